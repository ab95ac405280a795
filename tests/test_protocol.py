"""The protocol module: encode/decode round trips, the responder's replies, every error code."""

import numpy as np
import pytest

from skipconv.sim.bench.malformed import malformed_cases, small_layer
from skipconv.sw import golden, randlayer
from skipconv.sw import protocol as P
from skipconv.sw.config import PRESETS, EngineConfig
from skipconv.sw.layer import CONST
from skipconv.sw.protocol import ErrorCode as E
from skipconv.sw.protocol import Op, Res

FULL = EngineConfig()
CONFIGS = {
    "full": FULL,
    "g2-bus64": EngineConfig(g=2, bus_bits=64, lanes=3),
    "dense": PRESETS["dense"],
    "velcro-notrace-bus128": EngineConfig(features=frozenset({"velcro"}), trace=False,
                                          bus_bits=128, max_p=0),
    "icebreaker": PRESETS["icebreaker"],
}


def run_through(responder, parser, layer, x, config, trace=True):
    """Send the commands of one layer; return the decoded reply to RUN."""
    replies = []
    for words in P.encode_commands(layer, x, config, trace=trace):
        for msg in responder.feed_message(words):
            replies += parser.feed_bytes(P.to_bytes(msg.words(), config))
    assert [m.type for m in replies[:-2 - trace]] == [Res.OK] * (len(replies) - 2 - trace)
    return P.decode_run(replies[-2 - trace:], layer, trace=trace)


@pytest.mark.parametrize("features", [(), ("early_term",), ("zero_pred",), ("velcro",),
                                      ("perforation",), ("early_term", "zero_pred", "velcro"),
                                      ("early_term", "perforation", "velcro")])
@pytest.mark.parametrize("g,bus", [(1, 32), (2, 64), (3, 96)])
def test_round_trip_equals_golden(features, g, bus):
    cfg = EngineConfig(g=g, bus_bits=bus)
    rng = np.random.default_rng(hash((features, g)) % 1000)
    for et in ("exact", "predictive"):
        layer = randlayer.random_layer(rng, cin=3, cout=5, h=7, w=9, features=features, g=g,
                                       et=et, p=3)
        x = randlayer.random_input(rng, layer.in_shape)
        got = run_through(P.GoldenResponder(cfg), P.ResultParser(cfg), layer, x, cfg)
        want = golden.run(layer, x, g)
        assert want.mismatches(got) == []
        assert (got.outcome == want.outcome).all()
        assert got.positions == want.positions
        assert got.cycles == P.ideal_cycles(want, cfg)


@pytest.mark.parametrize("kw", [
    dict(raw=True), dict(act_signed=True, features=("early_term",), et="predictive"),
    dict(out_bits=12), dict(out_bits=3, stride=2, k=5, pad=2),
])
def test_round_trip_modes(kw):
    cfg = EngineConfig(out_bits=16, act_bits=16, weight_bits=12)
    rng = np.random.default_rng(7)
    layer = randlayer.random_layer(rng, cin=2, cout=3, h=9, w=6, **kw)
    x = randlayer.random_input(rng, layer.in_shape, signed=layer.act_signed)
    got = run_through(P.GoldenResponder(cfg), P.ResultParser(cfg), layer, x, cfg)
    assert golden.run(layer, x, 1).mismatches(got) == []


def test_ifmap_packing_by_act_bits():
    x = np.arange(2 * 3 * 3).reshape(2, 3, 3) * 13 % 256
    w8 = P.encode_ifmap(x, EngineConfig(act_bits=8))
    w16 = P.encode_ifmap(x, EngineConfig(act_bits=16))
    assert w8[1] == 5 and w16[1] == 9
    assert w8[2] == x.ravel()[0] | x.ravel()[1] << 8 | x.ravel()[2] << 16 | x.ravel()[3] << 24
    assert w16[-1] == x.ravel()[-2] | x.ravel()[-1] << 16   # 18 values, 2 per word
    assert w8[-1] == x.ravel()[-2] | x.ravel()[-1] << 8   # zero-padded last word


