"""The NumPy golden model of one engine layer: the single source of truth (docs/semantics.md).

``run(layer, x, g)`` returns every output, the performed MACs of every position, its outcome
and the per-layer accounting. It is vectorized over output positions: the loops are over
channels (early-termination refinement) and never over positions.

Exactness: every sum is formed by a float matrix product only where the bound on its
magnitude keeps float arithmetic exact (float32 below 2**24, float64 below 2**53); beyond that
it falls back to int64 products.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .layer import (COMPUTE, CONST, COPY, INT32_MAX, Layer, LayerError, atomic_write_bytes,
                    take_rows)

__all__ = ["OUTCOMES", "COMPUTED", "PREDICTED", "STOPPED", "Result", "run", "im2col", "requantize"]

#: Outcome of a position, indexed by the codes stored in ``Result.outcome``.
OUTCOMES = ("computed", "const", "copy", "predicted", "stopped")
COMPUTED, PREDICTED, STOPPED = 0, 3, 4   # CONST (1) and COPY (2) share the plan's codes

_COUNTERS = ("dense", "performed", "velcro", "perforation", "zero_pred", "early_term")
_F32_EXACT = 1 << 24
_F64_EXACT = 1 << 53
_REFINE_BLOCK = 1 << 20   # elements per chunk of the early-termination search
_I32 = 1 << 31
_MAX_BLOCKS = 32          # most block boundaries in the early-termination search
_SEARCH_OPS = 8           # element operations per pair and tap in a block (cost model)
_BATCH_ELEMENTS = 1 << 24  # tap-matrix elements per batch chunk (~128 MB float64)


@dataclass
class Result:
    """What running one layer produced (semantics.md sections 5 and 7)."""

    out: np.ndarray          # (Cout, Ho, Wo) int64
    macs: np.ndarray         # (Cout, Ho, Wo) int64, performed MACs per position
    outcome: np.ndarray      # (Cout, Ho, Wo) int8, index into OUTCOMES
    dense: int = 0
    performed: int = 0
    velcro: int = 0
    perforation: int = 0
    zero_pred: int = 0
    early_term: int = 0
    positions: dict = field(default_factory=dict)
    cycles: int | None = None

    def accounting(self) -> dict:
        """The per-layer MAC counters (``dense == performed + velcro + ... + early_term``)."""
        return {name: int(getattr(self, name)) for name in _COUNTERS}

    @property
    def skipped(self) -> int:
        return self.dense - self.performed

    def to_npz(self, path) -> None:
        """Write the section-7 result file (atomically)."""
        import io
        arrays = {"out": self.out, "macs": self.macs, "outcome": self.outcome}
        arrays.update({k: np.int64(v) for k, v in self.accounting().items()})
        arrays.update({f"positions_{k}": np.int64(self.positions.get(k, 0)) for k in OUTCOMES})
        if self.cycles is not None:
            arrays["cycles"] = np.int64(self.cycles)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def from_npz(cls, path) -> "Result":
        with np.load(os.fspath(path), allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
        missing = [k for k in ("out", "macs", *_COUNTERS) if k not in data]
        if missing:
            raise LayerError(f"result file {os.fspath(path)!r}: array {missing[0]!r} is missing")
        out = data["out"].astype(np.int64)
        outcome = data.get("outcome")
        return cls(
            out=out, macs=data["macs"].astype(np.int64),
            outcome=(outcome.astype(np.int8) if outcome is not None
                     else np.zeros(out.shape, np.int8)),
            **{k: int(data[k]) for k in _COUNTERS},
            positions={k: int(data[f"positions_{k}"]) for k in OUTCOMES
                       if f"positions_{k}" in data},
            cycles=int(data["cycles"]) if "cycles" in data else None,
        )

    def mismatches(self, other: "Result") -> list[str]:
        """Describe how ``other`` differs from this result (empty when bit-identical)."""
        problems = []
        for name in ("out", "macs"):
            a, b = getattr(self, name), getattr(other, name)
            if a.shape != b.shape:
                problems.append(f"{name}: shape {b.shape} != {a.shape}")
                continue
            diff = np.argwhere(a != b)
            if diff.size:
                c, y, x = (int(v) for v in diff[0])
                problems.append(f"{name}[{c}, {y}, {x}] = {int(b[c, y, x])}, expected "
                                f"{int(a[c, y, x])} ({len(diff)} positions differ)")
        for name in _COUNTERS:
            if int(getattr(self, name)) != int(getattr(other, name)):
                problems.append(f"{name} = {int(getattr(other, name))}, expected "
                                f"{int(getattr(self, name))}")
        for name in OUTCOMES:
            if other.positions and self.positions.get(name, 0) != other.positions.get(name, 0):
                problems.append(f"positions[{name}] = {other.positions.get(name, 0)}, expected "
                                f"{self.positions.get(name, 0)}")
        return problems


# -- arithmetic helpers ----------------------------------------------------------------------

def im2col(x: np.ndarray, k: int, stride: int, pad: int, dtype=np.float64) -> np.ndarray:
    """Return the ``(Cin*K*K, [N*]Ho*Wo)`` tap matrix; row ``ci*K*K + ky*K + kx`` is that tap.

    ``x`` is ``(Cin, H, W)`` or a batch ``(N, Cin, H, W)``; a batch's columns are image-major.
    """
    batch = x if x.ndim == 4 else x[None]
    n, cin, h, w = batch.shape
    xp = np.zeros((n, cin, h + 2 * pad, w + 2 * pad), dtype)     # converted while padded
    xp[:, :, pad:pad + h, pad:pad + w] = batch
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))
    win = win[:, :, ::stride, ::stride]              # (N, Cin, Ho, Wo, K, K)
    ho, wo = win.shape[2], win.shape[3]
    return np.ascontiguousarray(win.transpose(1, 4, 5, 0, 2, 3)).reshape(cin * k * k,
                                                                          n * ho * wo)


def _product_plan(w: np.ndarray, xmax: int):
    """How :func:`_exact_products` multiplies ``w`` (and any masked copy of it) exactly.

    float32 products are exact while every partial sum stays below 2**24: beyond that bound
    the taps are cut into chunks that each respect it (float32 products of the chunks, summed
    exactly in float64: about twice as fast as one float64 product). Returns ``"f32"``,
    ``"f64"``, ``"int"`` or the chunk starts. A copy of ``w`` with some weights zeroed has
    smaller sums, so the plan holds for it too.
    """
    # Chunks from the per-tap maximum over rows (two reductions, no |w| copy): a set of taps
    # whose maxima sum below 2**24 / xmax keeps every row's partial sums below 2**24.
    colmax = np.maximum(w.max(axis=0), -w.min(axis=0)).astype(np.float64) * max(xmax, 1)
    if float(colmax.sum()) < _F32_EXACT:
        return "f32"
    bound = _product_bound(w, xmax)             # the exact rows' bound, when it matters
    if bound < _F32_EXACT:
        return "f32"
    if bound >= _F64_EXACT:
        return "int"
    limit = _F32_EXACT - 1 - float(colmax.max())
    if limit <= 0:
        return "f64"
    before = np.cumsum(colmax) - colmax                 # sum of the maxima before each tap
    chunk = np.floor(before / limit)
    return np.concatenate(([0], np.flatnonzero(np.diff(chunk)) + 1))


def _product_bound(w: np.ndarray, xmax: int) -> float:
    """Largest ``sum(|w[c]|) * xmax``: no partial sum of a row's products exceeds it."""
    return float(np.abs(w).sum(axis=1, dtype=np.float64).max()) * max(xmax, 1)


