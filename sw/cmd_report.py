"""``skipconv report DIR``: markdown + CSV tables and PNG plots of the method runs in DIR."""

from __future__ import annotations

HELP = "write report.md, report.csv and PNG plots for the optimize runs found under DIR"


def add_arguments(parser):
    parser.add_argument("dir", metavar="DIR", help="folder holding one or more optimize runs")


def run(args) -> int:
    import sys

    from .report import write_report

    try:
        files = write_report(args.dir)
    except FileNotFoundError as e:
        print(f"skipconv report: {e}", file=sys.stderr)
        return 2
    for name, path in files.items():
        print(f"{name:20s} {path}")
    return 0