def test_layer_header_fields():
    rng = np.random.default_rng(3)
    layer = randlayer.random_layer(rng, cin=3, cout=2, h=5, w=7, k=3, stride=2, pad=1,
                                   features=("zero_pred", "early_term"), et="predictive",
                                   p=2)
    words = P.encode_layer(layer, FULL)
    assert words[0] == 0xC5 | Op.LOAD_LAYER << 8
    t = 27
    assert words[1] == 5 + 5 * 2 + 2 * t == len(words) - 2
    assert words[2] == 3 | 2 << 16 and words[3] == 5 | 7 << 16
    assert words[4] == 3 | 2 << 8 | 1 << 16 | 2 << 24
    assert words[5] == 0 | 0 << 1 | 2 << 2 | 1 << 4 | 8 << 8
    assert words[6] == t
    # Weights in tap order with their indices.
    first = words[2 + 5 + 10]
    tap = int(layer.order[0][0])
    assert first >> 16 == tap
    assert P._sx(first & 0xFFFF, 16) == layer.w.reshape(2, t)[0, tap]


def test_beats_and_bytes():
    cfg = EngineConfig(bus_bits=96)
    words = P.message(Op.RUN, [1])
    b = P.beats(words, cfg)
    assert b == [(words[0] | words[1] << 32 | 1 << 64, True)]
    three = P.beats(P.message(Op.LOAD_IFMAP, [1, 2, 3, 4, 5]), cfg)
    assert [last for _, last in three] == [False, False, True]
    assert three[1][0] == 2 | 3 << 32 | 4 << 64
    assert three[2][0] == 5                            # zero padding in the upper words
    data = P.to_bytes(P.message(Op.LOAD_IFMAP, [1, 2, 3, 4, 5]), cfg)
    assert len(data) == 36 and P.words_from_bytes(data)[-2:] == [0, 0]


def test_parser_handles_fragments_and_padding():
    cfg = EngineConfig(bus_bits=128)
    msgs = [P.Message(Res.OK, ()), P.Message(Res.ERROR, (3, 17)),
            P.Message(Res.OFMAP, (1, 2, 3, 4, 5)), P.Message(Res.OK, ())]
    stream = b"".join(P.to_bytes(m.words(), cfg) for m in msgs)
    parser = P.ResultParser(cfg)
    got = []
    for i in range(0, len(stream), 3):                 # pieces that split words
        got += parser.feed_bytes(stream[i:i + 3])
    assert got == msgs and parser.idle


@pytest.mark.parametrize("words,why", [
    ([0x000080C4, 0], "bad magic"), ([0x000099C5, 0], "unknown result type"),
    ([0x000083C5, 18], "COUNTERS"), ([0x000080C5, 1, 0], "OK"),
])
def test_parser_refuses_bad_results(words, why):
    with pytest.raises(P.ProtocolError, match=why):
        P.ResultParser(FULL).feed_words(words)


def test_engine_error_names_the_code():
    msg = P.Message(Res.ERROR, (int(E.LIMIT), 70000))
    with pytest.raises(P.EngineError, match="LIMIT .*70000") as info:
        msg.raise_for_error()
    assert info.value.code == E.LIMIT and info.value.detail == 70000
    with pytest.raises(P.EngineError, match="LIMIT"):
        P.decode_run([msg], small_layer(FULL, np.random.default_rng(0)))


def test_decode_run_checks_the_sequence():
    layer = small_layer(FULL, np.random.default_rng(0))
    with pytest.raises(P.ProtocolError, match="expected OFMAP, TRACE, COUNTERS"):
        P.decode_run([P.Message(Res.OK, ())], layer)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_malformed_cases_draw_their_codes_and_a_good_layer_follows(name):
    cfg = CONFIGS[name]
    cases = malformed_cases(cfg, seed=1)
    responder = P.GoldenResponder(cfg)
    rng = np.random.default_rng(2)
    for case in cases:
        replies = case.responder_replies(cfg, responder)
        codes = [m.body[0] for m in replies if m.type == Res.ERROR]
        assert codes == [int(c) for c in case.codes], case.name
        assert responder.idle, case.name
        layer = small_layer(cfg, rng)
        x = randlayer.random_input(rng, layer.in_shape)
        got = run_through(responder, P.ResultParser(cfg), layer, x, cfg, trace=cfg.trace)
        want = golden.run(layer, x, cfg.g)
        if cfg.trace:
            assert want.mismatches(got) == [], case.name
        else:
            assert (got.out == want.out).all() and got.accounting() == want.accounting()


