"""A literal, position-by-position reading of docs/semantics.md, for testing the golden model.

Deliberately slow and simple: plain Python integers, one position at a time, every check
point visited in order. Shares no code with skipconv.sw.golden.
"""

from __future__ import annotations

import numpy as np


def q(acc, M, sh, out_bits):
    if acc <= 0:
        return 0
    r = (1 << (sh - 1)) if sh > 0 else 0
    return min((acc * M + r) >> sh, (1 << out_bits) - 1)


def tap_term(L, x, c, y, xx, tap):
    """Weight times input of one tap at one position (0 in the padding)."""
    k, s, pad = L.k, L.stride, L.pad
    _, h, w = x.shape
    ci, rem = divmod(int(tap), k * k)
    ky, kx = divmod(rem, k)
    iy, ix = y * s + ky - pad, xx * s + kx - pad
    xv = int(x[ci, iy, ix]) if 0 <= iy < h and 0 <= ix < w else 0
    return int(L.w[c, ci, ky, kx]) * xv


def position(L, x, c, y, xx, g):
    """Return (value if computed, taps performed e, stopped_before_end) for one position."""
    t = L.cin * L.k * L.k
    psum = int(L.b[c])
    e = 0
    order = [int(v) for v in L.order[c]]
    while True:
        if L.et == "predictive" and e == int(L.spec[c]) and psum <= int(L.th[c]):
            return 0, e, True
        if L.et in ("exact", "predictive") and e >= int(L.neg_start[c]) and psum <= 0:
            return 0, e, True
        if e == t:
            break
        step = min(g, t - e)
        for j in range(e, e + step):
            psum += tap_term(L, x, c, y, xx, order[j])
        e += step
    if L.raw:
        return min(max(psum, 0), (1 << 31) - 1), t, False
    return q(psum, int(L.M[c]), int(L.sh[c]), L.out_bits), t, False


def partial_sum(L, x, c, y, xx, e):
    """The bias plus the first ``e`` taps of ``L.order[c]`` at one position."""
    return int(L.b[c]) + sum(tap_term(L, x, c, y, xx, tap) for tap in L.order[c][:e])


def run(layer, x, g=1):
    """Return (out, macs, outcome codes, counters dict) the slow way."""
    L = layer.normalized()
    cout, ho, wo = L.out_shape
    t = L.taps
    out = np.zeros((cout, ho, wo), np.int64)
    macs = np.zeros((cout, ho, wo), np.int64)
    outcome = np.zeros((cout, ho, wo), np.int64)
    stopped = np.zeros((cout, ho, wo), bool)
    # 1. every COMPUTE and CONST position's own value
    for c in range(cout):
        for y in range(ho):
            for xx in range(wo):
                kind = int(L.kind[c, y, xx])
                if kind == 1:
                    out[c, y, xx] = int(L.const[c, y, xx])
                    outcome[c, y, xx] = 1
                elif kind == 0:
                    v, e, st = position(L, x, c, y, xx, g)
                    out[c, y, xx], macs[c, y, xx] = v, e
                    stopped[c, y, xx] = st and e < t
                    outcome[c, y, xx] = 4 if stopped[c, y, xx] else 0
    # 2. zero prediction, window by window
    if L.p:
        p = L.p
        for c in range(cout):
            for wy in range((ho + p - 1) // p):
                for wx in range((wo + p - 1) // p):
                    cells = [(y, xx) for y in range(wy * p, wy * p + p)
                             for xx in range(wx * p, wx * p + p) if y < ho and xx < wo]
                    leaders = [(y, xx) for (y, xx) in cells if L.leader[c, y, xx]]
                    if all(out[c, y, xx] == 0 for (y, xx) in leaders):
                        for (y, xx) in cells:
                            if not L.leader[c, y, xx] and L.kind[c, y, xx] == 0:
                                out[c, y, xx] = 0
                                macs[c, y, xx] = 0
                                outcome[c, y, xx] = 3
    # 3. COPY from the NN target's final output
    for c in range(cout):
        for y in range(ho):
            for xx in range(wo):
                if L.kind[c, y, xx] == 2:
                    ny, nx = (int(v) for v in L.nn[y, xx])
                    out[c, y, xx] = out[c, ny, nx]
                    outcome[c, y, xx] = 2
    n = {code: int((outcome == code).sum()) for code in range(5)}
    counters = {
        "dense": cout * ho * wo * t,
        "performed": int(macs.sum()),
        "velcro": n[1] * t,
        "perforation": n[2] * t,
        "zero_pred": n[3] * t,
        "early_term": int(sum(t - macs[c, y, xx] for c in range(cout) for y in range(ho)
                              for xx in range(wo) if outcome[c, y, xx] in (0, 4))),
    }
    return out, macs, outcome, counters
