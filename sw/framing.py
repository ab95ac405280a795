"""Frames for the engine's streams on byte links (docs/protocol.md, "Framing on byte links").

A frame is ``SOF type seq len(2, LE) payload crc(2, LE)``; the CRC is CRC-16/CCITT-FALSE over
``type seq len payload``. This module is the Python side of that format:

* :func:`crc16` and :func:`encode_frame` build frames;
* :func:`message_frames` splits one stream message (whole words, ``tlast`` at its end) into
  DATA / DATA_LAST frames;
* :class:`FrameParser` is an incremental parser: it hunts for SOF, checks type, length and
  CRC, drops frames whose bytes stop arriving (byte timeout) and reports each bad frame as a
  :class:`FrameError` event instead of raising, so a receiver can answer NAK and resynchronize;
* :class:`FramedPeer` is the device side (what the board's UART bridge does in gateware), for
  emulating a board over a serial port in tests and on the bench.

The host side with retransmission and timeouts is
:class:`skipconv.sw.driver.transport.SerialTransport`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

__all__ = [
    "SOF", "DATA", "DATA_LAST", "DEV_DATA", "DEV_DATA_LAST", "ACK", "NAK", "FRAME_TYPES",
    "NAK_CRC", "NAK_LENGTH", "NAK_TIMEOUT", "MAX_PAYLOAD", "HEADER_BYTES", "TRAILER_BYTES",
    "FramingError", "Frame", "FrameError", "crc16", "encode_frame", "message_frames",
    "FrameParser", "FramedPeer",
]

SOF = 0xA5
DATA, DATA_LAST = 0x01, 0x11            # host to device
DEV_DATA, DEV_DATA_LAST = 0x02, 0x12    # device to host
ACK, NAK = 0x03, 0x04
FRAME_TYPES = {DATA: "DATA", DATA_LAST: "DATA_LAST", DEV_DATA: "DEV_DATA",
               DEV_DATA_LAST: "DEV_DATA_LAST", ACK: "ACK", NAK: "NAK"}
#: NAK reasons (the one payload byte of a NAK frame).
NAK_CRC, NAK_LENGTH, NAK_TIMEOUT = 1, 2, 3
NAK_REASONS = {NAK_CRC: "CRC", NAK_LENGTH: "length", NAK_TIMEOUT: "timeout"}
MAX_PAYLOAD = 1024
HEADER_BYTES = 5       # SOF, type, seq, len
TRAILER_BYTES = 2      # crc

_DATA_TYPES = (DATA, DATA_LAST, DEV_DATA, DEV_DATA_LAST)


class FramingError(ValueError):
    """A frame cannot be built from these values; the message names the field and value."""


def _crc_table():
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """Return CRC-16/CCITT-FALSE of ``data`` (poly 0x1021, init 0xFFFF, not reflected).

    ``crc16(b"123456789") == 0x29B1``. Pass a previous result as ``crc`` to continue it.
    """
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc


@dataclass(frozen=True)
class Frame:
    """One frame that passed every check."""

    type: int
    seq: int
    payload: bytes = b""

    @property
    def last(self) -> bool:
        """Whether this data frame ends a message (``tlast``)."""
        return self.type in (DATA_LAST, DEV_DATA_LAST)

    def encode(self) -> bytes:
        return encode_frame(self.type, self.seq, self.payload)

    def __repr__(self):
        name = FRAME_TYPES.get(self.type, hex(self.type))
        return f"Frame({name}, seq={self.seq}, {len(self.payload)} bytes)"


@dataclass(frozen=True)
class FrameError:
    """A frame the parser dropped: ``reason`` is one of the NAK reasons.

    ``seq`` and ``type`` are the header's values when the header got that far and was
    plausible (else ``None``); ``detail`` says what was wrong, for error messages.
    """

    reason: int
    seq: int | None
    detail: str
    type: int | None = None

    @property
    def reason_name(self) -> str:
        return NAK_REASONS.get(self.reason, str(self.reason))


def encode_frame(ftype: int, seq: int, payload: bytes = b"") -> bytes:
    """Return the bytes of one frame; refuse a type, seq or payload the format does not allow."""
    if ftype not in FRAME_TYPES:
        raise FramingError(f"frame type = {ftype!r}: must be one of "
                           f"{', '.join(hex(t) for t in FRAME_TYPES)}")
    if not isinstance(seq, int) or not 0 <= seq <= 255:
        raise FramingError(f"frame seq = {seq!r}: must be in 0..255")
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise FramingError(f"frame payload length = {len(payload)}: at most {MAX_PAYLOAD}")
    if ftype in _DATA_TYPES and len(payload) % 4:
        raise FramingError(f"frame payload length = {len(payload)}: a data frame carries "
                           "whole 32-bit words (a multiple of 4 bytes)")
    if ftype == ACK and payload:
        raise FramingError(f"ACK payload length = {len(payload)}: must be empty")
    if ftype == NAK and len(payload) != 1:
        raise FramingError(f"NAK payload length = {len(payload)}: must be 1 (the reason)")
    body = bytes((ftype, seq, len(payload) & 0xFF, len(payload) >> 8)) + payload
    crc = crc16(body)
    return bytes((SOF,)) + body + bytes((crc & 0xFF, crc >> 8))


def message_frames(message: bytes, *, from_host: bool = True,
                   max_payload: int = MAX_PAYLOAD) -> list[tuple[int, bytes]]:
    """Split one stream message into ``(type, payload)`` data frames, the last one DATA_LAST.

    ``message`` is whole little-endian words (beat padding included); an empty message is not
    a stream message and is refused.
    """
    if not message:
        raise FramingError("message length = 0: a stream message has at least its header")
    if len(message) % 4:
        raise FramingError(f"message length = {len(message)}: must be whole 32-bit words")
    if max_payload % 4 or not 4 <= max_payload <= MAX_PAYLOAD:
        raise FramingError(f"max_payload = {max_payload}: must be a multiple of 4 in "
                           f"4..{MAX_PAYLOAD}")
    mid, end = (DATA, DATA_LAST) if from_host else (DEV_DATA, DEV_DATA_LAST)
    chunks = [bytes(message[i:i + max_payload]) for i in range(0, len(message), max_payload)]
    return [(end if i == len(chunks) - 1 else mid, chunk) for i, chunk in enumerate(chunks)]


class FrameParser:
    """Incremental frame parser: feed bytes, get :class:`Frame` and :class:`FrameError` events.

    Parameters
    ----------
    byte_timeout : float or None
        Seconds after which a frame whose bytes stopped arriving is dropped (reported as a
        ``NAK_TIMEOUT`` error) and the parser hunts for the next SOF. ``None``: never.
    """

    def __init__(self, byte_timeout: float | None = 0.1):
        self.byte_timeout = byte_timeout
        self._buf = bytearray()
        self._last = None        # time the last byte of a partial frame arrived
        self.dropped_bytes = 0   # bytes skipped while hunting for SOF

    @property
    def pending(self) -> int:
        """Bytes of a frame started but not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes, now: float | None = None, *, buffered: bool = False) -> list:
        """Consume ``data``; return the frames and frame errors it completes, in order.

        ``now`` is when ``data`` arrived. ``buffered=True`` says the bytes were read from a
        buffer (a serial port's, a pty's) where they may have waited while the reader was busy
        or descheduled: their arrival time is unknown, so the reader's own lateness must not
        drop the partial frame they continue. Stalls are then judged by the empty reads
        (``feed(b"")``), which a reader polling the line makes while it is quiet.
        """
        now = time.monotonic() if now is None else now
        events = [] if (buffered and data) else self.expire(now)
        if data:
            self._buf += data
            self._last = now
        events += self._parse()
        return events

    def expire(self, now: float | None = None) -> list:
        """Drop a partial frame older than the byte timeout; return the error, if any."""
        now = time.monotonic() if now is None else now
        if (self.byte_timeout is None or not self._buf or self._last is None
                or now - self._last < self.byte_timeout):
            return []
        seq = self._buf[2] if len(self._buf) > 2 else None
        ftype = self._buf[1] if len(self._buf) > 1 and self._buf[1] in FRAME_TYPES else None
        err = FrameError(NAK_TIMEOUT, seq, f"frame incomplete after {len(self._buf)} bytes "
                         f"(no byte for {self.byte_timeout} s)", ftype)
        # Hunt from the byte after the dropped SOF: a real frame may start inside the debris.
        del self._buf[:1]
        self._last = now
        return [err] + self._parse()

    def _parse(self) -> list:
        events = []
        buf = self._buf
        while buf:
            if buf[0] != SOF:
                i = buf.find(SOF)
                skip = len(buf) if i < 0 else i
                self.dropped_bytes += skip
                del buf[:skip]
                continue
            if len(buf) < HEADER_BYTES:
                break
            ftype, seq, length = buf[1], buf[2], buf[3] | (buf[4] << 8)
            bad = None
            if ftype not in FRAME_TYPES:
                bad = FrameError(NAK_LENGTH, None, f"unknown frame type {ftype:#04x}")
            elif (length > MAX_PAYLOAD or (ftype in _DATA_TYPES and length % 4)
                  or (ftype == ACK and length) or (ftype == NAK and length != 1)):
                bad = FrameError(NAK_LENGTH, seq,
                                 f"{FRAME_TYPES[ftype]} frame with payload length {length}", ftype)
            if bad is not None:
                events.append(bad)
                del buf[:1]           # resynchronize on the next SOF
                continue
            total = HEADER_BYTES + length + TRAILER_BYTES
            if len(buf) < total:
                break
            got = buf[total - 2] | (buf[total - 1] << 8)
            want = crc16(bytes(buf[1:total - 2]))
            if got != want:
                events.append(FrameError(NAK_CRC, seq, f"{FRAME_TYPES[ftype]} frame seq {seq}: "
                                         f"CRC {got:#06x}, computed {want:#06x}", ftype))
                # The header was plausible: skip the whole frame, so that SOF bytes inside
                # its payload do not look like frames (the sender waits for our answer).
                del buf[:total]
                continue
            events.append(Frame(ftype, seq, bytes(buf[HEADER_BYTES:total - 2])))
            del buf[:total]
        if not buf:
            self._last = None
        return events


