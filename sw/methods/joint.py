"""One configuration that combines the four methods under one accuracy budget.

Each engine layer has four ladders of options, least aggressive first:

* ``et``: SnaPEA rungs (exact for unsigned inputs, then predictive at growing per-kernel
  tolerances; :func:`skipconv.sw.methods.snapea.layer_rungs`);
* ``zp``: no prediction, then diagonal zero prediction with ``p = 2, 3, 4``;
* ``velcro``: VELCRO thresholds ``T = 0.05, 0.10, ...`` from the dense network's mean and
  variance tensors on the calibration images;
* ``perf``: perforation rates ``0.1 .. 0.8`` with impact masks (nested: a higher rate
  perforates a superset).

A layer never holds zero prediction and perforation together (semantics.md). The search is
greedy: every round evaluates each single move (one ladder of one layer one or two rungs up)
and takes the one with the most saved MACs per NLL increase among those that keep the top-1
drop on the search images within ``eps * margin`` (and the NLL rise within ``nll_cap``); it
stops when no move does. It starts from nothing (every ladder at rung 0) or from a *warm
start*: a single method's configuration expressed in the ladders (:func:`seed_states`), the
best of several chosen by :func:`choose_start`. The result is then checked by golden
execution on held-out images (:func:`check`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from ..layer import Layer
from . import perforation, snapea, velcro, zero_pred
from .common import HeldOut, NetEval, golden_eval, validate_plan
from .executor import Executor, SerialExecutor

__all__ = ["Ladders", "build_ladders", "compose", "optimize", "lazy_moves", "check",
           "JointResult", "seed_states", "choose_start", "step_down", "merge_states"]

ZP_WINDOWS = (2, 3, 4)
VELCRO_STEPS = tuple(round(0.05 * k, 2) for k in range(1, 19))
#: SnaPEA tolerances of the train-image search (``run.optimize_model``): five more rungs than
#: the single-method search; on lenet conv2 reached the 0.15 rung with the default ladder.
WIDE_TOLERANCES = snapea.TOLERANCES + (0.2, 0.25, 0.3, 0.4, 0.5)
#: Perforation rates of the train-image search: steps of 0.05 instead of the single-method
#: search's 0.1 (on lenet the late, costly moves were single 0.1 perforation rungs).
FINE_PERF_RATES = tuple(round(0.05 * k, 2) for k in range(1, 17))


@dataclass
class Ladders:
    """Per layer, the options of each method (index 0 = off / the free floor)."""

    et: list        # [layer] list of Layer (ET fields used) or None (off)
    zp: list        # [layer] list of p (0 = off)
    velcro: list    # [layer] list of T
    perf: list      # [layer] list of (Ho, Wo) masks (index 0: nothing perforated)
    bv: list        # [layer] (B, V)
    #: [layer] the SnaPEA tolerance of each ``et`` rung (None: off); filled by build_ladders
    et_tol: list | None = None

    def size(self, method, i) -> int:
        return len(getattr(self, method)[i])


METHODS = ("et", "zp", "velcro", "perf")


def build_ladders(ev: NetEval, *, model=None, first_layer_velcro: bool = False,
                  zp_windows=ZP_WINDOWS, velcro_steps=VELCRO_STEPS,
                  perf_rates=perforation.RATES, tolerances=snapea.TOLERANCES) -> Ladders:
    """Profile the dense network on ``ev`` once and list every layer's options."""
    _, ins, _ = ev.run({}, capture=True)
    bv = velcro.variance_tensors(ev)
    G = (perforation.impacts(model, ev.layers, ev.x, ev.y) if model is not None else None)
    et, et_tol, zp, vl, pf = [], [], [], [], []
    for i, L in enumerate(ev.layers):
        prof = snapea.profile_layer(L, ins[i], ev.g)
        labelled = snapea.layer_rungs(L, prof, tolerances)
        rungs = [r for _, r in labelled]
        et.append(([] if not L.act_signed else [None]) + rungs)
        et_tol.append(([] if not L.act_signed else [None])
                      + [snapea.rung_tolerance(lab) for lab, _ in labelled])
        ho, wo = L.out_hw
        zp.append([0] + [p for p in zp_windows if p <= max(ho, wo)])
        vl.append([0.0] + (list(velcro_steps) if (i > 0 or first_layer_velcro) else []))
        masks = [np.zeros((ho, wo), bool)]
        for r in perf_rates:
            m = (perforation.impact_mask(G[i], r) if G is not None
                 else perforation.grid_mask(ho, wo, r))
            if m.any() and not m.all():
                masks.append(m)
        pf.append(masks)
    return Ladders(et=et, zp=zp, velcro=vl, perf=pf, bv=bv, et_tol=et_tol)


