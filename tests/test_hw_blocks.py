# amaranth: UnusedElaboratable=no
"""Unit tests of the engine's small blocks in the Amaranth simulator (async testbenches)."""

import numpy as np
import pytest
from amaranth import Module, Signal
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.sim import Simulator

from skipconv.hw.arbiter import RoundRobin
from skipconv.hw.dispatch import Dispatcher
from skipconv.hw.compare import ge_const, ge_narrow, gt_const, gt_narrow
from skipconv.hw.divider import Divider
from skipconv.hw.gather import Gather
from skipconv.hw.fifo import BlockFIFO, BufferedFIFO, LayoutFIFO
from skipconv.hw.multiplier import Multiplier
from skipconv.hw.params import UNIT_WIDTH, HwParams
from skipconv.hw.words import BeatPacker, BeatSplitter
from skipconv.hw.writer import shift_right_window
from skipconv.sw.config import EngineConfig


def _sim(dut, bench, background=None):
    m = Module()                  # a sync domain even when the block is combinational
    m.submodules.dut = dut
    tick = Signal()
    m.d.sync += tick.eq(~tick)
    sim = Simulator(m)
    sim.add_clock(1e-8)
    if background is not None:
        sim.add_testbench(background, background=True)
    finished = []

    async def checked(ctx):
        await bench(ctx)
        finished.append(True)
    sim.add_testbench(checked)
    sim.run_until(1e-4)           # a hang fails here instead of blocking
    assert finished, "testbench did not finish"


@pytest.mark.parametrize("num,den", [(0, 1), (17, 1), (27, 2), (100, 7), (65535, 3), (5, 9)])
def test_divider(num, den):
    dut = Divider(18)

    async def bench(ctx):
        ctx.set(dut.num, num)
        ctx.set(dut.den, den)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        await ctx.tick().until(dut.done)
        assert ctx.get(dut.quotient) == num // den

    _sim(dut, bench)


def test_compare_as_logic():
    """ge_const / gt_const (unsigned and signed) and the narrow compares against Python."""
    from amaranth import signed
    m = Module()
    x = Signal(9)
    sx = Signal(signed(7))
    y = Signal(5)
    consts = [-1, 0, 1, 2, 5, 47, 255, 256, 300, 511, 512, 600]
    outs = {c: (ge_const(x, c), gt_const(x, c)) for c in consts}
    souts = {c: gt_const(sx, c) for c in (0, 1, 20, 63, 64)}
    narrow = (gt_narrow(x, y), ge_narrow(x, y))

    async def bench(ctx):
        for v in range(512):
            sv, yv = (v % 128) - 64, (v * 7) % 32
            ctx.set(x, v)
            ctx.set(sx, sv)
            ctx.set(y, yv)
            for c, (ge, gt) in outs.items():
                assert (ctx.get(ge), ctx.get(gt)) == (int(v >= c), int(v > c)), (v, c)
            for c, gt in souts.items():
                assert ctx.get(gt) == int(sv > c), (sv, c)
            assert (ctx.get(narrow[0]), ctx.get(narrow[1])) == (int(v > yv), int(v >= yv))
        await ctx.tick()

    _sim(m, bench)


def test_shift_right_window():
    """The writer's narrow shifter: the low bits of x >> s and "any bit above them"."""
    m = Module()
    x = Signal(50)
    amount = Signal(6)
    lo, above = shift_right_window(m, x, amount, 8)
    rng = np.random.default_rng(2)

    async def bench(ctx):
        for _ in range(1500):
            xv = int(rng.integers(1 << int(rng.choice([8, 12, 20, 40, 50]))))
            av = int(rng.integers(64))
            ctx.set(x, xv)
            ctx.set(amount, av)
            assert ctx.get(lo) == (xv >> av) & 0xFF
            assert ctx.get(above) == int((xv >> av) >> 8 != 0)
        await ctx.tick()

    _sim(m, bench)


@pytest.mark.parametrize("ours,theirs,depth", [
    (BlockFIFO, SyncFIFO, 1), (BlockFIFO, SyncFIFO, 3), (BlockFIFO, SyncFIFO, 4),
    (BufferedFIFO, SyncFIFOBuffered, 2), (BufferedFIFO, SyncFIFOBuffered, 5),
    (BufferedFIFO, SyncFIFOBuffered, 16)])
def test_fifo_is_cycle_exact_amaranth_fifo(ours, theirs, depth):
    """Random pushes and pops: our FIFO's outputs equal Amaranth's on every cycle."""
    m = Module()
    m.submodules.ref = ref = theirs(width=12, depth=depth)
    m.submodules.dut = dut = ours(width=12, depth=depth)
    rng = np.random.default_rng(depth)

    async def bench(ctx):
        for _ in range(600):
            w_en, r_en, w_data = (int(rng.random() < 0.6), int(rng.random() < 0.5),
                                  int(rng.integers(1 << 12)))
            for f in (ref, dut):
                ctx.set(f.w_en, w_en)
                ctx.set(f.r_en, r_en)
                ctx.set(f.w_data, w_data)
            for name in ("w_rdy", "r_rdy", "level"):
                assert ctx.get(getattr(dut, name)) == ctx.get(getattr(ref, name)), name
            if ctx.get(ref.r_rdy):
                assert ctx.get(dut.r_data) == ctx.get(ref.r_data)
            await ctx.tick()

    _sim(m, bench)


