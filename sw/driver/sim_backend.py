"""The ``sim`` backend: the generated engine under cocotb + Verilator, started once per session.

:func:`open_sim` builds (or finds in the cache) the Verilator model of the config
(:func:`skipconv.sim.runner.build`), opens a listening socket on 127.0.0.1, and starts one
simulator process that runs :mod:`.sim_server` as its cocotb test. That test connects back
and serves protocol messages until the device is closed, so any number of layers run in one
simulator process. :class:`SimTransport` is the host end: the driver code above it is the
same :class:`~.device.EngineDevice` that talks to a board.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .transport import LinkTimeout, Transport, TransportError

__all__ = ["SimTransport", "SimUnavailable", "open_sim", "DEFAULT_CYCLE_LIMIT"]

#: Cycles the simulator may run waiting for one result message before it reports a stall.
DEFAULT_CYCLE_LIMIT = 50_000_000


class SimUnavailable(TransportError):
    """The simulated engine cannot be built or started here; the message says why."""


class SimTransport(Transport):
    """Protocol messages to and from the simulator process (see :mod:`.sim_server`)."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen, workdir: Path, *,
                 cycle_limit: int = DEFAULT_CYCLE_LIMIT, timeout: float = 600.0):
        self._sock = sock
        self._proc = proc
        self.workdir = workdir
        self.cycle_limit = cycle_limit
        self.timeout = timeout
        self.peer = f"simulator (pid {proc.pid})"
        self._closed = False

    def _request(self, op: bytes, payload: bytes = b"") -> None:
        try:
            self._sock.sendall(op + struct.pack("<I", len(payload)) + payload)
        except OSError as e:
            raise TransportError(f"{self.peer}: connection lost ({e}){self._log_hint()}") from None

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        deadline = time.monotonic() + self.timeout
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkTimeout(f"{self.peer}: no answer within {self.timeout} s")
            self._sock.settimeout(min(left, 1.0))
            try:
                chunk = self._sock.recv(n - len(buf))
            except socket.timeout:
                if self._proc.poll() is not None:
                    raise TransportError(f"{self.peer} exited with code {self._proc.returncode}"
                                         f"{self._log_hint()}") from None
                continue
            except OSError as e:
                raise TransportError(f"{self.peer}: connection lost ({e})") from None
            if not chunk:
                raise TransportError(f"{self.peer} closed the connection{self._log_hint()}")
            buf += chunk
        return bytes(buf)

    def _answer(self) -> tuple[bytes, bytes]:
        head = self._read_exact(5)
        n = struct.unpack("<I", head[1:])[0]
        return head[:1], (self._read_exact(n) if n else b"")

    def _log_hint(self) -> str:
        log = self.workdir / "sim.log"
        if log.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            return f"; simulator log {log}:\n{tail}"
        return ""

    def send(self, message: bytes) -> None:
        self._request(b"M", bytes(message))

    def recv(self, timeout: float | None = None) -> bytes:
        self._request(b"R", struct.pack("<Q", self.cycle_limit))
        op, payload = self._answer()
        if op == b"r":
            return payload
        raise LinkTimeout(f"{self.peer}: {payload.decode(errors='replace')}")

    def stats(self) -> dict:
        """Cycles simulated and wall seconds the simulator spent running the clock."""
        self._request(b"S")
        op, payload = self._answer()
        return json.loads(payload) if op == b"s" else {}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._request(b"Q")
            self._answer()
        except (TransportError, OSError):
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGTERM)     # our own process group only
            self._proc.wait(timeout=10)


def open_sim(config, *, progress: bool = True, cycle_limit: int = DEFAULT_CYCLE_LIMIT,
             start_timeout: float = 300.0, trace: bool | None = None, log=None,
             bulk: bool = True):
    """Build the engine for ``config`` (cached), start its simulator, return an EngineDevice.

    ``bulk`` (default) moves whole command batches and result streams through the bench
    wrapper's buffers (:mod:`skipconv.sim.bulk`); False drives the streams with cocotbext-axi
    beat by beat.
    """
    from .device import EngineDevice

    try:
        from skipconv.sim import runner
    except ImportError as e:
        raise SimUnavailable(f"the simulation runner is not available ({e})") from None
    say = log or (print if progress else (lambda *_: None))
    t0 = time.monotonic()
    try:
        sim_build = runner.build(config, "verilator", log=say)
    except ImportError as e:          # the gateware generator is not there
        raise SimUnavailable(f"the engine cannot be generated ({e})") from None
    except runner.SimError as e:
        raise SimUnavailable(str(e)) from None
    if time.monotonic() - t0 > 1:
        say(f"      simulator built in {time.monotonic() - t0:.0f} s (cached for next time)")

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="skipconv-simdev-"))
    job = {"build_dir": str(sim_build.build_dir), "config": config.to_dict(),
           "verilog": str(sim_build.verilog), "port": port, "workdir": str(workdir),
           "bulk": bool(bulk)}
    (workdir / "launch.json").write_text(json.dumps(job))
    proc = subprocess.Popen(
        [sys.executable, "-m", "skipconv.sw.driver.sim_launch", str(workdir / "launch.json")],
        stdout=open(workdir / "launch.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)     # its own process group: close() can end it and only it
    listener.settimeout(1.0)
    deadline = time.monotonic() + start_timeout
    sock = None
    try:
        while sock is None:
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                if proc.poll() is not None:
                    log_text = (workdir / "launch.log").read_text(errors="replace")
                    tail = "\n".join(log_text.splitlines()[-20:])
                    raise SimUnavailable(f"the simulator exited with code {proc.returncode} "
                                         f"before connecting:\n{tail}") from None
                if time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGTERM)
                    raise SimUnavailable(f"the simulator did not connect within "
                                         f"{start_timeout} s") from None
    finally:
        listener.close()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = SimTransport(sock, proc, workdir, cycle_limit=cycle_limit)
    return EngineDevice(config, transport, name="sim", trace=trace)