def compose(layer: Layer, lad: Ladders, i: int, state: dict) -> Layer:
    """The layer ``i`` configured by ``state`` = ``{method: rung index}``."""
    L = layer
    if state.get("perf", 0):
        L = perforation.apply(L, lad.perf[i][state["perf"]])
    if state.get("velcro", 0):
        B, V = lad.bv[i]
        L = velcro.apply(L, B, V, lad.velcro[i][state["velcro"]])
    if state.get("zp", 0):
        L = zero_pred.diagonal(L, lad.zp[i][state["zp"]])
    et = lad.et[i][state.get("et", 0)] if lad.et[i] else None
    if et is not None:
        L = dataclasses.replace(L, et=et.et, order=et.order, neg_start=et.neg_start,
                                spec=et.spec, th=et.th)
    return L


def seed_states(lad: Ladders, *, velcro_T=None, perforated=None, et_tol=None) -> dict:
    """A single method's configuration expressed in the joint ladders (a warm start).

    ``velcro_T``: VELCRO's threshold per layer (:func:`velcro.optimize`'s ``T``);
    ``perforated``: the share of perforated output positions per layer (of a perforation
    plan, :func:`perforation.perforated_of`); ``et_tol``: SnaPEA's per-kernel tolerance per
    layer (:func:`snapea.optimize`'s ``levels``; ``None``: no rung). Each layer takes, per
    method, the highest rung that is not more aggressive: VELCRO ``T`` at most the single
    method's, a perforation mask with at most as many positions, a SnaPEA rung whose
    tolerance (``lad.et_tol``) is at most the single method's. The rungs hold the joint
    ladders' own statistics (variance tensors, impacts and SnaPEA profiles of the ladders'
    images), so the seed is the single method's *choice* (how much of which layer), not its
    exact positions or thresholds. ``None`` or a layer beyond the list: rung 0.
    """
    n = len(lad.velcro)
    states = {i: {m: 0 for m in METHODS} for i in range(n)}
    if any(t is not None for t in et_tol or ()) and lad.et_tol is None:
        raise ValueError("et_tol: these ladders hold no tolerances of their SnaPEA rungs")
    for i, t in enumerate(et_tol or ()):
        if i < n and t is not None and lad.et[i]:
            # Rung 0 (off, or exact on an unsigned input) when none is within.
            states[i]["et"] = max([k for k, v in enumerate(lad.et_tol[i])
                                   if v is not None and v <= t + 1e-9] or [0])
    for i, t in enumerate(velcro_T or ()):
        if i < n and t > 0:
            states[i]["velcro"] = max(k for k, v in enumerate(lad.velcro[i]) if v <= t + 1e-9)
    for i, share in enumerate(perforated or ()):
        if i < n and share > 0:
            states[i]["perf"] = max(k for k, m in enumerate(lad.perf[i])
                                    if m.mean() <= share + 1e-9)
    return states


def _checked_states(lad: Ladders, states: dict, n: int) -> dict:
    """``states`` completed to every layer and method; rungs in range, semantics kept."""
    out = {i: {m: 0 for m in METHODS} for i in range(n)}
    for i, st in states.items():
        if not 0 <= i < n:
            raise ValueError(f"start names layer {i!r}; the network has {n} layers")
        for m, k in st.items():
            if m not in METHODS:
                raise ValueError(f"start layer {i}: unknown method {m!r}")
            if not 0 <= k < lad.size(m, i):
                raise ValueError(f"start layer {i} {m}: rung {k!r} not in 0..{lad.size(m, i) - 1}")
            out[i][m] = int(k)
        if out[i]["zp"] and out[i]["perf"]:
            raise ValueError(f"start layer {i}: zero prediction and perforation together")
    return out


def step_down(states: dict, k: int = 1) -> dict | None:
    """``states`` ``k`` rungs milder: every ladder above rung 0 lowered by ``k`` (not below
    0); ``None`` when ``k`` > 0 and every ladder is already at rung 0 (nothing to lower)."""
    if k and not any(v for st in states.values() for v in st.values()):
        return None
    return {i: {m: max(v - k, 0) for m, v in st.items()} for i, st in states.items()}


