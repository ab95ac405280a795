"""``skipconv generate [config options | --config FILE] -o DIR``: the engine's Verilog."""

from __future__ import annotations

import sys

HELP = "write the engine's Verilog (skipconv_engine.v) and its config.json for a configuration"


def add_arguments(parser):
    from .config_args import add_config_arguments
    add_config_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="output folder (created if missing)")


def run(args) -> int:
    from ..sw.config import ConfigError
    from .config_args import config_from_args
    from .generate import write_verilog
    try:
        config = config_from_args(args)
    except (ConfigError, OSError, ValueError) as e:
        print(f"skipconv generate: {e}", file=sys.stderr)
        return 2
    path = write_verilog(config, args.output)
    print(f"wrote {path} and {path.parent / 'config.json'} (config key {config.key})")
    return 0