def _exact_products(w: np.ndarray, cols_by_dtype, xmax: int, plan=None) -> np.ndarray:
    """``w @ cols`` as exact int64; ``w`` (R, T) holds integers (any integer or float dtype).

    ``plan`` is :func:`_product_plan` of ``w`` or of a matrix ``w`` is a masked copy of.
    """
    if w.size == 0:
        return np.zeros((w.shape[0], cols_by_dtype("int").shape[1]), np.int64)
    if plan is None:
        plan = _product_plan(w, xmax)
    if isinstance(plan, str):
        if plan == "f32":
            return (w.astype(np.float32, copy=False) @ cols_by_dtype(np.float32)).astype(np.int64)
        if plan == "f64":
            return (w.astype(np.float64) @ cols_by_dtype(np.float64)).astype(np.int64)
        return w.astype(np.int64, copy=False) @ cols_by_dtype("int")
    w32, cols = w.astype(np.float32, copy=False), cols_by_dtype(np.float32)
    ends = list(plan[1:]) + [w.shape[1]]
    out = np.zeros((w.shape[0], cols.shape[1]), np.float64)
    for a, b in zip(plan, ends):
        out += w32[:, a:b] @ cols[a:b]
    return out.astype(np.int64)


class _Taps:
    """The tap matrix of one input, built once per dtype on demand."""

    def __init__(self, x, layer: Layer):
        self._x, self._layer, self._cache = x, layer, {}
        lo, hi = layer.x_range()
        self.xmax = max(abs(lo), abs(hi))

    def __call__(self, dtype):
        key = "int" if dtype == "int" else np.dtype(dtype).name
        if key not in self._cache:
            dt = np.int64 if dtype == "int" else dtype
            L = self._layer
            self._cache[key] = im2col(self._x, L.k, L.stride, L.pad, dt)
        return self._cache[key]