def stepped_label(label: str, k: int) -> str:
    """The name of seed ``label`` stepped down ``k`` rungs: ``velcro[-2]``."""
    return f"{label}[-{k}]" if k else label


def merge_states(*parts: dict) -> dict:
    """The union of configurations: per layer and method the highest rung of ``parts``."""
    out = {}
    for st in parts:
        for i, ms in st.items():
            row = out.setdefault(i, {})
            for m, v in ms.items():
                row[m] = max(row.get(m, 0), v)
    return out


def choose_start(ev: NetEval, val: NetEval, lad: Ladders, seeds: dict, eps: float, *,
                 margin: float, val_margin: float, step_downs: int = 0) -> tuple:
    """The warm start among ``seeds`` (``{label: states}``): the one that saves the most MACs
    on ``ev`` (the search images) among those whose guarded top-1 drop is within
    ``eps * margin`` there and within ``eps * val_margin`` on ``val`` (the back-off's held-out
    images), i.e. those :func:`optimize` would have accepted as a step it may return.

    A seed past either guard is tried again up to ``step_downs`` times, one rung milder on
    every ladder each time (:func:`step_down`), and stands for its first milder version that
    is within (the guards are not loosened: the seed is).

    Returns ``(label, states, checks)``: ``(None, None, checks)`` when no seed is within.
    ``checks`` holds per seed the last version checked: ``label`` (:func:`stepped_label`),
    ``seed`` (the label in ``seeds``), ``rungs_down``, ``search_drop``,
    ``search_mac_reduction``, ``val_drop`` (``None``: not checked, the search guard
    failed), ``val_mac_reduction`` and ``within`` of that version.
    """
    best, checks = None, []
    for label, st0 in seeds.items():
        st0 = _checked_states(lad, st0, len(ev.layers))
        for k in range(step_downs + 1):
            st = step_down(st0, k)
            if st is None:
                break
            r = ev.run(_plan(ev, lad, st))
            sdrop = ev.base.acc - ev.guarded_acc(r)
            rec = {"label": stepped_label(label, k), "seed": label, "rungs_down": k,
                   "search_drop": sdrop,
                   "search_mac_reduction": r.mac_reduction, "val_drop": None,
                   "val_mac_reduction": None, "within": False}
            if sdrop <= eps * margin + 1e-12:
                rv = val.run(_plan(val, lad, st))
                rec["val_drop"] = val.base.acc - val.guarded_acc(rv)
                rec["val_mac_reduction"] = rv.mac_reduction
                rec["within"] = bool(rec["val_drop"] <= eps * val_margin + 1e-12)
            if rec["within"]:
                break
        checks.append(rec)
        if rec["within"] and (best is None or r.saved > best[0]):
            best = (r.saved, rec["label"], st)
    if best is None:
        return None, None, checks
    return best[1], best[2], checks


def _plan(ev, lad, states) -> dict:
    plan = {}
    for i, st in states.items():
        if any(st.values()) or (lad.et[i] and lad.et[i][0] is not None):
            plan[i] = compose(ev.layers[i], lad, i, st)
    return plan


def _joint_task(ctx, states):
    ev, lad = ctx
    r = ev.run(_plan(ev, lad, states))
    return ev.guarded_acc(r), r.nll, r.saved, ev.margin_loss(r)


@dataclass
class JointResult:
    plan: dict
    states: dict
    history: list = field(default_factory=list)   # (move, acc, nll, saved) per accepted step
    #: per accepted step (the floor first): :attr:`HeldOut.history` on the validation images
    #: (``drop``: guarded top-1 drop, ``nll``, ``mac_reduction``), when a validation set was
    #: given
    val: list = field(default_factory=list)
    #: index in ``history`` of the returned configuration (after the validation back-off)
    chosen: int = -1
    #: candidate configurations evaluated on the search images (the search's cost)
    evaluations: int = 0
    #: why the search stopped: "no_move", "val_stop", "max_rounds" or "max_seconds"
    stop: str = ""
    #: the states of every step of ``history`` (the floor first), for a walk after retraining
    trail: list = field(default_factory=list)


OBJECTIVES = ("nll", "margin")