def test_every_error_code_is_exercised():
    seen = set()
    total = 0
    for cfg in CONFIGS.values():
        cases = malformed_cases(cfg)
        total += len(cases)
        seen |= {c for case in cases for c in case.codes}
    assert seen == set(E)
    assert len(malformed_cases(FULL)) >= 50


def test_error_details():
    cfg = FULL
    layer = small_layer(cfg, np.random.default_rng(4))
    words = P.encode_layer(layer, cfg)
    r = P.GoldenResponder(cfg)
    assert r.feed_message([0x1234_56AB]) == [P.Message(Res.ERROR, (1, 0x123456AB))]
    assert r.feed_message([0xC5 | 9 << 8, 0]) == [P.Message(Res.ERROR, (2, 9))]
    big = list(words)
    big[2] = (big[2] & 0xFFFF) | (cfg.max_cout + 1) << 16
    assert r.feed_message(big) == [P.Message(Res.ERROR, (4, cfg.max_cout + 1))]
    assert r.feed_message(P.encode_run()) == [P.Message(Res.ERROR, (7, Op.RUN))]
    short = P.header(Op.LOAD_LAYER, 4) + words[2:6]
    assert r.feed_message(short) == [P.Message(Res.ERROR, (3, 4))]


def test_bad_message_is_dropped_up_to_tlast():
    cfg = FULL
    rng = np.random.default_rng(5)
    layer = small_layer(cfg, rng)
    good = P.encode_layer(layer, cfg)
    r = P.GoldenResponder(cfg)
    # A bad magic, then a whole valid LOAD_LAYER inside the same (unterminated) message.
    assert r.feed([0xBAD] + good, last=False) == [P.Message(Res.ERROR, (1, 0xBAD))]
    assert r.feed([0], last=True) == []
    assert r.feed_message(good) == [P.Message(Res.OK, ())]


def test_missing_tlast_is_found_at_the_last_word():
    cfg = FULL
    layer = small_layer(cfg, np.random.default_rng(6))
    good = P.encode_layer(layer, cfg)
    r = P.GoldenResponder(cfg)
    assert r.feed(good, last=False) == [P.Message(Res.ERROR, (3, len(good) - 2))]
    assert not r.idle
    assert r.feed(P.encode_run(), last=True) == []     # dropped: still the bad message
    assert r.idle
    assert r.feed_message(P.encode_run()) == [P.Message(Res.ERROR, (7, Op.RUN))]


def test_plan_is_ignored_without_has_plan_and_run_repeats():
    cfg = FULL
    rng = np.random.default_rng(8)
    layer = small_layer(cfg, rng, features=["early_term"])
    x = randlayer.random_input(rng, layer.in_shape)
    r = P.GoldenResponder(cfg)
    planned = small_layer(cfg, rng, features=["velcro"])
    planned.kind[:] = CONST
    assert r.feed_message(P.encode_layer(layer, cfg)) == [P.Message(Res.OK, ())]
    assert r.feed_message(P.encode_plan(planned, cfg)) == [P.Message(Res.OK, ())]
    assert r.feed_message(P.encode_ifmap(x, cfg)) == [P.Message(Res.OK, ())]
    first = r.feed_message(P.encode_run(True))
    assert first == r.feed_message(P.encode_run(True))
    assert golden.run(layer, x, 1).mismatches(P.decode_run(first, layer)) == []


def test_host_checked_rules_are_undefined():
    cfg = FULL
    rng = np.random.default_rng(9)
    layer = small_layer(cfg, rng, features=[])
    x = randlayer.random_input(rng, layer.in_shape)
    words = P.encode_layer(layer, cfg)
    base = 2 + 5 + 5 * layer.cout
    words[base + 1] = (words[base + 1] & 0xFFFF) | (words[base] >> 16) << 16   # duplicate tap
    r = P.GoldenResponder(cfg)
    r.feed_message(words)
    r.feed_message(P.encode_ifmap(x, cfg))
    with pytest.raises(P.UndefinedBehavior, match="order"):
        r.feed_message(P.encode_run())


def test_refusal_predicts_the_engine():
    rng = np.random.default_rng(10)
    layer = randlayer.random_layer(rng, cin=40, cout=4, h=4, w=4, features=())
    cfg = PRESETS["icebreaker"]                        # max_taps 256 < 40*9
    err = P.refusal(layer, cfg)
    assert err is not None and err.name == "LIMIT" and err.detail == 360
    assert P.refusal(layer, FULL) is None
    planned = small_layer(FULL, rng, features=["velcro"])
    err = P.refusal(planned, PRESETS["dense"])
    assert err.name == "FEATURE" and err.detail == P.PLAN_FEATURE_BITS


