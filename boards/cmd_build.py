"""``skipconv build``: a bitstream for an open board, or a Vitis RTL kernel for an Alveo card."""

from __future__ import annotations

HELP = ("build the engine for a board: ULX3S / iCEBreaker bitstream with yosys + nextpnr "
        "(report.json), or an Alveo RTL kernel (Verilog, kernel.xml, package_xo Tcl, v++ link)")

BOARD_CHOICES = ("ulx3s", "icebreaker", "alveo-u280", "alveo-u250", "alveo-u55c")


def add_arguments(parser) -> None:
    from ..hw.config_args import add_config_arguments

    parser.add_argument("--board", required=True, choices=BOARD_CHOICES)
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--clock-mhz", type=float, default=None,
                        help="engine clock from the PLL (default: ulx3s 35, icebreaker 24); "
                             "the build fails when nextpnr's Fmax is below it")
    parser.add_argument("--baud", type=int, default=115200, help="UART line rate")
    parser.add_argument("--seed", type=int, default=1, help="nextpnr placement seed")
    from .build import ROUTERS

    parser.add_argument("--router", default=ROUTERS[0], choices=ROUTERS,
                        help="nextpnr router (router2 routes ULX3S designs of 4+ lanes that "
                             "router1 leaves congested)")
    parser.add_argument("--no-timing-check", action="store_true",
                        help="write the bitstream even when Fmax is below --clock-mhz")
    parser.add_argument("--program", action="store_true",
                        help="load the bitstream with openFPGALoader (open boards only)")
    add_config_arguments(parser)


def run(args) -> int:
    import json
    import sys

    from ..hw.config_args import config_from_args
    from ..sw.config import ConfigError

    try:
        if args.board == "icebreaker" and not any(
                getattr(args, k, None) is not None for k in ("config", "preset")):
            args.preset = "icebreaker"
        config = config_from_args(args)
    except (ConfigError, OSError, ValueError) as e:
        print(f"skipconv build: {e}", file=sys.stderr)
        return 2
    if args.board.startswith("alveo-"):
        from .alveo import write_kernel
        if args.program:
            print("skipconv build: --program is for the open boards; an Alveo kernel is "
                  "loaded by XRT (see docs/boards.md)", file=sys.stderr)
            return 2
        info = write_kernel(args.board, config, args.out)
        print(json.dumps({k: info[k] for k in ("card", "platform", "kernel", "files", "link")},
                         indent=2))
        print(f"next: on a machine with Vivado and Vitis, run {args.out}/build.sh",
              file=sys.stderr)
        return 0

    from .build import BuildError, build_board, program_board
    try:
        report = build_board(args.board, config, args.out, clock_mhz=args.clock_mhz,
                             baud=args.baud, seed=args.seed, router=args.router,
                             check_timing=not args.no_timing_check,
                             log=lambda s: print(s, file=sys.stderr))
    except (BuildError, ValueError) as e:
        print(f"skipconv build: {e}", file=sys.stderr)
        return 1
    summary = {k: report[k] for k in ("board", "luts", "ffs", "dsps", "brams", "fmax",
                                      "bitstream")}
    print(json.dumps(summary, indent=2))
    if args.program:
        try:
            program_board(args.board, report["bitstream"])
        except BuildError as e:
            print(f"skipconv build: {e}", file=sys.stderr)
            return 1
    return 0
