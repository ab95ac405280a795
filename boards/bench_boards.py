"""``skipconv bench boards``: silicon cost and Fmax of the engine on the open boards.

For the ULX3S (ECP5-85F) at each ``--lanes`` and for the iCEBreaker preset, builds the
all-features engine and the dense baseline of the same size with yosys + nextpnr and reports
Fmax (per seed), LUTs, FFs, DSPs, block RAMs and ``lut_overhead`` = LUTs(all features) /
LUTs(dense) - 1. Builds are cached by config, board, clock, seed and gateware sources, so a
rerun only builds what changed. Each build takes minutes on a 2-core machine.
"""

from __future__ import annotations

HELP = "ULX3S / iCEBreaker builds: Fmax, LUT overhead of the skip features, DSPs, BRAMs"


def add_arguments(parser) -> None:
    parser.add_argument("--boards", default="ulx3s,icebreaker",
                        help="comma-separated: ulx3s, icebreaker")
    parser.add_argument("--lanes", default="8", help="ULX3S lane counts, comma-separated")
    parser.add_argument("--seeds", default="1", help="nextpnr seeds, comma-separated")
    parser.add_argument("--ulx3s-mhz", type=float, default=125.0,
                        help="ULX3S clock target (the goal: 125)")
    parser.add_argument("--icebreaker-mhz", type=float, default=24.0,
                        help="iCEBreaker clock target")
    parser.add_argument("--memories", default=None, metavar="K=V,...",
                        help="EngineConfig overrides for the ULX3S runs, e.g. "
                             "max_cout=16,max_taps=576 (the default preset's buffers need "
                             "more block RAM than the 85F has at 8 lanes)")
    parser.add_argument("--no-dense", action="store_true",
                        help="skip the dense baselines (no lut_overhead)")
    parser.add_argument("--map-at-clock", action="store_true",
                        help="give yosys' ABC9 the clock period as its delay target instead "
                             "of the shortest delay: steadier, smaller LUT counts for "
                             "lut_overhead (both designs mapped alike)")
    from .build import ROUTERS

    parser.add_argument("--router", default=ROUTERS[0], choices=ROUTERS,
                        help="nextpnr router (router2 routes designs of 4+ lanes that router1 "
                             "leaves congested)")
    parser.add_argument("--pack-only", action="store_true",
                        help="stop nextpnr after packing: LUTs, FFs, DSPs, block RAMs and "
                             "lut_overhead in minutes, no Fmax")


def _resources(r) -> dict:
    """``luts``, ``ffs``, ``dsps``, ``brams`` used and available, those the report has."""
    out = {}
    for k in ("luts", "ffs", "dsps", "brams"):
        if k in r:
            out[k] = r[k]["used"]
            out[f"{k}_available"] = r[k]["available"]
    return out


def _summary(reports):
    from .build import engine_fmax
    packed = [r for r in reports if r.get("status") == "packed"]
    if packed:
        r = packed[0]
        return {"status": "packed", **_resources(r), "build_s": r.get("seconds")}
    ok = [r for r in reports if r.get("status") == "ok"]
    if not ok:
        # Did not fit: the utilization nextpnr found before giving up still tells why.
        r = reports[0]
        return {"status": "failed", "error": r.get("error"), **_resources(r)}
    r = ok[0]
    fmax = [engine_fmax(x) for x in ok]
    out = {"status": "ok", "fmax_mhz": min(fmax), "fmax_mhz_seeds": fmax,
           "fmax_mhz_max": max(fmax), "seeds": [x["seed"] for x in ok], **_resources(r),
           "build_s": r.get("seconds")}
    failed = {str(x["seed"]): x.get("error") for x in reports if x.get("status") != "ok"}
    if failed:
        # e.g. router2 diverged on that seed's placement: Fmax is over the seeds that routed
        out["seeds_failed"] = failed
    if r.get("critical_path"):
        out["critical_path"] = {k: r["critical_path"][k] for k in ("from", "to")}
    return out


def run(args) -> dict:
    import sys

    from tqdm import tqdm

    from ..sw.config import PRESETS
    from .build import cached_build

    boards = [b.strip() for b in args.boards.split(",") if b.strip()]
    lanes = [int(v) for v in args.lanes.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    jobs = []
    if "ulx3s" in boards:
        for n in lanes:
            over = dict(kv.split("=") for kv in args.memories.split(",")) if args.memories else {}
            base = PRESETS["default"].replace(lanes=n, **{k: int(v) for k, v in over.items()})
            jobs.append(("ulx3s", f"lanes_{n}", "all", base, args.ulx3s_mhz))
            if not args.no_dense:
                jobs.append(("ulx3s", f"lanes_{n}", "dense", base.replace(features=frozenset()),
                             args.ulx3s_mhz))
    if "icebreaker" in boards:
        base = PRESETS["icebreaker"]
        jobs.append(("icebreaker", f"lanes_{base.lanes}", "all", base, args.icebreaker_mhz))
        if not args.no_dense:
            jobs.append(("icebreaker", f"lanes_{base.lanes}", "dense",
                         base.replace(features=frozenset()), args.icebreaker_mhz))
    result = {}
    with tqdm(total=len(jobs) * len(seeds), desc="board builds", file=sys.stderr) as bar:
        for board, size, variant, config, mhz in jobs:
            reports = []
            for seed in seeds:
                bar.set_postfix_str(f"{board} {size} {variant} seed {seed}")
                reports.append(cached_build(board, config, mhz, seed,
                                             lambda s: tqdm.write(s, file=sys.stderr),
                                             pack_only=args.pack_only,
                                             map_at_clock=args.map_at_clock,
                                             router=args.router))
                bar.update()
            entry = result.setdefault(board, {}).setdefault(size, {})
            entry[variant] = _summary(reports)
            entry[variant]["config_key"] = config.key
            entry["clock_target_mhz"] = mhz
            entry["map_at_clock"] = args.map_at_clock
    for board, sizes in result.items():
        for size, entry in sizes.items():
            a, d = entry.get("all", {}), entry.get("dense", {})
            if a.get("luts") and d.get("luts"):
                # Synthesis counts: valid even when a design did not fit the device.
                entry["lut_overhead"] = round(a["luts"] / d["luts"] - 1, 4)
            if a.get("status") == "ok":
                entry["fmax_mhz"] = a["fmax_mhz"]
    if "ulx3s" in result:
        done = "packed" if args.pack_only else "ok"
        fits = [int(s.split("_")[1]) for s, e in result["ulx3s"].items()
                if e.get("all", {}).get("status") == done]
        key = "largest_lanes_packed" if args.pack_only else "largest_lanes_built"
        result["ulx3s"][key] = max(fits) if fits else None
    return result
