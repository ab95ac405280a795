"""``skipconv bench TARGET``: run a benchmark and print its figures (JSON with ``--json``).

A target is a module ``bench_<target>.py`` in one of skipconv's subpackages that defines
``HELP``, ``add_arguments(parser)`` and ``run(args) -> dict``.
"""

from __future__ import annotations

import importlib
import json

from .cli import discover

HELP = "run a benchmark (golden, engine, offload, methods, boards) and print its figures"


def targets() -> dict:
    """Benchmark name -> module path, for every ``bench_<name>.py``."""
    return discover("bench_")


def add_arguments(parser):
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, mod_name in targets().items():
        mod = importlib.import_module(mod_name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        mod.add_arguments(p)
        p.set_defaults(_bench=mod.run)


def run(args) -> int:
    figures = args._bench(args)
    if args.json:
        print(json.dumps(figures, indent=2, sort_keys=True))
    else:
        width = max((len(k) for k in figures), default=0)
        for key, value in figures.items():
            print(f"{key:<{width}}  {value}")
    return 0
