"""Transports: how command messages reach an engine and result messages come back.

The driver speaks whole stream messages (docs/protocol.md: 32-bit little-endian words, beat
padding included, ``tlast`` at the end) and never cares what carries them:

* :class:`CallTransport`: an in-process engine, a callable ``message -> [reply, ...]`` (the
  golden protocol responder);
* :class:`SerialTransport`: a byte link with the framing of docs/protocol.md (a board's UART,
  or a pseudo-terminal in tests), with ACK/NAK, retransmission and timeouts;
* :class:`StreamSocketTransport`: a local socket to the simulator process, each message
  prefixed by its length (a reliable pipe needs no CRC).
"""

from __future__ import annotations

import collections
import socket
import struct
import time

from .. import framing
from ..framing import Frame, FrameError, FrameParser

__all__ = ["TransportError", "LinkTimeout", "CorruptResult", "Transport", "CallTransport",
           "SerialTransport", "StreamSocketTransport"]


class TransportError(RuntimeError):
    """The link failed (the engine may be fine): retransmissions ran out, a peer vanished."""


class LinkTimeout(TransportError, TimeoutError):
    """Nothing (or not enough) came back within the timeout."""


class CorruptResult(TransportError):
    """A result frame failed its CRC; the command's replies were drained: run the layer again."""


