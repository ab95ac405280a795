"""The Device API: run whole layers on an engine, whatever carries the bytes.

A :class:`Device` takes a :class:`~skipconv.sw.layer.Layer` and its integer input, checks
that the engine can run it, splits it into tiles when it exceeds the engine's buffers
(:mod:`.tiling`), runs every tile and returns one :class:`~skipconv.sw.golden.Result` for the
whole layer. Backends differ only in how one tile runs:

* :class:`GoldenDevice` (``"golden"``): the NumPy golden model, same tiling;
* :class:`EngineDevice`: the engine protocol (:mod:`skipconv.sw.protocol`) over a
  :class:`~.transport.Transport`; the ``sim``, ``serial`` and ``xrt`` backends are this class
  with different transports, and ``"responder"`` is it with the protocol's software engine
  (:class:`~skipconv.sw.protocol.GoldenResponder`) in-process.

:func:`open_device` builds one from a name (``golden``, ``responder``, ``sim``,
``serial:PORT``, ``xrt``).
"""

from __future__ import annotations

import time

import numpy as np

from .. import golden, protocol
from ..config import EngineConfig
from ..golden import Result
from ..layer import Layer, LayerError
from . import tiling
from .transport import CallTransport, CorruptResult, Transport

__all__ = ["DeviceError", "Device", "GoldenDevice", "EngineDevice", "check_layer",
           "check_input", "open_device", "responder_engine", "message_bytes", "DEVICE_NAMES"]

DEVICE_NAMES = ("golden", "responder", "sim", "serial:PORT", "xrt")


class DeviceError(ValueError):
    """A layer or input this device cannot run; the message names the problem and the value."""


def check_layer(layer: Layer, config: EngineConfig) -> None:
    """Refuse a layer the engine cannot run even tiled (a package built for another config).

    Checks the layer's own rules (``validate`` with the engine's ``g``), then every limit
    that tiling cannot lift, each error naming the field, the layer's value and the engine's.
    """
    name = layer.name or "layer"
    try:
        layer.validate(g=config.g)
    except LayerError as e:
        raise DeviceError(f"{name}: {e}") from None
    missing = sorted(layer.features - config.features)
    if missing:
        built = ", ".join(sorted(config.features)) or "none (dense engine)"
        raise DeviceError(f"{name} uses {missing[0]}, which this engine was built without "
                          f"(its features: {built}); use a package made for this config")
    checks = [("taps Cin*K*K", layer.taps, "max_taps", config.max_taps),
              ("K", layer.k, "max_k", config.max_k),
              ("p", layer.p, "max_p", config.max_p),
              ("act_bits", layer.act_bits, "act_bits", config.act_bits),
              ("weight_bits", layer.weight_bits, "weight_bits", config.weight_bits)]
    if not layer.raw:
        checks.append(("out_bits", layer.out_bits, "out_bits", config.out_bits))
    for what, value, limit, engine_value in checks:
        if value > engine_value:
            raise DeviceError(f"{name}: {what} = {value} exceeds the engine's {limit} = "
                              f"{engine_value} (tiling cannot split it)")


def check_input(layer: Layer, x) -> np.ndarray:
    """Return ``x`` as an int64 array after checking its type, shape and value range."""
    name = layer.name or "layer"
    if hasattr(x, "detach") and hasattr(x, "numpy"):       # a torch tensor
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise DeviceError(f"{name}: input of type {type(x).__name__}: expected a NumPy array "
                          "or a torch tensor of integers")
    if not np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        raise DeviceError(f"{name}: input dtype {x.dtype}: the engine takes integer "
                          "activations (quantize the input first)")
    if x.shape != tuple(layer.in_shape):
        raise DeviceError(f"{name}: input shape {tuple(x.shape)}: the layer expects "
                          f"{tuple(int(v) for v in layer.in_shape)} (Cin, H, W)")
    lo, hi = layer.x_range()
    if x.size and (x.min() < lo or x.max() > hi):
        bad = int(x.min()) if x.min() < lo else int(x.max())
        kind = "signed" if layer.act_signed else "unsigned"
        raise DeviceError(f"{name}: input value {bad} outside the {kind} {layer.act_bits}-bit "
                          f"range {lo}..{hi}")
    return x.astype(np.int64, copy=False)


