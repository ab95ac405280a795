# amaranth: UnusedElaboratable=no
"""One PE in the Amaranth simulator: every early-termination check point, g = 1 and 2.

``predictive-late`` puts the speculation point after ``neg_start`` with a negative threshold,
where both rules apply at once and a sum in (th, 0] must stop by the exact rule."""

import sys
from pathlib import Path

import numpy as np
import pytest
from amaranth.sim import Simulator

from skipconv.hw.params import HwParams
from skipconv.hw.pe import PE
from skipconv.sw.config import EngineConfig
from skipconv.sw.layer import Layer

sys.path.insert(0, str(Path(__file__).parent))
import reference  # noqa: E402


@pytest.mark.parametrize("lut_ram", [True, False], ids=["ring7", "ring5"])
@pytest.mark.parametrize("g,et", [(1, "exact"), (2, "exact"), (1, "predictive"),
                                  (2, "predictive"), (2, "off"), (1, "predictive-late"),
                                  (2, "predictive-late")])
def test_pe_stops_where_the_rules_say(g, et, lut_ram):
    """Both rings: 7 contexts, and 5 without the read registers (the iCE40 build)."""
    rng = np.random.default_rng(7 * g + len(et))
    late = et == "predictive-late"
    et = "predictive" if late else et
    cin, h, w, k, pad = 2, 3, 6, 3, 1
    t = cin * k * k
    wt = rng.integers(-60, 60, size=(1, cin, k, k))
    order = rng.permutation(t)[None, :]
    pos = np.asarray([i for i in order[0] if wt.ravel()[i] > 0])
    neg = np.asarray([i for i in order[0] if wt.ravel()[i] <= 0])
    order = np.concatenate([pos, neg])[None, :].astype(np.int64)
    neg_start = np.asarray([len(pos)])
    if late:
        spec = np.asarray([-(-len(pos) // g) * g])
        th = np.asarray([int(rng.integers(-10**6, -10**5))])
        b = np.asarray([int(rng.integers(-40000, -10000))])
    else:
        spec = np.asarray([(t // 3) // g * g])
        th = np.asarray([int(rng.integers(-200, 2000))])
        b = np.asarray([int(rng.integers(-3000, 500))])
    layer = Layer(in_shape=(cin, h, w), w=wt, b=b, stride=1, pad=pad, et=et,
                  order=order if et != "off" else None,
                  neg_start=neg_start if et != "off" else None,
                  spec=spec if et == "predictive" else None,
                  th=th if et == "predictive" else None, M=np.asarray([1]),
                  sh=np.asarray([0]), name="pe")
    L = layer.normalized()
    x = rng.integers(0, 256, size=(cin, h, w))
    x[rng.random(x.shape) < 0.3] = 0
    ho, wo = L.out_hw

    cfg = EngineConfig(lanes=1, g=g, max_taps=64, max_ifmap=256, max_cout=2, max_ofmap=256,
                       max_k=3, max_p=2)
    hp = HwParams(cfg, lut_ram=lut_ram)
    assert hp.depth == (7 if lut_ram else 5)
    dut = PE(hp)
    n_pos = min(hp.unit_width, wo)
    results = {}

    async def bench(ctx):
        ctx.set(dut.layer, {"taps": t, "h": h, "w": w, "k": k, "stride": 1, "pad": pad,
                            "p": 0, "et": {"off": 0, "exact": 1, "predictive": 2}[et],
                            "ho": ho, "wo": wo, "cin": cin, "cout": 1})
        for e, tap in enumerate(L.order[0]):
            ci, rem = divmod(int(tap), k * k)
            ky, kx = divmod(rem, k)
            row_e = min((e // g + 1) * g, t)            # tap count after the tap's row
            ctx.set(dut.wt, {"en": 1, "addr": e // g, "lane": e % g,
                             "data": {"w": int(L.w.ravel()[tap]), "off": ci * h * w + ky * w + kx,
                                      "ky": ky, "kx": kx,
                                      "neg": int(row_e >= int(L.neg_start[0]))}})
            await ctx.tick()
        ctx.set(dut.wt.en, 0)
        for i, v in enumerate(x.ravel()):
            ctx.set(dut.ifm, {"en": 1, "addr": i, "data": int(v)})
            await ctx.tick()
        ctx.set(dut.ifm.en, 0)
        # the PE sums products only: its bounds come moved by the bias (param_layout)
        b0, th0 = int(L.b[0]), int(L.th[0])
        ctx.set(dut.prm, {"en": 1, "addr": 0, "data": {
            "spec": int(L.spec[0]), "th_b": th0 - b0, "nb": -b0, "th_neg": int(th0 < 0)}})
        await ctx.tick()
        ctx.set(dut.prm.en, 0)
        ctx.set(dut.unit, {"c": 0, "stop0": 0,
                           "wbase": 0, "oaddr": 0, "iy0": -pad, "ix0": -pad,
                           "base": -(pad * w + pad), "widx": 0, "hmax": 1, "wmax": n_pos})
        await ctx.tick().until(dut.req)
        ctx.set(dut.grant, 1)
        await ctx.tick()
        ctx.set(dut.grant, 0)
        ctx.set(dut.result.ready, 1)
        for _ in range(2000):
            _, _, valid, r = await ctx.tick().sample(dut.result.valid, dut.result.payload)
            if valid:
                results[r.oaddr] = (r.psum, r.fired, r.e)
            if len(results) == n_pos:
                break

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()

    assert sorted(results) == list(range(n_pos))
    both = 0                                    # stopped at spec with th < sum <= 0
    for xx in range(n_pos):
        _, e, stopped = reference.position(L, x, 0, 0, xx, g)
        if late and stopped and e == int(L.spec[0]):
            both += reference.partial_sum(L, x, 0, 0, xx, e) > int(L.th[0])
        psum, fired, e_hw = results[xx]
        assert (e_hw, bool(fired)) == (e, stopped), xx
        if not stopped:
            iy = np.arange(k)[:, None] - pad
            ix = xx + np.arange(k)[None, :] - pad
            xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
            products = int((L.w[0] * xp[:, iy + pad, ix + pad]).sum())
            assert psum == products, xx         # the writer adds the bias
    assert both or not late, "no position exercised the exact rule at the speculation point"
