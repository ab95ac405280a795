"""A catalogue of malformed command sequences, each with the error codes it must draw.

Pure Python (no cocotb): the protocol unit tests check each case against
:class:`~skipconv.sw.protocol.GoldenResponder`, and the cocotb benches send the same cases to
the simulated engine and compare its raw result words with the responder's, then run a
correct layer after each case.

A case is a list of *chunks* ``(words, last)``: the words go out as beats (the last one padded
with zeros) and ``last`` sets ``tlast`` on the chunk's final beat. Most cases hold one fault;
``codes`` lists the ``ERROR`` codes of the whole sequence in order (the ``OK`` replies of good
setup commands are not listed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skipconv.sw import protocol as P
from skipconv.sw import randlayer
from skipconv.sw.config import EngineConfig
from skipconv.sw.layer import COMPUTE, CONST, COPY, Layer
from skipconv.sw.protocol import ErrorCode as E
from skipconv.sw.protocol import Op

__all__ = ["FaultCase", "malformed_cases", "small_layer", "plan_features"]


@dataclass
class FaultCase:
    name: str
    chunks: list           # [(words, last)]
    codes: list            # expected ERROR codes, in order

    def responder_replies(self, config: EngineConfig, responder=None) -> list:
        """The reply messages of a fresh (or the given) responder to this case."""
        responder = responder or P.GoldenResponder(config)
        out = []
        for words, last in self.chunks:
            out += responder.feed([v for g in P.beat_words(words, config) for v in g], last)
        return out


def plan_features(config: EngineConfig) -> list[str]:
    """The planned mechanisms a test layer for ``config`` can use together."""
    feats = [f for f in ("velcro", "zero_pred") if config.has(f)]
    if not config.has("zero_pred") and config.has("perforation"):
        feats.append("perforation")
    return feats


def small_layer(config: EngineConfig, rng, *, features=None, cin=2, cout=3, h=6, w=6,
                k=3, pad=1, stride=1, et="exact", name="small") -> Layer:
    """A random layer small enough for any preset, using ``features`` (default: all it can)."""
    if features is None:
        features = plan_features(config) + (["early_term"] if config.has("early_term") else [])
    layer = randlayer.random_layer(
        rng, cin=cin, cout=cout, h=h, w=w, k=k, pad=pad, stride=stride, features=features,
        et=et, p=min(2, max(config.max_p, 2)), g=config.g, act_bits=min(8, config.act_bits),
        weight_bits=min(8, config.weight_bits), out_bits=min(8, config.out_bits))
    layer.name = name
    return layer


def _msg(op, body):
    return P.message(op, body)


def _replace(words, index, value):
    words = list(words)
    words[index] = value & P.WORD_MASK
    return words


def _set_bits(word, lo, width, value):
    mask = ((1 << width) - 1) << lo
    return (word & ~mask) | ((value << lo) & mask)


def malformed_cases(config: EngineConfig, seed: int = 0) -> list[FaultCase]:
    """Malformed command sequences that apply to ``config`` (about 50-60 for a full engine)."""
    rng = np.random.default_rng(seed)
    cfg = config
    L = small_layer(cfg, rng)
    x = randlayer.random_input(rng, L.in_shape, act_bits=L.act_bits)
    lay = P.encode_layer(L, cfg)
    plan = P.encode_plan(L, cfg) if P.has_plan(L) else None
    ifm = P.encode_ifmap(x, cfg)
    run = P.encode_run(False)
    cases: list[FaultCase] = []

    def case(name, codes, *chunks):
        cases.append(FaultCase(name, [(list(w), last) for w, last in chunks], list(codes)))

    def one(name, code, words):
        case(name, [code], (words, True))

    def setup():
        """Good commands that load the base layer (and its plan), no ifmap."""
        return [(lay, True)] + ([(plan, True)] if plan is not None else [])

    wpb = P.words_per_beat(cfg)

    def early(words):
        """The message without its last beat: tlast comes a whole beat early."""
        return words[:(-(-len(words) // wpb) - 1) * wpb]

    def layer_field(body_index, lo, width, value):
        """The base LOAD_LAYER with one header field changed (length left as it was)."""
        i = 2 + body_index
        return _replace(lay, i, _set_bits(lay[i], lo, width, value))

    # -- BAD_MAGIC ---------------------------------------------------------------------------
    one("magic 0x00", E.BAD_MAGIC, _replace(lay, 0, lay[0] & ~0xFF))
    one("magic 0xC4", E.BAD_MAGIC, _replace(lay, 0, (lay[0] & ~0xFF) | 0xC4))
    one("magic 0x5C on RUN", E.BAD_MAGIC, _replace(run, 0, (run[0] & ~0xFF) | 0x5C))
    one("garbage word", E.BAD_MAGIC, [0xDEADBEEF])
    one("a result header sent as a command", E.BAD_MAGIC, [0x0000_80C6, 0])
    # -- BAD_OPCODE --------------------------------------------------------------------------
    for opc in (0x00, 0x05, 0x80, 0xFF):
        one(f"opcode 0x{opc:02X}", E.BAD_OPCODE, [P.MAGIC | opc << 8, 1, 0])
    # -- BAD_LENGTH --------------------------------------------------------------------------
    case("RUN with n = 0", [E.BAD_LENGTH], *setup(), (ifm, True),
         (P.header(Op.RUN, 0), True))
    case("RUN with n = 2", [E.BAD_LENGTH], *setup(), (ifm, True),
         (P.header(Op.RUN, 2) + [0, 0], True))
    if wpb <= 2:      # on a wider bus the header's beat has room for RUN's body word
        case("RUN with tlast on its header", [E.BAD_LENGTH], *setup(), (ifm, True),
             (P.header(Op.RUN, 1), True))
    one("tlast on word 0", E.BAD_LENGTH, lay[:1])
    one("LOAD_LAYER with n = 0", E.BAD_LENGTH, P.header(Op.LOAD_LAYER, 0))
    one("LOAD_LAYER cut after its header fields", E.BAD_LENGTH, lay[:-(-4 // wpb) * wpb])
    one("LOAD_LAYER n one short", E.BAD_LENGTH,
        P.header(Op.LOAD_LAYER, len(lay) - 3) + lay[2:-1])
    one("LOAD_LAYER n one long", E.BAD_LENGTH,
        P.header(Op.LOAD_LAYER, len(lay) - 1) + lay[2:] + [0])
    one("LOAD_LAYER n = 3", E.BAD_LENGTH, P.header(Op.LOAD_LAYER, 3) + lay[2:5])
    case("LOAD_LAYER without tlast", [E.BAD_LENGTH], (lay, False), ([1, 2, 3], True))
    one("LOAD_LAYER tlast one beat early", E.BAD_LENGTH, early(lay))
    case("LOAD_IFMAP n one short", [E.BAD_LENGTH], *setup(),
         (P.header(Op.LOAD_IFMAP, len(ifm) - 3) + ifm[2:-1], True))
    case("LOAD_IFMAP n one long", [E.BAD_LENGTH], *setup(),
         (P.header(Op.LOAD_IFMAP, len(ifm) - 1) + ifm[2:] + [0], True))
    case("LOAD_IFMAP tlast early", [E.BAD_LENGTH], *setup(), (early(ifm), True))
    case("LOAD_IFMAP without tlast", [E.BAD_LENGTH], *setup(), (ifm, False), ([7] * 3, True))
    if plan is not None:
        case("LOAD_PLAN n one long", [E.BAD_LENGTH], (lay, True),
             (P.header(Op.LOAD_PLAN, len(plan) - 1) + plan[2:] + [0], True))
        case("LOAD_PLAN n = 0", [E.BAD_LENGTH], (lay, True), (P.header(Op.LOAD_PLAN, 0), True))
        case("LOAD_PLAN tlast early", [E.BAD_LENGTH], (lay, True), (early(plan), True))
    # -- LIMIT -------------------------------------------------------------------------------
    one("Cout > max_cout", E.LIMIT, layer_field(0, 16, 16, cfg.max_cout + 1))
    if cfg.max_ifmap < 0xFFFF:
        one("W > max_ifmap", E.LIMIT, layer_field(1, 16, 16, cfg.max_ifmap + 1))
    h_big = cfg.max_ifmap // L.cin + 1
    if h_big < 1 << 16:
        one("Cin*H*W > max_ifmap", E.LIMIT, layer_field(1, 0, 16, h_big))
    # the product beyond 32 bits: the reply's detail is its low 32 bits
    one("Cin*H*W >= 2**32", E.LIMIT, layer_field(1, 0, 32, 0xFFFFFFFF))
    if cfg.max_k < 255:
        one("K > max_k", E.LIMIT, layer_field(2, 0, 8, cfg.max_k + 1))
    if cfg.out_bits < 255:
        one("out_bits > config", E.LIMIT, layer_field(3, 8, 8, cfg.out_bits + 1))
    if cfg.has("zero_pred") and cfg.max_p < 8:
        one("p > max_p", E.LIMIT, layer_field(2, 24, 8, cfg.max_p + 1))
    # Cout*Ho*Wo beyond max_ofmap with a small ifmap: a large pad keeps Cin*H*W small.
    big = _ofmap_overflow(cfg, L)
    if big is not None:
        one("Cout*Ho*Wo > max_ofmap", E.LIMIT, big)
    if cfg.max_taps < 0xFFFF and cfg.max_k >= 1:
        cin_big = cfg.max_taps // (L.k * L.k) + 1
        t_big = cin_big * L.k * L.k
        if cin_big < 1 << 16 and cin_big * L.in_shape[1] * L.in_shape[2] <= cfg.max_ifmap:
            w = layer_field(0, 0, 16, cin_big)
            one("T > max_taps", E.LIMIT, _replace(w, 6, t_big))
    # -- FEATURE -----------------------------------------------------------------------------
    if not cfg.has("early_term"):
        one("et exact without early_term", E.FEATURE, layer_field(3, 2, 2, 1))
        one("et predictive without early_term", E.FEATURE, layer_field(3, 2, 2, 2))
    if not cfg.has("zero_pred"):
        one("p = 2 without zero_pred", E.FEATURE, layer_field(2, 24, 8, 2))
    planned = bool(plan_features(cfg))
    if not planned:
        one("has_plan without planned mechanisms", E.FEATURE, layer_field(3, 4, 1, 1))
        case("LOAD_PLAN without planned mechanisms", [E.FEATURE], (lay, True),
             (_msg(Op.LOAD_PLAN, [0] * (1 + L.cout * L.out_hw[0] * L.out_hw[1])), True))
    if plan is not None and not cfg.has("perforation"):
        ho, wo = L.out_hw
        case("has_nn without perforation", [E.FEATURE], (lay, True),
             (_msg(Op.LOAD_PLAN, [1] + list(plan[3:]) + [0] * (ho * wo)), True))
    for feature, kind_code in (("velcro", CONST), ("perforation", COPY)):
        if planned and not cfg.has(feature):
            Lf = small_layer(cfg, rng, features=[feature], name=feature)
            if Lf.kind is not None and (np.asarray(Lf.kind) == kind_code).any():
                case(f"{feature} plan on an engine without it", [E.FEATURE],
                     (P.encode_layer(Lf, cfg), True), (P.encode_plan(Lf, cfg), True))
    if not cfg.trace:
        case("RUN trace without trace", [E.FEATURE], *setup(), (ifm, True),
             (P.encode_run(True), True))
    # -- BAD_VALUE ---------------------------------------------------------------------------
    one("Cin = 0", E.BAD_VALUE, layer_field(0, 0, 16, 0))
    one("Cout = 0", E.BAD_VALUE, layer_field(0, 16, 16, 0))
    one("H = 0", E.BAD_VALUE, layer_field(1, 0, 16, 0))
    one("W = 0", E.BAD_VALUE, layer_field(1, 16, 16, 0))
    one("K = 0", E.BAD_VALUE, layer_field(2, 0, 8, 0))
    one("stride = 0", E.BAD_VALUE, layer_field(2, 8, 8, 0))
    one("pad = K", E.BAD_VALUE, layer_field(2, 16, 8, L.k))
    if cfg.has("zero_pred"):
        one("p = 1", E.BAD_VALUE, layer_field(2, 24, 8, 1))
    small_h = layer_field(1, 0, 16, 1)                   # H = 1, and pad 0 below
    one("input smaller than the kernel", E.BAD_VALUE,
        _replace(small_h, 4, _set_bits(small_h[4], 16, 8, 0)))
    one("et = 3", E.BAD_VALUE, layer_field(3, 2, 2, 3))
    one("out_bits = 0", E.BAD_VALUE, layer_field(3, 8, 8, 0))
    one("T != Cin*K*K", E.BAD_VALUE, _replace(lay, 6, L.taps + 1))
    ch = 2 + P.LAYER_HEADER_WORDS          # first per-channel word
    one("M = 0", E.BAD_VALUE, _replace(lay, ch + 1, lay[ch + 1] & ~0xFFFF))
    one("sh = 48", E.BAD_VALUE, _replace(lay, ch + 1, _set_bits(lay[ch + 1], 16, 8, 48)))
    one("neg_start > T (channel 1)", E.BAD_VALUE,
        _replace(lay, ch + P.CHANNEL_WORDS + 2, L.taps + 1))
    one("spec > T", E.BAD_VALUE, _replace(lay, ch + 3, L.taps + cfg.g))
    if cfg.g > 1:
        one("spec not a multiple of g", E.BAD_VALUE, _replace(lay, ch + 3, 1))
    wts = ch + P.CHANNEL_WORDS * L.cout
    one("tap index = T", E.BAD_VALUE, _replace(lay, wts + 3, _set_bits(lay[wts + 3], 16, 16,
                                                                      L.taps)))
    one("tap index 0xFFFF (last channel)", E.BAD_VALUE,
        _replace(lay, len(lay) - 1, lay[-1] | 0xFFFF0000))
    if plan is not None:
        case("plan kind 3", [E.BAD_VALUE], (lay, True), (_replace(plan, 4, 3), True))
        if cfg.has("velcro"):
            case("CONST above 2**out_bits - 1", [E.BAD_VALUE], (lay, True),
                 (_replace(plan, 5, CONST | ((1 << L.out_bits) << 8)), True))
        if cfg.has("perforation"):
            no_nn = [0] + plan[3:3 + L.cout * L.out_hw[0] * L.out_hw[1]]
            case("COPY without an NN table", [E.BAD_VALUE], (lay, True),
                 (_msg(Op.LOAD_PLAN, _replace(no_nn, 2, COPY)), True))
    if cfg.has("perforation"):
        Lp = small_layer(cfg, rng, features=["perforation"], name="perforated")
        lay_p, plan_p = P.encode_layer(Lp, cfg), P.encode_plan(Lp, cfg)
        ho, wo = Lp.out_hw
        case("NN target row outside the ofmap", [E.BAD_VALUE], (lay_p, True),
             (_replace(plan_p, len(plan_p) - 1, ho << 16), True))
        case("NN target column outside the ofmap", [E.BAD_VALUE], (lay_p, True),
             (_replace(plan_p, len(plan_p) - 2, wo), True))
    # -- NOT_READY ---------------------------------------------------------------------------
    case("RUN after LOAD_LAYER only", [E.NOT_READY], *setup(), (run, True))
    if plan is not None:
        case("RUN without the plan", [E.NOT_READY], (lay, True), (ifm, True), (run, True))
        case("RUN after a refused plan", [E.BAD_VALUE, E.NOT_READY], (lay, True), (plan, True),
             (_replace(plan, 4, 3), True), (ifm, True), (run, True))
    case("LOAD_IFMAP after a refused LOAD_LAYER", [E.BAD_VALUE, E.NOT_READY],
         (layer_field(2, 0, 8, 0), True), (ifm, True))
    case("RUN after a refused LOAD_LAYER", [E.BAD_VALUE, E.NOT_READY], *setup(), (ifm, True),
         (layer_field(0, 0, 16, 0), True), (run, True))
    case("RUN after a refused LOAD_IFMAP", [E.BAD_LENGTH, E.NOT_READY], *setup(), (ifm, True),
         (early(ifm), True), (run, True))
    if planned:       # (a plan-less engine refuses LOAD_PLAN itself first: FEATURE)
        case("LOAD_PLAN after a refused LOAD_LAYER", [E.BAD_LENGTH, E.NOT_READY],
             (lay[:4], True), (_msg(Op.LOAD_PLAN, [0]), True))
    # A message with a bad magic is no LOAD_*: what is loaded stays loaded.
    case("RUN after a bad-magic LOAD_LAYER header", [E.BAD_MAGIC], *setup(), (ifm, True),
         ([lay[0] & ~0xFF, 0], True), (run, True))
    case("RUN after a new LOAD_LAYER dropped the ifmap", [E.NOT_READY], *setup(), (ifm, True),
         *setup(), (run, True))
    # -- several faults in a row -------------------------------------------------------------
    case("three bad messages back to back", [E.BAD_MAGIC, E.BAD_OPCODE, E.BAD_VALUE],
         ([0x12345678, 9, 9], True), ([P.MAGIC | 0x33 << 8, 0], True),
         (layer_field(0, 16, 16, 0), True))
    return cases


def _ofmap_overflow(cfg: EngineConfig, L: Layer):
    """A LOAD_LAYER prefix whose ofmap exceeds max_ofmap while the ifmap fits, or None."""
    cout = min(cfg.max_cout, 0xFFFF)
    for h in range(1, 1 << 16):
        if L.cin * h * h > cfg.max_ifmap:
            return None
        # pad must stay below K: use K = max_k and the largest pad.
        kk = min(cfg.max_k, 255)
        pad = kk - 1
        ho = h + 2 * pad - kk + 1
        if ho >= 1 and cout * ho * ho > cfg.max_ofmap:
            t = L.cin * kk * kk
            if t > cfg.max_taps:
                return None
            words = [L.cin | cout << 16, h | h << 16, kk | 1 << 8 | pad << 16,
                     min(8, cfg.out_bits) << 8, t]
            return P.header(Op.LOAD_LAYER, 6) + words + [0]
    return None