class Device:
    """One engine (or its model) that runs layers.

    Attributes
    ----------
    name : str
        The backend name.
    config : EngineConfig
        The engine's parameters (limits, features, ``g``).
    stats : dict
        Totals since opening: ``layers``, ``tiles``, ``wall_s`` (time in :meth:`run`),
        ``device_s`` (time the backend reports as spent in the device, where it knows).
    """

    name = "device"

    def __init__(self, config: EngineConfig):
        if not isinstance(config, EngineConfig):
            raise DeviceError(f"config of type {type(config).__name__}: expected EngineConfig")
        self.config = config
        self.stats = {"layers": 0, "tiles": 0, "wall_s": 0.0, "device_s": 0.0}

    def run(self, layer: Layer, x) -> Result:
        """Run ``layer`` on input ``x`` (tiled as needed); return the whole layer's result."""
        t0 = time.perf_counter()
        check_layer(layer, self.config)
        x = check_input(layer, x)
        tiles = tiling.plan_tiles(layer, self.config)
        results = []
        for tile in tiles:
            results.append(self._run_tile(tile.layer, tile.input(x, layer), tile))
        result = tiling.assemble(layer, tiles, results)
        self.stats["layers"] += 1
        self.stats["tiles"] += len(tiles)
        self.stats["wall_s"] += time.perf_counter() - t0
        return result

    def _run_tile(self, layer: Layer, x: np.ndarray, tile) -> Result:
        raise NotImplementedError

    def close(self) -> None:
        """Release the device."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} config {self.config.key}>"


class GoldenDevice(Device):
    """The NumPy golden model, tiled exactly like an engine with this config."""

    name = "golden"

    def _run_tile(self, layer, x, tile):
        t0 = time.perf_counter()
        result = golden.run(layer, x, g=self.config.g)
        self.stats["device_s"] += time.perf_counter() - t0
        return result


def message_bytes(words, config: EngineConfig) -> bytes:
    """One message as little-endian bytes with its beat padding (as ``protocol.to_bytes``,
    vectorized: the host must not be the bottleneck on long weight and ifmap messages)."""
    per_beat = config.bus_bits // 32
    w = np.asarray(words, dtype=np.int64) & 0xFFFFFFFF
    pad = (-len(w)) % per_beat
    if pad:
        w = np.concatenate([w, np.zeros(pad, np.int64)])
    return w.astype("<u4").tobytes()


def responder_engine(config: EngineConfig):
    """A byte-level engine for a transport or a framed peer: the protocol's GoldenResponder.

    Returns a callable ``command message bytes -> [result message bytes, ...]``.
    """
    responder = protocol.GoldenResponder(config)

    def engine(message: bytes) -> list[bytes]:
        replies = responder.feed(protocol.words_from_bytes(message), last=True)
        return [protocol.to_bytes(m.words(), config) for m in replies]

    engine.responder = responder
    return engine


class EngineDevice(Device):
    """An engine spoken to through the protocol over a transport (sim, serial, xrt, in-process).

    Parameters
    ----------
    config : EngineConfig
        The engine's parameters; they must be those it was built with.
    transport : Transport
        Carries whole command and result messages.
    name : str
        Backend name for messages.
    trace : bool or None
        Ask for the per-position MAC trace (default: when the engine has one). Without it the
        result's ``macs`` is -1 everywhere (counters still come from the engine).
    reply_timeout : float or None
        Seconds to wait for each reply (None: the transport's default).
    """

    def __init__(self, config: EngineConfig, transport: Transport, *, name: str = "engine",
                 trace: bool | None = None, reply_timeout: float | None = None):
        super().__init__(config)
        self.transport = transport
        self.name = name
        self.trace = config.trace if trace is None else bool(trace)
        if self.trace and not config.trace:
            raise DeviceError("trace = True: this engine was built without the trace buffer")
        self.reply_timeout = reply_timeout
        self._parser = protocol.ResultParser(config)

    def _reply(self) -> protocol.Message:
        while True:
            data = self.transport.recv(self.reply_timeout)
            msgs = self._parser.feed_bytes(data)
            if len(msgs) > 1:
                raise protocol.ProtocolError(f"{self.transport.peer}: {len(msgs)} result "
                                             "messages in one transfer")
            if msgs:
                return msgs[0]

    def _run_tile(self, layer, x, tile):
        try:
            return self._exchange(layer, x, tile)
        except CorruptResult:
            self._parser = protocol.ResultParser(self.config)
            raise
        except protocol.EngineError:
            raise
        except Exception:
            # Whatever went wrong mid-conversation, leave the link clean for the next layer.
            self.transport.drain()
            self._parser = protocol.ResultParser(self.config)
            raise

    def _exchange(self, layer, x, tile):
        config = self.config
        commands = protocol.encode_commands(layer, x, config, trace=self.trace)
        names = ["LOAD_LAYER"] + (["LOAD_PLAN"] if len(commands) == 4 else []) + \
                ["LOAD_IFMAP", "RUN"]
        t0 = time.perf_counter()
        # Pipelined: every command is answered by exactly one reply sequence, in order.
        for words in commands:
            self.transport.send(message_bytes(words, config))
        first_error = None
        for op in names[:-1]:
            reply = self._reply()
            if reply.type == protocol.Res.ERROR and first_error is None:
                first_error = (op, reply)
            elif reply.type not in (protocol.Res.OK, protocol.Res.ERROR):
                raise protocol.ProtocolError(f"{self.transport.peer}: {op} answered by "
                                             f"{reply.name}, expected OK")
        replies = [self._reply()]
        if replies[0].type != protocol.Res.ERROR:
            expected = 2 + int(self.trace)
            while len(replies) < expected:
                replies.append(self._reply())
        self.stats["device_s"] += time.perf_counter() - t0
        where = f"layer {layer.name!r}"
        if first_error is not None:
            op, reply = first_error
            code, detail = protocol.decode_error(reply)
            raise protocol.EngineError(code, detail, f"{op} of {where}")
        replies[0].raise_for_error(f"RUN of {where}")
        return protocol.decode_run(replies, layer, trace=self.trace)

    def close(self):
        self.transport.close()


def open_device(spec: str, config: EngineConfig | None = None, **options) -> Device:
    """Open a device by name: ``golden``, ``responder``, ``sim``, ``serial:PORT`` or ``xrt``.

    ``config`` defaults to the default preset. ``options`` go to the backend (e.g.
    ``baudrate``/``timeout`` for serial, ``build_dir`` for sim, ``xclbin`` for xrt).
    """
    from ..config import PRESETS
    config = PRESETS["default"] if config is None else config
    if spec == "golden":
        return GoldenDevice(config)
    if spec == "responder":
        return EngineDevice(config, CallTransport(responder_engine(config), "GoldenResponder"),
                            name="responder")
    if spec == "sim":
        from .sim_backend import open_sim
        return open_sim(config, **options)
    if spec.startswith("serial:"):
        from .transport import SerialTransport
        port = spec[len("serial:"):]
        if not port:
            raise DeviceError("device 'serial:' names no port (e.g. serial:/dev/ttyUSB0)")
        opts = {k: options.pop(k) for k in ("baudrate", "timeout", "attempts", "byte_timeout")
                if k in options}
        return EngineDevice(config, SerialTransport(port, **opts), name=spec, **options)
    if spec == "xrt":
        from .xrt_backend import open_xrt
        return open_xrt(config, **options)
    raise DeviceError(f"device {spec!r}: expected one of {', '.join(DEVICE_NAMES)}")