@pytest.mark.parametrize("lut_ram", [True, False])
def test_layout_fifo_stores_only_the_kept_fields(lut_ram):
    from amaranth import signed
    from amaranth.lib import data
    layout = data.StructLayout({"a": 3, "z": 4, "b": signed(5)})
    dut = LayoutFIFO(layout, depth=2, lut_ram=lut_ram, zero={"z"})

    async def bench(ctx):
        for a, z, b in ((5, 9, -7), (2, 15, 11)):
            ctx.set(dut.w_data, {"a": a, "z": z, "b": b})
            ctx.set(dut.w_en, 1)
            await ctx.tick()
        ctx.set(dut.w_en, 0)
        ctx.set(dut.r_en, 1)
        for a, b in ((5, -7), (2, 11)):
            assert ctx.get(dut.r_rdy)
            got = ctx.get(dut.r_data)
            assert (got.a, got.z, got.b) == (a, 0, b)
            await ctx.tick()
        assert not ctx.get(dut.r_rdy)

    _sim(dut, bench)


@pytest.mark.parametrize("a,b", [(0, 0), (1, 1), (0xFFFFFFFF, 0xFFFF), (123456, 789), (7, 0),
                                 (0, 65535), (0x80000001, 0x8001)])
def test_multiplier(a, b):
    dut = Multiplier(32, 16)

    async def bench(ctx):
        for x, y in ((a, b), (b, a & 0xFFFF)):      # back to back: done falls with start
            ctx.set(dut.a, x)
            ctx.set(dut.b, y)
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            assert not ctx.get(dut.done)
            await ctx.tick().until(dut.done)
            assert ctx.get(dut.product) == x * y

    _sim(dut, bench)


def test_round_robin_is_fair():
    dut = RoundRobin(4)

    async def bench(ctx):
        ctx.set(dut.advance, 1)
        ctx.set(dut.req, 0b1011)
        seen = []
        for _ in range(6):
            await ctx.delay(1e-9)
            seen.append(ctx.get(dut.index))
            assert ctx.get(dut.grant) == 1 << seen[-1]
            await ctx.tick()
        assert seen == [1, 3, 0, 1, 3, 0]      # starts after requester 0
        ctx.set(dut.req, 0)
        await ctx.delay(1e-9)
        assert ctx.get(dut.valid) == 0 and ctx.get(dut.grant) == 0

    _sim(dut, bench)


def _gather_run(n, fan, *, seed, words, p_valid, p_ready):
    """Offer ``words`` numbered words per stream (held until taken), drain with random ready.
    Returns the words received per tagged lane and the cycle of the last one."""
    dut = Gather(16, n, fan)
    rng = np.random.default_rng(seed)
    queues = [[lane * 1000 + k for k in range(words)] for lane in range(n)]
    got, last = [[] for _ in range(n)], [None]

    async def bench(ctx):
        offered = [False] * n
        for cycle in range(words * n * 8):
            for lane in range(n):
                if not offered[lane] and queues[lane] and rng.random() < p_valid:
                    offered[lane] = True
                ctx.set(dut.i[lane].valid, offered[lane])
                ctx.set(dut.i[lane].payload, queues[lane][0] if offered[lane] else 0)
            ctx.set(dut.o.ready, rng.random() < p_ready)
            _, _, o_valid, o_ready, o_word, *taken = await ctx.tick().sample(
                dut.o.valid, dut.o.ready, dut.o.payload, *[dut.i[lane].ready for lane in range(n)])
            if o_valid and o_ready:
                got[o_word.lane].append(o_word.data)
                last[0] = cycle
            for lane in range(n):
                if offered[lane] and taken[lane]:
                    queues[lane].pop(0)
                    offered[lane] = False
        assert not ctx.get(dut.busy)

    _sim(dut, bench)
    return got, last[0]


@pytest.mark.parametrize("n,fan", [(3, 4), (5, 4), (7, 3), (8, 4)])
def test_gather_delivers_every_word_once_in_order(n, fan):
    """Flat (n <= fan) and grouped gathers, uneven last group included: under random valid
    and ready every word arrives once, tagged with its stream, each stream in order."""
    got, _ = _gather_run(n, fan, seed=n * 10 + fan, words=24, p_valid=0.6, p_ready=0.7)
    assert got == [[lane * 1000 + k for k in range(24)] for lane in range(n)]


