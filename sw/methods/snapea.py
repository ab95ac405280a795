"""SnaPEA (Akhlaghi et al., ISCA 2018): early termination of convolutions that end negative.

* **Exact mode** (:func:`exact`): each kernel's taps are reordered positive weights first;
  ``neg_start`` is the first non-positive weight. On a non-negative input the partial sum can
  only fall after it, so the engine stops as soon as it is ``<= 0``; no output changes.
  Only for unsigned inputs (not a network's first layer).
* **Predictive mode** (:func:`predictive`): ``N`` speculative taps go first (the
  largest-magnitude weight of each of ``N`` groups of the kernel, ``N`` a multiple of ``g``),
  then the exact order; after them, ``psum <= Th`` stops with output 0.
* **Optimizer** (:func:`optimize`), as the paper's three steps:
  kernel profiling (per kernel and ``N``: the partial sum after the speculative taps and the
  final output, on calibration images), local optimization (per layer, a ladder of per-kernel
  tolerances; each rung picks, per kernel, the ``(N, Th)`` that saves the most MACs while
  zeroing at most that share of the kernel's non-zero outputs; each rung is evaluated on the
  whole network), and a global pass for the cross-layer effect (start every layer at its most
  aggressive rung that alone stays within ``eps``, then step back the layer whose rung costs
  the most accuracy per saved MAC until the whole network is within ``eps``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..layer import Layer
from .common import NetEval, validate_plan
from .emulate import emulate
from .executor import Executor, SerialExecutor

__all__ = ["exact", "speculative_taps", "predictive", "profile_layer", "KernelProfile",
           "layer_rungs", "rung_tolerance", "optimize", "TOLERANCES"]

#: Per-kernel tolerance ladder of the local optimization: the largest share of a kernel's
#: non-zero outputs (on calibration images) that speculation may turn into 0.
TOLERANCES = (0.0, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15)


def _exact_order(wc: np.ndarray, front=()) -> tuple[np.ndarray, int]:
    """Order ``front`` taps first, then the other positive taps, then the non-positive ones."""
    front = [int(i) for i in front]
    taken = np.zeros(len(wc), bool)
    taken[front] = True
    pos = [i for i in np.nonzero(wc > 0)[0] if not taken[i]]
    neg = [i for i in np.nonzero(wc <= 0)[0] if not taken[i]]
    order = np.array(front + pos + neg, np.int64)
    return order, len(front) + len(pos)


def exact(layer: Layer) -> Layer:
    """The exact-mode layer: positive-first order, ``neg_start`` at the first non-positive."""
    if layer.act_signed:
        raise ValueError(f"layer {layer.name!r}: act_signed = True; exact early termination "
                         "needs a non-negative input (not a network's first layer)")
    wf = np.asarray(layer.w).reshape(layer.cout, -1)
    orders, negs = zip(*(_exact_order(wf[c]) for c in range(layer.cout)))
    return dataclasses.replace(layer, et="exact", order=np.stack(orders),
                               neg_start=np.array(negs, np.int64), spec=None, th=None)


def speculative_taps(wc: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` speculative taps of one kernel: the largest |w| of each of ``n`` tap groups.

    The groups are ``n`` contiguous runs of the tap index (input channel, then row, column),
    so the speculation samples the whole receptive field (the paper's "largest weights from
    each group").
    """
    t = len(wc)
    if not 0 <= n <= t:
        raise ValueError(f"speculative taps n = {n}: must be in 0..{t}")
    groups = np.array_split(np.arange(t), n) if n else []
    return np.array([int(gr[np.argmax(np.abs(wc[gr]))]) for gr in groups], np.int64)


def predictive(layer: Layer, n: np.ndarray, th: np.ndarray, taps=None) -> Layer:
    """The predictive-mode layer with ``n[c]`` speculative taps and threshold ``th[c]``.

    ``taps[c]`` (default :func:`speculative_taps` of the layer's weights) are kernel ``c``'s
    speculative taps. Kernels with ``n[c] == 0`` run in exact mode (a zero-tap speculation
    never fires when ``th[c]`` is below the bias; we set it so).
    """
    cout = layer.cout
    wf = np.asarray(layer.w).reshape(cout, -1)
    t = wf.shape[1]
    n = np.asarray(n, np.int64)
    th = np.asarray(th, np.int64).copy()
    orders, negs = [], []
    for c in range(cout):
        front = speculative_taps(wf[c], int(n[c])) if taps is None else taps[c]
        if len(front) != int(n[c]):
            raise ValueError(f"kernel {c}: {len(front)} speculative taps, n = {int(n[c])}")
        order, neg = _exact_order(wf[c], front)
        if layer.act_signed:
            neg = t                       # a signed input allows only the final check
        orders.append(order)
        negs.append(neg)
        if n[c] == 0:
            th[c] = max(-(1 << 31), int(layer.b[c]) - 1)    # psum(0) = b > th: never fires
    return dataclasses.replace(layer, et="predictive", order=np.stack(orders),
                               neg_start=np.array(negs, np.int64), spec=n, th=th)


