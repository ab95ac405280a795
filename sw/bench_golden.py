"""``skipconv bench golden``: golden-model speed against ``torch.nn.functional.conv2d``.

On ResNet-18's 3x3 layer shapes at 56x56, 28x28, 14x14 and 7x7 (batch 1), the golden model's
time for the dense layer and for the layer with every mechanism on (exact early termination,
2x2 diagonal zero prediction, 10% CONST positions; perforation instead of zero prediction is
timed too, since a layer cannot combine the two) is divided by PyTorch's float32 conv2d time
on the same data. Each figure is the best of several repetitions, single-threaded.
"""

from __future__ import annotations

import time

HELP = "golden-model time relative to torch conv2d on ResNet-18 3x3 layer shapes"

SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))   # (channels, H=W), 3x3, stride 1, pad 1


def add_arguments(parser):
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; best is kept")
    parser.add_argument("--seed", type=int, default=0)


def _best(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(args) -> dict:
    import dataclasses

    import numpy as np
    import torch
    from tqdm import tqdm

    from . import golden, randlayer

    from threadpoolctl import threadpool_limits

    # Both sides on one thread: torch's intra-op pool and NumPy's BLAS (OpenBLAS would
    # otherwise use every core for the golden model's products).
    torch.set_num_threads(1)
    blas = threadpool_limits(1)
    rng = np.random.default_rng(args.seed)
    t_torch = t_dense = t_all = t_perf = 0.0
    per_layer = []
    for ch, hw in tqdm(SHAPES, desc="bench golden", unit="layer"):
        layer = randlayer.random_layer(rng, cin=ch, cout=ch, h=hw, w=hw, k=3, pad=1,
                                       features=("early_term", "zero_pred", "velcro"), p=2)
        perf = randlayer.random_layer(rng, cin=ch, cout=ch, h=hw, w=hw, k=3, pad=1,
                                      features=("early_term", "perforation", "velcro"))
        dense = dataclasses.replace(layer, kind=None, const=None, p=0, leader=None, et="off",
                                    order=None, neg_start=None, spec=None, th=None)
        x = randlayer.random_input(rng, layer.in_shape)
        xt = torch.from_numpy(x.astype(np.float32))[None]
        wt = torch.from_numpy(layer.w.astype(np.float32))
        bt = torch.from_numpy(layer.b.astype(np.float32))
        tt = _best(lambda: torch.nn.functional.conv2d(xt, wt, bt, padding=1), args.repeat)
        td = _best(lambda: golden.run(dense, x), args.repeat)
        ta = _best(lambda: golden.run(layer, x), args.repeat)
        tp = _best(lambda: golden.run(perf, x), args.repeat)
        t_torch, t_dense, t_all, t_perf = t_torch + tt, t_dense + td, t_all + ta, t_perf + tp
        per_layer.append({"shape": f"{ch}x{hw}x{hw}", "torch_ms": round(tt * 1e3, 3),
                          "dense_ms": round(td * 1e3, 3), "all_features_ms": round(ta * 1e3, 3),
                          "perforation_variant_ms": round(tp * 1e3, 3)})
    blas.unregister()
    return {
        "dense_vs_torch": round(t_dense / t_torch, 2),
        "all_features_vs_torch": round(t_all / t_torch, 2),
        "all_features_perforation_vs_torch": round(t_perf / t_torch, 2),
        "torch_ms_total": round(t_torch * 1e3, 3),
        "layers": per_layer,
        "threads": 1,
    }
