# amaranth: UnusedElaboratable=no
"""Whole-engine layers in the Amaranth simulator, bit-exact against the golden model."""

import numpy as np
import pytest

from skipconv.hw.amaranth_sim import run_messages
from skipconv.sim.bench.malformed import malformed_cases
from skipconv.sw import golden
from skipconv.sw import protocol as P
from skipconv.sw.config import FEATURES, EngineConfig
from skipconv.sw.randlayer import random_input, random_layer

SMALL = dict(max_taps=64, max_ifmap=512, max_cout=4, max_ofmap=512, max_k=3, max_p=2)
ALL = frozenset(FEATURES)

# (name, config changes, layer keywords, stall probability)
LAYERS = [
    ("dense g1", dict(lanes=2, features=frozenset()), dict(features=[]), 0.0),
    ("zero_pred+exact ET+velcro g1", dict(lanes=2), dict(features=["zero_pred", "early_term",
                                                                   "velcro"]), 0.0),
    ("perforation+ET+velcro g2 bus64 stalls", dict(lanes=3, g=2, bus_bits=64),
     dict(features=["perforation", "early_term", "velcro"]), 0.25),
    ("zero_pred+predictive ET g2 signed input", dict(lanes=2, g=2),
     dict(features=["zero_pred", "early_term"], et="predictive", act_signed=True), 0.0),
    ("stride 2 raw output, zero_pred", dict(lanes=2), dict(features=["zero_pred", "velcro"],
                                                           stride=2, h=9, w=8, raw=True), 0.0),
    # more lanes than one gather arbiter serves: results gathered in registered groups
    ("zero_pred+ET+velcro lanes 6 grouped gather stalls", dict(lanes=6, max_cout=8),
     dict(features=["zero_pred", "early_term", "velcro"], cout=7), 0.25),
]


def _run_and_compare(cfg, layer, x, stall=0.0, seed=0):
    res = run_messages(cfg, P.encode_commands(layer, x, cfg, trace=cfg.trace), stall=stall,
                       seed=seed)
    gold = golden.run(layer, x, cfg.g)
    out = P.decode_ofmap(res[-3 if cfg.trace else -2], layer)
    counters = P.decode_counters(res[-1])
    np.testing.assert_array_equal(out, gold.out)
    if cfg.trace:
        np.testing.assert_array_equal(P.decode_trace(res[-2], layer), gold.macs)
    for name, value in gold.accounting().items():
        assert counters[name] == value, name
    assert counters["positions"] == gold.positions
    assert counters["cycles"] > 0
    return counters