class Transport:
    """One command stream out, one result stream in, as whole messages."""

    #: Human-readable name of what is on the other end (for error messages).
    peer = "engine"

    def send(self, message: bytes) -> None:
        """Send one command message (whole words, ``tlast`` after its last beat)."""
        raise NotImplementedError

    def recv(self, timeout: float | None = None) -> bytes:
        """Return the next result message; raise :class:`LinkTimeout` when none comes."""
        raise NotImplementedError

    def drain(self) -> None:
        """Forget every reply still in flight (after an error), so the next command is clean."""

    def close(self) -> None:
        """Release the link."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CallTransport(Transport):
    """An engine living in this process: ``engine(message) -> list of reply messages``."""

    def __init__(self, engine, peer: str = "in-process engine"):
        self._engine = engine
        self._replies = collections.deque()
        self.peer = peer

    def send(self, message: bytes) -> None:
        self._replies.extend(self._engine(bytes(message)))

    def recv(self, timeout=None) -> bytes:
        if not self._replies:
            raise LinkTimeout(f"{self.peer}: no reply pending")
        return self._replies.popleft()

    def drain(self) -> None:
        self._replies.clear()


class SerialTransport(Transport):
    """The host side of the byte-link framing (docs/protocol.md) over a serial port.

    Parameters
    ----------
    port : str or file-like
        A pyserial port name or URL (``/dev/ttyUSB0``, ``loop://``), or an object with
        ``read(n)``, ``write(data)`` and a read timeout (an open ``serial.Serial``).
    baudrate : int
        Line rate when ``port`` is a name.
    timeout : float
        Seconds of silence after which a wait for an ACK or a result gives up.
    attempts : int
        Sends of one frame (first try plus retransmissions) before the link is declared dead.
    byte_timeout : float
        Inter-byte timeout of a frame (a frame stalled longer is dropped).
    max_payload : int
        Largest frame payload sent (bytes, a multiple of 4, at most 1024).
    """

    def __init__(self, port, *, baudrate: int = 115200, timeout: float = 2.0, attempts: int = 4,
                 byte_timeout: float = 0.1, max_payload: int = framing.MAX_PAYLOAD):
        if isinstance(port, str):
            import serial  # pyserial, imported only for a real port
            try:
                self._port = serial.serial_for_url(port, baudrate=baudrate, timeout=0.02)
            except (serial.SerialException, ValueError) as e:
                raise TransportError(f"serial port {port!r}: cannot open ({e})") from None
            self.peer = f"serial port {port}"
            self._owns = True
        else:
            self._port = port
            self.peer = f"serial port {getattr(port, 'name', port)!s}"
            self._owns = False
        if timeout <= 0:
            raise ValueError(f"timeout = {timeout!r}: must be > 0 seconds")
        if attempts < 1:
            raise ValueError(f"attempts = {attempts!r}: must be >= 1")
        self.timeout = timeout
        self.attempts = attempts
        self.max_payload = max_payload
        self._parser = FrameParser(byte_timeout)
        self._seq = 0
        self._acks = collections.deque()      # ACK/NAK frames not yet consumed
        self._messages = collections.deque()  # complete result messages
        self._partial = bytearray()
        self._corrupt = None                  # first FrameError of a result being received
        self.retransmissions = 0
        self.naks = 0

    # -- receiving ---------------------------------------------------------------------------

    def _pump(self) -> bool:
        """Read what has arrived (waiting at most the port's read timeout); whether any did."""
        # Ask for what is waiting (at least one byte): read() returns as soon as it has it,
        # instead of sitting out the port's timeout for a full buffer.
        waiting = getattr(self._port, "in_waiting", None)
        data = self._port.read(max(1, waiting) if waiting is not None else 4096)
        now = time.monotonic()
        # The bytes may have waited in the port's buffer while this thread was not running
        # (a loaded machine, the GIL): only a quiet read judges a stalled frame.
        events = self._parser.feed(data or b"", now, buffered=True)
        for ev in events:
            if isinstance(ev, FrameError):
                if ev.type in (framing.ACK, framing.NAK):
                    continue      # a lost ACK/NAK: the ACK timeout retransmits
                if self._corrupt is None:
                    self._corrupt = ev
            elif ev.type in (framing.ACK, framing.NAK):
                self._acks.append(ev)
            elif ev.type in (framing.DEV_DATA, framing.DEV_DATA_LAST):
                self._partial += ev.payload
                if ev.last:
                    if self._corrupt is None:
                        self._messages.append(bytes(self._partial))
                    self._partial.clear()
        return bool(data)

    def recv(self, timeout: float | None = None) -> bytes:
        timeout = self.timeout if timeout is None else timeout
        last_byte = time.monotonic()
        while True:
            if self._corrupt is not None:
                err = self._corrupt
                self.drain()
                raise CorruptResult(f"{self.peer}: corrupted result frame ({err.detail}); the "
                                    "replies to this command were dropped: run the layer again")
            if self._messages:
                return self._messages.popleft()
            if self._pump():
                last_byte = time.monotonic()
            elif time.monotonic() - last_byte > timeout:
                raise LinkTimeout(f"{self.peer}: no result within {timeout} s "
                                  f"({len(self._partial)} bytes of a message received)")

    def drain(self, quiet: float = 0.2) -> None:
        """Read and drop until the line has been quiet for ``quiet`` seconds."""
        end = time.monotonic() + max(quiet, 10 * self.timeout)
        last = time.monotonic()
        while time.monotonic() < end and time.monotonic() - last < quiet:
            if self._port.read(4096):
                last = time.monotonic()
        self._parser = FrameParser(self._parser.byte_timeout)
        self._acks.clear()
        self._messages.clear()
        self._partial.clear()
        self._corrupt = None

    # -- sending -----------------------------------------------------------------------------

    def send(self, message: bytes) -> None:
        for ftype, payload in framing.message_frames(message, max_payload=self.max_payload):
            self._send_frame(ftype, payload)

    def _send_frame(self, ftype: int, payload: bytes) -> None:
        seq = self._seq
        raw = framing.encode_frame(ftype, seq, payload)
        why = "no ACK"
        for attempt in range(self.attempts):
            if attempt:
                self.retransmissions += 1
            self._port.write(raw)
            reply = self._wait_ack(seq)
            if reply is None:
                why = f"no ACK within {self.timeout} s"
                continue
            if reply.type == framing.ACK:
                self._seq = (seq + 1) & 0xFF
                return
            self.naks += 1
            reason = reply.payload[0] if reply.payload else 0
            why = f"NAK ({framing.NAK_REASONS.get(reason, reason)})"
        raise LinkTimeout(f"{self.peer}: frame seq {seq} ({len(payload)} bytes) not accepted "
                          f"after {self.attempts} attempts; last: {why}")

    def _wait_ack(self, seq: int) -> Frame | None:
        last_byte = time.monotonic()
        while True:
            while self._acks:
                ack = self._acks.popleft()
                if ack.seq == seq:
                    return ack
                # An ACK/NAK for an older frame (a duplicate): ignore it.
            if self._pump():
                last_byte = time.monotonic()
            elif time.monotonic() - last_byte > self.timeout:
                return None

    def close(self) -> None:
        if self._owns:
            self._port.close()


class StreamSocketTransport(Transport):
    """Messages over a reliable local socket, each prefixed by its length (u32 LE).

    Used between the driver and the simulator process; ``timeout`` bounds every wait.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 60.0, peer: str = "simulator"):
        self._sock = sock
        self.timeout = timeout
        self.peer = peer
        self._buf = bytearray()

    def send(self, message: bytes) -> None:
        try:
            self._sock.sendall(struct.pack("<I", len(message)) + bytes(message))
        except OSError as e:
            raise TransportError(f"{self.peer}: connection lost while sending ({e})") from None

    def _read_exact(self, n: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkTimeout(f"{self.peer}: no result within {timeout} s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError as e:
                raise TransportError(f"{self.peer}: connection lost ({e})") from None
            if not chunk:
                raise TransportError(f"{self.peer}: connection closed by the peer")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def recv(self, timeout: float | None = None) -> bytes:
        timeout = self.timeout if timeout is None else timeout
        (n,) = struct.unpack("<I", self._read_exact(4, timeout))
        return self._read_exact(n, timeout)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