def optimize(ev: NetEval, eps: float, *, model=None, margin: float = 0.25,
             nll_cap: float | None = 0.03,
             executor: Executor | None = None, ladders: Ladders | None = None,
             max_jump: int = 2, max_rounds: int = 200, methods=METHODS,
             objective: str = "nll", val: NetEval | None = None, val_margin: float = 0.5,
             val_stop: float = 1.0, lazy_k: int | None = None, full_every: int = 10,
             max_seconds: float | None = None, start: dict | None = None,
             progress: bool = True) -> JointResult:
    """Greedy joint configuration within ``eps * margin`` top-1 drop on ``ev``'s images.

    Each round takes the move with the most saved MACs per rise of the ``objective`` on
    ``ev``'s images: ``"nll"`` (mean NLL) or ``"margin"`` (mean loss of logit margin against
    the dense network, :meth:`NetEval.margin_loss`, which still measures on images the
    network is sure of, such as its training images). ``nll_cap`` bounds the rise of the mean
    NLL over the dense network's (``None``: no bound).

    ``val`` (held-out images, never the test split; :class:`~.common.HeldOut`): after every
    accepted move the configuration is evaluated there; the search stops once its guarded
    top-1 drop exceeds ``eps * val_stop``, and the result is the last configuration of the
    trajectory whose drop there is within ``eps * val_margin`` (a back-off; the floor if none
    is). The zero-prediction and perforation searches take the same ``holdout``.

    Without ``val``, on lenet with the 500 calibration images as ``ev``: a budget on top-1
    alone (margin 0.5) held there but not on test (1.5 points); margin 0.35 with an NLL cap
    of 0.05 and the defaults (0.25, 0.03) both stopped at the same configuration, 1.2 points
    on test: 500 images are too few to steer this many moves. ``skipconv optimize`` searches
    on the training images with ``objective="margin"`` and backs off on the calibration
    images (:func:`skipconv.sw.methods.run.optimize_model`).

    ``lazy_k`` (``None``: every round evaluates every move) makes the search lazy greedy
    (:func:`lazy_moves`): a round evaluates the moves never evaluated and the ``lazy_k`` best
    by their last score; moves that broke the budget stay out; every ``full_every`` rounds
    (0: never), and before stopping, a full round evaluates them all again.

    ``max_seconds``: no new round starts after that much wall time (a deadline; the back-off
    then chooses along the trajectory so far). :attr:`JointResult.stop` says why it stopped.

    ``start`` (``{layer: {method: rung}}``, e.g. from :func:`seed_states` /
    :func:`choose_start`; ``None``: every ladder at rung 0): the warm start, step 0 of the
    trajectory (``history[0]`` is ``"start"`` instead of ``"floor"``). It must be within the
    search guard on ``ev`` and, with ``val``, within ``eps * val_margin`` there (ValueError
    otherwise), so the back-off can never return less than it: every accepted move saves
    more MACs on ``ev`` than the step before.
    """
    from tqdm import tqdm

    if objective not in OBJECTIVES:
        raise ValueError(f"objective = {objective!r}: must be one of {', '.join(OBJECTIVES)}")
    executor = executor or SerialExecutor()
    model = model if model is not None else getattr(ev.net, "model", None)
    lad = ladders or build_ladders(ev, model=model)
    base = ev.base
    budget = eps * margin
    states = _checked_states(lad, start or {}, len(ev.layers))
    first = "floor" if start is None else "start"
    acc, nll, saved, mloss = _joint_task((ev, lad), states)
    if start is not None and (base.acc - acc > budget + 1e-12 or (
            nll_cap is not None and nll - base.nll > nll_cap)):
        raise ValueError(f"start: guarded top-1 drop {base.acc - acc:.4f} / NLL rise "
                         f"{nll - base.nll:.4f} on the search images, past the search guard")
    cost = (lambda n, ml: n) if objective == "nll" else (lambda n, ml: ml)
    history = [(first, acc, nll, saved)]
    trail = [states]
    held = HeldOut(val, eps, val_margin, val_stop) if val is not None else None
    if held is not None:
        d0 = held.check(_plan(val, lad, states), first)
        if start is not None and not held.within(d0):
            raise ValueError(f"start: guarded top-1 drop {d0:.4f} on the held-out images, past "
                             f"eps * val_margin = {eps * val_margin:.4f}")
    ctx = (ev, lad)
    bar = tqdm(total=max_rounds, desc="joint", disable=not progress, leave=False)
    scores = {}         # move -> score at its last evaluation (None: broke the budget)
    since_full = None   # rounds since the last full round (None: none yet)
    evaluations = [0]

    def evaluate(moves):
        evaluations[0] += len(moves)
        res = executor.map(_joint_task, ctx, [s for _, s in moves])
        best = None
        current = cost(nll, mloss)
        for (move, new), (a, n, s, ml) in zip(moves, res):
            scores[move] = None
            if base.acc - a > budget + 1e-12 or s <= saved:
                continue
            if nll_cap is not None and n - base.nll > nll_cap:
                continue
            score = (s - saved) / max(cost(n, ml) - current, 1e-4)
            scores[move] = score
            if best is None or score > best[0]:
                best = (score, move, new, a, n, s, ml)
        return best

    t_start = time.monotonic()
    stop = "max_rounds"
    for _ in range(max_rounds):
        if max_seconds is not None and time.monotonic() - t_start > max_seconds:
            stop = "max_seconds"
            break
        moves = []
        for i, st in states.items():
            for m in methods:
                if m == "zp" and st["perf"] or m == "perf" and st["zp"]:
                    continue
                for j in range(1, max_jump + 1):
                    if st[m] + j < lad.size(m, i):
                        new = {k: dict(v) for k, v in states.items()}
                        new[i][m] = st[m] + j
                        moves.append(((i, m, st[m] + j), new))
        if not moves:
            stop = "no_move"
            break
        full = (lazy_k is None or since_full is None
                or (full_every and since_full + 1 >= full_every))
        picked = moves if full else lazy_moves(moves, scores, lazy_k)
        best = evaluate(picked)
        if best is None and not full:
            # Nothing acceptable among the re-checked moves: only a full round may stop.
            full = True
            done = {mv for mv, _ in picked}
            best = evaluate([mv for mv in moves if mv[0] not in done])
        since_full = 0 if full else since_full + 1
        if best is None:
            stop = "no_move"
            break
        _, move, states, acc, nll, saved, mloss = best
        # The moved ladder now starts from another rung: its moves are new ones.
        for key in [k for k in scores if k[:2] == move[:2]]:
            del scores[key]
        history.append((move, acc, nll, saved))
        trail.append(states)
        bar.update(1)
        post = {"red": f"{saved / max(base.total['dense'], 1):.3f}", "acc": f"{acc:.3f}"}
        if held is not None:
            drop = held.check(_plan(val, lad, states), move)
            post["val_drop"] = f"{drop:.3f}"
            bar.set_postfix(**post)
            if held.exceeded(drop):
                stop = "val_stop"
                break
        else:
            bar.set_postfix(**post)
    bar.close()
    chosen = len(history) - 1 if held is None else (held.chosen() or 0)
    states = trail[chosen]
    plan = _plan(ev, lad, states)
    validate_plan(plan, ev.layers, ev.g)
    return JointResult(plan=plan, states=states, history=history,
                       val=held.history if held is not None else [], chosen=chosen,
                       evaluations=evaluations[0], stop=stop, trail=trail)


