"""Random valid layers with any mix of skip mechanisms, for tests and benchmarks.

Values are drawn so that every mechanism actually fires: post-ReLU-like inputs with many
zeros, weights of both signs, a bias and requantization that put outputs across the whole
output range, CONST and COPY positions, leader masks and early-termination parameters that
stop some positions and not others.
"""

from __future__ import annotations

import numpy as np

from .layer import COMPUTE, CONST, COPY, Layer

__all__ = ["random_layer", "random_input", "diagonal_leaders", "nearest_neighbours",
           "exact_et_params", "requant_for"]


def diagonal_leaders(cout: int, ho: int, wo: int, p: int) -> np.ndarray:
    """The seed paper's default: the main diagonal of every p x p window is the leader set."""
    y = np.arange(ho)[:, None] % p
    x = np.arange(wo)[None, :] % p
    return np.broadcast_to(y == x, (cout, ho, wo)).copy()


def nearest_neighbours(perforated: np.ndarray) -> np.ndarray:
    """The (Ho, Wo, 2) NN table: each position's nearest computed (not perforated) position.

    Distance is Euclidean; ties go to the smallest (ny, nx). Computed positions point at
    themselves.
    """
    ho, wo = perforated.shape
    cand = np.argwhere(~perforated)
    if cand.size == 0:
        raise ValueError("perforation mask covers every position: nothing to copy from")
    yy, xx = np.mgrid[0:ho, 0:wo]
    d = (yy[..., None] - cand[:, 0]) ** 2 + (xx[..., None] - cand[:, 1]) ** 2
    return cand[np.argmin(d, axis=-1)].astype(np.int64)


def exact_et_params(w: np.ndarray, rng=None):
    """Positive-weights-first tap order and ``neg_start`` per channel (SnaPEA exact mode).

    Within the positive and the non-positive group the order is shuffled by ``rng`` (or kept
    in tap order when ``rng`` is None): any order inside a group is valid.
    """
    cout = w.shape[0]
    wf = w.reshape(cout, -1)
    t = wf.shape[1]
    order = np.empty((cout, t), np.int64)
    neg_start = np.empty(cout, np.int64)
    for c in range(cout):
        pos = np.nonzero(wf[c] > 0)[0]
        rest = np.nonzero(wf[c] <= 0)[0]
        if rng is not None:
            pos, rest = rng.permutation(pos), rng.permutation(rest)
        order[c] = np.concatenate([pos, rest])
        neg_start[c] = len(pos)
    return order, neg_start


def requant_for(typical_acc: float, out_bits: int, cout: int, rng=None):
    """``M, sh`` per channel mapping a typical accumulator to about half the output range."""
    scale = ((1 << out_bits) - 1) / max(typical_acc, 1.0)
    sh = np.full(cout, 20, np.int64)
    m = np.round(scale * (1 << 20) * (rng.uniform(0.5, 2.0, cout) if rng is not None else 1))
    while (m > 65535).any():
        over = m > 65535
        sh[over] -= 1
        m[over] = np.round(m[over] / 2)
    return np.clip(m, 1, 65535).astype(np.int64), np.clip(sh, 0, 47)


def random_input(rng, shape, act_bits=8, signed=False, zero_frac=0.4):
    if signed:
        lim = 1 << (act_bits - 1)
        x = rng.integers(-lim, lim, size=shape)
    else:
        x = rng.integers(0, 1 << act_bits, size=shape)
    x[rng.random(shape) < zero_frac] = 0
    return x.astype(np.int64)


def random_layer(rng, *, cin=3, cout=4, h=8, w=8, k=3, stride=1, pad=1, act_bits=8,
                 weight_bits=8, out_bits=8, act_signed=False, raw=False, features=(),
                 et="exact", p=2, g=1, const_frac=0.1, perf_frac=0.3,
                 leaders="diagonal") -> Layer:
    """Return a random valid layer using ``features`` (names of config.FEATURES).

    ``et`` picks the early-termination mode when ``early_term`` is in ``features`` (exact
    falls back to predictive on a signed input). ``leaders`` is "diagonal" or "random".
    """
    features = set(features)
    if {"zero_pred", "perforation"} <= features:
        raise ValueError("zero_pred and perforation cannot be combined in one layer")
    wlim = 1 << (weight_bits - 1)
    wt = rng.integers(-wlim, wlim, size=(cout, cin, k, k))
    wt[rng.random(wt.shape) < 0.2] = 0
    t = cin * k * k
    amax = (1 << (act_bits - 1)) if act_signed else (1 << act_bits) - 1
    typical = np.sqrt(t) * amax * wlim / 4
    b = np.round(rng.normal(0, typical / 2, cout)).astype(np.int64)
    b = np.clip(b, -(1 << 31), (1 << 31) - 1)
    M, sh = requant_for(typical, out_bits, cout, rng)
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    layer = Layer(in_shape=(cin, h, w), w=wt, b=b, stride=stride, pad=pad,
                  M=None if raw else M, sh=None if raw else sh, out_bits=out_bits,
                  act_bits=act_bits, weight_bits=weight_bits, act_signed=act_signed, raw=raw,
                  name="random")

    kind = np.full((cout, ho, wo), COMPUTE, np.int64)
    const = np.zeros((cout, ho, wo), np.int64)
    out_max = (1 << 31) - 1 if raw else (1 << out_bits) - 1
    if "perforation" in features:
        perforated = rng.random((ho, wo)) < perf_frac
        if perforated.all():
            perforated[0, 0] = False
        kind[:, perforated] = COPY
        layer.nn = nearest_neighbours(perforated)
    if "velcro" in features:
        velcro = rng.random((cout, ho, wo)) < const_frac
        kind[velcro] = CONST
        const[velcro] = rng.integers(0, min(out_max, 255) + 1, size=int(velcro.sum()))
    if features & {"perforation", "velcro"}:
        layer.kind, layer.const = kind, const
    if "zero_pred" in features:
        layer.p = p
        if leaders == "diagonal":
            layer.leader = diagonal_leaders(cout, ho, wo, p)
        else:
            layer.leader = rng.random((cout, ho, wo)) < 0.4
    if "early_term" in features:
        mode = "predictive" if (et == "predictive" or act_signed) else "exact"
        layer.et = mode
        if act_signed:
            order = np.stack([rng.permutation(t) for _ in range(cout)])
            neg_start = np.full(cout, t, np.int64)
        else:
            order, neg_start = exact_et_params(wt, rng)
        if mode == "predictive":
            # Speculate on the largest-magnitude taps first, as SnaPEA does.
            spec = (rng.integers(0, t // g + 1, size=cout) * g).astype(np.int64)
            for c in range(cout):
                flat = wt[c].reshape(-1)
                head = np.argsort(-np.abs(flat), kind="stable")[:spec[c]]
                rest = [i for i in order[c] if i not in set(head.tolist())]
                if not act_signed:
                    # After the speculative head: remaining positives first, then the rest.
                    rest = [i for i in rest if flat[i] > 0] + [i for i in rest if flat[i] <= 0]
                order[c] = np.concatenate([head, rest]).astype(np.int64)
                if not act_signed:
                    positive = np.nonzero(flat[order[c]] > 0)[0]
                    neg_start[c] = positive[-1] + 1 if positive.size else 0
            layer.spec = spec
            layer.th = np.round(rng.normal(0, typical / 4, cout)).astype(np.int64)
        layer.order, layer.neg_start = order, neg_start
    layer.validate(g=g)
    return layer
