"""VELCRO (Gabbay & Shomron, Mathematics 2021): replace low-variance activations by averages.

Algorithm 1, on the integer network:

* preprocessing (:func:`moments`): inference on a small preprocessing subset of a specialized
  task; running sums ``S`` and ``Q`` of every engine layer's output element, the mean tensor
  ``B = S / N`` and the variance tensor ``V = Q / N - B**2`` (steps 1-5);
* compression (:func:`apply`): for layer ``k`` and threshold ``T_k`` (a fraction), the
  elements whose variance is within the lowest ``T_k`` percentile become CONST positions
  holding their average, rounded and clipped to the output domain (step 6);
* the compression-saving ratio ``C`` (:func:`compression_saving_ratio`), the paper's formula
  ``C = 1 - compressed / original computations = sum_k T_k c_k w_k h_k m_k /
  sum_k c_k w_k h_k m_k``. The paper writes the per-element cost ``m_k`` out of the formula
  (it counts output elements); we keep it (``m_k = |T|``, MACs per output element of layer
  ``k``) so that ``C`` is a share of MACs and equals what the golden model skips;
* the search (:func:`optimize`): the threshold tuple that maximizes ``C`` with no top-1 loss
  (``eps = 0``) on held-out images of the task, greedy in steps of ``step``; the first layer
  is left untouched by default, as in the paper.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..layer import CONST, Layer
from .common import NetEval, validate_plan
from .executor import Executor, SerialExecutor

__all__ = ["moments", "apply", "realized_thresholds", "compression_saving_ratio", "optimize",
           "variance_tensors"]


def moments(outputs_batches) -> list:
    """Steps 2-5: per layer ``(B, V)`` from running sums over every image of every batch.

    ``outputs_batches`` yields, per batch, a list with one ``(N, C, H, W)`` array per layer.
    """
    S = Q = None
    n = 0
    for outs in outputs_batches:
        if S is None:
            S = [np.zeros(o.shape[1:], np.float64) for o in outs]
            Q = [np.zeros(o.shape[1:], np.float64) for o in outs]
        for k, o in enumerate(outs):
            o = np.asarray(o, np.float64)
            S[k] += o.sum(axis=0)
            Q[k] += (o * o).sum(axis=0)
        n += len(outs[0])
    if not n:
        raise ValueError("moments(): no preprocessing images")
    B = [s / n for s in S]
    V = [np.maximum(q / n - b * b, 0.0) for q, b in zip(Q, B)]
    return list(zip(B, V))


def variance_tensors(ev: NetEval, batch: int = 250) -> list:
    """``(B, V)`` per engine layer of the dense network on ``ev``'s images."""
    def batches():
        for s in range(0, len(ev), batch):
            _, _, outs = ev.subset(np.arange(s, min(s + batch, len(ev)))).run({}, capture=True)
            yield outs
    return moments(batches())


def _count(T: float, n: int) -> int:
    if not 0.0 <= T < 1.0:
        raise ValueError(f"VELCRO threshold T = {T!r}: must be in [0, 1)")
    return int(np.floor(T * n + 0.5))


def apply(layer: Layer, B: np.ndarray, V: np.ndarray, T: float) -> Layer:
    """Step 6: the lowest-variance ``T`` share of ``layer``'s outputs become CONST averages.

    Existing CONST positions stay; perforated (COPY) positions that are selected become CONST
    (semantics.md: both masks -> CONST). Ties in variance go to the lower flat index.
    """
    shape = layer.out_shape
    if B.shape != shape or V.shape != shape:
        raise ValueError(f"B/V shape {B.shape}: must be the layer's output shape {shape}")
    n = int(np.prod(shape))
    cnt = _count(T, n)
    if cnt == 0:
        return layer
    sel = np.zeros(n, bool)
    sel[np.argsort(V.ravel(), kind="stable")[:cnt]] = True
    sel = sel.reshape(shape)
    kind = np.zeros(shape, np.int64) if layer.kind is None else np.asarray(layer.kind).copy()
    const = np.zeros(shape, np.int64) if layer.const is None else np.asarray(layer.const).copy()
    kind[sel] = CONST
    const[sel] = np.clip(np.floor(B[sel] + 0.5), 0, layer.out_max).astype(np.int64)
    return dataclasses.replace(layer, kind=kind, const=const)