@pytest.mark.parametrize("name,changes,kw,stall", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_matches_golden(name, changes, kw, stall):
    cfg = EngineConfig(**SMALL, features=ALL).replace(**changes)
    rng = np.random.default_rng(sum(map(ord, name)))
    kw = dict(dict(cin=2, cout=3, h=6, w=5, k=3, g=cfg.g), **kw)
    layer = random_layer(rng, **kw)
    x = random_input(rng, layer.in_shape, signed=layer.act_signed)
    _run_and_compare(cfg, layer, x, stall=stall)


@pytest.mark.parametrize("name,changes,kw,stall", [LAYERS[0], LAYERS[2], LAYERS[3]],
                         ids=[LAYERS[0][0], LAYERS[2][0], LAYERS[3][0]])
def test_block_ram_build_replies_like_the_default_build(name, changes, kw, stall):
    """The iCE40 build (``lut_ram=False``: small FIFOs and memories in block RAM, a PE ring
    without the read-register stages) answers with the default build's very messages, but
    for the cycle count (its ring is two stages shorter), and both match the golden model."""
    from skipconv.hw.engine import Engine
    cfg = EngineConfig(**SMALL, features=ALL).replace(**changes)
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    kw = dict(dict(cin=2, cout=3, h=6, w=5, k=3, g=cfg.g), **kw)
    layer = random_layer(rng, **kw)
    x = random_input(rng, layer.in_shape, signed=layer.act_signed)
    msgs = P.encode_commands(layer, x, cfg, trace=cfg.trace)
    default = run_messages(cfg, msgs, stall=stall)
    block = run_messages(cfg, msgs, stall=stall, engine=Engine(cfg, lut_ram=False))
    counters = [P.decode_counters(r) for r in (block[-1], default[-1])]
    assert counters[0]["cycles"] > 0
    for c in counters:
        del c["cycles"]
    assert counters[0] == counters[1]
    assert block[:-1] == default[:-1]
    np.testing.assert_array_equal(P.decode_ofmap(block[-3 if cfg.trace else -2], layer),
                                  golden.run(layer, x, cfg.g).out)


def test_dense_layer_keeps_every_lane_busy():
    """Cout < lanes and a short row: the dense engine still runs at >= 85% MAC utilization."""
    cfg = EngineConfig(**SMALL, lanes=4, features=frozenset(), trace=False)
    rng = np.random.default_rng(5)
    layer = random_layer(rng, cin=3, cout=2, h=8, w=8, k=3, features=[])
    x = random_input(rng, layer.in_shape)
    counters = _run_and_compare(cfg, layer, x)
    assert layer.dense_macs / (counters["cycles"] * cfg.lanes) >= 0.85


@pytest.mark.parametrize("lut_ram", [True, False], ids=["lut_ram", "block_ram"])
def test_malformed_commands_answered_like_the_protocol_model(lut_ram):
    """Every malformed case of the catalogue, back to back in one run, then a correct layer
    (also in the iCE40 build, ``lut_ram=False``)."""
    from skipconv.hw.engine import Engine
    cfg = EngineConfig(**SMALL, lanes=1)
    cases = malformed_cases(cfg, seed=3)
    assert len(cases) >= 50
    responder = P.GoldenResponder(cfg)
    chunks, expected = [], []
    for case in cases:
        expected += case.responder_replies(cfg, responder)
        chunks += case.chunks
    rng = np.random.default_rng(9)
    layer = random_layer(rng, cin=2, cout=2, h=5, w=5, k=3, features=["velcro", "early_term"])
    x = random_input(rng, layer.in_shape)
    for msg in P.encode_commands(layer, x, cfg, trace=True):
        chunks.append((msg, True))
        expected += responder.feed_message(msg)
    got = run_messages(cfg, None, chunks=chunks, replies=len(expected),
                       engine=Engine(cfg, lut_ram=lut_ram))
    assert [m.type for m in got] == [m.type for m in expected]
    errors = [(m.body[0], m.body[1]) for m in got if m.type == P.Res.ERROR]
    assert errors == [(m.body[0], m.body[1]) for m in expected if m.type == P.Res.ERROR]
    assert len(errors) >= 50
    np.testing.assert_array_equal(P.decode_ofmap(got[-3], layer),
                                  golden.run(layer, x, cfg.g).out)


def test_reset_in_the_middle_of_a_layer():
    """``rst`` while a layer runs: nothing half-done survives, the next layer is exact."""
    from amaranth import ClockDomain, Module, ResetSignal, Signal
    from amaranth.sim import DomainReset, Simulator

    from skipconv.hw.engine import Engine
    cfg = EngineConfig(**SMALL, lanes=2)
    rng = np.random.default_rng(4)
    first = random_layer(rng, cin=2, cout=3, h=6, w=6, k=3,
                         features=["zero_pred", "early_term", "velcro"])
    x1 = random_input(rng, first.in_shape)
    second = random_layer(rng, cin=2, cout=2, h=5, w=6, k=3, features=["velcro", "early_term"])
    x2 = random_input(rng, second.in_shape)
    dut = Engine(cfg)
    top = Module()
    top.domains.sync = ClockDomain()
    top.submodules.engine = dut
    rst = Signal()
    top.d.comb += ResetSignal("sync").eq(rst)
    got = []
    parser = P.ResultParser(cfg)
    state = {"busy_at_reset": None}

    async def send(ctx, msgs):
        for msg in msgs:
            for data, last in P.beats(msg, cfg):
                ctx.set(dut.s_axis_tdata, data)
                ctx.set(dut.s_axis_tlast, int(last))
                ctx.set(dut.s_axis_tvalid, 1)
                await ctx.tick().until(dut.s_axis_tready)
                ctx.set(dut.s_axis_tvalid, 0)

    async def bench(ctx):
        await send(ctx, P.encode_commands(first, x1, cfg, trace=True))
        await ctx.tick().repeat(60)
        state["busy_at_reset"] = ctx.get(dut.busy)
        ctx.set(rst, 1)
        await ctx.tick()
        ctx.set(rst, 0)
        state["words_before"] = len(got)
        await send(ctx, P.encode_commands(second, x2, cfg, trace=True))
        while len(got) < 9:
            await ctx.tick()

    async def receive(ctx):
        ctx.set(dut.m_axis_tready, 1)
        while True:
            try:
                _, _, valid, data = await ctx.tick().sample(dut.m_axis_tvalid, dut.m_axis_tdata)
            except DomainReset:
                continue
            if valid:
                got.extend(parser.feed_words([data]))

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(receive, background=True)
    sim.add_testbench(bench)
    sim.run_until(5e-4)
    assert state["busy_at_reset"] == 1
    assert [m.name for m in got] == ["OK"] * 6 + ["OFMAP", "TRACE", "COUNTERS"]
    gold = golden.run(second, x2, cfg.g)
    np.testing.assert_array_equal(P.decode_ofmap(got[-3], second), gold.out)
    assert P.decode_counters(got[-1])["performed"] == gold.performed
