"""The ``xrt`` backend: an Alveo card running the engine as an XRT kernel, through ``pyxrt``.

``pyxrt`` (from the Xilinx Runtime) is imported only when this backend is opened; without XRT
the error says so and what to install. The kernel is the boards issue's Alveo wrapper around
the same engine and protocol; the transport moves whole protocol messages through two device
buffers.

Assumed kernel interface (docs/driver.md "xrt backend"; to be checked against
``skipconv.boards.alveo`` when its register map is final):

* kernel name ``skipconv_engine`` in the ``.xclbin``;
* arguments, in order: ``cmd`` (global buffer of command words), ``cmd_words`` (u32),
  ``res`` (global buffer for result words), ``res_capacity`` (u32, words);
* one kernel run streams ``cmd_words`` words into the engine's command stream (message
  boundaries from the headers' lengths, ``tlast`` on each message's last beat) and writes the
  result stream to ``res`` from word 1 on; word 0 receives the number of result words written.
"""

from __future__ import annotations

import collections
import os

import numpy as np

from .transport import LinkTimeout, Transport, TransportError

__all__ = ["XrtUnavailable", "XrtTransport", "open_xrt", "KERNEL_NAME"]

KERNEL_NAME = "skipconv_engine"


class XrtUnavailable(TransportError):
    """XRT (``pyxrt``) is not installed or no Alveo card / xclbin is available."""


def _import_pyxrt():
    try:
        import pyxrt  # noqa: PLC0415 (only when the backend is used)
    except ImportError as e:
        raise XrtUnavailable(
            f"the xrt backend needs pyxrt from the Xilinx Runtime (XRT), which is not "
            f"installed here ({e}); install XRT and source /opt/xilinx/xrt/setup.sh, or use "
            "--device golden, sim or serial:PORT") from None
    return pyxrt


class XrtTransport(Transport):
    """Protocol messages through an Alveo kernel run: commands are batched until a reply is
    needed, then one kernel run moves them and returns every reply.
    """

    def __init__(self, xclbin: str, *, device_index: int = 0, res_capacity: int = 1 << 22,
                 timeout_ms: int = 60_000):
        pyxrt = _import_pyxrt()
        if not xclbin or not os.path.exists(xclbin):
            raise XrtUnavailable(f"xclbin = {xclbin!r}: no such file (build it with the boards "
                                 "issue's Alveo flow, or pass --xclbin)")
        try:
            self._dev = pyxrt.device(device_index)
            uuid = self._dev.load_xclbin(xclbin)
            self._kernel = pyxrt.kernel(self._dev, uuid, KERNEL_NAME)
        except Exception as e:  # pyxrt raises RuntimeError subclasses without a common base
            raise XrtUnavailable(f"Alveo card {device_index}: cannot load {xclbin!r} "
                                 f"kernel {KERNEL_NAME!r} ({e})") from None
        self._pyxrt = pyxrt
        self.peer = f"Alveo card {device_index} ({os.path.basename(xclbin)})"
        self.res_capacity = res_capacity
        self.timeout_ms = timeout_ms
        self._pending = bytearray()
        self._replies = collections.deque()
        self._res_bo = pyxrt.bo(self._dev, 4 * (res_capacity + 1), pyxrt.bo.normal,
                                self._kernel.group_id(2))

    def send(self, message: bytes) -> None:
        self._pending += message

    def _flush(self):
        pyxrt = self._pyxrt
        words = len(self._pending) // 4
        cmd_bo = pyxrt.bo(self._dev, max(4, len(self._pending)), pyxrt.bo.normal,
                          self._kernel.group_id(0))
        cmd_bo.write(bytes(self._pending), 0)
        cmd_bo.sync(pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE)
        self._pending.clear()
        run = self._kernel(cmd_bo, words, self._res_bo, self.res_capacity)
        state = run.wait(self.timeout_ms)
        if state != pyxrt.ert_cmd_state.ERT_CMD_STATE_COMPLETED:
            raise LinkTimeout(f"{self.peer}: kernel run ended in state {state}")
        self._res_bo.sync(pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE)
        raw = np.frombuffer(self._res_bo.read(4 * (self.res_capacity + 1), 0), "<u4")
        n = int(raw[0])
        if n > self.res_capacity:
            raise TransportError(f"{self.peer}: kernel reports {n} result words, more than "
                                 f"the buffer's {self.res_capacity}")
        # Split the result stream into messages by their headers (body length in word 1).
        body = raw[1:1 + n]
        i = 0
        while i + 1 < n:
            length = 2 + int(body[i + 1])
            self._replies.append(body[i:i + length].astype("<u4").tobytes())
            i += length

    def recv(self, timeout=None) -> bytes:
        if not self._replies and self._pending:
            self._flush()
        if not self._replies:
            raise LinkTimeout(f"{self.peer}: no result pending")
        return self._replies.popleft()

    def drain(self) -> None:
        self._pending.clear()
        self._replies.clear()


def open_xrt(config, *, xclbin: str | None = None, device_index: int = 0, **options):
    """Open the ``xrt`` backend (``xclbin`` defaults to ``$SKIPCONV_XCLBIN``)."""
    from .device import EngineDevice
    _import_pyxrt()
    if config.bus_bits != 32:
        # Beat padding: the result splitter above assumes one word per beat.
        raise XrtUnavailable(f"config.bus_bits = {config.bus_bits}: the xrt transport "
                             "supports 32-bit streams only")
    xclbin = xclbin or os.environ.get("SKIPCONV_XCLBIN")
    transport = XrtTransport(xclbin, device_index=device_index)
    return EngineDevice(config, transport, name="xrt", **options)