def realized_thresholds(T, layers) -> list:
    """The share of each layer's elements :func:`apply` really replaces (count / elements)."""
    out = []
    for t, L in zip(T, layers):
        n = int(np.prod(L.out_shape))
        out.append(_count(float(t), n) / n)
    return out


def compression_saving_ratio(T, layers, *, per_element_macs: bool = True) -> float:
    """The paper's ``C`` for threshold tuple ``T`` over ``layers`` (realized thresholds).

    With ``per_element_macs=False`` it is the printed formula (every output element costs
    the same); by default each layer's elements weigh ``|T|`` MACs.
    """
    Tr = realized_thresholds(T, layers)
    num = den = 0.0
    for t, L in zip(Tr, layers):
        c, h, w = L.out_shape
        m = L.taps if per_element_macs else 1
        num += t * c * w * h * m
        den += c * w * h * m
    return num / den if den else 0.0


def _velcro_task(ctx, T):
    ev, base_plan, bv = ctx
    plan = _plan(ev, base_plan, bv, T)
    r = ev.run(plan)
    return ev.guarded_acc(r), r.nll


def _plan(ev, base_plan, bv, T) -> dict:
    plan = dict(base_plan)
    for k, t in enumerate(T):
        if t > 0:
            L = plan.get(k, ev.layers[k])
            plan[k] = apply(L, bv[k][0], bv[k][1], t)
    return plan


def optimize(ev_pre: NetEval, ev_val: NetEval, eps: float = 0.0, *, step: float = 0.05,
             max_T: float = 0.95, first_layer: bool = False, base_plan=None,
             executor: Executor | None = None, progress: bool = True,
             max_rounds: int = 200) -> tuple[dict, tuple]:
    """Search the threshold tuple; return ``(plan, T)``.

    ``ev_pre``: the preprocessing images (statistics only); ``ev_val``: held-out images of
    the same task, on which the top-1 accuracy must stay within ``eps`` of the uncompressed
    network's. Greedy: each round raises by ``step`` the one threshold whose raise keeps the
    budget and adds the most MACs to ``C`` per NLL increase; it stops when no raise keeps it.
    """
    from tqdm import tqdm

    executor = executor or SerialExecutor()
    base_plan = dict(base_plan or {})
    bv = variance_tensors(ev_pre)
    base = ev_val.run(base_plan)
    nl = len(ev_val.layers)
    T = [0.0] * nl
    free = [k for k in range(nl) if (first_layer or k > 0)]
    macs = [int(np.prod(L.out_shape)) * L.taps for L in ev_val.layers]
    ctx = (ev_val, base_plan, bv)
    cur_nll = base.nll
    bar = tqdm(total=max_rounds, desc="velcro", disable=not progress, leave=False)
    for _ in range(max_rounds):
        cands = []
        for k in free:
            if T[k] + step <= max_T + 1e-9:
                t2 = list(T)
                t2[k] = round(T[k] + step, 6)
                cands.append((k, t2))
        if not cands:
            break
        res = executor.map(_velcro_task, ctx, [t for _, t in cands])
        best = None
        for (k, t2), (acc, nll) in zip(cands, res):
            if base.acc - acc > eps + 1e-12:
                continue
            score = (step * macs[k]) / max(nll - cur_nll, 1e-6)
            if best is None or score > best[0]:
                best = (score, t2, nll)
        if best is None:
            break
        T, cur_nll = best[1], best[2]
        bar.update(1)
        bar.set_postfix(C=f"{compression_saving_ratio(T, ev_val.layers):.3f}")
    bar.close()
    plan = _plan(ev_val, base_plan, bv, T)
    validate_plan(plan, ev_val.layers, ev_val.g)
    return plan, tuple(T)