@pytest.mark.parametrize("n,fan", [(4, 4), (8, 4)])
def test_gather_takes_one_word_per_cycle(n, fan):
    """All streams busy and the output always ready: one word per cycle (the group registers
    add latency, not gaps)."""
    words = 16
    got, last = _gather_run(n, fan, seed=0, words=words, p_valid=1.0, p_ready=1.0)
    assert [len(g) for g in got] == [words] * n
    assert last <= n * words + 1


@pytest.mark.parametrize("n", [1, 2, 4])
def test_beat_splitter_and_packer(n):
    """Words out of beats keep order and tlast; words into beats pad the message's last beat."""
    split, pack = BeatSplitter(n), BeatPacker(n)
    words = list(range(100, 107))
    beats = [words[i:i + n] for i in range(0, len(words), n)]
    beats[-1] += [0] * (n - len(beats[-1]))

    async def bench_split(ctx):
        got = []
        ctx.set(split.words.ready, 1)
        for bi, beat in enumerate(beats):
            ctx.set(split.beats.p.data, sum(v << (32 * j) for j, v in enumerate(beat)))
            ctx.set(split.beats.p.last, bi == len(beats) - 1)
            ctx.set(split.beats.valid, 1)
            for _ in range(n):
                p, = await ctx.tick().sample(split.words.p).until(split.words.valid)
                got.append((p.data, p.beat_end, p.tlast))
        ctx.set(split.beats.valid, 0)
        flat = [v for b in beats for v in b]
        assert [g[0] for g in got] == flat
        assert [g[1] for g in got] == [(i % n) == n - 1 for i in range(len(flat))]
        assert [g[2] for g in got] == [i >= len(flat) - n for i in range(len(flat))]

    _sim(split, bench_split)

    async def send_words(ctx):
        for i, v in enumerate(words):
            ctx.set(pack.words.p.data, v)
            ctx.set(pack.words.p.last, i == len(words) - 1)
            ctx.set(pack.words.valid, 1)
            await ctx.tick().until(pack.words.ready)
        ctx.set(pack.words.valid, 0)

    async def bench_pack(ctx):
        out = []
        ctx.set(pack.beats.ready, 1)
        while len(out) < len(beats):
            _, _, valid, p = await ctx.tick().sample(pack.beats.valid, pack.beats.p)
            if valid:
                out.append((p.data, p.last))
        for (data, last), beat, i in zip(out, beats, range(len(beats))):
            assert data == sum(v << (32 * j) for j, v in enumerate(beat))
            assert last == (i == len(beats) - 1)

    _sim(pack, bench_pack, background=send_words)


@pytest.mark.parametrize("p,ho,wo,cout,stride", [(0, 3, 9, 2, 1), (2, 5, 5, 2, 2),
                                                  (3, 7, 4, 1, 1), (0, 4, 6, 1, 3)])
def test_dispatcher_covers_every_position_once(p, ho, wo, cout, stride):
    """Units tile the ofmap of every channel exactly once, with consistent origins."""
    cfg = EngineConfig(lanes=2, max_taps=64, max_ifmap=512, max_cout=4, max_ofmap=512,
                       max_k=3, max_p=4)
    hp = HwParams(cfg)
    dut = Dispatcher(hp)
    pad, k = 1, 3
    w_in = (wo - 1) * stride + k - 2 * pad
    rows = 7
    th, tw = (p, p) if p else (1, UNIT_WIDTH)       # the tile, as the loader multiplies it out

    async def bench(ctx):
        ctx.set(dut.layer, {"cout": cout, "ho": ho, "wo": wo, "howo": ho * wo, "p": p,
                            "stride": stride, "pad": pad, "w": w_in, "h": ho, "k": k,
                            "rows": rows, "pad_off": pad * w_in + pad, "tile_dy": th * stride,
                            "tile_dx": tw * stride, "tile_dout": th * wo,
                            "tile_dbase": th * stride * w_in})
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        cover = np.zeros((cout, ho, wo), int)
        widx = []
        ctx.set(dut.req, 0b10)
        for _ in range(400):
            await ctx.delay(1e-9)
            if ctx.get(dut.grant):
                assert ctx.get(dut.grant) == 0b10
                u = ctx.get(dut.unit)
                c, oaddr = u.c, u.oaddr
                y0, x0 = divmod(oaddr - c * ho * wo, wo)
                assert u.wbase == c * rows
                assert u.iy0 == y0 * stride - pad and u.ix0 == x0 * stride - pad
                assert u.base == u.iy0 * w_in + u.ix0
                assert u.hmax == min(p or 1, ho - y0)
                assert u.wmax == min(p or UNIT_WIDTH, wo - x0)
                cover[c, y0:y0 + u.hmax, x0:x0 + u.wmax] += 1
                widx.append(u.widx)
            if ctx.get(dut.done):
                break
            await ctx.tick()
        assert ctx.get(dut.done)
        assert (cover == 1).all()
        assert widx == list(range(len(widx)))

    _sim(dut, bench)
