"""Batch emulation of engine layers: docs/semantics.md on N inputs at once, for the searches.

The golden model (:mod:`skipconv.sw.golden`) runs one input at a time and is the number we
report. The method searches evaluate hundreds of candidate configurations on hundreds of
images, so they use this batch version of the same rules: sums are float32 or float64 convolutions
(exact while every partial sum stays below 2**24 or 2**53, checked), early-termination stop points are
found like the golden model does (one masked convolution per check rule plus a running sum
over the non-positive taps of the positions that cross zero later). ``tests/test_methods_*``
check it against the golden model bit for bit (outputs and every MAC counter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..layer import COMPUTE, CONST, COPY, INT32_MAX, Layer

__all__ = ["BatchResult", "emulate", "COUNTERS"]

COUNTERS = ("dense", "performed", "velcro", "perforation", "zero_pred", "early_term")
_F64_EXACT = 1 << 53
_F32_EXACT = 1 << 24
_BLOCK = 1 << 22          # elements per running-sum block (~32 MB float64)
_GRID = 4                 # check points per channel that bracket a stop point


@dataclass
class BatchResult:
    """Outputs (N, Cout, Ho, Wo) int64 and the layer's MAC counters summed over the batch."""

    out: np.ndarray
    counters: dict = field(default_factory=dict)
    positions: dict = field(default_factory=dict)
    macs: np.ndarray | None = None     # (N, Cout, Ho, Wo) performed MACs, when asked for


def _conv(x, w, stride, pad):
    return F.conv2d(x, w, stride=stride, padding=pad)


