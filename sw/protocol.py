"""The engine's command and result streams (docs/protocol.md): encoder, decoder, responder.

This is the only module that knows the bytes. Three parts:

* **Encoding** commands from a :class:`~skipconv.sw.layer.Layer`, an input and an
  :class:`~skipconv.sw.config.EngineConfig`: :func:`encode_layer`, :func:`encode_plan`,
  :func:`encode_ifmap`, :func:`encode_run`, :func:`encode_commands`; a message is a list of
  32-bit words (header included, beat padding not); :func:`beats` and :func:`to_bytes` add
  the beat padding and ``tlast`` for a bus or a byte link.
* **Decoding** results: :class:`ResultParser` takes words or bytes incrementally and returns
  :class:`Message` objects; :func:`decode_ofmap`, :func:`decode_trace`,
  :func:`decode_counters`, :func:`decode_error` unpack their bodies and :func:`decode_run`
  turns the reply to ``RUN`` into a :class:`skipconv.sw.golden.Result` whose every number came
  from the engine.
* **Responding**: :class:`GoldenResponder` is the executable specification of the engine's
  side. It consumes command beats and returns exactly the result messages the engine must
  send, error replies and the drop-the-rest-of-a-bad-message rule included, computing layers
  with the golden model. Only ``cycles`` is not the engine's: the responder reports
  :func:`ideal_cycles`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .config import EngineConfig
from .layer import COMPUTE, CONST, COPY, ET_MODES, Layer, LayerError

__all__ = [
    "MAGIC", "Op", "Res", "ErrorCode", "FEATURE_BITS", "TRACE_FEATURE_BIT", "PLAN_FEATURE_BITS",
    "COUNTER_NAMES", "POSITION_NAMES",
    "ProtocolError", "EngineError", "UndefinedBehavior",
    "Message", "header", "message", "encode_layer", "encode_plan", "encode_ifmap",
    "encode_run", "encode_commands", "has_plan", "beats", "beat_words", "to_bytes",
    "words_from_bytes", "ResultParser", "decode_ofmap", "decode_trace", "decode_counters",
    "decode_error", "decode_run", "GoldenResponder", "ideal_cycles", "refusal",
]

MAGIC = 0xC5
WORD_MASK = 0xFFFFFFFF


class Op(enum.IntEnum):
    """Command opcodes (host to engine)."""
    LOAD_LAYER = 0x01
    LOAD_PLAN = 0x02
    LOAD_IFMAP = 0x03
    RUN = 0x04


class Res(enum.IntEnum):
    """Result types (engine to host)."""
    OK = 0x80
    OFMAP = 0x81
    TRACE = 0x82
    COUNTERS = 0x83
    ERROR = 0xEE


class ErrorCode(enum.IntEnum):
    """Codes of an ``ERROR`` result."""
    BAD_MAGIC = 1
    BAD_OPCODE = 2
    BAD_LENGTH = 3
    LIMIT = 4
    FEATURE = 5
    BAD_VALUE = 6
    NOT_READY = 7


#: Detail of a ``FEATURE`` error, per mechanism.
FEATURE_BITS = {"early_term": 1, "zero_pred": 2, "velcro": 4, "perforation": 8}
#: Detail of a ``FEATURE`` error for ``RUN`` with the trace bit on an engine built without it.
TRACE_FEATURE_BIT = 16
#: Detail of a ``FEATURE`` error for a plan on an engine with no planned mechanism.
PLAN_FEATURE_BITS = FEATURE_BITS["zero_pred"] | FEATURE_BITS["velcro"] | FEATURE_BITS["perforation"]

#: The u64 counters of ``COUNTERS``, in stream order (after ``cycles``).
COUNTER_NAMES = ("dense", "performed", "velcro", "perforation", "zero_pred", "early_term")
#: The u32 position counts of ``COUNTERS``, in stream order.
POSITION_NAMES = ("computed", "stopped", "const", "copy", "predicted")
COUNTERS_WORDS = 2 + 2 * len(COUNTER_NAMES) + len(POSITION_NAMES)

LAYER_HEADER_WORDS = 5
CHANNEL_WORDS = 5
MAX_SHIFT = 47
CONST_BITS = 24
_ET_CODES = {name: i for i, name in enumerate(ET_MODES)}


class ProtocolError(ValueError):
    """Bytes or words that break docs/protocol.md, or a layer that cannot be encoded."""


class EngineError(ProtocolError):
    """The engine answered ``ERROR``: ``code`` (an :class:`ErrorCode`) and ``detail``."""

    def __init__(self, code: int, detail: int, context: str = ""):
        self.code = code
        self.detail = detail
        try:
            self.name = ErrorCode(code).name
        except ValueError:
            self.name = f"UNKNOWN_{code}"
        where = f" ({context})" if context else ""
        super().__init__(f"engine error {self.name} (code {code}), detail {detail}{where}")


class UndefinedBehavior(ProtocolError):
    """Commands the protocol leaves undefined: they break a rule the host must check."""


# -- messages ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Message:
    """One message of either stream: its opcode or result type and its body words."""

    type: int
    body: tuple

    @property
    def name(self) -> str:
        for enum_cls in (Res, Op):
            try:
                return enum_cls(self.type).name
            except ValueError:
                pass
        return f"0x{self.type:02X}"

    def words(self) -> list[int]:
        """Header and body words (no beat padding)."""
        return header(self.type, len(self.body)) + list(self.body)

    def raise_for_error(self, context: str = "") -> "Message":
        """Raise :class:`EngineError` when this is an ``ERROR`` result; return self otherwise."""
        if self.type == Res.ERROR:
            code, detail = decode_error(self)
            raise EngineError(code, detail, context)
        return self


def header(type_: int, n: int) -> list[int]:
    """The two header words of a message with opcode/type ``type_`` and ``n`` body words."""
    return [MAGIC | (int(type_) & 0xFF) << 8, int(n) & WORD_MASK]


def message(type_: int, body: Sequence[int]) -> list[int]:
    """The words of one message (header and body)."""
    body = [int(v) & WORD_MASK for v in body]
    return header(type_, len(body)) + body


# -- encoding commands -------------------------------------------------------------------------

def _field(name, value, bits, layer_name=""):
    value = int(value)
    if not 0 <= value < (1 << bits):
        where = f" of layer {layer_name!r}" if layer_name else ""
        raise ProtocolError(f"{name} = {value}{where} does not fit the protocol's {bits}-bit field")
    return value


def has_plan(layer: Layer) -> bool:
    """Whether ``layer`` needs ``LOAD_PLAN``: zero prediction, CONST or COPY positions."""
    if layer.p:
        return True
    return layer.kind is not None and bool((np.asarray(layer.kind) != COMPUTE).any())


def encode_layer(layer: Layer, config: EngineConfig) -> list[int]:
    """The ``LOAD_LAYER`` message of ``layer`` (validated against ``config.g``).

    Fields an engine ignores in this mode are written neutral so that the engine can check
    every field always: ``neg_start = T`` when early termination is off, ``spec = th = 0``
    unless it is predictive, ``M = 1, sh = 0`` in raw mode.
    """
    layer.validate(g=config.g)
    _check_widths(layer, config)
    L = layer.normalized()
    cin, h, w = L.in_shape
    cout, k, t = L.cout, L.k, L.taps
    nm = L.name
    words = [
        _field("Cin", cin, 16, nm) | _field("Cout", cout, 16, nm) << 16,
        _field("H", h, 16, nm) | _field("W", w, 16, nm) << 16,
        (_field("K", k, 8, nm) | _field("stride", L.stride, 8, nm) << 8
         | _field("pad", L.pad, 8, nm) << 16 | _field("p", L.p, 8, nm) << 24),
        (int(bool(L.act_signed)) | int(bool(L.raw)) << 1 | _ET_CODES[L.et] << 2
         | int(has_plan(L)) << 4 | _field("out_bits", L.out_bits, 8, nm) << 8),
        _field("T", t, 16, nm),
    ]
    for c in range(cout):
        m, sh = (1, 0) if L.raw else (int(L.M[c]), int(L.sh[c]))
        neg_start = t if L.et == "off" else int(L.neg_start[c])
        spec, th = (int(L.spec[c]), int(L.th[c])) if L.et == "predictive" else (0, 0)
        words += [int(L.b[c]) & WORD_MASK, m | sh << 16, neg_start, spec, th & WORD_MASK]
    wflat = L.w.reshape(cout, t)
    for c in range(cout):
        order = L.order[c]
        weights = wflat[c, order] & 0xFFFF
        words += (weights | order.astype(np.int64) << 16).tolist()
    return message(Op.LOAD_LAYER, words)


def _check_widths(layer: Layer, config: EngineConfig):
    for name in ("act_bits", "weight_bits"):
        if getattr(layer, name) > getattr(config, name):
            raise ProtocolError(
                f"layer {layer.name!r} has {name} = {getattr(layer, name)}, more than the "
                f"engine's {name} = {getattr(config, name)}")


def encode_plan(layer: Layer, config: EngineConfig) -> list[int]:
    """The ``LOAD_PLAN`` message of ``layer`` (kinds, leaders, constants, NN table).

    Leader bits are written only when zero prediction is on; the NN table is sent when the
    layer has COPY positions, and names each position itself where it is not perforated.
    """
    layer.validate(g=config.g)
    L = layer.normalized()
    cout, ho, wo = L.out_shape
    kind = L.kind
    const = np.where(kind == CONST, L.const, 0)
    if const.size and int(const.max()) >= 1 << CONST_BITS:
        raise ProtocolError(f"const = {int(const.max())} of layer {L.name!r} does not fit "
                            f"the plan's {CONST_BITS}-bit field")
    leader = L.leader if L.p else np.zeros_like(L.leader)
    pos = (kind | leader.astype(np.int64) << 2 | const << 8).ravel()
    copy = kind == COPY
    has_nn = bool(copy.any())
    words = [int(has_nn)] + pos.tolist()
    if has_nn:
        perforated = copy.any(axis=0)
        yy, xx = np.mgrid[0:ho, 0:wo]
        ny = np.where(perforated, L.nn[..., 0], yy)
        nx = np.where(perforated, L.nn[..., 1], xx)
        words += (nx | ny << 16).ravel().tolist()
    return message(Op.LOAD_PLAN, words)


def acts_per_word(config: EngineConfig) -> int:
    """Activations packed into one ``LOAD_IFMAP`` word: 4 up to 8 bits, else 2."""
    return 4 if config.act_bits <= 8 else 2


def outs_per_word(out_bits: int, raw: bool) -> int:
    """Outputs packed into one ``OFMAP`` word."""
    if raw:
        return 1
    return 4 if out_bits <= 8 else 2


def _pack(values: np.ndarray, per_word: int) -> list[int]:
    bits = 32 // per_word
    v = np.asarray(values, np.int64).ravel() & ((1 << bits) - 1)
    pad = (-len(v)) % per_word
    v = np.concatenate([v, np.zeros(pad, np.int64)]).reshape(-1, per_word)
    shifts = np.arange(per_word, dtype=np.int64) * bits
    return (v << shifts).sum(axis=1).astype(np.int64).tolist()


def _unpack(words: Sequence[int], per_word: int, count: int, signed=False) -> np.ndarray:
    bits = 32 // per_word
    w = np.asarray(words, np.int64)
    shifts = np.arange(per_word, dtype=np.int64) * bits
    v = ((w[:, None] >> shifts) & ((1 << bits) - 1)).ravel()[:count]
    if signed:
        v = np.where(v >= 1 << (bits - 1), v - (1 << bits), v)
    return v


def encode_ifmap(x: np.ndarray, config: EngineConfig) -> list[int]:
    """The ``LOAD_IFMAP`` message of input ``x`` (Cin, H, W), packed for ``config.act_bits``."""
    x = np.asarray(x)
    if x.ndim != 3:
        raise ProtocolError(f"x.shape = {x.shape}: the ifmap must be (Cin, H, W)")
    return message(Op.LOAD_IFMAP, _pack(x, acts_per_word(config)))


def encode_run(trace: bool = False) -> list[int]:
    """The ``RUN`` message; ``trace`` asks for the per-position MAC trace."""
    return message(Op.RUN, [int(bool(trace))])


def encode_commands(layer: Layer, x: np.ndarray, config: EngineConfig,
                    trace: bool = False) -> list[list[int]]:
    """All messages that run ``layer`` on ``x``: LOAD_LAYER, [LOAD_PLAN,] LOAD_IFMAP, RUN."""
    layer.validate(g=config.g, x=x)
    msgs = [encode_layer(layer, config)]
    if has_plan(layer):
        msgs.append(encode_plan(layer, config))
    msgs.append(encode_ifmap(x, config))
    msgs.append(encode_run(trace))
    return msgs


# -- beats and bytes ---------------------------------------------------------------------------

def words_per_beat(config: EngineConfig) -> int:
    return config.bus_bits // 32


def beat_words(words: Sequence[int], config: EngineConfig) -> list[list[int]]:
    """Split one message into beats of ``bus_bits / 32`` words, the last padded with zeros."""
    n = words_per_beat(config)
    words = [int(v) & WORD_MASK for v in words]
    words += [0] * ((-len(words)) % n)
    return [words[i:i + n] for i in range(0, len(words), n)]


def beats(words: Sequence[int], config: EngineConfig) -> list[tuple[int, bool]]:
    """One message as bus beats ``(tdata, tlast)``; the lowest word in the lowest bits."""
    out = []
    groups = beat_words(words, config)
    for i, group in enumerate(groups):
        data = 0
        for j, v in enumerate(group):
            data |= v << (32 * j)
        out.append((data, i == len(groups) - 1))
    return out


def to_bytes(words: Sequence[int], config: EngineConfig) -> bytes:
    """One message as little-endian bytes for a byte link, beat padding included."""
    flat = [v for group in beat_words(words, config) for v in group]
    return np.asarray(flat, dtype="<u4").tobytes()


def words_from_bytes(data: bytes) -> list[int]:
    """Little-endian 32-bit words of ``data`` (its length must be a multiple of 4)."""
    if len(data) % 4:
        raise ProtocolError(f"{len(data)} bytes is not a whole number of 32-bit words")
    return np.frombuffer(bytes(data), dtype="<u4").astype(np.int64).tolist()


# -- decoding results --------------------------------------------------------------------------

_RESULT_LENGTHS = {Res.OK: 0, Res.COUNTERS: COUNTERS_WORDS, Res.ERROR: 2}


class ResultParser:
    """Split a result stream into :class:`Message` objects, incrementally.

    Feed words (:meth:`feed_words`) or bytes (:meth:`feed_bytes`) in pieces of any size; each
    call returns the messages completed by it. Beat padding after a message is skipped: the
    stream is counted in beats of ``config.bus_bits / 32`` words from its start. A header that
    breaks the protocol raises :class:`ProtocolError`.
    """

    def __init__(self, config: EngineConfig):
        self._per_beat = words_per_beat(config)
        self._bytes = b""
        self._hdr: list[int] = []
        self._body: list[int] = []
        self._need = None       # body words still expected, None while reading the header
        self._type = None
        self._skip = 0          # padding words to drop
        self._count = 0         # words of the stream so far

    @property
    def idle(self) -> bool:
        """Whether the stream is between messages (no partial message buffered)."""
        return not self._hdr and self._need is None and not self._bytes

    def feed_bytes(self, data: bytes) -> list[Message]:
        data = self._bytes + bytes(data)
        cut = len(data) - len(data) % 4
        self._bytes = data[cut:]
        return self.feed_words(words_from_bytes(data[:cut]))

    def feed_words(self, words: Iterable[int]) -> list[Message]:
        out = []
        for w in words:
            w = int(w) & WORD_MASK
            self._count += 1
            if self._skip:
                self._skip -= 1
                continue
            if self._need is None:
                self._hdr.append(w)
                if len(self._hdr) == 1:
                    if w & 0xFF != MAGIC:
                        raise ProtocolError(f"result word 0x{w:08X}: bad magic (expected 0xC5)")
                    try:
                        self._type = Res((w >> 8) & 0xFF)
                    except ValueError:
                        raise ProtocolError(
                            f"result word 0x{w:08X}: unknown result type "
                            f"0x{(w >> 8) & 0xFF:02X}") from None
                    continue
                expected = _RESULT_LENGTHS.get(self._type)
                if expected is not None and w != expected:
                    raise ProtocolError(f"{self._type.name} result with body length {w}, "
                                        f"expected {expected}")
                self._need = w
                self._hdr = []
                self._body = []
            else:
                self._body.append(w)
            if self._need is not None and len(self._body) == self._need:
                out.append(Message(int(self._type), tuple(self._body)))
                self._need = None
                self._body = []
                self._skip = (-self._count) % self._per_beat
        return out


def _expect(msg: Message, type_: Res):
    msg.raise_for_error()
    if msg.type != type_:
        raise ProtocolError(f"expected a {type_.name} result, got {msg.name}")


def decode_error(msg: Message) -> tuple[int, int]:
    """``(code, detail)`` of an ``ERROR`` result."""
    if msg.type != Res.ERROR or len(msg.body) != 2:
        raise ProtocolError(f"not an ERROR result: {msg.name} with {len(msg.body)} words")
    return int(msg.body[0]), int(msg.body[1])


def decode_ofmap(msg: Message, layer: Layer) -> np.ndarray:
    """The ``(Cout, Ho, Wo)`` outputs of an ``OFMAP`` result for ``layer``."""
    _expect(msg, Res.OFMAP)
    shape = layer.out_shape
    count = int(np.prod(shape))
    per = outs_per_word(layer.out_bits, layer.raw)
    if len(msg.body) != -(-count // per):
        raise ProtocolError(f"OFMAP has {len(msg.body)} words; {shape} outputs need "
                            f"{-(-count // per)}")
    return _unpack(msg.body, per, count, signed=layer.raw).reshape(shape)


def decode_trace(msg: Message, layer: Layer) -> np.ndarray:
    """The ``(Cout, Ho, Wo)`` performed MACs of a ``TRACE`` result for ``layer``."""
    _expect(msg, Res.TRACE)
    shape = layer.out_shape
    count = int(np.prod(shape))
    if len(msg.body) != -(-count // 2):
        raise ProtocolError(f"TRACE has {len(msg.body)} words; {shape} positions need "
                            f"{-(-count // 2)}")
    return _unpack(msg.body, 2, count).reshape(shape)


def decode_counters(msg: Message) -> dict:
    """The ``COUNTERS`` result as a dict: ``cycles``, the MAC counters and ``positions``."""
    _expect(msg, Res.COUNTERS)
    b = [int(v) for v in msg.body]
    out = {"cycles": b[0] | b[1] << 32}
    for i, name in enumerate(COUNTER_NAMES):
        out[name] = b[2 + 2 * i] | b[3 + 2 * i] << 32
    base = 2 + 2 * len(COUNTER_NAMES)
    out["positions"] = {name: b[base + i] for i, name in enumerate(POSITION_NAMES)}
    return out


def decode_run(messages: Sequence[Message], layer: Layer, trace: bool = True):
    """Turn the reply to ``RUN`` into a :class:`skipconv.sw.golden.Result`.

    ``out`` comes from OFMAP, ``macs`` from TRACE, the counters, positions and ``cycles`` from
    COUNTERS. ``outcome`` is derived from hardware data only: the plan's kinds, the traced
    MACs and, for zero prediction, whether a window's leaders came out zero. Without a trace
    ``macs`` is all -1 and ``outcome`` is left at 0.
    """
    from .golden import COMPUTED, PREDICTED, STOPPED, Result

    messages = list(messages)
    for m in messages:
        m.raise_for_error("reply to RUN")
    expected = [Res.OFMAP] + ([Res.TRACE] if trace else []) + [Res.COUNTERS]
    got = [m.type for m in messages]
    if got != [int(t) for t in expected]:
        raise ProtocolError("reply to RUN was " + ", ".join(m.name for m in messages)
                            + "; expected " + ", ".join(t.name for t in expected))
    out = decode_ofmap(messages[0], layer)
    counters = decode_counters(messages[-1])
    L = layer.normalized()
    shape = L.out_shape
    outcome = np.zeros(shape, np.int8)
    if trace:
        macs = decode_trace(messages[1], layer)
        kind = L.kind if has_plan(L) else np.zeros(shape, np.int64)
        outcome[:] = COMPUTED
        outcome[kind == CONST] = CONST
        outcome[kind == COPY] = COPY
        if L.p:
            leader = L.leader if has_plan(L) else np.zeros(shape, bool)
            outcome[_window_predicted(out, leader, L.p) & ~leader & (kind == COMPUTE)] = PREDICTED
        outcome[(outcome == COMPUTED) & (macs < L.taps)] = STOPPED
    else:
        macs = np.full(shape, -1, np.int64)
    result = Result(out=out.astype(np.int64), macs=macs.astype(np.int64), outcome=outcome,
                    positions=dict(counters["positions"]), cycles=counters["cycles"],
                    **{k: counters[k] for k in COUNTER_NAMES})
    return result


def _window_predicted(out, leader, p):
    cout, ho, wo = out.shape
    hp, wp = -(-ho // p) * p, -(-wo // p) * p
    live = np.zeros((cout, hp, wp), bool)
    live[:, :ho, :wo] = leader & (out != 0)
    live = live.reshape(cout, hp // p, p, wp // p, p).any(axis=(2, 4))
    return np.repeat(np.repeat(~live, p, axis=1), p, axis=2)[:, :ho, :wo]


# -- the responder (executable specification of the engine side) ----------------------------

def ideal_cycles(result, config: EngineConfig) -> int:
    """Cycles of a perfect engine: every performed MAC step spread evenly over all lanes."""
    steps = int((-(-np.asarray(result.macs, np.int64) // config.g)).sum())
    return -(-steps // config.lanes)


class _Fault(Exception):
    def __init__(self, code: ErrorCode, detail: int):
        self.code, self.detail = code, int(detail) & WORD_MASK


def _sx(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _sx_array(values: np.ndarray, bits: int) -> np.ndarray:
    """:func:`_sx` of every element (int64)."""
    v = np.asarray(values, np.int64) & ((1 << bits) - 1)
    return v - ((v >> (bits - 1)) << bits)


def _as_words(words) -> np.ndarray:
    """``words`` as an int64 array of 32-bit words (each ``int(v) & WORD_MASK``)."""
    if not (isinstance(words, np.ndarray) and words.dtype.kind in "iu"):
        try:
            a = np.asarray(words)
        except (OverflowError, ValueError, TypeError):
            a = None
        if a is None or a.dtype.kind not in "iu" or a.ndim != 1:
            return np.asarray([int(v) & WORD_MASK for v in words], np.int64)
        words = a
    return words.astype(np.int64) & WORD_MASK


class _Words:
    """Body words kept in stream order, appended one by one (the word-by-word path) or as
    whole arrays (the bulk path of :meth:`GoldenResponder.feed`)."""

    __slots__ = ("_parts", "_tail", "_len")

    def __init__(self):
        self._parts: list[np.ndarray] = []
        self._tail: list[int] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, w: int) -> None:
        self._tail.append(w)
        self._len += 1

    def extend(self, a: np.ndarray) -> None:
        if self._tail:
            self._parts.append(np.asarray(self._tail, np.int64))
            self._tail = []
        self._parts.append(a)
        self._len += len(a)

    def array(self) -> np.ndarray:
        """All words as one int64 array."""
        parts = self._parts + ([np.asarray(self._tail, np.int64)] if self._tail else [])
        if not parts:
            return np.zeros(0, np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class _LayerRegs:
    """What a good ``LOAD_LAYER`` leaves in the engine."""
    cin: int = 0
    cout: int = 0
    h: int = 0
    w: int = 0
    k: int = 0
    stride: int = 0
    pad: int = 0
    p: int = 0
    act_signed: bool = False
    raw: bool = False
    et: int = 0
    has_plan: bool = False
    out_bits: int = 0
    t: int = 0
    ho: int = 0
    wo: int = 0
    chan: list = None
    weights: _Words = None      # the raw weight words {order index, weight}, stream order

    @property
    def npos(self):
        return self.cout * self.ho * self.wo


class GoldenResponder:
    """The engine's side of the protocol, in software: feed command beats, get result messages.

    Checks happen in stream order and the first fault found is answered (docs/protocol.md,
    "Check order"); the rest of that message is dropped up to its ``tlast``. A good ``RUN``
    runs the golden model; ``cycles`` in its ``COUNTERS`` is :func:`ideal_cycles` (the
    engine's own count is the only number the responder cannot know).

    Parameters
    ----------
    config : EngineConfig
        The engine being modelled (limits, features, ``g``, bus width, trace).
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        self._per_beat = words_per_beat(config)
        self.reset()

    # -- state -----------------------------------------------------------------------------

    def reset(self) -> None:
        """What the ``rst`` input does: nothing loaded, between messages."""
        self.layer_regs: _LayerRegs | None = None
        self.plan = None            # (kind, leader, const, nn) arrays
        self.ifmap = None           # (Cin, H, W) int64
        self._start_message()

    def _start_message(self):
        self._idx = 0               # word index within the message
        self._op = None
        self._n = None
        self._dropping = False
        self._length_checked = False
        self._new = None            # what this message is loading
        self._trace = False

    @property
    def idle(self) -> bool:
        """Whether the responder is between messages."""
        return self._idx == 0 and not self._dropping

    # -- input -----------------------------------------------------------------------------

    def feed(self, words: Sequence[int], last: bool = True) -> list[Message]:
        """Consume whole beats of command words; ``last`` is the ``tlast`` of the final beat.

        ``words`` may be a list or an integer NumPy array. The same as :meth:`feed_beat` beat
        after beat, but the long bodies (``LOAD_LAYER`` weights, ``LOAD_IFMAP``, ``LOAD_PLAN``
        positions and NN table) are checked and stored a whole run of beats at a time
        (:meth:`_bulk`); a run ends before the beat of a faulty word, before the message's
        last word and before the final beat, which all go word by word.
        """
        a = _as_words(words)
        per = self._per_beat
        if len(a) % per:
            raise ProtocolError(f"{len(a)} words is not a whole number of "
                                f"{per}-word beats")
        out: list[Message] = []
        total = len(a)
        stop = total - per              # the final beat (it may carry tlast) goes word by word
        p = 0
        while p < total:
            if p < stop:
                if self._dropping:
                    p = stop            # beats without tlast of a refused message: dropped
                    continue
                m = self._bulk(a, p, stop)
                if m:
                    p += m
                    continue
            out += self.feed_beat(a[p:p + per].tolist(), last and p + per == total)
            p += per
        return out

    def feed_message(self, words: Sequence[int]) -> list[Message]:
        """Consume one message as the host sends it: beat-padded, ``tlast`` on its last beat."""
        return self.feed([v for g in beat_words(words, self.config) for v in g], last=True)

    def feed_beat(self, words: Sequence[int], last: bool) -> list[Message]:
        """Consume one beat (``bus_bits / 32`` words) with its ``tlast``."""
        if len(words) != self._per_beat:
            raise ProtocolError(f"a beat has {self._per_beat} words, not {len(words)}")
        out: list[Message] = []
        if self._dropping:
            if last:
                self._start_message()
            return out
        try:
            done = False
            for w in words:
                self._word(int(w) & WORD_MASK, out)
                self._idx += 1
                if self._n is not None and self._idx == 2 + self._n:
                    # The message's last word: its beat must carry tlast, and a length that
                    # the header fields could not check yet is too short for them.
                    if not last or not self._length_checked:
                        raise _Fault(ErrorCode.BAD_LENGTH, self._n)
                    self._complete(out)
                    done = True
                    break            # the rest of the beat is padding
            if last and not done:
                raise _Fault(ErrorCode.BAD_LENGTH, self._n or 0)   # tlast too early
            if last:
                self._start_message()
        except _Fault as f:
            self._refuse(f, out)
            if last:
                self._start_message()
            else:
                self._dropping = True
        return out

    def _refuse(self, fault: _Fault, out):
        # A refused LOAD_* leaves nothing loaded for RUN; unknown or bad headers change nothing.
        if self._op == Op.LOAD_LAYER:
            self.layer_regs, self.plan, self.ifmap = None, None, None
        elif self._op == Op.LOAD_PLAN:
            self.plan = None
        elif self._op == Op.LOAD_IFMAP:
            self.ifmap = None
        out.append(Message(Res.ERROR, (int(fault.code), fault.detail)))

    # -- bulk checks ---------------------------------------------------------------------------

    def _bulk(self, a: np.ndarray, p: int, stop: int) -> int:
        """Check and store body words ``a[p:]`` at once, up to ``stop`` (a beat boundary);
        return how many (whole beats, maybe 0).

        Exactly what :meth:`_word` does word by word, for the words that carry no header
        field: the run stops before the beat holding the message's last word (it completes
        the message and checks ``tlast``), before the end of the body part (positions, NN
        table) and before the beat of the first word that breaks a check, so that beat goes
        through :meth:`feed_beat`, which answers the same fault with the same code.
        """
        n, i, per = self._n, self._idx, self._per_beat
        if n is None or not self._length_checked or i < 2:
            return 0
        j = i - 2                       # body index of a[p]
        op = self._op
        end = n - 1                     # the last body word completes the message: not here
        if op == Op.LOAD_LAYER:
            r = self._new
            if j < LAYER_HEADER_WORDS + CHANNEL_WORDS * r.cout:
                return 0
        elif op == Op.LOAD_PLAN:
            if j < 1:
                return 0
            npos = self.layer_regs.npos
            if j <= npos:
                end = min(end, npos + 1)
        elif op != Op.LOAD_IFMAP:
            return 0
        m = min(end - j, stop - p)
        m -= m % per
        if m <= 0:
            return 0
        w = a[p:p + m]
        bad = None
        if op == Op.LOAD_LAYER:
            bad = (w >> 16) >= r.t
        elif op == Op.LOAD_PLAN:
            r, cfg = self.layer_regs, self.config
            if j <= npos:
                kind = w & 3
                bad = kind == 3
                if not cfg.has("velcro"):
                    bad |= kind == CONST
                if not cfg.has("perforation") or not self._new["has_nn"]:
                    bad |= kind == COPY
                if not r.raw:
                    bad |= (kind == CONST) & ((w >> 8) > (1 << r.out_bits) - 1)
            else:
                bad = ((w >> 16) >= r.ho) | ((w & 0xFFFF) >= r.wo)
        if bad is not None and bad.any():
            k = int(np.argmax(bad))
            m = k - k % per
            if m == 0:
                return 0
            w = w[:m]
        if op == Op.LOAD_LAYER:
            r.weights.extend(w)
        elif op == Op.LOAD_PLAN:
            self._new["pos" if j <= npos else "nn"].extend(w)
        else:
            self._new.extend(w)
        self._idx += m
        return m

    # -- per-word checks ---------------------------------------------------------------------

    def _word(self, w: int, out):
        i = self._idx
        if i == 0:
            self._header0(w)
        elif i == 1:
            self._n = w
            self._header1(w)
        else:
            j = i - 2
            {Op.LOAD_LAYER: self._layer_word, Op.LOAD_PLAN: self._plan_word,
             Op.LOAD_IFMAP: self._ifmap_word, Op.RUN: self._run_word}[self._op](j, w)

    def _header0(self, w):
        cfg = self.config
        if w & 0xFF != MAGIC:
            raise _Fault(ErrorCode.BAD_MAGIC, w)
        opcode = (w >> 8) & 0xFF
        try:
            self._op = Op(opcode)
        except ValueError:
            raise _Fault(ErrorCode.BAD_OPCODE, opcode) from None
        if self._op == Op.LOAD_PLAN and not _plan_features(cfg):
            raise _Fault(ErrorCode.FEATURE, PLAN_FEATURE_BITS)
        if self._op in (Op.LOAD_PLAN, Op.LOAD_IFMAP) and self.layer_regs is None:
            raise _Fault(ErrorCode.NOT_READY, opcode)
        if self._op == Op.RUN:
            regs = self.layer_regs
            if (regs is None or self.ifmap is None
                    or (regs.has_plan and self.plan is None)):
                raise _Fault(ErrorCode.NOT_READY, opcode)

    def _header1(self, n):
        regs = self.layer_regs
        if self._op == Op.RUN:
            if n != 1:
                raise _Fault(ErrorCode.BAD_LENGTH, n)
            self._length_checked = True
        elif self._op == Op.LOAD_IFMAP:
            if n != -(-(regs.cin * regs.h * regs.w) // acts_per_word(self.config)):
                raise _Fault(ErrorCode.BAD_LENGTH, n)
            self._length_checked = True
            self._new = _Words()

    def _layer_word(self, j, w):
        cfg = self.config
        BV, LIM, FEAT = ErrorCode.BAD_VALUE, ErrorCode.LIMIT, ErrorCode.FEATURE
        if j == 0:
            self._new = r = _LayerRegs(chan=[], weights=_Words())
            r.cin, r.cout = w & 0xFFFF, w >> 16
            if r.cin == 0:
                raise _Fault(BV, r.cin)
            if r.cout == 0:
                raise _Fault(BV, r.cout)
            if r.cout > cfg.max_cout:
                raise _Fault(LIM, r.cout)
            return
        r = self._new
        if j == 1:
            r.h, r.w = w & 0xFFFF, w >> 16
            if r.h == 0:
                raise _Fault(BV, r.h)
            if r.w == 0:
                raise _Fault(BV, r.w)
            if r.cin * r.h * r.w > cfg.max_ifmap:
                raise _Fault(LIM, r.cin * r.h * r.w)
        elif j == 2:
            r.k, r.stride, r.pad, r.p = w & 0xFF, (w >> 8) & 0xFF, (w >> 16) & 0xFF, w >> 24
            if r.k == 0:
                raise _Fault(BV, r.k)
            if r.k > cfg.max_k:
                raise _Fault(LIM, r.k)
            if r.stride == 0:
                raise _Fault(BV, r.stride)
            if r.pad >= r.k:
                raise _Fault(BV, r.pad)
            if r.p == 1:
                raise _Fault(BV, r.p)
            if r.p and not cfg.has("zero_pred"):
                raise _Fault(FEAT, FEATURE_BITS["zero_pred"])
            if r.p > cfg.max_p:
                raise _Fault(LIM, r.p)
            if r.h + 2 * r.pad < r.k:
                raise _Fault(BV, r.h)
            if r.w + 2 * r.pad < r.k:
                raise _Fault(BV, r.w)
            r.ho = (r.h + 2 * r.pad - r.k) // r.stride + 1
            r.wo = (r.w + 2 * r.pad - r.k) // r.stride + 1
            if r.npos > cfg.max_ofmap:
                raise _Fault(LIM, r.npos)
        elif j == 3:
            r.act_signed, r.raw = bool(w & 1), bool(w & 2)
            r.et, r.has_plan, r.out_bits = (w >> 2) & 3, bool(w & 16), (w >> 8) & 0xFF
            if r.et == 3:
                raise _Fault(BV, r.et)
            if r.et and not cfg.has("early_term"):
                raise _Fault(FEAT, FEATURE_BITS["early_term"])
            if r.has_plan and not _plan_features(cfg):
                raise _Fault(FEAT, PLAN_FEATURE_BITS)
            if r.out_bits == 0:
                raise _Fault(BV, r.out_bits)
            if r.out_bits > cfg.out_bits:
                raise _Fault(LIM, r.out_bits)
        elif j == 4:
            r.t = w
            if r.t != r.cin * r.k * r.k:
                raise _Fault(BV, r.t)
            if r.t > cfg.max_taps:
                raise _Fault(LIM, r.t)
            if self._n != LAYER_HEADER_WORDS + CHANNEL_WORDS * r.cout + r.cout * r.t:
                raise _Fault(ErrorCode.BAD_LENGTH, self._n)
            self._length_checked = True
        elif j < LAYER_HEADER_WORDS + CHANNEL_WORDS * r.cout:
            c, f = divmod(j - LAYER_HEADER_WORDS, CHANNEL_WORDS)
            if f == 0:
                r.chan.append([_sx(w, 32)])
            elif f == 1:
                m, sh = w & 0xFFFF, (w >> 16) & 0xFF
                if m == 0:
                    raise _Fault(BV, m)
                if sh > MAX_SHIFT:
                    raise _Fault(BV, sh)
                r.chan[c] += [m, sh]
            elif f == 2:
                if w > r.t:
                    raise _Fault(BV, w)
                r.chan[c].append(w)
            elif f == 3:
                if w > r.t or w % cfg.g:
                    raise _Fault(BV, w)
                r.chan[c].append(w)
            else:
                r.chan[c].append(_sx(w, 32))
        else:
            idx = w >> 16
            if idx >= r.t:
                raise _Fault(BV, idx)
            r.weights.append(w)

    def _plan_word(self, j, w):
        cfg, r = self.config, self.layer_regs
        if j == 0:
            has_nn = bool(w & 1)
            if has_nn and not cfg.has("perforation"):
                raise _Fault(ErrorCode.FEATURE, FEATURE_BITS["perforation"])
            if self._n != 1 + r.npos + (r.ho * r.wo if has_nn else 0):
                raise _Fault(ErrorCode.BAD_LENGTH, self._n)
            self._length_checked = True
            self._new = {"has_nn": has_nn, "pos": _Words(), "nn": _Words()}
        elif j <= r.npos:
            kind, const = w & 3, w >> 8
            if kind == 3:
                raise _Fault(ErrorCode.BAD_VALUE, kind)
            if kind == CONST and not cfg.has("velcro"):
                raise _Fault(ErrorCode.FEATURE, FEATURE_BITS["velcro"])
            if kind == COPY and not cfg.has("perforation"):
                raise _Fault(ErrorCode.FEATURE, FEATURE_BITS["perforation"])
            if kind == COPY and not self._new["has_nn"]:
                raise _Fault(ErrorCode.BAD_VALUE, kind)
            if kind == CONST and not r.raw and const > (1 << r.out_bits) - 1:
                raise _Fault(ErrorCode.BAD_VALUE, const)
            self._new["pos"].append(w)
        else:
            nx, ny = w & 0xFFFF, w >> 16
            if ny >= r.ho or nx >= r.wo:
                raise _Fault(ErrorCode.BAD_VALUE, w)
            self._new["nn"].append(w)

    def _ifmap_word(self, j, w):
        self._new.append(w)

    def _run_word(self, j, w):
        self._trace = bool(w & 1)
        if self._trace and not self.config.trace:
            raise _Fault(ErrorCode.FEATURE, TRACE_FEATURE_BIT)

    # -- complete messages -------------------------------------------------------------------

    def _complete(self, out):
        op = self._op
        if op == Op.LOAD_LAYER:
            self.layer_regs, self.plan, self.ifmap = self._new, None, None
            out.append(Message(Res.OK, ()))
        elif op == Op.LOAD_PLAN:
            r = self.layer_regs
            pos = self._new["pos"].array().reshape(r.cout, r.ho, r.wo)
            if self._new["has_nn"]:
                nnw = self._new["nn"].array()
                nn = np.stack([nnw >> 16, nnw & 0xFFFF], axis=-1).reshape(r.ho, r.wo, 2)
            else:
                nn = np.zeros((r.ho, r.wo, 2), np.int64)
            self.plan = (pos & 3, (pos >> 2 & 1).astype(bool), pos >> 8, nn)
            out.append(Message(Res.OK, ()))
        elif op == Op.LOAD_IFMAP:
            r = self.layer_regs
            count = r.cin * r.h * r.w
            per = acts_per_word(self.config)
            v = _unpack(self._new.array(), per, count)
            bits = self.config.act_bits
            v = v & ((1 << bits) - 1)
            if r.act_signed:
                v = np.where(v >> (bits - 1) & 1, v - (1 << bits), v)
            self.ifmap = v.reshape(r.cin, r.h, r.w)
            out.append(Message(Res.OK, ()))
        elif op == Op.RUN:
            out += self._run()

    def loaded_layer(self) -> Layer:
        """The :class:`Layer` the engine holds (layer registers and, if used, the plan)."""
        r, cfg = self.layer_regs, self.config
        t = r.t
        words = r.weights.array().reshape(r.cout, t)
        order = words >> 16                             # tap index of each stream slot
        wv = _sx_array(words, cfg.weight_bits)
        w = np.zeros((r.cout, t), np.int64)
        if (np.sort(order, axis=1) == np.arange(t)).all():
            np.put_along_axis(w, order, wv, axis=1)     # each tap once (a good layer)
        else:                                           # repeated taps: the last one stays
            for c in range(r.cout):
                for j in range(t):
                    w[c, order[c, j]] = wv[c, j]
        chan = np.asarray(r.chan, np.int64).reshape(r.cout, 6)
        layer = Layer(
            in_shape=(r.cin, r.h, r.w), w=w.reshape(r.cout, r.cin, r.k, r.k), b=chan[:, 0],
            stride=r.stride, pad=r.pad, M=None if r.raw else chan[:, 1],
            sh=None if r.raw else chan[:, 2], out_bits=r.out_bits, act_bits=cfg.act_bits,
            weight_bits=cfg.weight_bits, act_signed=r.act_signed, raw=r.raw,
            p=r.p, et=ET_MODES[r.et], order=order, neg_start=chan[:, 3],
            spec=chan[:, 4], th=chan[:, 5], name="loaded")
        shape = (r.cout, r.ho, r.wo)
        if r.has_plan:
            kind, leader, const, nn = self.plan
            layer.kind, layer.const, layer.nn = kind, np.where(kind == CONST, const, 0), nn
            layer.leader = leader if r.p else None
        if r.p and layer.leader is None:
            layer.leader = np.zeros(shape, bool)
        return layer

    def _run(self) -> list[Message]:
        from . import golden
        layer = self.loaded_layer()
        try:
            result = golden.run(layer, self.ifmap, g=self.config.g)
        except LayerError as e:
            raise UndefinedBehavior(
                f"RUN of a layer that breaks a rule the host must check: {e}") from None
        return self.reply_for(result, layer, self._trace)

    def reply_for(self, result, layer: Layer, trace: bool) -> list[Message]:
        """The result messages of a good ``RUN`` whose golden result is ``result``."""
        per = outs_per_word(layer.out_bits, layer.raw)
        msgs = [Message(Res.OFMAP, tuple(_pack(result.out, per)))]
        if trace:
            msgs.append(Message(Res.TRACE, tuple(_pack(result.macs, 2))))
        cycles = result.cycles if result.cycles is not None else ideal_cycles(result, self.config)
        body = [cycles & WORD_MASK, cycles >> 32]
        for name in COUNTER_NAMES:
            v = int(getattr(result, name))
            body += [v & WORD_MASK, v >> 32]
        body += [int(result.positions.get(name, 0)) for name in POSITION_NAMES]
        msgs.append(Message(Res.COUNTERS, tuple(body)))
        return msgs


def _plan_features(config: EngineConfig) -> bool:
    return any(config.has(f) for f in ("zero_pred", "velcro", "perforation"))


def refusal(layer: Layer, config: EngineConfig) -> EngineError | None:
    """The error the engine would answer to ``LOAD_LAYER``/``LOAD_PLAN`` of ``layer``, or None.

    The driver uses it to refuse a layer (or pick a tiling) before sending a byte.
    """
    responder = GoldenResponder(config)
    msgs = [encode_layer(layer, config)]
    if has_plan(layer):
        msgs.append(encode_plan(layer, config))
    for words in msgs:
        for reply in responder.feed_message(words):
            if reply.type == Res.ERROR:
                code, detail = decode_error(reply)
                return EngineError(code, detail, f"layer {layer.name!r}")
    return None