@dataclass
class KernelProfile:
    """Kernel profiling of one layer on calibration inputs.

    For each candidate ``N`` (``ns[j]``) and kernel ``c``: the sorted partial sums after the
    speculative taps at positions whose output is non-zero (``pos_psums``), at all positions
    (``all_psums``), and the MACs each position would save if stopped there (``gain``, in
    the same order as ``all_psums``).
    """

    ns: list
    pos_psums: list       # [j][c] sorted array
    all_psums: list       # [j][c] sorted array
    gain: list            # [j][c] array aligned with all_psums
    n_positions: int


def carried_over(rung: Layer, layer: Layer) -> Layer:
    """``rung`` (an early-termination configuration of an earlier version of ``layer``, e.g.
    before retraining) on ``layer``: exact stays exact; predictive keeps its speculative
    taps and its thresholds as real partial sums (``th * s_x * s_w``, in ``layer``'s scales),
    the other taps ordered by ``layer``'s weights."""
    if rung.et == "exact":
        return exact(layer)
    old = float(rung.meta["s_x"]) * np.asarray(rung.meta["s_w"], np.float64)
    new = float(layer.meta["s_x"]) * np.asarray(layer.meta["s_w"], np.float64)
    th = np.clip(np.round(np.asarray(rung.th, np.float64) * old / new), -(1 << 31), (1 << 31) - 1)
    taps = [np.asarray(rung.order[c])[:int(rung.spec[c])] for c in range(layer.cout)]
    return predictive(layer, rung.spec, th.astype(np.int64), taps)


