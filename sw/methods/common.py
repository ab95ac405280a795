"""What every method search shares: a network on a set of images, evaluated with a plan.

A *plan* is a dict ``{layer index: configured Layer}``; layers not named run as exported
(dense). :class:`NetEval` evaluates a plan on its images with the batch emulator (searches)
and :func:`golden_eval` evaluates it with the golden model, one image at a time (the numbers
we report). Both return an :class:`Evaluation`: top-1 accuracy, mean NLL and the per-layer MAC
counters of docs/semantics.md section 5.

The network is anything with ``layers`` (list of :class:`~skipconv.sw.layer.Layer`) and
``forward_int(x, conv=...)`` that evaluates the integer network with every engine layer run
by ``conv(layer, x_int) -> out_int`` (the exporter's ``ExportedNet``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..layer import Layer
from .emulate import COUNTERS, emulate

__all__ = ["Evaluation", "NetEval", "HeldOut", "golden_eval", "mac_reduction", "margins",
           "sum_counters", "plan_from_layers", "validate_plan"]


def sum_counters(per_layer: list[dict]) -> dict:
    """Add the MAC counters of several layers (or images)."""
    total = {k: 0 for k in COUNTERS}
    for c in per_layer:
        for k in COUNTERS:
            total[k] += int(c.get(k, 0))
    return total


def mac_reduction(counters: dict) -> float:
    """``1 - performed / dense`` of a counter dict (0 when there are no MACs)."""
    dense = counters.get("dense", 0)
    return 1.0 - counters["performed"] / dense if dense else 0.0


@dataclass
class Evaluation:
    """One plan evaluated on one image set."""

    acc: float                       # top-1 accuracy, 0..1
    nll: float                       # mean negative log-likelihood of the labels
    layers: list                     # per engine layer: dict of MAC counters
    positions: list = field(default_factory=list)   # per engine layer: outcome counts
    pred: np.ndarray | None = None   # (N,) predicted classes
    logits: np.ndarray | None = None  # (N, classes) float64

    @property
    def total(self) -> dict:
        return sum_counters(self.layers)

    @property
    def mac_reduction(self) -> float:
        return mac_reduction(self.total)

    @property
    def saved(self) -> int:
        t = self.total
        return t["dense"] - t["performed"]

    def summary(self) -> dict:
        return {"acc": self.acc, "nll": self.nll, "mac_reduction": self.mac_reduction,
                **{k: v for k, v in self.total.items()}}


def _logits_np(logits) -> np.ndarray:
    if hasattr(logits, "detach"):
        logits = logits.detach().cpu().numpy()
    return np.asarray(logits, dtype=np.float64)


def _score(logits, y) -> tuple[float, float, np.ndarray, np.ndarray]:
    z = _logits_np(logits)
    pred = z.argmax(axis=1)
    zs = z - z.max(axis=1, keepdims=True)
    logp = zs - np.log(np.exp(zs).sum(axis=1, keepdims=True))
    y = np.asarray(y, np.int64)
    return float((pred == y).mean()), float(-logp[np.arange(len(y)), y].mean()), pred, z


def margins(logits, y) -> np.ndarray:
    """Per image, the label's logit minus the largest other logit (< 0: misclassified)."""
    z = np.array(_logits_np(logits), dtype=np.float64)
    y = np.asarray(y, np.int64)
    rows = np.arange(len(y))
    own = z[rows, y].copy()
    z[rows, y] = -np.inf
    return own - z.max(axis=1)


def _fingerprint_array(a) -> bytes:
    a = np.ascontiguousarray(a)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.digest()


