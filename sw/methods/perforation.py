"""PerforatedCNNs (Figurnov et al., NIPS 2016): compute a subset of positions, copy the rest.

A perforation mask is per ``(y, x)`` and shared by all channels (semantics.md section 2);
perforated positions become COPY positions whose value is that of their nearest computed
neighbour (:func:`nn_table`). Masks of rate ``r`` (share of perforated positions):

* :func:`uniform_mask`: ``r`` of the positions chosen uniformly at random (seeded);
* :func:`grid_mask`: computed positions on a regular grid of rows x columns (like a larger
  stride), each axis keeping ``sqrt(1 - r)`` of its lines;
* :func:`pooling_mask`: perforate first the positions the next pooling layer uses least (the
  weight of a position is the number of pooling windows that contain it);
* :func:`impact_mask`: perforate first the positions of least impact ``G(y, x) = sum_c
  |dL/dV(c, y, x) * V(c, y, x)|`` (first-order Taylor, averaged over images), re-estimated on
  the already perforated network as the rate grows (:func:`impacts`).

:func:`optimize` is the paper's greedy multi-layer perforation: each step perforates further
the layer with the least cost ``(NLL_n - NLL_0) / (t_0 - t_n)`` (``t`` counted in MACs),
while top-1 stays within ``eps``; with a ``holdout`` (held-out images) it backs off along its
trajectory like the joint search.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..layer import COMPUTE, CONST, COPY, Layer
from .common import HeldOut, NetEval, validate_plan
from .executor import Executor, SerialExecutor

__all__ = ["uniform_mask", "grid_mask", "pooling_mask", "impact_mask", "nn_table", "apply",
           "perforated_of", "impacts", "optimize", "MASKS", "RATES"]

MASKS = ("uniform", "grid", "pooling", "impact")
#: Perforation rates the greedy search steps through.
RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _count(r: float, n: int) -> int:
    if not 0.0 <= r < 1.0:
        raise ValueError(f"perforation rate r = {r!r}: must be in [0, 1)")
    return min(n - 1, int(np.floor(r * n + 0.5)))


def _by_weight(weight: np.ndarray, r: float, seed: int = 0) -> np.ndarray:
    """Perforate the ``r`` share of positions of least weight (ties broken pseudo-randomly)."""
    ho, wo = weight.shape
    cnt = _count(r, ho * wo)
    tie = np.random.default_rng(seed).random(ho * wo)
    order = np.lexsort((tie, weight.ravel()))
    m = np.zeros(ho * wo, bool)
    m[order[:cnt]] = True
    return m.reshape(ho, wo)


def uniform_mask(ho: int, wo: int, r: float, seed: int = 0) -> np.ndarray:
    """``r`` of the positions, uniformly at random (seeded)."""
    return _by_weight(np.zeros((ho, wo)), r, seed)


def grid_mask(ho: int, wo: int, r: float) -> np.ndarray:
    """Computed positions on a regular grid keeping ``sqrt(1 - r)`` of rows and of columns."""
    keep = np.sqrt(1.0 - r)

    def lines(n):
        k = max(1, int(round(keep * n)))
        return np.unique(np.floor((np.arange(k) + 0.5) * n / k).astype(int))
    m = np.ones((ho, wo), bool)
    m[np.ix_(lines(ho), lines(wo))] = False
    return m


def pooling_mask(ho: int, wo: int, r: float, pool_k: int = 2, pool_s: int = 2,
                 seed: int = 0) -> np.ndarray:
    """Perforate the positions covered by the fewest windows of the next pooling layer."""
    weight = np.zeros((ho, wo))
    for y in range(0, ho - pool_k + 1, pool_s):
        for x in range(0, wo - pool_k + 1, pool_s):
            weight[y:y + pool_k, x:x + pool_k] += 1
    return _by_weight(weight, r, seed)


def impact_mask(impact: np.ndarray, r: float, perforated=None) -> np.ndarray:
    """Perforate the least-impact positions (already perforated ones first: weight 0)."""
    weight = np.asarray(impact, np.float64).copy()
    if perforated is not None:
        weight[np.asarray(perforated, bool)] = -1.0
    return _by_weight(weight, r)


def nn_table(perforated: np.ndarray) -> np.ndarray:
    """``(Ho, Wo, 2)``: each position's nearest computed position (itself when computed).

    Euclidean distance; ties go to the smallest ``(ny, nx)``.
    """
    perforated = np.asarray(perforated, bool)
    ho, wo = perforated.shape
    cand = np.argwhere(~perforated)
    if cand.size == 0:
        raise ValueError("perforation mask covers every position: nothing to copy from")
    yy, xx = np.mgrid[0:ho, 0:wo]
    d = (yy[..., None] - cand[:, 0]) ** 2 + (xx[..., None] - cand[:, 1]) ** 2
    return cand[np.argmin(d, axis=-1)].astype(np.int64)


def perforated_of(layer: Layer) -> np.ndarray:
    """The layer's perforation mask ``(Ho, Wo)`` (positions with COPY in some channel)."""
    if layer.kind is None:
        return np.zeros(layer.out_hw, bool)
    return (np.asarray(layer.kind) == COPY).any(axis=0)