def _candidate_ns(t: int, g: int) -> list:
    ns = sorted({max(g, (t * f // 100) // g * g) for f in (6, 12, 25)})
    return [n for n in ns if 0 < n < t]


def profile_layer(layer: Layer, x: np.ndarray, g: int = 1, ns=None) -> KernelProfile:
    """Kernel profiling: partial sums after ``N`` speculative taps vs the final output."""
    t = layer.taps
    ns = ns or _candidate_ns(t, g)
    base = exact(layer) if not layer.act_signed else layer
    ref = emulate(base, x, g, macs=True)
    nonzero = ref.out != 0                                       # (N, Cout, Ho, Wo)
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    wf = np.asarray(layer.w).reshape(layer.cout, -1)
    pos_ps, all_ps, gains = [], [], []
    for n in ns:
        mask = np.zeros_like(wf, dtype=bool)
        for c in range(layer.cout):
            mask[c, speculative_taps(wf[c], n)] = True
        wm = torch.as_tensor(np.where(mask, wf, 0).reshape(layer.w.shape), dtype=torch.float64)
        ps = (F.conv2d(xt, wm, stride=layer.stride, padding=layer.pad)
              + torch.as_tensor(layer.b, dtype=torch.float64).view(1, -1, 1, 1)).numpy()
        pp, ap, gg = [], [], []
        for c in range(layer.cout):
            psc = ps[:, c].ravel()
            gain = np.maximum(ref.macs[:, c].ravel() - n, 0)
            o = np.argsort(psc, kind="stable")
            ap.append(psc[o])
            gg.append(gain[o])
            pp.append(np.sort(psc[nonzero[:, c].ravel()]))
        pos_ps.append(pp)
        all_ps.append(ap)
        gains.append(gg)
    return KernelProfile(ns=list(ns), pos_psums=pos_ps, all_psums=all_ps, gain=gains,
                         n_positions=int(nonzero[:, 0].size))


def _choose(profile: KernelProfile, c: int, tol: float) -> tuple[int, int, int]:
    """Best ``(N, Th, saved)`` of kernel ``c`` zeroing at most ``tol`` of its non-zero outputs."""
    best = (0, 0, 0)
    for j, n in enumerate(profile.ns):
        pos = profile.pos_psums[j][c]
        allowed = int(np.floor(tol * len(pos)))
        # Largest Th with at most `allowed` non-zero outputs at psum <= Th.
        if allowed >= len(pos):
            th = float(profile.all_psums[j][c][-1])
        else:
            th = float(pos[allowed]) - 1.0          # integer psums: strictly below the next
        k = int(np.searchsorted(profile.all_psums[j][c], th, side="right"))
        saved = int(profile.gain[j][c][:k].sum())
        if saved > best[2]:
            best = (n, int(np.clip(th, -(1 << 31), (1 << 31) - 1)), saved)
    return best


def layer_rungs(layer: Layer, profile: KernelProfile, tolerances=TOLERANCES) -> list:
    """Local optimization's candidate configurations of one layer, least aggressive first."""
    rungs = []
    for tol in tolerances:
        if tol == 0.0 and not layer.act_signed:
            rungs.append(("exact", exact(layer)))
            continue
        picks = [_choose(profile, c, tol) for c in range(layer.cout)]
        n = np.array([p[0] for p in picks])
        th = np.array([p[1] for p in picks])
        if not n.any():
            continue
        rungs.append((f"tol={tol}", predictive(layer, n, th)))
    return rungs


def rung_tolerance(label: str) -> float:
    """The per-kernel tolerance of a :func:`layer_rungs` label (``"exact"``: 0)."""
    return 0.0 if label == "exact" else float(label[4:])


def _eval_task(ev: NetEval, plan: dict):
    r = ev.run(plan)
    return ev.guarded_acc(r), r.nll, r.saved


def optimize(ev: NetEval, eps: float, *, layers=None, executor: Executor | None = None,
             tolerances=TOLERANCES, levels: dict | None = None,
             progress: bool = True) -> dict:
    """SnaPEA's profiling + local + global optimization on ``ev``; returns the plan.

    ``eps`` is the allowed top-1 drop (fraction, e.g. 0.01) on ``ev``'s images. Layers with a
    signed input get only predictive rungs; every other layer is at least exact.
    ``levels`` (a dict, filled in): per searched layer, the tolerance of its chosen rung
    (``None``: no rung, i.e. the exact floor or, on a signed input, nothing), so that the
    choice can be put on rungs profiled elsewhere (the joint warm start).
    """
    from tqdm import tqdm

    executor = executor or SerialExecutor()
    idx = list(range(len(ev.layers))) if layers is None else list(layers)
    base = ev.base
    _, ins, _ = ev.run({}, capture=True)
    floor_plan = {i: exact(ev.layers[i]) for i in idx if not ev.layers[i].act_signed}

    # Kernel profiling and local optimization, one layer at a time.
    rungs = {}
    for i in tqdm(idx, desc="snapea local", disable=not progress, leave=False):
        prof = profile_layer(ev.layers[i], ins[i], ev.g)
        cands = layer_rungs(ev.layers[i], prof, tolerances)
        plans = [{**floor_plan, i: L} for _, L in cands]
        res = executor.map(_eval_task, ev, plans)
        rungs[i] = [(name, L, acc, nll, saved) for (name, L), (acc, nll, saved)
                    in zip(cands, res)]

    # Global pass: most aggressive rung per layer that alone keeps the budget, then back off.
    floor_saved = ev.run(floor_plan).saved
    level = {}
    for i, rs in rungs.items():
        ok = [k for k, r in enumerate(rs) if base.acc - r[2] <= eps]
        level[i] = max(ok) if ok else None
    plan = dict(floor_plan)
    for _ in range(sum(len(r) for r in rungs.values()) + 1):
        plan, used = dict(floor_plan), dict(level)      # used: the levels of this plan
        plan.update({i: rungs[i][k][1] for i, k in level.items() if k is not None})
        r = ev.run(plan)
        if base.acc - ev.guarded_acc(r) <= eps:
            break
        # Step back the layer whose current rung costs the most accuracy per saved MAC.
        worst, worst_cost = None, -1.0
        for i, k in level.items():
            if k is None:
                continue
            _, _, acc, nll, saved = rungs[i][k]
            cost = ((max(base.acc - acc, 0) + 1e-3 * max(nll - base.nll, 0))
                    / max(saved - floor_saved, 1))
            if cost > worst_cost:
                worst, worst_cost = i, cost
        if worst is None:
            plan = dict(floor_plan)
            break
        k = level[worst] - 1
        level[worst] = k if k >= 0 else None
    validate_plan(plan, ev.layers, ev.g)
    if levels is not None:
        levels.update({i: None if k is None else rung_tolerance(rungs[i][k][0])
                       for i, k in used.items()})
    return plan