def _fingerprint_layer(L: Layer) -> bytes:
    """Content hash of everything that decides a layer's outputs and MACs."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(L.in_shape), L.stride, L.pad, L.out_bits, L.act_bits, L.act_signed,
                   L.raw, L.p, L.et)).encode())
    for name in ("w", "b", "M", "sh", "kind", "const", "nn", "leader", "order", "neg_start",
                 "spec", "th"):
        v = getattr(L, name)
        h.update(name.encode())
        if v is not None:
            h.update(_fingerprint_array(np.asarray(v)))
    return h.digest()


def validate_plan(plan: dict, layers: list, g: int) -> None:
    """Check every configured layer (semantics rules, shapes equal to the exported layer)."""
    for i, L in plan.items():
        if not 0 <= i < len(layers):
            raise ValueError(f"plan names layer {i!r}; the network has {len(layers)} layers")
        base = layers[i]
        if tuple(L.in_shape) != tuple(base.in_shape) or L.w.shape != base.w.shape:
            raise ValueError(f"plan layer {i} ({L.name!r}) does not match the exported layer")
        L.validate(g=g)


def plan_from_layers(configured: list, exported: list) -> dict:
    """The plan that replaces every exported layer by the configured one at the same index."""
    return {i: L for i, (L, E) in enumerate(zip(configured, exported)) if L is not E}


class NetEval:
    """A network, an image set and its labels, evaluated by batch emulation.

    ``capture=True`` in :meth:`run` also returns every engine layer's integer input and output
    (as lists of arrays, batch first), for statistics (spatial correlation, VELCRO moments,
    impacts).
    """

    def __init__(self, net, x, y, g: int = 1, *, reference: Evaluation | None = None):
        self.net = net
        self.x = x
        self.y = np.asarray(y, np.int64)
        self.g = int(g)
        self.layers = list(net.layers)
        # ``reference``: the dense evaluation drops are measured against, on these same
        # images (default: this network's own). A retrained network is judged against the
        # original dense network, not against its own dense version.
        if reference is not None and len(reference.pred) != len(self.y):
            raise ValueError(f"reference has {len(reference.pred)} images; this set has "
                             f"{len(self.y)}")
        self._base = reference
        self._base_margins = None
        # Greedy searches change one layer at a time: the layers before it see the same input
        # with the same configuration, so their results are reused (content-keyed).
        self._cache = OrderedDict()
        self.cache_size = 24

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()          # workers build their own
        return state

    def __len__(self):
        return len(self.y)

    def index_of(self, layer) -> int:
        for i, L in enumerate(self.layers):
            if L is layer:
                return i
        for i, L in enumerate(self.layers):        # fall back to the name (copies)
            if layer.name and L.name == layer.name:
                return i
        raise KeyError(f"layer {layer.name!r} is not one of the network's engine layers")

    def run(self, plan: dict | None = None, *, capture: bool = False,
            validated: bool = True) -> Evaluation | tuple:
        """Evaluate ``plan`` (``None``: dense). Returns an Evaluation (and captures)."""
        plan = plan or {}
        per_layer = [None] * len(self.layers)
        positions = [None] * len(self.layers)
        ins, outs = [None] * len(self.layers), [None] * len(self.layers)

        def conv(layer, x_int):
            i = self.index_of(layer)
            L = plan.get(i, self.layers[i])
            xb = np.asarray(x_int)
            single = xb.ndim == 3
            if single:
                xb = xb[None]
            key = (i, _fingerprint_layer(L), _fingerprint_array(xb))
            r = self._cache.get(key)
            if r is None:
                r = emulate(L, xb, self.g, validate=not validated)
                self._cache[key] = r
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            per_layer[i] = sum_counters([per_layer[i] or {}, r.counters])
            positions[i] = {k: (positions[i] or {}).get(k, 0) + v for k, v in r.positions.items()}
            if capture:
                ins[i], outs[i] = xb, r.out
            return r.out[0] if single else r.out

        logits = self.net.forward_int(self.x, conv=conv)
        acc, nll, pred, z = _score(logits, self.y)
        ev = Evaluation(acc=acc, nll=nll, layers=[c or {k: 0 for k in COUNTERS} for c in per_layer],
                        positions=positions, pred=pred, logits=z)
        return (ev, ins, outs) if capture else ev

    @property
    def base(self) -> Evaluation:
        """The dense evaluation (cached), or the ``reference`` given."""
        if self._base is None:
            self._base = self.run({})
        return self._base

    def guarded_acc(self, r: Evaluation) -> float:
        """Dense top-1 minus the share of images the dense network classifies right and ``r``
        wrong (gains ignored): the searches' accuracy, so that a configuration cannot spend
        the budget by trading losses on some images for lucky gains on others (these do not
        carry over to held-out images; measured on lenet: test drops of 1.1 points for
        0.2-0.4 point calibration drops before this rule)."""
        right = self.base.pred == self.y
        return self.base.acc - float(np.mean(right & (r.pred != self.y)))

    def margin_loss(self, r: Evaluation) -> float:
        """Mean over the images of the loss of logit margin (label minus the best other class)
        against the dense network, losses only. It does not saturate on images the network is
        sure of, so it measures how far a configuration moves the network's outputs even on
        images it classifies with a wide margin (e.g. its own training images), where top-1
        and NLL barely move."""
        if self._base_margins is None:
            self._base_margins = margins(self.base.logits, self.y)
        return float(np.maximum(self._base_margins - margins(r.logits, self.y), 0.0).mean())

    def subset(self, idx) -> "NetEval":
        idx = np.asarray(idx)
        return NetEval(self.net, self.x[idx], self.y[idx], self.g)


class HeldOut:
    """Held-out images that decide how far a search goes, never which move it takes.

    The searches rank their candidates on other images (seeded augmented copies of training
    images, ``run.optimize_model``) and check their configurations here: :meth:`check`
    evaluates a plan and records its guarded top-1 drop (dense top-1 minus
    :meth:`NetEval.guarded_acc`); :meth:`within` says whether a drop is within
    ``eps * margin`` and :meth:`exceeded` whether it is past ``eps * stop``. Greedy searches
    that grow a configuration (joint, perforation) check it after every accepted step, stop
    once it is exceeded, and return the step :meth:`chosen`: the last one within (a
    back-off; their floor, checked first as step 0, if none is). The zero-prediction layer pass, which walks
    down from its most aggressive configuration, takes the first one within.

    Selection on these images is then one choice along one trajectory instead of a choice
    among many candidates per step (on the zoo the single-method searches that spent their
    budget on the 500 calibration images they searched on exceeded eps on test: 1.1-2.1
    points, docs/benchmarks.md).
    """

    def __init__(self, ev: NetEval, eps: float, margin: float = 0.5, stop: float = 1.0):
        for name, v in (("eps", eps), ("margin", margin), ("stop", stop)):
            if not (isinstance(v, (int, float, np.floating)) and v >= 0):
                raise ValueError(f"held-out {name} = {v!r}: must be a number >= 0")
        self.ev, self.eps, self.margin, self.stop = ev, float(eps), float(margin), float(stop)
        #: one dict per :meth:`check`: ``step`` (the caller's label), ``drop`` (guarded top-1
        #: drop, fraction), ``nll`` and ``mac_reduction`` on these images
        self.history: list = []

    def __len__(self):
        return len(self.history)

    def check(self, plan: dict, step=None) -> float:
        """Evaluate ``plan`` here; record and return its guarded top-1 drop."""
        r = self.ev.run(plan)
        drop = self.ev.base.acc - self.ev.guarded_acc(r)
        self.history.append({"step": step, "drop": drop, "nll": r.nll,
                             "mac_reduction": r.mac_reduction})
        return drop

    def within(self, drop: float) -> bool:
        return drop <= self.eps * self.margin + 1e-12

    def exceeded(self, drop: float) -> bool:
        return drop > self.eps * self.stop + 1e-12

    def chosen(self) -> int | None:
        """Index in :attr:`history` of the last check within ``eps * margin`` (None: none)."""
        ok = [k for k, v in enumerate(self.history) if self.within(v["drop"])]
        return ok[-1] if ok else None

    @property
    def drops(self) -> list:
        return [v["drop"] for v in self.history]


def golden_eval(net, plan: dict, x, y, g: int = 1, *, progress: bool = True,
                desc: str = "golden") -> Evaluation:
    """Evaluate ``plan`` with :func:`skipconv.sw.golden.run`, one image per call (reported)."""
    from tqdm import tqdm

    from .. import golden

    layers = list(net.layers)
    validate_plan(plan, layers, g)
    y = np.asarray(y, np.int64)
    per_layer = [{k: 0 for k in COUNTERS} for _ in layers]
    positions = [dict() for _ in layers]
    ids = {id(L): i for i, L in enumerate(layers)}
    bar = tqdm(total=len(y) * len(layers), desc=desc, disable=not progress, leave=False)

    def conv(layer, x_int):
        i = ids.get(id(layer))
        if i is None:
            i = next(j for j, L in enumerate(layers) if L.name == layer.name)
        L = plan.get(i, layers[i])
        xb = np.asarray(x_int)
        single = xb.ndim == 3
        if single:
            xb = xb[None]
        outs = []
        for img in xb:
            r = golden.run(L, img, g)
            outs.append(r.out)
            for k in COUNTERS:
                per_layer[i][k] += int(getattr(r, k))
            for k, v in r.positions.items():
                positions[i][k] = positions[i].get(k, 0) + v
            bar.update(1)
        out = np.stack(outs)
        return out[0] if single else out

    try:
        logits = net.forward_int(x, conv=conv)
    finally:
        bar.close()
    acc, nll, pred, z = _score(logits, y)
    return Evaluation(acc=acc, nll=nll, layers=per_layer, positions=positions, pred=pred,
                      logits=z)
