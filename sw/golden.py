"""The NumPy golden model of one engine layer: the single source of truth (docs/semantics.md).

``run(layer, x, g)`` returns every output, the performed MACs of every position, its outcome
and the per-layer accounting. It is vectorized over output positions: the only loops are
those of the early-termination stop-point search (rounds, the taps of a round, chunks of
(channel, position) pairs), never over positions.

Exactness: every sum is formed by a float matrix product only where the bound on its
magnitude keeps float arithmetic exact (float32 below 2**24, float64 below 2**53); beyond that
it falls back to int64 products. The stop-point search sums integers (int32 where its bound
allows, else int64).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .layer import COMPUTE, CONST, COPY, INT32_MAX, Layer, LayerError, atomic_write_bytes

__all__ = ["OUTCOMES", "COMPUTED", "PREDICTED", "STOPPED", "Result", "run", "im2col", "requantize"]

#: Outcome of a position, indexed by the codes stored in ``Result.outcome``.
OUTCOMES = ("computed", "const", "copy", "predicted", "stopped")
COMPUTED, PREDICTED, STOPPED = 0, 3, 4   # CONST (1) and COPY (2) share the plan's codes

_COUNTERS = ("dense", "performed", "velcro", "perforation", "zero_pred", "early_term")
_F32_EXACT = 1 << 24
_F64_EXACT = 1 << 53
# Pairs x taps per chunk of the early-termination search. Its temporaries (int32 sums, int64
# indices: 2-4 MB) are reused from one chunk to the next; larger chunks (8-16 MB) grew the
# heap further, and glibc gives the heap's top back after each call, so every call paid page
# faults for them (on 64x56x56 several ms of system time).
_SEARCH_BLOCK = 1 << 19
_ROWS_BYTES = 1 << 24     # largest copy of a round's input rows
_I32 = 1 << 31
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
    # The per-tap maxima of |w| give the chunks (a set of taps whose maxima sum below
    # 2**24 / xmax keeps every row's partial sums below 2**24), the row sums of |w| the exact
    # rows' bound when it matters.
    amax, rowsum = _abs_stats(w)
    xmax = max(xmax, 1)
    colmax = amax.astype(np.float64) * xmax
    if float(colmax.sum()) < _F32_EXACT:
        return "f32"
    bound = float(rowsum.max()) * xmax
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


def _abs_stats(w: np.ndarray):
    """Per-column maxima and exact row sums of ``|w|``, one cache-sized block of rows at a
    time (no full ``|w|`` temporary: a fresh array of that size costs more than the sums)."""
    rows, t = w.shape
    ftype = w.dtype if w.dtype.kind == "f" else np.float64      # no integer overflow
    step = max(1, (1 << 17) // max(t, 1))
    buf = np.empty((min(step, rows), t), ftype)
    amax, rowsum = np.zeros(t, ftype), np.empty(rows, ftype)
    for r0 in range(0, rows, step):
        a = np.abs(w[r0:r0 + step], out=buf[:min(step, rows - r0)], casting="unsafe")
        np.maximum(amax, a.max(axis=0), out=amax)
        rowsum[r0:r0 + step] = a.sum(axis=1)
    # float32 sums of integers are exact while every partial sum stays below 2**24.
    if ftype != np.float64 and float(amax.max(initial=0)) * t >= _F32_EXACT:
        rowsum = np.abs(w).sum(axis=1, dtype=np.float64)
    return amax, rowsum


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

    def release(self, keep=None):
        """Drop the cached matrices but ``keep``'s (memory for what follows: large fresh
        temporaries cost page faults)."""
        key = None if keep is None else np.dtype(keep).name
        self._cache = {k: v for k, v in self._cache.items() if k == key}


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

    Returns ``(e, fired, search)``; ``e`` and ``fired`` are (Cout, P). ``fired`` is true when a
    rule fired at any check point, including the final one (the output is then 0).
    ``search`` is None or a :class:`_Search`: the (channel, position) pairs whose psum crosses
    zero after the first rule-2 check point. They all output 0 (``fired``), so only their
    stop points are missing, and the caller resolves them for the positions that are really
    computed (:meth:`_Search.resolve`); until then their ``e`` is ``T``.
    """
    cout, t = w2.shape
    npos = acc.shape[1]
    e_stop = np.full((cout, npos), t, np.int64)
    fired = np.zeros((cout, npos), bool)
    if L.et == "off":
        return e_stop, fired, None

    b = L.b[:, None]
    ranks = []

    def rank():
        if not ranks:
            ranks.append(_ranks(L.order))
        return ranks[0]

    def psum_at(e):          # psum after the first e[c] taps of order[c], all positions
        masked = w32 * (rank() < e[:, None])          # float32 (np.where is much slower)
        return b + _exact_products(masked, taps, taps.xmax, plan)

    # Rule 2: from the first check point at or after neg_start, psum can only fall (weights
    # <= 0 on a non-negative input; a signed input has neg_start = T, the final check only).
    e0 = np.minimum(-(-L.neg_start // g) * g, t)
    # Every positive weight comes before neg_start <= e0 (validated), so a channel has at
    # most e0 of them, and the total is sum(e0) only when every channel has exactly e0 (one
    # count over the whole table: much cheaper than per-row counts).
    if int(np.count_nonzero(w32 > 0)) == int(e0.sum()):
        # A channel with exactly e0 positive weights has them as its first e0 taps: no rank
        # table needed. On a non-negative input psum(e0) >= b then, so only channels with
        # b <= 0 can stop at e0.
        rows = np.flatnonzero(L.b <= 0) if L.x_range()[0] >= 0 else np.arange(cout)
        at_e0 = np.zeros((cout, npos), bool)
        if len(rows):
            wpos = w32[rows] if len(rows) < cout else w32.copy()
            ps0 = _exact_products(np.maximum(wpos, np.float32(0), out=wpos), taps, taps.xmax,
                                  plan)
            ps0 += b[rows]
            at_e0[rows] = ps0 <= 0
    else:
        at_e0 = psum_at(e0) <= 0
    np.copyto(e_stop, e0[:, None], where=at_e0)
    fired |= at_e0
    crossing = ~at_e0 & (acc <= 0)        # stops at some check point in (e0, T]
    fired |= crossing
    search = None
    if crossing.any():
        search = _Search(L, acc, taps, w32, e0, crossing, g)

    if L.et == "predictive":
        # Rule 1 at e == spec: psum <= th stops; it is checked before rule 2 at that point.
        # It needs the crossing pairs' rule-2 stop points: applied after the search.
        ps1 = psum_at(L.spec)
        rule1 = ps1 <= L.th[:, None]
        if search is None:
            _apply_rule1(L, e_stop, fired, rule1)
        else:
            search.rule1 = rule1
        fired |= rule1
    return e_stop, fired, search


def _apply_rule1(L: Layer, e_stop, rule2_fired, rule1):
    """Predictive rule 1 at ``e == spec`` over the rule-2 stop points ``e_stop`` (in place)."""
    spec = np.broadcast_to(L.spec[:, None], e_stop.shape)
    take = rule1 & (~rule2_fired | (spec <= e_stop))
    e_stop[take] = spec[take]


def _ranks(order: np.ndarray) -> np.ndarray:
    """``rank[c, tap]``: where ``tap`` comes in ``order[c]`` (the inverse permutations)."""
    cout, t = order.shape
    rank = np.empty(cout * t, np.int64)
    rank[(np.arange(cout) * t)[:, None] + order] = np.arange(t)
    return rank.reshape(cout, t)


class _Search:
    """The exact rule-2 stop points of the pairs whose psum crosses zero after ``e0``."""

    def __init__(self, L, acc, taps, w2, e0, crossing, g):
        self.L, self.taps, self.w2, self.e0, self.g = L, taps, w2, e0, g
        self.crossing, self.rule1 = crossing, None
        # The pairs (channel-major) and their accumulators: the caller may reuse acc.
        self.flat = np.flatnonzero(crossing)
        self.acc = acc.ravel()[self.flat]
        self.xtype = _search_xtype(L)

    def resolve(self, e_stop, needed=None):
        """Write the stop points of the crossing pairs where ``needed`` (default: all) into
        ``e_stop``; then apply predictive rule 1 if the layer has it."""
        L = self.L
        flat, acc = self.flat, self.acc
        self.flat = self.acc = None          # (called once: memory for the search's arrays)
        if needed is not None:
            keep = np.flatnonzero(needed.ravel()[flat])     # (faster than two bool masks)
            flat, acc = np.take(flat, keep), np.take(acc, keep)
            del keep
        if len(flat):
            e_stop.ravel()[flat] = _first_stop(L.order, self.w2, self.e0, flat, acc,
                                               self.taps, self.g)
        if self.rule1 is not None:
            rule2_fired = self.crossing | (e_stop < L.taps)
            _apply_rule1(L, e_stop, rule2_fired, self.rule1)


_FIRST_WIDTH = 16     # tail taps of the first round of the backward search
_MAX_WIDTH = 512      # most tail taps per round
_GROWTH = 2           # a round after k0 taps is k0 / _GROWTH wide (at least the first's width)
_ROWS_SHARE = 8       # input rows copied while more than 1/_ROWS_SHARE of the pairs are open


def _search_xtype(L: Layer):
    """The narrowest dtype of the search's input matrix."""
    lo_x, hi_x = L.x_range()
    if lo_x < 0:                 # a signed input has no crossing pairs (neg_start = T)
        return np.int64
    return np.uint8 if hi_x < 256 else np.uint16 if hi_x < 65536 else np.int64


def _first_stop(order, w2, e0, pairs, acc, taps: _Taps, g):
    """First check point after ``e0`` with psum <= 0, for each crossing (channel, position):
    ``pairs`` are their flat indices in the (Cout, P) arrays (ascending), ``acc`` their
    accumulators.

    After ``e0`` every term is <= 0 (non-positive weights, non-negative input), so psum falls
    monotonically from ``psum(e0) > 0`` to ``acc = psum(T) <= 0``. Scanning backward from the
    end: ``psum(T - k) = acc + s_k``, where ``s_k >= 0`` is minus the sum of the last ``k``
    terms; with ``k*`` the fewest last taps with ``s_k > -acc`` (the target), psum is > 0 up
    to ``T - k*`` and <= 0 after, so the stop is the first check point ``>= T - k* + 1``.
    Most pairs stop near the end, so the scan runs in rounds of growing width over the pairs
    not yet resolved: each round gathers the round's taps of every open pair (channel-major
    pairs and a tap-major input matrix: neighbouring pairs read neighbouring memory), forms
    the running sum row by row, and finds ``k*`` by a binary search in the monotone sums.
    Terms of ranks before ``e0`` are zeroed: the crossing comes before them (``s`` at
    ``k = T - e0`` is ``psum(e0) - acc > -acc``), and the sums stay monotone.
    """
    cout, t = w2.shape
    lo_x, hi_x = taps._layer.x_range()
    cols = taps(_search_xtype(taps._layer))               # (T, P) tap-major
    npos = cols.shape[1]
    flat = cols.ravel()
    # The open pairs, one column each: original index, channel, position, what the sum of
    # the taps still to scan must exceed (one array: compacted in one step per round; filled
    # in place, no per-row temporaries).
    n = len(pairs)
    state = np.empty((4, n), np.int64)
    state[0] = np.arange(n)
    np.divmod(pairs, npos, out=(state[1], state[2]))     # channel-major, p ascending
    np.negative(acc, out=state[3])
    kmax = int(t - e0[state[1]].min())                    # longest tail of a pair
    wmax = 1 << (taps._layer.weight_bits - 1)            # |w| bound (validated range)
    xmax = max(abs(int(lo_x)), abs(int(hi_x)), 1)
    # A round's running sums are at most width * |w| * x: int32 when that bound allows.
    acc_type = np.int32 if _MAX_WIDTH * wmax * xmax < _I32 else np.int64
    lim_max = np.iinfo(acc_type).max
    result = np.empty(n, np.int64)
    k0, width = 0, _FIRST_WIDTH
    # The rounds gather weights at scattered taps of every open channel: from the narrowest
    # exact copy (int8 for 8-bit weights: 1/8 of the int64 table's cache lines).
    wtype = np.int8 if taps._layer.weight_bits <= 8 else np.int16
    w2_flat = w2.astype(wtype).ravel()
    row_start = np.arange(cout) * t
    e0_max = int(e0.max())
    while state.shape[1]:
        if k0 >= kmax:
            raise AssertionError("early-termination search ran past e0: a bug in the golden "
                                 "model")
        w = min(width, kmax - k0)
        # Tables for the channels with open pairs only (late rounds have few).
        ch = state[1]                                     # sorted (channel-major pairs)
        first = np.flatnonzero(np.concatenate(([True], ch[1:] != ch[:-1])))
        chans = ch[first]
        counts = np.diff(np.append(first, len(ch)))     # open pairs per open channel
        local = ch if len(chans) == cout else np.repeat(np.arange(len(chans)), counts)
        tap, wt_t = _round_tables(order, w2_flat, row_start, e0, e0_max, k0, w, acc_type,
                                  chans if len(chans) < cout else None)
        n_open, nch = state.shape[1], len(chans)
        rows = None
        if n_open * _ROWS_SHARE > nch * npos and w * nch * npos <= _ROWS_BYTES:
            # Many open pairs: copy the round's input rows of every open channel
            # (contiguous rows, cheap) and pick the pairs' columns, one index per pair.
            # (np.take: several times faster than fancy indexing on short rows)
            rows = np.take(cols, tap.ravel(), axis=0).reshape(w, nch * npos)
        else:
            tap *= npos                                              # flat row offsets
        still = np.ones(n_open, bool)
        last = np.empty(n_open, acc_type)
        lim = np.minimum(state[3], lim_max).astype(acc_type)
        step = max(1, _SEARCH_BLOCK // w)
        for s in range(0, n_open, step):                             # bounded temporaries
            sl = slice(s, s + step)
            f, j, last[sl] = _round(flat, rows, tap, wt_t, local[sl], state[2, sl], lim[sl],
                                    nch, npos, counts if step >= n_open else None)
            if len(j):
                f += s
                e = (t - k0) - j                                      # T - k* + 1
                if g > 1:
                    e = np.minimum(-(-e // g) * g, t)
                result[np.take(state[0], f)] = e
                still[f] = False
        keep = np.flatnonzero(still)
        state = np.take(state, keep, axis=1)
        state[3] -= np.take(last, keep)
        k0 += w
        # Powers of two (a cheaper search for the row), growing with k0.
        width = min(1 << (max(width, k0 // _GROWTH).bit_length() - 1), _MAX_WIDTH)
    return result


def _round_tables(order, w2_flat, row_start, e0, e0_max, k0, w, acc_type, chans=None):
    """The taps of a round, last first (ranks ``t-1-k0`` down to ``t-k0-w``), and their
    negated weights (zero before ``e0``): tables ``(w, channels)``, for the channels
    ``chans`` (default all)."""
    t = order.shape[1]
    if chans is None:
        sub = order[:, t - k0 - w:t - k0]
    else:   # only the open channels' slices (np.take would copy every row's slice first)
        sub, row_start, e0 = order[chans, t - k0 - w:t - k0], row_start[chans], e0[chans]
    # Gathered row by row (each channel's weights stay in one row: cache friendly), then
    # reversed and transposed as small tables.
    wsub = np.take(w2_flat, sub + row_start[:, None])
    tap = sub[:, ::-1].T.copy()     # a copy even where the view is contiguous: edited later
    wt_t = np.negative(wsub[:, ::-1].T, dtype=acc_type, order="C")  # >= 0 from e0 on
    if t - k0 - w < e0_max:
        wt_t[(t - 1 - k0 - np.arange(w))[:, None] < e0[None, :]] = 0
    return tap, wt_t


def _round(flat, rows, tap_t, wt_t, ca, pa, lim, cout, npos, counts=None):
    """One round of :func:`_first_stop` on some open pairs (sorted by table column ``ca``).

    The input values come from ``rows`` (the round's input rows per channel, ``(w, Cout*P)``)
    when given, else from ``flat`` (the tap matrix) at ``tap_t`` (flat row offsets) + position.
    Returns ``(found, j, last)``: the pairs whose running sum exceeds ``lim`` in this round
    (indices), the first row where it does (for those pairs), and every pair's sum over the
    whole round.
    """
    w = wt_t.shape[0]
    if counts is None:
        counts = np.bincount(ca, minlength=cout)                     # pairs per channel
    terms = np.repeat(wt_t, counts, axis=1)                          # (w, n)
    if rows is not None:
        terms *= np.take(rows, ca * npos + pa, axis=1)
    else:
        idx = np.repeat(tap_t, counts, axis=1)                       # flat indices
        idx += pa
        terms *= np.take(flat, idx)
        del idx
    if terms.shape[1] < 128:                                         # running sums s
        np.cumsum(terms, axis=0, out=terms)
    else:                                     # row by row: much faster on long rows
        for k in range(1, w):
            np.add(terms[k], terms[k - 1], out=terms[k])
    last = terms[-1].copy()
    fidx = np.flatnonzero(last > lim)
    # First row whose s exceeds lim, i.e. the number j of rows with s <= lim (s is monotone
    # down the rows): a binary search by bits, from the highest.
    flim = lim[fidx]
    tflat = terms.ravel()
    n = terms.shape[1]
    bit = 1 << (w - 1).bit_length() - 1 if w > 1 else 0
    if w & (w - 1) == 0:
        # w a power of two: j never passes w - 1, so the flat index of row j - 1 of each
        # pair is kept and moved by whole rows (fewest operations per level).
        idx = fidx - n
        while bit and len(fidx):
            ok = np.take(tflat, idx + bit * n) <= flim
            idx += ok * (bit * n)
            bit >>= 1
        return fidx, (idx - fidx) // n + 1, last
    j = np.zeros(len(fidx), np.intp)
    while bit and len(fidx):
        cand = j + bit                                   # test row cand - 1 (if cand < w)
        ok = np.take(tflat, (np.minimum(cand, w - 1) - 1) * n + fidx) <= flim
        ok &= cand < w
        j += ok * bit
        bit >>= 1
    return fidx, j, last


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
        e_stop, fired, search = _stop_points(L, acc, taps, w2, w32, g, plan)

    if L.raw:
        value = np.clip(acc, 0, INT32_MAX, out=acc)
    else:
        value = requantize(acc, L.M, L.sh, L.out_bits, overwrite=True)
    shape = (cout, n, ho, wo)
    if ets:
        # Zeroing by a mask multiply: masked copies branch on every element (several times
        # slower on these dense, random masks).
        np.multiply(value, ~fired, out=value)
    out = value.reshape(shape)

    kind = L.kind.astype(np.int8)[:, None]     # the plan is the same per image; int8: fast
    plan_counts = [0, int(np.count_nonzero(kind == CONST)), int(np.count_nonzero(kind == COPY))]
    has_const, has_copy = bool(plan_counts[CONST]), bool(plan_counts[COPY])
    if has_const:
        np.copyto(out, L.const[:, None], where=kind == CONST)     # in place (np.where is slow)

    predicted = None
    if L.p:
        predicted = _predicted_followers(out, kind, L.leader[:, None], L.p)
        np.multiply(out, ~predicted, out=out)

    if has_copy:
        copy = np.broadcast_to(kind == COPY, shape)
        ny, nx = L.nn[..., 0], L.nn[..., 1]
        np.copyto(out, out[..., ny, nx], where=copy)

    if ets and search is not None:
        # The crossing pairs' stop points, only where MACs are performed: a CONST, COPY or
        # predicted position reports 0 MACs whatever its stop point (and outputs 0 anyway).
        needed = None
        if has_const or has_copy or predicted is not None:
            needed = np.broadcast_to(kind == COMPUTE, shape)
            if predicted is not None:
                needed = needed & ~predicted
            needed = needed.reshape(cout, n * ho * wo)
        taps.release(keep=search.xtype)      # the product matrices are done with: free them
        search.resolve(e_stop, needed)

    # Performed MACs: e_stop (or T) where computed, 0 where CONST, COPY or predicted.
    # (Masks multiply: faster than masked copies on these int64 arrays.)
    macs = e_stop.reshape(shape) if ets else np.full(shape, t, np.int64)
    outcome = np.broadcast_to(kind, shape).copy()      # COMPUTED (0), CONST (1), COPY (2)
    stopped = macs < t if ets else None
    if has_const or has_copy:
        compute = kind == COMPUTE
        macs *= compute
        if ets:
            stopped &= compute
    if predicted is not None:
        not_predicted = ~predicted
        macs *= not_predicted
        if ets:
            stopped &= not_predicted
        # The predicted and stopped positions are COMPUTED (0) so far: adding the masked
        # codes sets them (much faster than masked copies).
        outcome += predicted.view(np.int8) * np.int8(PREDICTED)
    if ets:
        outcome += stopped.view(np.int8) * np.int8(STOPPED)     # (COMPUTED so far, as above)

    counts = [0] * len(OUTCOMES)
    counts[CONST], counts[COPY] = int(plan_counts[CONST]) * n, int(plan_counts[COPY]) * n
    counts[PREDICTED] = int(np.count_nonzero(predicted)) if predicted is not None else 0
    counts[STOPPED] = int(np.count_nonzero(stopped)) if ets else 0
    counts[COMPUTED] = outcome.size - sum(counts)
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
    np.logical_and(leader, out != 0, out=nonzero_leader[..., :ho, :wo])
    # A window is live when any of its p*p cells is: p*p strided ORs (faster than .any over
    # two strided axes).
    live = nonzero_leader[..., 0::p, 0::p].copy()
    for dy in range(p):
        for dx in range(p):
            if dy or dx:
                live |= nonzero_leader[..., dy::p, dx::p]
    window_predicted = np.empty((*lead, hp // p, p, wp // p, p), bool)
    window_predicted[...] = ~live[..., :, None, :, None]
    window_predicted = window_predicted.reshape(*lead, hp, wp)[..., :ho, :wo]
    return window_predicted & (~leader & (kind == COMPUTE))
