"""Zero prediction from spatial correlation (Shomron & Weiser, CAL 2018; the 2019 report).

* :func:`spatial_correlation`: share of all-zero ``s x s`` windows per layer (the 2018
  paper's Fig. 3; ``s = 1`` is the sparsity).
* :func:`diagonal`: the 2018 predictor, leaders on the diagonal of every ``p x p`` window.
* :func:`prediction_stats`: the Fig. 5 breakdown, measured: windows predicted, activations
  predicted, false predictions (predicted zero but non-zero without the predictor).
* :func:`optimize`: the 2019 report's greedy mask optimizer in its four modes, with the
  ``ones_range`` restriction and the accuracy budget ``eps``, following its appendix passes:
  a first-level pass evaluates every (target, pattern) alone; the patch, channel and layer
  quantizer passes combine the ``top_m`` best records of the targets below them, keeping only
  records within ``eps``; the layer pass walks down (``UpdateMask``) until the whole network
  is within ``eps`` (and, with a ``holdout``, within its budget on held-out images).

Modes (what one *target* of the first-level pass is):

=================== ================================================================
``uniform_layer``   one pattern for every window of a layer
``uniform_filter``  a per-window-position mask shared by every filter of a layer
                    (targets: clusters of ``gt x gt`` window positions, all filters)
``uniform_patch``   one pattern per filter (kernel ofmap), the same in all its windows
``max_granularity`` one pattern per (filter, cluster of ``gt x gt`` windows); ``gt``
                    as large as the ofmap gives ``uniform_patch``
=================== ================================================================

A layer never combines zero prediction with perforation (semantics.md section 3).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from ..layer import COPY, Layer
from .common import HeldOut, NetEval, validate_plan
from .emulate import emulate
from .executor import Executor, SerialExecutor

__all__ = ["spatial_correlation", "diagonal_pattern", "patterns", "leader_from_choice",
           "apply", "diagonal", "prediction_stats", "optimize", "MODES"]

MODES = ("uniform_layer", "uniform_filter", "uniform_patch", "max_granularity")
_MAX_PATTERNS = 64


def spatial_correlation(outputs, sizes=(1, 2, 3, 4, 5)) -> np.ndarray:
    """``(layers, sizes)``: share of non-overlapping ``s x s`` windows that are all zero.

    ``outputs`` holds one ``(N, C, H, W)`` array per layer. Windows tile each ofmap from
    (0, 0); only windows entirely inside it count (NaN when none fits).
    """
    res = np.full((len(outputs), len(sizes)), np.nan)
    for i, o in enumerate(outputs):
        o = np.asarray(o)
        n, c, h, w = o.shape
        for j, s in enumerate(sizes):
            hh, ww = h // s, w // s
            if hh == 0 or ww == 0:
                continue
            z = (o[:, :, :hh * s, :ww * s] == 0).reshape(n, c, hh, s, ww, s)
            res[i, j] = float(z.all(axis=(3, 5)).mean())
    return res


def diagonal_pattern(p: int) -> np.ndarray:
    return np.eye(p, dtype=bool)


def patterns(p: int, ones_range=None, limit: int = _MAX_PATTERNS, seed: int = 0) -> list:
    """Leader patterns of a ``p x p`` window with a number of ones in ``ones_range``.

    The degenerate all-ones / all-zeros masks are excluded. The diagonal comes first when it
    qualifies. Beyond ``limit`` patterns a fixed pseudo-random subset is kept (p >= 4 has
    up to 2**16 - 2 of them).
    """
    if not 2 <= p <= 8:
        raise ValueError(f"p = {p}: zero-prediction window must be in 2..8")
    lo, hi = ones_range if ones_range is not None else (1, p * p - 1)
    lo, hi = max(1, int(lo)), min(p * p - 1, int(hi))
    if lo > hi:
        raise ValueError(f"ones_range = {ones_range!r}: empty for p = {p} (1..{p * p - 1})")
    diag = diagonal_pattern(p)
    out = [diag] if lo <= p <= hi else []
    total = sum(_ncr(p * p, k) for k in range(lo, hi + 1))
    rng = np.random.default_rng(seed)
    if total <= 4 * limit:
        for k in range(lo, hi + 1):
            for ones in itertools.combinations(range(p * p), k):
                m = np.zeros(p * p, bool)
                m[list(ones)] = True
                m = m.reshape(p, p)
                if not (m == diag).all():
                    out.append(m)
        if len(out) > limit:
            keep = [0] + sorted(rng.choice(np.arange(1, len(out)), limit - 1, replace=False))
            out = [out[i] for i in keep]
    else:
        seen = {diag.tobytes()}
        while len(out) < limit:
            k = int(rng.integers(lo, hi + 1))
            m = np.zeros(p * p, bool)
            m[rng.choice(p * p, k, replace=False)] = True
            m = m.reshape(p, p)
            if m.tobytes() not in seen:
                seen.add(m.tobytes())
                out.append(m)
    return out


def _ncr(n, k):
    from math import comb
    return comb(n, k)


def leader_from_choice(out_shape, p: int, choice: np.ndarray, pats: list) -> np.ndarray:
    """Leader mask ``(Cout, Ho, Wo)`` from a pattern index per window ``(Cout, nWy, nWx)``.

    Index ``-1`` makes every position of the window a leader (no prediction there).
    """
    cout, ho, wo = out_shape
    nwy, nwx = -(-ho // p), -(-wo // p)
    choice = np.asarray(choice)
    if choice.shape != (cout, nwy, nwx):
        raise ValueError(f"choice.shape = {choice.shape}: must be {(cout, nwy, nwx)}")
    table = np.stack([np.asarray(m, bool) for m in pats] + [np.ones((p, p), bool)])
    tiles = table[choice]                                     # (Cout, nWy, nWx, p, p)
    return tiles.transpose(0, 1, 3, 2, 4).reshape(cout, nwy * p, nwx * p)[:, :ho, :wo].copy()


def apply(layer: Layer, p: int, leader: np.ndarray) -> Layer:
    """``layer`` with zero prediction ``p`` and ``leader``; off when every position leads."""
    if layer.kind is not None and (np.asarray(layer.kind) == COPY).any():
        raise ValueError(f"layer {layer.name!r} is perforated: zero prediction cannot be "
                         "combined with perforation in one layer")
    leader = np.asarray(leader, bool)
    if leader.all():
        return dataclasses.replace(layer, p=0, leader=None)
    return dataclasses.replace(layer, p=int(p), leader=leader)


def diagonal(layer: Layer, p: int) -> Layer:
    """The 2018 paper's predictor: the window diagonal leads, in every window and filter."""
    cout, ho, wo = layer.out_shape
    nw = (cout, -(-ho // p), -(-wo // p))
    return apply(layer, p, leader_from_choice(layer.out_shape, p, np.zeros(nw, np.int64),
                                              [diagonal_pattern(p)]))


@dataclass
class PredictionStats:
    p: int
    windows: int = 0             # windows with at least one follower
    windows_predicted: int = 0
    acts: int = 0                # all ofmap activations
    acts_predicted: int = 0      # followers output as 0 by the predictor
    false_predicted: int = 0     # ... that are non-zero without the predictor
    leaders_in_predicted: int = 0
    acc: float = 0.0
    mac_reduction: float = 0.0

    @property
    def window_rate(self) -> float:
        return self.windows_predicted / max(self.windows, 1)

    @property
    def false_rate(self) -> float:
        """False predictions per predicted activation."""
        return self.false_predicted / max(self.acts_predicted, 1)

    @property
    def predicted_per_window(self) -> float:
        return self.acts_predicted / max(self.windows_predicted, 1)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(window_rate=self.window_rate, false_rate=self.false_rate,
                 predicted_per_window=self.predicted_per_window,
                 act_rate=self.acts_predicted / max(self.acts, 1))
        return d


def prediction_stats(ev: NetEval, plan: dict) -> PredictionStats:
    """Measure a zero-prediction plan: predicted windows and activations, false predictions.

    Each predicted layer is compared with the same layer without the predictor *on the same
    input* (the input the predicted network feeds it), as the 2018 paper records them.
    """
    r, ins, outs = ev.run(plan, capture=True)
    ps = {L.p for L in plan.values() if L.p}
    st = PredictionStats(p=ps.pop() if len(ps) == 1 else 0, acc=r.acc,
                         mac_reduction=r.mac_reduction)
    for i, L in plan.items():
        if not L.p:
            continue
        ref = emulate(dataclasses.replace(L, p=0, leader=None), ins[i], ev.g, validate=False).out
        out = outs[i]
        leader = np.asarray(L.leader, bool)[None]
        pm = _pred_mask(L, ref)                              # followers in predicted windows
        n, cout, ho, wo = out.shape
        p = L.p
        hp, wp = -(-ho // p) * p, -(-wo // p) * p
        fol = np.zeros((cout, hp, wp), bool)
        fol[:, :ho, :wo] = ~leader[0]
        has_f = fol.reshape(cout, hp // p, p, wp // p, p).any(axis=(2, 4))
        live = np.zeros((n, cout, hp, wp), bool)
        live[:, :, :ho, :wo] = leader & (ref != 0)
        win_pred = ~live.reshape(n, cout, hp // p, p, wp // p, p).any(axis=(3, 5))
        st.windows += int(n * has_f.sum())
        st.windows_predicted += int((win_pred & has_f[None]).sum())
        st.acts += int(out.size)
        st.acts_predicted += int(pm.sum())
        st.false_predicted += int((pm & (ref != 0)).sum())
        pad_leader = np.zeros((cout, hp, wp), bool)
        pad_leader[:, :ho, :wo] = leader[0]
        lw = pad_leader.reshape(cout, hp // p, p, wp // p, p).sum(axis=(2, 4))
        st.leaders_in_predicted += int((win_pred * lw[None]).sum())
    return st


def _pred_mask(L: Layer, ref: np.ndarray) -> np.ndarray:
    """Followers of windows whose leaders are all zero in ``ref`` (N, Cout, Ho, Wo)."""
    n, cout, ho, wo = ref.shape
    p = L.p
    leader = np.asarray(L.leader, bool)
    hp, wp = -(-ho // p) * p, -(-wo // p) * p
    live = np.zeros((n, cout, hp, wp), bool)
    live[:, :, :ho, :wo] = leader[None] & (ref != 0)
    win = ~live.reshape(n, cout, hp // p, p, wp // p, p).any(axis=(3, 5))
    full = np.repeat(np.repeat(win, p, axis=2), p, axis=3)[:, :, :ho, :wo]
    kind = np.zeros((cout, ho, wo), np.int64) if L.kind is None else np.asarray(L.kind)
    return full & ~leader[None] & (kind == 0)[None]


# -- the 2019 report's greedy optimizer --------------------------------------------------------

@dataclass
class _Record:
    choice: dict      # layer -> (Cout, nWy, nWx) int array (-1 where this record is silent)
    saved: int
    err: float
    nll: float


def _overlay(records) -> dict:
    out = {}
    for rec in records:
        for i, ch in rec.choice.items():
            if i not in out:
                out[i] = np.full_like(ch, -1)
            out[i] = np.where(ch >= 0, ch, out[i])
    return out


def _plan_of(ev, base_plan, choice, p, pats) -> dict:
    plan = dict(base_plan)
    for i, ch in choice.items():
        L = plan.get(i, ev.layers[i])
        plan[i] = apply(L, p, leader_from_choice(L.out_shape, p, ch, pats))
    return plan


def _zp_task(ctx, choice):
    ev, base_plan, p, pats, base_saved = ctx
    r = ev.run(_plan_of(ev, base_plan, choice, p, pats))
    return r.saved - base_saved, ev.guarded_acc(r), r.nll


def _targets(ev, layers, mode, p, gt):
    """(level-path, layer, selector) per first-level target; the path names its parents."""
    out = []
    for i in layers:
        cout, ho, wo = ev.layers[i].out_shape
        nwy, nwx = -(-ho // p), -(-wo // p)
        if mode == "uniform_layer":
            out.append(((i,), i, np.ones((cout, nwy, nwx), bool)))
            continue
        if mode == "uniform_patch":
            for c in range(cout):
                sel = np.zeros((cout, nwy, nwx), bool)
                sel[c] = True
                out.append(((i, c), i, sel))
            continue
        for cy in range(0, nwy, gt):
            for cx in range(0, nwx, gt):
                if mode == "uniform_filter":
                    sel = np.zeros((cout, nwy, nwx), bool)
                    sel[:, cy:cy + gt, cx:cx + gt] = True
                    out.append(((i, (cy, cx)), i, sel))
                else:
                    for c in range(cout):
                        sel = np.zeros((cout, nwy, nwx), bool)
                        sel[c, cy:cy + gt, cx:cx + gt] = True
                        out.append(((i, c, (cy, cx)), i, sel))
    return out


def optimize(ev: NetEval, eps: float, *, mode: str = "uniform_layer", p: int = 2,
             ones_range=None, gt: int = 2, top_m: int = 3, layers=None, base_plan=None,
             executor: Executor | None = None, max_patterns: int = 16,
             holdout: HeldOut | None = None, trail: list | None = None,
             progress: bool = True) -> dict:
    """The 2019 report's optimizer; returns the plan (``base_plan`` plus leader masks).

    ``eps`` is the allowed (guarded) top-1 drop, a fraction, on ``ev``'s images (the search
    images, which rank the records). Layers of ``base_plan`` that are perforated are skipped.

    ``holdout`` (:class:`~.common.HeldOut`, images other than ``ev``'s, never the test
    split): the layer pass's walk down also requires the held-out guarded drop within the
    holdout's ``eps * margin``; every configuration within ``eps`` on ``ev`` is checked there
    (``holdout.history``) until one is, and the base plan is returned if none is.

    ``trail`` (a list, filled): every configuration of the layer pass in its walk order,
    evaluated or not, as a dict: ``label`` (``{str(layer): record index or None}``, as in
    ``holdout.history``), ``plan`` and ``search_drop`` (guarded drop on ``ev``, ``None``
    past the walk's stop). Retraining re-walks it (``run.optimize_model``).
    """
    from tqdm import tqdm

    if mode not in MODES:
        raise ValueError(f"mode = {mode!r}: must be one of {', '.join(MODES)}")
    if not isinstance(gt, int) or gt < 1:
        raise ValueError(f"gt = {gt!r}: must be an integer >= 1")
    executor = executor or SerialExecutor()
    base_plan = dict(base_plan or {})
    layers = list(range(len(ev.layers))) if layers is None else list(layers)
    layers = [i for i in layers if i not in base_plan or base_plan[i].kind is None
              or not (np.asarray(base_plan[i].kind) == COPY).any()]
    pats = patterns(p, ones_range, limit=max_patterns)
    b = ev.run(base_plan)
    ctx = (ev, base_plan, p, pats, b.saved)

    def evaluate(choices):
        res = executor.map(_zp_task, ctx, choices)
        return [_Record(ch, s, ev.base.acc - a, nll) for ch, (s, a, nll) in zip(choices, res)]

    # First level: every target with every pattern, alone.
    targets = _targets(ev, layers, mode, p, gt)
    first = {}
    for path, i, sel in tqdm(targets, desc=f"zero_pred {mode}", disable=not progress,
                             leave=False):
        shape = sel.shape
        choices = [{i: np.where(sel, k, -1).reshape(shape)} for k in range(len(pats))]
        recs = [r for r in evaluate(choices) if r.err <= eps and r.saved > 0]
        recs.sort(key=lambda r: (-r.saved, r.nll))
        first[path] = recs[:top_m]

    # Quantizer passes: merge the children's i-th best records, level by level up to layers.
    level = first
    while any(len(path) > 1 for path in level):
        groups = {}
        for path, recs in level.items():
            groups.setdefault(path[:-1], []).append(recs)
        merged = {}
        for parent, children in groups.items():
            children = [c for c in children if c]
            if not children:
                merged[parent] = []
                continue
            combos = [_overlay([c[min(j, len(c) - 1)] for c in children]) for j in range(top_m)]
            recs = [r for r in evaluate(combos) if r.err <= eps and r.saved > 0]
            # The best child alone stays a candidate (a combination may break the budget).
            recs += [max(children, key=lambda c: c[0].saved)[0]]
            recs.sort(key=lambda r: (-r.saved, r.nll))
            merged[parent] = recs[:top_m]
        level = merged

    # Layer quantizer: all layers at their best record, walk down until within eps.
    per_layer = {path[0]: recs for path, recs in level.items() if recs}
    walk = list(_layer_walk(per_layer))
    steps = [{"label": {str(i): k for i, k in pos.items()},
              "plan": _plan_of(ev, base_plan, _overlay(
                  [per_layer[i][k] for i, k in pos.items() if k is not None]), p, pats),
              "search_drop": None} for pos in walk]
    if trail is not None:
        trail.extend(steps)
    best = None
    for pos, step in zip(walk, steps):
        active = [per_layer[i][k] for i, k in pos.items() if k is not None]
        rec = evaluate([_overlay(active)])[0]
        step["search_drop"] = rec.err
        if rec.err <= eps and (holdout is None or holdout.within(holdout.check(
                _plan_of(ev, base_plan, rec.choice, p, pats),
                {str(i): k for i, k in pos.items()}))):
            best = rec
            break
    plan = _plan_of(ev, base_plan, best.choice, p, pats) if best else base_plan
    validate_plan(plan, ev.layers, ev.g)
    return plan


def _layer_walk(per_layer: dict):
    """The layer pass's configurations, most aggressive first: ``{layer: record index or None}``.

    All layers start at their best record; each step, ``UpdateMask`` moves the layer whose
    record costs the most accuracy per saved MAC to its next record (``None`` = off, after
    its last). The order depends on the records only, so it can be listed before evaluating.
    """
    pos = {i: 0 for i in per_layer}
    while any(k is not None for k in pos.values()):
        yield dict(pos)
        worst = max((i for i, k in pos.items() if k is not None),
                    key=lambda i: (per_layer[i][pos[i]].err + 1e-3 * per_layer[i][pos[i]].nll)
                    / max(per_layer[i][pos[i]].saved, 1))
        pos[worst] = pos[worst] + 1 if pos[worst] + 1 < len(per_layer[worst]) else None
