"""cocotb bench of the UART board top: the host driver's ``serial`` backend talks to the
simulated board through a pseudo-terminal, and this bench moves every byte bit by bit
between the pty and the top's ``rx``/``tx`` pins (8N1 at ``divisor`` clocks per bit).

The host runs in a thread of the simulator process (it only touches the pty, never cocotb).
The job (``$SKIPCONV_BOARDS_JOB``): ``config`` (dict), ``divisor``, and ``steps``: a list of
``{"name", "layer" (Layer), "x", "rx_flip": [stream offsets], "tx_corrupt": bool}``.
``rx_flip`` flips host-to-board bytes at those offsets (counted from the step's start) of
the link's byte stream (line noise on the way in: the board must NAK and the host
retransmit); ``tx_corrupt`` flips one payload byte of the step's first long result frame
(the OFMAP: the host reports the corrupted frame and runs the layer again). Each step's
result (or the error the host saw first) is returned to pytest, which compares with golden.
"""

from __future__ import annotations

import os
import pickle
import threading
import traceback

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, Timer

from ..sw.config import EngineConfig

CLK_NS = 10


@cocotb.test()
async def host_over_pty(dut):
    from ..sw.driver.device import EngineDevice
    from ..sw.driver.pty import PtyPair
    from ..sw.driver.transport import CorruptResult, SerialTransport

    job = pickle.loads(open(os.environ["SKIPCONV_BOARDS_JOB"], "rb").read())
    config = EngineConfig.from_dict(job["config"])
    bit_ns = job["divisor"] * CLK_NS
    Clock(dut.clk, CLK_NS, unit="ns").start()
    dut.rx.value = 1
    dut.rst.value = 1
    await ClockCycles(dut.clk, 5)
    dut.rst.value = 0

    pty = PtyPair()
    pty.device.read_timeout = 0
    faults = {"rx": set(), "tx": False}
    counts = {"rx": 0}
    lock = threading.Lock()
    results = []
    state = {"done": False, "error": None}

    def host():
        try:
            transport = SerialTransport(pty.port_name, timeout=60.0, attempts=4,
                                        byte_timeout=5.0)
            device = EngineDevice(config, transport, name="serial (simulated ULX3S)")
            for step in job["steps"]:
                with lock:
                    faults["rx"] = {counts["rx"] + o for o in step.get("rx_flip", ())}
                    faults["tx"] = bool(step.get("tx_corrupt"))
                naks, retx = transport.naks, transport.retransmissions
                entry = {"name": step["name"], "first_error": None}
                try:
                    res = device.run(step["layer"], step["x"])
                except CorruptResult as e:
                    # What a user does after a corrupted result frame: run the layer again.
                    entry["first_error"] = f"CorruptResult: {e}"
                    res = device.run(step["layer"], step["x"])
                entry.update(result=res, naks=transport.naks - naks,
                             retransmissions=transport.retransmissions - retx)
                results.append(entry)
            transport.close()
        except Exception:
            state["error"] = traceback.format_exc()
        finally:
            state["done"] = True

    async def to_pins():
        # pty -> rx pin, one Timer per bit.
        while True:
            data = pty.device.read(4096)
            if not data:
                await Timer(200 * CLK_NS, unit="ns")
                continue
            for b in data:
                with lock:
                    if counts["rx"] in faults["rx"]:
                        b ^= 0x20
                    counts["rx"] += 1
                for level in [0] + [(b >> i) & 1 for i in range(8)] + [1]:
                    dut.rx.value = level
                    await Timer(bit_ns, unit="ns")

    frame = {"pos": 0, "type": 0, "len": 0}

    def corrupt_tx(b):
        # Track the device's frames (SOF type seq len len payload crc crc) to hit a payload.
        pos = frame["pos"]
        if pos == 0 and b != 0xA5:
            return b
        if pos == 1:
            frame["type"] = b
        elif pos == 3:
            frame["len"] = b
        elif pos == 4:
            frame["len"] |= b << 8
        frame["pos"] = pos + 1
        if pos >= 4 and pos + 1 == 5 + frame["len"] + 2:
            frame["pos"] = 0
        if (faults["tx"] and pos == 15 and frame["type"] in (0x02, 0x12)
                and frame["len"] >= 32):
            faults["tx"] = False
            return b ^ 0x01
        return b

    async def from_pins():
        # tx pin -> pty: sample each bit in its middle.
        while True:
            await FallingEdge(dut.tx)
            await Timer(bit_ns * 3 // 2, unit="ns")
            b = 0
            for i in range(8):
                b |= int(dut.tx.value) << i
                await Timer(bit_ns, unit="ns")
            assert int(dut.tx.value) == 1, "tx: stop bit is 0"
            with lock:
                b = corrupt_tx(b)
            pty.device.write(bytes([b]))

    cocotb.start_soon(to_pins())
    cocotb.start_soon(from_pins())
    thread = threading.Thread(target=host, name="host-driver", daemon=True)
    thread.start()
    while not state["done"]:
        await Timer(2000 * CLK_NS, unit="ns")
    thread.join(timeout=5)
    pty.close()
    with open(os.environ["SKIPCONV_BOARDS_OUT"], "wb") as f:
        pickle.dump({"steps": results, "error": state["error"]}, f)
    assert state["error"] is None, state["error"]