def apply(layer: Layer, perforated: np.ndarray) -> Layer:
    """``layer`` with the positions of ``perforated`` (Ho, Wo) as COPY of their NN target.

    CONST positions (VELCRO) stay CONST. A layer with zero prediction is refused.
    """
    if layer.p:
        raise ValueError(f"layer {layer.name!r} uses zero prediction (p = {layer.p}): "
                         "it cannot be perforated as well")
    perforated = np.asarray(perforated, bool)
    if perforated.shape != layer.out_hw:
        raise ValueError(f"perforation mask shape {perforated.shape}: must be {layer.out_hw}")
    cout, ho, wo = layer.out_shape
    kind = np.zeros((cout, ho, wo), np.int64) if layer.kind is None else np.asarray(layer.kind).copy()
    kind[(kind == COPY)] = COMPUTE                 # a new mask replaces the old one
    kind[:, perforated] = np.where(kind[:, perforated] == CONST, CONST, COPY)
    if not perforated.any():
        return dataclasses.replace(layer, kind=kind if (kind != COMPUTE).any() else None,
                                   nn=None)
    const = (np.zeros((cout, ho, wo), np.int64) if layer.const is None
             else np.asarray(layer.const))
    return dataclasses.replace(layer, kind=kind, const=const, nn=nn_table(perforated))


# -- impact estimation on the float model -----------------------------------------------------

def _conv_modules(model, layers):
    """The float model's Conv2d module of each engine layer (matched in order by shape)."""
    import torch.nn as nn
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    out, j = [], 0
    for L in layers:
        while j < len(convs) and (tuple(convs[j].weight.shape) != tuple(L.w.shape)
                                  or convs[j].stride[0] != L.stride
                                  or convs[j].padding[0] != L.pad):
            j += 1
        if j == len(convs):
            raise ValueError(f"no Conv2d of the float model matches engine layer {L.name!r}")
        out.append(convs[j])
        j += 1
    return out


def impacts(model, layers, x, y, perforated: dict | None = None, batch: int = 250) -> list:
    """``G(y, x)`` per engine layer: sum over channels of ``|dNLL/dV * V|``, image mean.

    ``model`` is the float network the engine layers were exported from; ``perforated`` maps
    layer index to the current mask, applied (nearest-neighbour copies) in the forward pass,
    so perforated positions get no gradient, hence zero impact.
    """
    import torch
    import torch.nn.functional as F

    perforated = perforated or {}
    mods = _conv_modules(model, layers)
    saved = {}
    hooks = []

    def make_hook(i):
        def hook(mod, inp, out):
            out.retain_grad()
            saved[i] = out
            if i in perforated and np.asarray(perforated[i]).any():
                nn = torch.as_tensor(nn_table(perforated[i]))
                return out[:, :, nn[..., 0], nn[..., 1]]
            return out
        return hook

    for i, m in enumerate(mods):
        hooks.append(m.register_forward_hook(make_hook(i)))
    G = [np.zeros(L.out_hw) for L in layers]
    model.eval()
    x = torch.as_tensor(x)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    try:
        for s in range(0, len(yt), batch):
            saved.clear()
            model.zero_grad()
            loss = F.cross_entropy(model(x[s:s + batch]), yt[s:s + batch], reduction="sum")
            loss.backward()
            for i, v in saved.items():
                G[i] += (v.grad * v).abs().sum(dim=1).sum(dim=0).detach().numpy()
    finally:
        for h in hooks:
            h.remove()
    return [g / len(yt) for g in G]


# -- greedy multi-layer perforation -----------------------------------------------------------

