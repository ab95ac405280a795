"""The ``skipconv`` command line.

Each subcommand lives in a module named ``cmd_<name>.py`` in one of the four subpackages
(``skipconv.sw``, ``skipconv.hw``, ``skipconv.sim``, ``skipconv.boards``) and defines:

* ``HELP``: a one-line summary;
* ``add_arguments(parser)``: its options;
* ``run(args) -> int``: the work (import heavy modules inside it so ``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

__all__ = ["main", "build_parser", "discover"]

_PACKAGES = ("skipconv.sw", "skipconv.hw", "skipconv.sim", "skipconv.boards")


def discover(prefix: str) -> dict:
    """Map ``name`` to the module path of every ``<prefix><name>.py`` in skipconv's packages."""
    found = {}
    for pkg_name in _PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith(prefix):
                found[info.name[len(prefix):]] = f"{pkg_name}.{info.name}"
    return dict(sorted(found.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skipconv",
        description="Generate, simulate and drive conv2d+ReLU engines that skip work.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod_name in discover("cmd_").items():
        mod = importlib.import_module(mod_name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