def test_encoder_refuses_what_it_cannot_represent():
    rng = np.random.default_rng(11)
    layer = randlayer.random_layer(rng, act_bits=12, features=())
    with pytest.raises(P.ProtocolError, match="act_bits = 12"):
        P.encode_layer(layer, FULL)
    with pytest.raises(P.ProtocolError, match="x.shape"):
        P.encode_ifmap(np.zeros((3, 3)), FULL)


def test_copy_without_an_nn_table_is_refused():
    cfg = FULL
    rng = np.random.default_rng(12)
    layer = small_layer(cfg, rng, features=["perforation"])
    words = P.encode_plan(layer, cfg)
    cout, ho, wo = layer.out_shape
    kinds = words[3:3 + cout * ho * wo]
    no_nn = P.message(Op.LOAD_PLAN, [0] + kinds)
    r = P.GoldenResponder(cfg)
    assert r.feed_message(P.encode_layer(layer, cfg)) == [P.Message(Res.OK, ())]
    assert r.feed_message(no_nn) == [P.Message(Res.ERROR, (int(E.BAD_VALUE), 2))]


def test_a_words_own_checks_come_before_an_early_tlast():
    cfg = FULL
    layer = small_layer(cfg, np.random.default_rng(13))
    words = P.encode_layer(layer, cfg)
    bad = list(words[:5])
    bad[4] &= ~0xFF                                     # K = 0 on the word that ends early
    assert P.GoldenResponder(cfg).feed_message(bad) == [
        P.Message(Res.ERROR, (int(E.BAD_VALUE), 0))]


def _beat_by_beat(responder, words, last, cfg):
    """``responder.feed`` one beat at a time (the word-by-word path, no bulk runs)."""
    n = P.words_per_beat(cfg)
    out = []
    for i in range(0, len(words), n):
        out += responder.feed_beat(words[i:i + n], last and i + n == len(words))
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bulk_bodies_answer_like_word_by_word(name):
    """feed() checks long bodies a run of beats at a time: same replies, codes and state as
    feed_beat() beat by beat, on good bodies and on bodies with a bad word anywhere."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(14)
    feats = [f for f in ("velcro", "perforation", "early_term") if cfg.has(f)]
    layer = small_layer(cfg, rng, features=feats, cin=3, cout=4, h=7, w=6)
    x = randlayer.random_input(rng, layer.in_shape)
    msgs = P.encode_commands(layer, x, cfg, trace=cfg.trace)
    _, ho, wo = layer.out_shape
    for trial in range(80):
        fast, slow = P.GoldenResponder(cfg), P.GoldenResponder(cfg)
        for m, words in enumerate(msgs):
            words = list(words)
            if trial and m == trial % len(msgs) and len(words) > 3:
                # A word near a check's bound: tap index, kind, constant, NN coordinates.
                k, d, e = int(rng.integers(2, len(words))), *rng.integers(-1, 2, 2)
                words[k] = [words[k] ^ (1 << int(rng.integers(32))),
                            (words[k] & 0xFFFF) | (layer.taps + d) << 16,
                            (words[k] & ~3 & P.WORD_MASK) | int(rng.integers(4)),
                            (words[k] & 0xFF) | ((1 << layer.out_bits) + d) << 8,
                            (ho + d) << 16 | (wo + e)][trial % 5] & P.WORD_MASK
            beat = [v for g in P.beat_words(words, cfg) for v in g]
            last = bool(trial % 7) or m != 1
            try:
                got = fast.feed(np.asarray(beat, np.uint32), last)
            except P.UndefinedBehavior:
                with pytest.raises(P.UndefinedBehavior):
                    _beat_by_beat(slow, beat, last, cfg)
                break
            assert got == _beat_by_beat(slow, beat, last, cfg), (trial, m)
            assert (fast.idle, fast._idx, fast._dropping) == (slow.idle, slow._idx,
                                                              slow._dropping)
            if fast.ifmap is not None or slow.ifmap is not None:
                assert (fast.ifmap == slow.ifmap).all()
