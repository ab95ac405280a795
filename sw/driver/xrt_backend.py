"""The ``xrt`` backend: an Alveo card running the engine as an XRT kernel, through ``pyxrt``.

``pyxrt`` (from the Xilinx Runtime) is imported only when this backend is opened; without XRT
the error says so and what to install. The kernel is the boards issue's RTL kernel
(:mod:`skipconv.boards.alveo`, docs/boards.md):

* kernel ``skipconv_kernel`` with arguments ``cmd`` (command buffer address), ``cmd_words``,
  ``res`` (result buffer address), ``res_capacity`` (result words after word 0);
* one run streams the command buffer into the engine (``tlast`` from each message's header) and
  finishes when every command has been answered;
* result word 0 is the number ``n`` of result words written after it, bit 31 set when the
  results overflowed ``res_capacity``; words 1..n are the result stream, beat padding included.

The transport batches a tile's commands until the driver asks for a reply, then runs the kernel
once and splits the result stream into messages with the protocol's parser.
"""

from __future__ import annotations

import collections
import os

import numpy as np

from .transport import LinkTimeout, Transport, TransportError

__all__ = ["XrtUnavailable", "XrtTransport", "open_xrt", "split_results", "KERNEL_NAME",
           "OVERFLOW_BIT"]

#: The RTL kernel's name (``skipconv.boards.alveo.KERNEL``; kept here so that opening the
#: backend does not import the gateware).
KERNEL_NAME = "skipconv_kernel"
#: Bit of result word 0 set when the results overflowed the buffer.
OVERFLOW_BIT = 1 << 31


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


def split_results(raw, config, res_capacity: int, peer: str = "kernel") -> list[bytes]:
    """The result messages of one kernel run from its result buffer words (word 0: count)."""
    from .. import protocol
    from .device import message_bytes
    raw = np.asarray(raw, dtype=np.uint32)
    head = int(raw[0])
    n = head & ~OVERFLOW_BIT
    if head & OVERFLOW_BIT or n > res_capacity:
        raise TransportError(f"{peer}: the results overflowed the {res_capacity}-word result "
                             "buffer (results were dropped)")
    parser = protocol.ResultParser(config)
    messages = parser.feed_bytes(raw[1:1 + n].astype("<u4").tobytes())
    if not parser.idle:
        raise TransportError(f"{peer}: the result stream ends inside a message")
    return [message_bytes(m.words(), config) for m in messages]


class XrtTransport(Transport):
    """Protocol messages through an Alveo kernel run: commands are batched until a reply is
    needed, then one kernel run moves them and returns every reply.
    """

    def __init__(self, xclbin: str, config, *, device_index: int = 0,
                 res_capacity: int = 1 << 22, timeout_ms: int = 60_000):
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
        self.config = config
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
        self._replies.extend(split_results(raw, self.config, self.res_capacity, self.peer))

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
    xclbin = xclbin or os.environ.get("SKIPCONV_XCLBIN")
    transport = XrtTransport(xclbin, config, device_index=device_index)
    return EngineDevice(config, transport, name="xrt", **options)
