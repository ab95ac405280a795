"""The simulator side of the ``sim`` backend: a cocotb test that serves the engine's streams.

This module runs *inside* the simulator process (cocotb imports it as the test module; the
host process starts it, see :mod:`.sim_backend`). It connects back to the host over a local
TCP socket (the port comes in the job of :func:`skipconv.sim.runner.run_bench`) and serves requests until the host says goodbye or the
socket closes. The engine is driven through the same protocol bytes a board receives; the
command stream is an AXI-Stream source, the result stream a sink (cocotbext-axi), both with
``tlast`` per message.

Requests (host to simulator): one op byte and a u32 little-endian length, then the payload.

* ``M`` + a command message (whole words, beat padding included): queued on the command
  stream; no answer (the clock runs only while the host waits for a reply, below);
* ``R`` + u64 cycle limit: run the clock until one result message is complete, answer
  ``r`` + the message, or ``t`` + a text after the cycle limit (the engine stalled);
* ``S``: answer ``s`` + JSON statistics (cycles simulated, wall seconds spent simulating);
* ``Q``: finish the test.

While the host computes (tiling, encoding, PyTorch), simulated time stands still.

By default (job ``"bulk": True``) the streams run in the bulk mode of the bench wrapper
(:mod:`skipconv.sim.bulk`): the queued command messages go to the engine at full rate when
the host asks for a reply, and the result beats are captured in the simulator, a few Python
wake-ups per batch. ``"bulk": False`` uses cocotbext-axi models beat by beat.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, First, RisingEdge, Timer
from cocotb.utils import get_sim_time

CLOCK_NS = 10


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("host closed the connection")
        buf += chunk
    return bytes(buf)


def _send(sock, op: bytes, payload: bytes = b""):
    sock.sendall(op + struct.pack("<I", len(payload)) + payload)


@cocotb.test()
async def serve(dut):
    """Serve protocol messages from the host until it says ``Q``."""
    import logging

    from cocotbext.axi import AxiStreamBus, AxiStreamFrame, AxiStreamSink, AxiStreamSource

    from skipconv.sim.runner import load_job, save_output

    config, job = load_job()
    port = int(job["port"])
    bulk = bool(job.get("bulk", True))
    dut.rst.value = 1
    if bulk:
        # The wrapper streams whole batches of commands and captures the results; its own
        # clock runs the engine (skipconv.sim.bulk).
        from skipconv.sim.bulk import BulkStreams
        dut.bulk.value = 1
        streams = BulkStreams(dut, config.bus_bits, CLOCK_NS)
        clk = dut.bulk_clk
        beat_bytes = config.bus_bits // 8
        pending: list[bytes] = []           # command messages not sent yet
        partial: list[int] = []             # beats of a result message not ended yet
        results: list[bytes] = []           # result messages not asked for yet
    else:
        # The clock toggles in the simulator (GPI), not in Python: while the engine computes
        # and both streams are idle, no Python runs per cycle.
        Clock(dut.clk, CLOCK_NS, unit="ns", impl="gpi").start()
        dut.bulk.value = 0
        clk = dut.clk
        source = AxiStreamSource(AxiStreamBus.from_prefix(dut, "s_axis"), dut.clk, dut.rst)
        sink = AxiStreamSink(AxiStreamBus.from_prefix(dut, "m_axis"), dut.clk, dut.rst)
        for obj in (source, sink):
            obj.log.setLevel(logging.WARNING)       # no line per frame
    await ClockCycles(clk, 4)
    dut.rst.value = 0
    await RisingEdge(clk)

    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stats = {"cycles": 0, "sim_s": 0.0, "messages_in": 0, "messages_out": 0}
    edge = RisingEdge(clk)

    async def bulk_recv(limit):
        """The next result message (bulk mode), or None after ``limit`` cycles."""
        nonlocal partial
        if not results:
            data, last = [], []
            for msg in pending:
                n = len(msg) // beat_bytes
                data += [int.from_bytes(msg[i * beat_bytes:(i + 1) * beat_bytes], "little")
                         for i in range(n)]
                last += [False] * (n - 1) + [True]
            pending.clear()
            beats, _ = await streams.exchange(data, last, 1, budget_cycles=max(1, int(limit)),
                                              quiet_cycles=0)
            for value, end in beats:
                partial.append(value)
                if end:
                    results.append(b"".join(v.to_bytes(beat_bytes, "little") for v in partial))
                    partial = []
        return results.pop(0) if results else None

    def now_cycles():
        return int(get_sim_time("ns")) // CLOCK_NS

    try:
        while True:
            try:
                head = _recv_exact(sock, 5)
            except ConnectionError:
                break
            op, n = head[:1], struct.unpack("<I", head[1:])[0]
            payload = _recv_exact(sock, n) if n else b""
            if op == b"M":
                if bulk:
                    pending.append(payload)                  # sent with the next R
                else:
                    await source.send(AxiStreamFrame(payload))   # queued, sent while clocking
                stats["messages_in"] += 1
            elif op == b"R":
                (limit,) = struct.unpack("<Q", payload)
                t0, c0 = time.perf_counter(), now_cycles()
                frame = None
                if bulk:
                    frame = await bulk_recv(limit)
                elif sink.empty():
                    recv = cocotb.start_soon(sink.recv())
                    # One timer, not a per-edge count: no Python per cycle while waiting.
                    await First(recv, Timer(max(1, int(limit)) * CLOCK_NS, "ns"))
                    if recv.done():
                        frame = recv.result()
                    else:
                        recv.cancel()
                else:
                    frame = sink.recv_nowait()
                stats["cycles"] += now_cycles() - c0
                stats["sim_s"] += time.perf_counter() - t0
                if frame is None:
                    _send(sock, b"t", f"no result message within {limit} cycles "
                                      f"(busy = {dut.busy.value}, error = {dut.error.value})"
                          .encode())
                else:
                    stats["messages_out"] += 1
                    _send(sock, b"r", frame if bulk else bytes(frame.tdata))
            elif op == b"S":
                stats["now_cycles"] = now_cycles()
                _send(sock, b"s", json.dumps(stats).encode())
            elif op == b"Q":
                _send(sock, b"q")
                break
            else:
                _send(sock, b"t", f"unknown request {op!r}".encode())
        await edge
    finally:
        sock.close()
        save_output(stats)
