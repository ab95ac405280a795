"""A pseudo-terminal pair: a real serial port for the host, its other end for a device model.

The host opens :attr:`PtyPair.port_name` with pyserial like any ``/dev/tty*``; a device model
(:class:`skipconv.sw.framing.FramedPeer`) reads and writes :attr:`PtyPair.device`.
"""

from __future__ import annotations

import os
import select
import tty

__all__ = ["PtyPair", "PtyEnd"]


class PtyEnd:
    """The controlling (device) end of a pseudo-terminal, with a pyserial-like read/write."""

    def __init__(self, fd: int, read_timeout: float = 0.02):
        self.fd = fd
        self.read_timeout = read_timeout
        self.name = f"pty-master-{fd}"

    def read(self, n: int) -> bytes:
        """Return up to ``n`` bytes, or ``b""`` after ``read_timeout`` seconds without any."""
        ready, _, _ = select.select([self.fd], [], [], self.read_timeout)
        if not ready:
            return b""
        try:
            return os.read(self.fd, n)
        except OSError:        # the other end closed
            return b""

    def write(self, data: bytes) -> int:
        view = memoryview(bytes(data))
        while view:
            _, ready, _ = select.select([], [self.fd], [], 1.0)
            if not ready:
                raise TimeoutError(f"{self.name}: the other end stopped reading")
            n = os.write(self.fd, view)
            view = view[n:]
        return len(data)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class PtyPair:
    """Open a raw pseudo-terminal; the host side is a real tty at :attr:`port_name`."""

    def __init__(self):
        master, slave = os.openpty()
        tty.setraw(slave)          # no echo, no line editing, 8-bit clean
        tty.setraw(master)
        self.device = PtyEnd(master)
        self._slave = slave        # kept open so the master never sees a hang-up
        self.port_name = os.ttyname(slave)

    def close(self) -> None:
        self.device.close()
        try:
            os.close(self._slave)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
