"""``skipconv bench hw``: cycle figures of the gateware in the Amaranth simulator.

A cross-check of the architecture independent of Verilator (the official figures come from
``skipconv bench engine``): random layers of the MNIST conv1 shape (Cin 1, 5x5, Cout 6, 28x28)
and a small 3x3 shape, each run on the dense baseline engine (layer without its plan) and on
the skip engine (diagonal 2x2 zero prediction, exact early termination, ~10% VELCRO). Outputs
are checked against the golden model. Slow: pure-Python simulation (minutes).
"""

from __future__ import annotations

HELP = "engine cycle figures in the Amaranth simulator (dense utilization, skip efficiency)"

SHAPES = {"mnist_conv1": (1, 28, 6, 5, 0), "conv3x3_8x8": (8, 8, 8, 3, 1)}


def add_arguments(parser):
    parser.add_argument("--lanes", type=int, default=8, help="engine lanes (default 8)")
    parser.add_argument("-g", type=int, default=1, help="MACs per PE per cycle (default 1)")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> dict:
    import dataclasses

    import numpy as np
    from tqdm import tqdm

    from ..sw import golden
    from ..sw import protocol as P
    from ..sw.config import FEATURES, EngineConfig
    from ..sw.randlayer import random_input, random_layer
    from .amaranth_sim import run_messages

    out = {"lanes": args.lanes, "g": args.g, "simulator": "amaranth", "layers": {}}
    tot = {"dense": 0, "performed": 0, "dense_cycles": 0, "skip_cycles": 0}
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for name in tqdm(shapes, desc="layers"):
        cin, h, cout, k, pad = SHAPES[name]
        rng = np.random.default_rng(args.seed)
        skip_layer = random_layer(rng, cin=cin, cout=cout, h=h, w=h, k=k, pad=pad, g=args.g,
                                  features=["zero_pred", "early_term", "velcro"],
                                  et="exact", p=2, const_frac=0.1)
        x = random_input(rng, skip_layer.in_shape)
        dense_layer = dataclasses.replace(skip_layer, kind=None, const=None, nn=None, p=0,
                                          leader=None, et="off", order=None, neg_start=None,
                                          spec=None, th=None)
        limits = dict(lanes=args.lanes, g=args.g, max_taps=cin * k * k, max_ifmap=cin * h * h,
                      max_cout=cout, max_ofmap=cout * h * h, max_k=k, max_p=2, trace=False)
        row = {}
        for tag, layer, feats in (("dense", dense_layer, frozenset()),
                                  ("skip", skip_layer, frozenset(FEATURES))):
            cfg = EngineConfig(**limits, features=feats)
            res = run_messages(cfg, P.encode_commands(layer, x, cfg), max_cycles=10 ** 7)
            gold = golden.run(layer, x, args.g)
            counters = P.decode_counters(res[-1])
            exact = bool((P.decode_ofmap(res[-2], layer) == gold.out).all()
                         and all(counters[k2] == v for k2, v in gold.accounting().items()))
            row[tag] = {"cycles": counters["cycles"], "dense": gold.dense,
                        "performed": gold.performed, "bit_exact": exact}
        d, s = row["dense"], row["skip"]
        row["dense_utilization"] = d["dense"] / (d["cycles"] * args.lanes * args.g)
        row["skip_efficiency"] = ((d["cycles"] / s["cycles"]) / (s["dense"] / s["performed"]))
        out["layers"][name] = row
        tot["dense"] += s["dense"]
        tot["performed"] += s["performed"]
        tot["dense_cycles"] += d["cycles"]
        tot["skip_cycles"] += s["cycles"]
    out["dense_utilization"] = tot["dense"] / (tot["dense_cycles"] * args.lanes * args.g)
    out["skip_efficiency"] = ((tot["dense_cycles"] / tot["skip_cycles"])
                              / (tot["dense"] / tot["performed"]))
    out["bit_exact"] = all(r[t]["bit_exact"] for r in out["layers"].values()
                           for t in ("dense", "skip"))
    return out