def _perf_task(ctx, plan):
    ev = ctx
    r = ev.run(plan)
    return ev.guarded_acc(r), r.nll, r.total["performed"]


def _pool_after(layer: Layer):
    pool = (layer.meta or {}).get("pool")
    if isinstance(pool, (list, tuple)) and len(pool) == 2:
        return int(pool[0]), int(pool[1])
    if isinstance(pool, dict):
        return int(pool.get("k", 2)), int(pool.get("s", pool.get("k", 2)))
    return 2, 2


def optimize(ev: NetEval, eps: float, *, mask: str = "impact", model=None, layers=None,
             rates=RATES, base_plan=None, executor: Executor | None = None,
             impact_images: int = 250, holdout: HeldOut | None = None,
             progress: bool = True) -> dict:
    """Greedy multi-layer perforation within ``eps`` top-1 drop; returns the plan.

    ``mask`` is one of :data:`MASKS`; ``impact`` needs the float ``model``. Layers of
    ``base_plan`` with zero prediction are left alone. ``eps`` bounds the guarded top-1 drop
    on ``ev``'s images (the search images, which rank the steps).

    ``holdout`` (:class:`~.common.HeldOut`, images other than ``ev``'s, never the test
    split): the base plan and every accepted step are checked there; the search stops once
    the held-out drop exceeds ``eps * stop`` of the holdout, and the result is the last step
    within its ``eps * margin`` (the base plan if none is); ``holdout.history`` holds the
    trajectory. Without it the last accepted step is returned.
    """
    from tqdm import tqdm

    if mask not in MASKS:
        raise ValueError(f"mask = {mask!r}: must be one of {', '.join(MASKS)}")
    if mask == "impact" and model is None:
        raise ValueError("mask = 'impact' needs the float model (model=...)")
    executor = executor or SerialExecutor()
    base_plan = dict(base_plan or {})
    idx = list(range(len(ev.layers))) if layers is None else list(layers)
    idx = [i for i in idx if not base_plan.get(i, ev.layers[i]).p]
    b0 = ev.run(base_plan)
    nll0, t0 = b0.nll, b0.total["performed"]
    level = {i: 0 for i in idx}                     # index into rates + 1 (0: not perforated)
    current = {i: np.zeros(ev.layers[i].out_hw, bool) for i in idx}
    plan = dict(base_plan)
    n_imp = min(impact_images, len(ev))

    def mask_for(i, r):
        ho, wo = ev.layers[i].out_hw
        if mask == "uniform":
            return uniform_mask(ho, wo, r, seed=i)
        if mask == "grid":
            return grid_mask(ho, wo, r)
        if mask == "pooling":
            return pooling_mask(ho, wo, r, *_pool_after(ev.layers[i]), seed=i)
        return impact_mask(G[i], r, current[i])

    trail = [plan]
    if holdout is not None:
        holdout.check(plan, "base")
    bar = tqdm(total=len(idx) * len(rates), desc=f"perforation {mask}", disable=not progress,
               leave=False)
    while True:
        if mask == "impact":     # re-estimated on the network perforated so far
            G = impacts(model, ev.layers, ev.x[:n_imp], ev.y[:n_imp],
                        {i: m for i, m in current.items() if m.any()})
        cands = []
        for i in idx:
            if level[i] >= len(rates):
                continue
            m = mask_for(i, rates[level[i]])
            cplan = dict(plan)
            cplan[i] = apply(base_plan.get(i, ev.layers[i]), m)
            cands.append((i, m, cplan))
        if not cands:
            break
        res = executor.map(_perf_task, ev, [c[2] for c in cands])
        best = None
        for (i, m, cplan), (acc, nll, t_n) in zip(cands, res):
            if ev.base.acc - acc > eps:
                continue
            cost = (nll - nll0) / max(t0 - t_n, 1)
            if best is None or cost < best[0]:
                best = (cost, i, m, cplan)
        if best is None:
            break
        _, i, m, plan = best
        current[i] = m
        level[i] += 1
        trail.append(plan)
        bar.update(1)
        if holdout is not None:
            drop = holdout.check(plan, f"layer {i} rate {rates[level[i] - 1]}")
            bar.set_postfix(val_drop=f"{drop:.3f}")
            if holdout.exceeded(drop):
                break
    bar.close()
    plan = trail[holdout.chosen() or 0] if holdout is not None else trail[-1]
    validate_plan(plan, ev.layers, ev.g)
    return plan