def emulate(layer: Layer, x, g: int = 1, *, validate: bool = True,
            macs: bool = False) -> BatchResult:
    """Run ``layer`` on a batch ``x`` (N, Cin, H, W) of integers; semantics.md, bit-exact.

    Runs with one torch thread: on the shared 2-core machine, torch's thread pool spinning
    against other processes made these small kernels 10-20x slower (measured).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _emulate(layer, x, g, validate, macs)
    finally:
        torch.set_num_threads(before)


def _emulate(layer, x, g, validate, macs) -> BatchResult:
    if validate:
        layer.validate(g=g)
    L = layer.normalized() if validate else _normalized_fast(layer)
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if xt.ndim != 4:
        raise ValueError(f"x.shape = {tuple(xt.shape)}: emulate() takes a batch (N, Cin, H, W)")
    n = xt.shape[0]
    cout, ho, wo = L.out_shape
    t = L.taps
    lo, hi = L.x_range()
    bound = int(np.abs(L.w).reshape(cout, -1).sum(axis=1).max()) * max(abs(lo), abs(hi)) \
        + int(np.abs(L.b).max())
    if bound >= _F64_EXACT:
        raise ValueError(f"layer {L.name!r}: sums up to {bound} are not exact in float64; "
                         "use skipconv.sw.golden for this layer")
    # float32 is exact (and several times faster) while every partial sum stays below 2**24.
    if bound < _F32_EXACT:
        xt = xt.to(torch.float32)
    wt = torch.as_tensor(L.w, dtype=xt.dtype)
    bt = torch.as_tensor(L.b, dtype=xt.dtype).view(1, -1, 1, 1)
    acc = _conv(xt, wt, L.stride, L.pad) + bt                          # (N, Cout, Ho, Wo)

    # Full-size (N, Cout, Ho, Wo) int64 passes cost ~0.1-0.2 s each on 1,000 images of a
    # 16x28x28 layer (profiled): masks stay per layer (Cout, Ho, Wo) and broadcast, and the
    # passes a layer's features do not need are skipped.
    e_stop = fired = None                       # None: every position runs all t taps
    if L.et != "off":
        e_stop, fired = _stop_points(L, xt, acc, g, torch.full(acc.shape, t, dtype=torch.int64),
                                     torch.zeros(acc.shape, dtype=torch.bool))

    acc_i = acc.to(torch.int64)
    if L.raw:
        value = acc_i.clamp(min=0, max=INT32_MAX)
    else:
        M = torch.as_tensor(L.M, dtype=torch.int64).view(1, -1, 1, 1)
        sh = torch.as_tensor(L.sh, dtype=torch.int64).view(1, -1, 1, 1)
        rnd = torch.where(sh > 0, torch.ones_like(sh) << (sh - 1).clamp(min=0),
                          torch.zeros_like(sh))
        pos = acc_i.clamp(min=0)
        if int(pos.max()) * int(M.max()) >= (1 << 62):
            raise ValueError(f"layer {L.name!r}: requantization exceeds int64 in emulation")
        value = torch.minimum((pos * M + rnd) >> sh, torch.tensor((1 << L.out_bits) - 1))
        value.masked_fill_(acc_i <= 0, 0)
    if fired is not None:
        value.masked_fill_(fired, 0)

    kind = torch.as_tensor(L.kind).unsqueeze(0)                        # (1, Cout, Ho, Wo)
    is_const, copy, is_compute = kind == CONST, kind == COPY, kind == COMPUTE
    n_const = n * int(is_const.sum())
    n_copy = n * int(copy.sum())
    out = value
    if n_const:
        const = torch.as_tensor(L.const, dtype=torch.int64).unsqueeze(0)
        out = torch.where(is_const, const, out)

    computed = is_compute.expand(n, -1, -1, -1)
    n_pred = 0
    if L.p:
        predicted = _predicted_followers(out, kind, torch.as_tensor(L.leader), L.p)
        out = out.masked_fill(predicted, 0)
        computed = computed & ~predicted
        n_pred = int(predicted.sum())
    if n_copy:
        ny = torch.as_tensor(L.nn[..., 0])
        nx = torch.as_tensor(L.nn[..., 1])
        out = torch.where(copy, out[:, :, ny, nx], out)

    n_computed = int(computed.sum())
    if e_stop is None:
        performed, n_stopped = n_computed * t, 0
        per_pos = computed.to(torch.int64) * t if macs else None
    else:
        e_done = e_stop.masked_fill(~computed, 0)                # taps run, per position
        performed = int(e_done.sum())
        n_stopped = int((computed & (e_stop < t)).sum())
        per_pos = e_done if macs else None
    counters = {
        "dense": n * cout * ho * wo * t,
        "performed": performed,
        "velcro": n_const * t,
        "perforation": n_copy * t,
        "zero_pred": n_pred * t,
        "early_term": n_computed * t - performed,
    }
    positions = {"computed": n_computed - n_stopped, "const": n_const,
                 "copy": n_copy, "predicted": n_pred, "stopped": n_stopped}
    return BatchResult(out=np.asarray(out.numpy(), np.int64), counters=counters,
                       positions=positions, macs=None if per_pos is None else per_pos.numpy())


def _normalized_fast(layer: Layer) -> Layer:
    """``normalized()`` without re-validation, for callers that validated the layer already."""
    import dataclasses
    cout, ho, wo = layer.out_shape
    t = layer.taps
    return dataclasses.replace(
        layer,
        M=layer.M if layer.M is not None else np.ones(cout, np.int64),
        sh=layer.sh if layer.sh is not None else np.zeros(cout, np.int64),
        kind=np.asarray(layer.kind, np.int64) if layer.kind is not None
        else np.zeros((cout, ho, wo), np.int64),
        const=layer.const if layer.const is not None else np.zeros((cout, ho, wo), np.int64),
        nn=layer.nn if layer.nn is not None else np.zeros((ho, wo, 2), np.int64),
        leader=(np.asarray(layer.leader, bool) if layer.leader is not None
                else np.zeros((cout, ho, wo), bool)),
        order=(np.asarray(layer.order, np.int64) if layer.order is not None
               else np.tile(np.arange(t, dtype=np.int64), (cout, 1))),
        neg_start=(np.asarray(layer.neg_start, np.int64) if layer.neg_start is not None
                   else np.full(cout, t, np.int64)),
        spec=layer.spec if layer.spec is not None else np.zeros(cout, np.int64),
        th=layer.th if layer.th is not None else np.zeros(cout, np.int64),
    )


def _rank(order):
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(order.shape[1]), order.shape), 1)
    return rank


def _psum_at(L, xt, rank, e):
    """psum after the first ``e[c]`` taps of ``order[c]``, every position (N, Cout, Ho, Wo)."""
    wflat = np.asarray(L.w).reshape(L.cout, -1)
    wm = np.where(rank < np.asarray(e)[:, None], wflat, 0).reshape(L.w.shape)
    bt = torch.as_tensor(L.b, dtype=xt.dtype).view(1, -1, 1, 1)
    return _conv(xt, torch.as_tensor(wm, dtype=xt.dtype), L.stride, L.pad) + bt


def _stop_points(L, xt, acc, g, e_stop, fired):
    t = L.taps
    order = np.asarray(L.order, np.int64)
    rank = _rank(order)
    neg_start = np.asarray(L.neg_start, np.int64)
    e0 = np.minimum(-(-neg_start // g) * g, t)
    ps0 = _psum_at(L, xt, rank, e0)
    at_e0 = ps0 <= 0
    e0t = torch.as_tensor(e0).view(1, -1, 1, 1).expand_as(e_stop)
    e_stop = torch.where(at_e0, e0t, e_stop)
    fired = fired | at_e0
    crossing = ~at_e0 & (acc <= 0)
    if bool(crossing.any()):
        e_stop = _refine(L, xt, order, rank, g, e0, ps0, crossing, e_stop)
        fired = fired | crossing
    if L.et == "predictive":
        spec = np.asarray(L.spec, np.int64)
        ps1 = _psum_at(L, xt, rank, spec)
        th = torch.as_tensor(np.asarray(L.th), dtype=torch.float64).view(1, -1, 1, 1)
        ps1 = ps1.to(torch.float64)
        rule1 = ps1 <= th
        spect = torch.as_tensor(spec).view(1, -1, 1, 1).expand_as(e_stop)
        take = rule1 & (~fired | (spect <= e_stop))
        e_stop = torch.where(take, spect, e_stop)
        fired = fired | rule1
    return e_stop, fired


def _predicted_followers(out, kind, leader, p):
    n, cout, ho, wo = out.shape
    hp, wp = -(-ho // p) * p, -(-wo // p) * p
    nz = torch.zeros((n, cout, hp, wp), dtype=torch.bool)
    nz[:, :, :ho, :wo] = leader.unsqueeze(0) & (out != 0)
    live = nz.view(n, cout, hp // p, p, wp // p, p).any(dim=5).any(dim=3)
    win = (~live).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)[:, :, :ho, :wo]
    return win & ~leader.unsqueeze(0) & (kind == COMPUTE)


def _refine(L, xt, order, rank, g, e0, ps0, crossing, e_stop):
    """Stop points of the positions that cross zero after ``e0`` (psum falls from there on).

    Two steps: the partial sums at a grid of up to ``_GRID`` check points per channel (one
    masked convolution per grid level, all channels at once) bracket each position's stop
    point; a running sum over the taps of its bracket only then finds the exact check point.
    """
    t = L.taps
    n, cout = crossing.shape[0], crossing.shape[1]
    checks = []
    for c in range(cout):
        ec = int(e0[c])
        ch = np.arange(g * (ec // g + 1), t, g, dtype=np.int64)
        checks.append(np.append(ch[ch > ec], t))
    levels = max(1, min(_GRID, max(len(ch) for ch in checks)))
    # Repeated grid points (channels with few checks) are harmless: a position is bracketed
    # at the first level where psum <= 0, whose predecessor is a strictly earlier point.
    grid = np.stack([ch[np.linspace(0, len(ch) - 1, levels).round().astype(int)]
                     for ch in checks])                                 # (Cout, levels)
    # bracket[j]: psum at grid level j; the stop lies in (grid[j-1], grid[j]] for the
    # first j with psum <= 0 (grid[-1] = e0, psum ps0 > 0 for crossing positions).
    cross_cf = crossing.transpose(0, 1).reshape(cout, -1)
    level = torch.full(cross_cf.shape, -1, dtype=torch.int64)
    lo_ps = ps0.transpose(0, 1).reshape(cout, -1).clone()
    prev = ps0.transpose(0, 1).reshape(cout, -1)
    for j in range(levels):
        ps = _psum_at(L, xt, rank, grid[:, j]).transpose(0, 1).reshape(cout, -1)
        hit = cross_cf & (level < 0) & (ps <= 0)
        level[hit] = j
        lo_ps = torch.where(hit, prev, lo_ps)
        prev = ps
    # The taps of a bracket are gathered straight from the padded input (flat index of a
    # position's window corner + the tap's offset): no im2col copy of the whole input, and only
    # the bracket's taps are read (profiled on vgg_small: the row gathers of the im2col matrix
    # were most of an evaluation).
    xp = F.pad(xt, (L.pad,) * 4).contiguous()
    _, cin, hp, wp = xp.shape
    ho, wo = crossing.shape[2], crossing.shape[3]
    xflat = xp.reshape(-1)
    oy = torch.arange(ho, dtype=torch.int64).view(ho, 1) * (L.stride * wp)
    ox = torch.arange(wo, dtype=torch.int64).view(1, wo) * L.stride
    base = (torch.arange(n, dtype=torch.int64).view(n, 1, 1) * (cin * hp * wp)
            + (oy + ox).unsqueeze(0)).reshape(-1)                                   # (N*P,)
    k = L.k
    tap = torch.arange(t, dtype=torch.int64)
    offset = (tap // (k * k)) * (hp * wp) + ((tap // k) % k) * wp + tap % k         # (T,)
    wflat = np.asarray(L.w).reshape(L.cout, -1)
    e_cf = e_stop.transpose(0, 1).reshape(cout, -1).clone()
    for c in torch.nonzero(cross_cf.any(dim=1)).flatten().tolist():
        for j in torch.unique(level[c][cross_cf[c]]).tolist():
            lo = int(e0[c]) if j == 0 else int(grid[c, j - 1])
            hi = int(grid[c, j])
            ch = checks[c][(checks[c] > lo) & (checks[c] <= hi)]
            taps = torch.as_tensor(order[c, lo:hi])
            w = torch.as_tensor(wflat[c, order[c, lo:hi]], dtype=xt.dtype)
            rows = torch.as_tensor(ch - lo - 1)
            chk = torch.as_tensor(ch)
            sel = torch.nonzero(cross_cf[c] & (level[c] == j)).flatten()
            toff = offset.index_select(0, taps)
            block = max(1, _BLOCK // max(1, len(taps)))
            for s in range(0, sel.shape[0], block):
                rs = sel[s:s + block]
                terms = xflat[base.index_select(0, rs)[:, None] + toff[None, :]]     # (k, seg)
                run = torch.cumsum(terms * w, dim=1).index_select(1, rows)
                run += lo_ps[c].index_select(0, rs)[:, None]
                first = torch.argmax((run <= 0).to(torch.uint8), dim=1)
                e_cf[c].index_copy_(0, rs, chk.index_select(0, first))
    return e_cf.view(cout, n, *crossing.shape[2:]).transpose(0, 1)