def requantize(acc: np.ndarray, M: np.ndarray, sh: np.ndarray, out_bits: int, *,
               overwrite: bool = False) -> np.ndarray:
    """``q(acc)`` of semantics.md section 1, per channel (axis 0), exact.

    ``overwrite=True`` lets it compute in ``acc``'s own memory (an int64 array the caller
    no longer needs).
    """
    acc = np.asarray(acc, np.int64)
    shape = (-1,) + (1,) * (acc.ndim - 1)
    M = np.asarray(M, np.int64).reshape(shape)
    sh = np.asarray(sh, np.int64).reshape(shape)
    rnd = np.where(sh > 0, np.left_shift(np.int64(1), np.maximum(sh - 1, 0)), 0)
    # acc <= 0 gives (0 * M + rnd) >> sh = 0 (rnd < 2**sh): ReLU needs no separate select.
    pos = np.maximum(acc, 0, out=acc if overwrite else None)
    if pos.size and int(pos.max()) >= (1 << 62) // 65536:
        # Products beyond int64: use Python integers (only for extreme widths).
        prod = pos.astype(object) * M.astype(object) + rnd.astype(object)
        scaled = np.array([int(v) >> int(s) for v, s in
                           zip(prod.ravel(), np.broadcast_to(sh, prod.shape).ravel())],
                          dtype=object).reshape(prod.shape)
        return np.minimum(scaled, (1 << out_bits) - 1).astype(np.int64)
    # In place: large temporaries cost more (fresh pages) than the arithmetic.
    pos *= M
    pos += rnd
    pos >>= sh
    return np.minimum(pos, (1 << out_bits) - 1, out=pos)


# -- early termination -----------------------------------------------------------------------