def lazy_moves(moves: list, scores: dict, k: int) -> list:
    """The moves a lazy round evaluates: those without a score (never evaluated, or on a
    ladder that moved since) and the ``k`` best by their last score; moves whose last
    evaluation broke the budget (score ``None``) are left out until a full round. Greedy
    configurations only grow, so a move that broke the budget rarely fits again, and one
    accepted move elsewhere changes the other moves' scores little (re-checked before use)."""
    fresh = [mv for mv in moves if mv[0] not in scores]
    known = sorted((mv for mv in moves if scores.get(mv[0]) is not None),
                   key=lambda mv: -scores[mv[0]])
    return fresh + known[:k]


def check(net, plan: dict, x, y, eps: float, g: int = 1, *, progress: bool = True,
          reference=None) -> dict:
    """Golden execution of the dense network and of ``plan`` on ``(x, y)``; the eps verdict.

    ``reference``: the network whose dense run the drop is measured against (default
    ``net``; a retrained ``net`` is judged against the original network).
    """
    dense = golden_eval(reference if reference is not None else net, {}, x, y, g,
                        progress=progress, desc="golden dense")
    conf = golden_eval(net, plan, x, y, g, progress=progress, desc="golden plan")
    drop = dense.acc - conf.acc
    return {"acc_dense": dense.acc, "acc": conf.acc, "drop": drop,
            "mac_reduction": conf.mac_reduction, "within_eps": bool(drop <= eps + 1e-12),
            "dense": dense, "configured": conf}