class FramedPeer:
    """The device side of the framing, in software: a board's UART bridge around an engine.

    Reads host frames from ``port`` (anything with ``read(n)``/``write(bytes)``, e.g. a
    pyserial port or a pseudo-terminal wrapper), answers ACK/NAK, forwards each complete
    message to ``engine`` (a callable ``message bytes -> list of reply message bytes``) and
    sends the replies as DEV_DATA frames. Runs in a background thread (:meth:`start`).

    Fault injection for tests: ``corrupt_rx`` is a set of offsets in the received byte stream
    (counting from 0 over the peer's life) whose bytes are flipped on arrival, as line noise
    would; ``corrupt_tx`` a set of device-frame indices (from 0) whose CRC is broken on the
    way out; ``silent`` makes the peer read and drop everything.
    """

    def __init__(self, port, engine, *, byte_timeout: float = 0.1, max_payload: int = MAX_PAYLOAD,
                 corrupt_rx=(), corrupt_tx=()):
        self.port = port
        self.engine = engine
        self.parser = FrameParser(byte_timeout)
        self.max_payload = max_payload
        self.corrupt_rx = set(corrupt_rx)
        self.corrupt_tx = set(corrupt_tx)
        self.silent = False
        self.naks = 0
        self.retransmissions = 0
        self._rx_bytes = 0
        self._tx_count = 0
        self._last_seq = None
        self._message = bytearray()
        self._stop = threading.Event()
        self._thread = None
        self.error = None

    # -- thread ------------------------------------------------------------------------------

    def start(self) -> "FramedPeer":
        self._thread = threading.Thread(target=self._run, name="FramedPeer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _run(self):
        try:
            while not self._stop.is_set():
                data = self.port.read(4096)
                if self.silent:
                    continue
                self.handle_bytes(data or b"")
        except Exception as e:  # reported to the test through .error
            if not self._stop.is_set():
                self.error = e

    # -- protocol ----------------------------------------------------------------------------

    def handle_bytes(self, data: bytes) -> None:
        """Process received bytes (the thread calls this; tests may call it directly)."""
        if data:
            data = self._inject_rx(data)
        for ev in self.parser.feed(data, buffered=True):
            if isinstance(ev, FrameError):
                # A frame whose header is garbage cannot be named: the host's ACK timeout
                # retransmits it. Frames we can name are answered NAK at once.
                if ev.seq is not None and ev.type in (DATA, DATA_LAST):
                    self.naks += 1
                    self.port.write(encode_frame(NAK, ev.seq, bytes((ev.reason,))))
            elif ev.type in (DATA, DATA_LAST):
                self._on_data(ev)
            # Host-bound frame types arriving here are not ours: ignore them.

    def _inject_rx(self, data: bytes) -> bytes:
        # Flip the received bytes at the chosen stream offsets, as line noise would.
        data = bytearray(data)
        for off in [o for o in self.corrupt_rx if self._rx_bytes <= o < self._rx_bytes + len(data)]:
            data[off - self._rx_bytes] ^= 0xFF
            self.corrupt_rx.discard(off)
        self._rx_bytes += len(data)
        return bytes(data)

    def _on_data(self, frame: Frame) -> None:
        if frame.seq == self._last_seq:
            self.retransmissions += 1
            self.port.write(encode_frame(ACK, frame.seq))
            return
        self._last_seq = frame.seq
        self.port.write(encode_frame(ACK, frame.seq))
        self._message += frame.payload
        if frame.last:
            message, self._message = bytes(self._message), bytearray()
            for reply in self.engine(message):
                self.send_message(reply)

    def send_message(self, message: bytes) -> None:
        """Send one engine result message as device data frames (not acknowledged)."""
        for ftype, payload in message_frames(message, from_host=False,
                                             max_payload=self.max_payload):
            raw = bytearray(encode_frame(ftype, self._tx_count & 0xFF, payload))
            if self._tx_count in self.corrupt_tx:
                raw[-1] ^= 0x5A
            self._tx_count += 1
            self.port.write(bytes(raw))