def _stop_points(L: Layer, acc, taps: _Taps, w2, w32, g: int, plan):
    """Per position: the check point where early termination stops (or ``T``) and whether it did.

    Returns ``(e, fired)``, both (Cout, P). ``fired`` is true when a rule fired at any check
    point, including the final one (the output is then 0).
    """
    cout, t = w2.shape
    npos = acc.shape[1]
    e_stop = np.full((cout, npos), t, np.int64)
    fired = np.zeros((cout, npos), bool)
    if L.et == "off":
        return e_stop, fired

    b = L.b[:, None]
    rank = _ranks(L.order)

    def psum_at(e):          # psum after the first e[c] taps of order[c], all positions
        return b + _exact_products(np.where(rank < e[:, None], w32, 0), taps, taps.xmax, plan)

    # Rule 2: from the first check point at or after neg_start, psum can only fall (weights
    # <= 0 on a non-negative input; a signed input has neg_start = T, the final check only).
    e0 = np.minimum(-(-L.neg_start // g) * g, t)
    ps0 = psum_at(e0)
    at_e0 = ps0 <= 0
    e_stop[at_e0] = np.broadcast_to(e0[:, None], e_stop.shape)[at_e0]
    fired |= at_e0
    crossing = ~at_e0 & (acc <= 0)        # stops at some check point in (e0, T]
    if crossing.any():
        c_idx, p_idx = np.nonzero(crossing)
        e_stop[c_idx, p_idx] = _first_stop(L.order, w2, w32, rank, e0, ps0, crossing, c_idx,
                                           p_idx, taps, g, plan)
        fired |= crossing

    if L.et == "predictive":
        # Rule 1 at e == spec: psum <= th stops; it is checked before rule 2 at that point.
        ps1 = psum_at(L.spec)
        rule1 = ps1 <= L.th[:, None]
        spec = np.broadcast_to(L.spec[:, None], e_stop.shape)
        take = rule1 & (~fired | (spec <= e_stop))
        e_stop[take] = spec[take]
        fired |= rule1
    return e_stop, fired


def _ranks(order: np.ndarray) -> np.ndarray:
    """``rank[c, tap]``: where ``tap`` comes in ``order[c]`` (the inverse permutations)."""
    cout, t = order.shape
    rank = np.empty(cout * t, np.int64)
    rank[(np.arange(cout) * t)[:, None] + order] = np.arange(t)
    return rank.reshape(cout, t)


def _first_stop(order, w2, w32, rank, e0, ps0, crossing, c_idx, p_idx, taps: _Taps, g, plan):
    """First check point after ``e0`` with psum <= 0, for each crossing (channel, position).

    The psum only falls after ``e0``, so the search is in two levels: psums at a few block
    boundaries by masked matrix products (cheap in BLAS), then a running sum inside the one
    block where each pair crosses, vectorized over all pairs.
    """
    cout, t = w2.shape
    neg_len = t - e0
    cols_any = crossing.any(axis=0)
    # Balance the two levels: each block boundary costs a masked (Cout x T) weight matrix and
    # a product over the crossing columns; the search inside a block costs ~_SEARCH_OPS
    # element operations per pair and tap of the block.
    boundary_cost = cout * t * (int(cols_any.sum()) / 16 + 3)
    search_cost = len(c_idx) * int(neg_len.max()) * _SEARCH_OPS
    n_blocks = int(np.clip(round(np.sqrt(search_cost / boundary_cost)), 1, _MAX_BLOCKS))
    bounds = [e0]
    for j in range(1, n_blocks):
        step = -(-(j * neg_len) // (n_blocks * g)) * g          # multiples of g: check points
        bounds.append(np.minimum(e0 + step, t))
    bounds.append(np.full(cout, t))
    reduced = {}

    def reduced_taps(dtype):                    # the tap matrix on the crossing columns only
        key = str(dtype)
        if key not in reduced:
            reduced[key] = np.ascontiguousarray(taps(dtype)[:, cols_any])
        return reduced[key]
    lo_rank = e0[c_idx].copy()                  # block start (a check point) of each pair
    lo_psum = ps0[c_idx, p_idx].copy()
    hi_rank = np.full(len(c_idx), t)
    open_ = np.ones(len(c_idx), bool)           # crossing not yet located
    col_pos = np.cumsum(cols_any) - 1           # position -> column in the reduced matrix
    n_cols = int(cols_any.sum())
    pair_flat = c_idx * n_cols + col_pos[p_idx]
    ps0_pairs = ps0[c_idx, p_idx]
    for j in range(1, n_blocks):
        inside = (rank >= e0[:, None]) & (rank < bounds[j][:, None])
        part = _exact_products(np.where(inside, w32, 0), reduced_taps, taps.xmax, plan)
        ps_j = ps0_pairs + np.take(part, pair_flat)
        b_j = bounds[j][c_idx]
        crossed = open_ & (ps_j <= 0)
        hi_rank[crossed] = b_j[crossed]
        still = open_ & ~crossed
        lo_rank[still], lo_psum[still] = b_j[still], ps_j[still]
        open_ = still

    # Inside the block: running sum over the taps of ranks lo.., pair by pair, vectorized.
    # Each pair's crossing is at a check point in (lo, hi], and psum(hi) <= 0, so the window
    # needs no mask: terms past hi (or past T, where the padded tables hold weight 0) come
    # after the crossing and cannot move it.
    width = int((hi_rank - lo_rank).max())
    cols32 = reduced_taps(np.float32)
    small = cols32.size < _I32 and cout * (t + width) < _I32
    itype = np.int32 if small else np.int64
    # Position-major taps (one position's taps contiguous): a pair's gathers stay in one row.
    cols = np.ascontiguousarray(cols32.T).astype(itype).ravel()   # integers: exact
    ordered_w = np.zeros((cout, t + width), itype)          # weight of the r-th tap, padded
    ordered_w[:, :t] = take_rows(w2, order)
    ordered_tap = np.zeros((cout, t + width), itype)         # its tap index
    ordered_tap[:, :t] = order
    ordered_w, ordered_tap = ordered_w.ravel(), ordered_tap.ravel()
    # Every term and every running sum of a window is within the layer's product bound (the
    # crossing also bounds psum(lo)): int32 holds them exactly when the bound allows.
    acc_type = np.int32 if small and _product_bound(w32, taps.xmax) < _I32 else np.int64
    steps = np.arange(width, dtype=itype)
    result = np.empty(len(c_idx), np.int64)
    chunk = max(1, _REFINE_BLOCK // max(width, 1))
    for s in range(0, len(c_idx), chunk):
        sl = slice(s, s + chunk)
        c, lo = c_idx[sl], lo_rank[sl]
        flat = (c * (t + width) + lo).astype(itype)[:, None] + steps   # (n, width)
        terms = np.take(ordered_w, flat).astype(acc_type, copy=False)
        terms *= np.take(cols, np.take(ordered_tap, flat)
                         + (col_pos[p_idx[sl]] * t).astype(itype)[:, None])
        run = np.cumsum(terms, axis=1, dtype=acc_type)
        below = run <= (-lo_psum[sl]).astype(acc_type)[:, None]          # psum <= 0
        if g > 1:
            e = lo[:, None] + steps + 1                                     # taps done
            below &= (e % g == 0) | (e == t)
        result[sl] = lo + np.argmax(below, axis=1) + 1
    return result


# -- the layer -------------------------------------------------------------------------------

def run(layer: Layer, x: np.ndarray, g: int = 1) -> Result:
    """Run ``layer`` on input ``x`` with ``g`` MACs per step; see docs/semantics.md.

    ``x`` is one input ``(Cin, H, W)`` or a batch ``(N, Cin, H, W)``. For a batch, ``out``,
    ``macs`` and ``outcome`` get a leading ``N`` axis and the counters are summed over it.
    """
    if not isinstance(g, (int, np.integer)) or isinstance(g, bool) or g < 1:
        raise LayerError(f"g = {g!r}: must be an integer >= 1")
    g = int(g)
    x = np.asarray(x)
    batched = x.ndim == 4
    if batched:
        layer.validate(g=g)
        if x.shape[1:] != tuple(layer.in_shape):
            raise LayerError(f"x.shape = {x.shape}: a batch must be (N, "
                             f"{', '.join(str(v) for v in layer.in_shape)})")
        layer.validate(x=x[0])                              # dtype
        lo, hi = layer.x_range()
        if x.size and (x.min() < lo or x.max() > hi):
            bad = int(x.min()) if x.min() < lo else int(x.max())
            raise LayerError(f"x = {bad}: outside the input range {lo}..{hi}")
    else:
        layer.validate(g=g, x=x)
    L = layer.normalized(validate=False)
    xs = x[None] if not batched else x          # im2col converts to its product dtype
    ho, wo = L.out_hw
    per_image = max(1, L.taps * ho * wo)
    chunk = max(1, _BATCH_ELEMENTS // per_image)
    parts = [_run_batch(L, xs[i:i + chunk], g) for i in range(0, len(xs), chunk)]
    result = parts[0] if len(parts) == 1 else _concat(parts)
    if not batched:
        result.out, result.macs, result.outcome = result.out[0], result.macs[0], result.outcome[0]
    return result


def _concat(parts: list[Result]) -> Result:
    out = Result(out=np.concatenate([r.out for r in parts]),
                 macs=np.concatenate([r.macs for r in parts]),
                 outcome=np.concatenate([r.outcome for r in parts]),
                 positions={k: sum(r.positions[k] for r in parts) for k in OUTCOMES})
    for name in _COUNTERS:
        setattr(out, name, sum(getattr(r, name) for r in parts))
    return out


def _run_batch(L: Layer, xs: np.ndarray, g: int) -> Result:
    """The rules on a batch: images are just more columns of the (Cout, N*Ho*Wo) matrices.

    Work on (Cout, N*P) arrays is done in place where it can be: a fresh temporary of that
    size costs more (new pages) than the arithmetic. Steps of a mechanism the layer does not
    use are skipped; the result is the same either way.
    """
    n = len(xs)
    cout, ho, wo = L.out_shape
    t = L.taps
    w2 = L.w.reshape(cout, t)
    taps = _Taps(xs, L)

    w32 = w2.astype(np.float32)                 # small integers: exact; masked copies too
    plan = _product_plan(w32, taps.xmax)
    acc = _exact_products(w32, taps, taps.xmax, plan)                 # (Cout, N*P)
    acc += L.b[:, None]
    ets = L.et != "off"
    if ets:
        e_stop, fired = _stop_points(L, acc, taps, w2, w32, g, plan)

    if L.raw:
        value = np.clip(acc, 0, INT32_MAX, out=acc)
    else:
        value = requantize(acc, L.M, L.sh, L.out_bits, overwrite=True)
    shape = (cout, n, ho, wo)
    if ets:
        value[fired] = 0
    out = value.reshape(shape)

    kind = L.kind[:, None]                                   # the plan is the same per image
    has_const, has_copy = bool((L.kind == CONST).any()), bool((L.kind == COPY).any())
    if has_const:
        out = np.where(kind == CONST, L.const[:, None], out)

    predicted = None
    if L.p:
        predicted = _predicted_followers(out, kind, L.leader[:, None], L.p)
        out[predicted] = 0

    if has_copy:
        copy = np.broadcast_to(kind == COPY, shape)
        ny, nx = L.nn[..., 0], L.nn[..., 1]
        out = np.where(copy, out[..., ny, nx], out)

    # Performed MACs: e_stop (or T) where computed, 0 where CONST, COPY or predicted.
    macs = e_stop.reshape(shape) if ets else np.full(shape, t, np.int64)
    outcome = np.zeros(shape, np.int8)                        # COMPUTED
    if ets:
        outcome[macs < t] = STOPPED
    if has_const or has_copy:
        skipped = np.broadcast_to(kind != COMPUTE, shape)
        macs = np.where(skipped, 0, macs)
        outcome = np.where(skipped, np.broadcast_to(kind, shape).astype(np.int8), outcome)
    if predicted is not None:
        macs[predicted] = 0
        outcome[predicted] = PREDICTED

    counts = [int(np.count_nonzero(outcome == code)) for code in range(len(OUTCOMES))]
    n_const, n_copy, n_pred = int(counts[CONST]), int(counts[COPY]), int(counts[PREDICTED])
    performed = int(macs.sum())
    result = Result(
        out=out.swapaxes(0, 1), macs=macs.swapaxes(0, 1),
        outcome=outcome.swapaxes(0, 1),
        dense=cout * n * ho * wo * t,
        performed=performed,
        velcro=n_const * t,
        perforation=n_copy * t,
        zero_pred=n_pred * t,
        early_term=int(counts[COMPUTED] + counts[STOPPED]) * t - performed,
        positions={name: int(counts[i]) for i, name in enumerate(OUTCOMES)},
    )
    total = (result.performed + result.velcro + result.perforation + result.zero_pred
             + result.early_term)
    assert total == result.dense, "MAC identity broken: a bug in the golden model"
    return result


def _predicted_followers(out, kind, leader, p):
    """Followers (COMPUTE, not leaders) of windows whose leaders are all zero.

    Works on the last two axes (Ho, Wo); leading axes (channels, images) broadcast.
    """
    *lead, ho, wo = out.shape
    hp, wp = -(-ho // p) * p, -(-wo // p) * p
    nonzero_leader = np.zeros((*lead, hp, wp), bool)          # outside the ofmap: zero
    nonzero_leader[..., :ho, :wo] = leader & (out != 0)
    live = nonzero_leader.reshape(*lead, hp // p, p, wp // p, p).any(axis=(-3, -1))
    window_predicted = np.repeat(np.repeat(~live, p, axis=-2), p, axis=-1)[..., :ho, :wo]
    return window_predicted & ~leader & (kind == COMPUTE)
