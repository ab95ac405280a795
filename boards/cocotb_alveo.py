"""cocotb bench of the Alveo kernel: card memory is a cocotbext-axi ``AxiRam``, the host an
``AxiLiteMaster`` on the control port, as XRT would drive them.

The job (``$SKIPCONV_BOARDS_JOB``, see :func:`skipconv.boards.simbuild.run_cocotb`) is a dict:
``config`` (EngineConfig dict) and ``runs``: a list of ``{"name", "cmd": bytes}`` command
buffers. For each run the bench writes the buffer, sets the arguments, starts the kernel,
waits for ``ap_done`` (bounded: a kernel that never finishes fails the test) and returns the
result words; the pytest side decodes them and compares with the golden model.
"""

from __future__ import annotations

import os
import pickle

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiRam

from .alveo import REGISTERS

CMD_ADDR = 0x1000
RES_ADDR = 0x40000
RAM_BYTES = 1 << 20


def _reg(name):
    return REGISTERS[name][0]


@cocotb.test()
async def run_kernel(dut):
    job = pickle.loads(open(os.environ["SKIPCONV_BOARDS_JOB"], "rb").read())
    Clock(dut.ap_clk, 4, unit="ns").start()
    ram = AxiRam(AxiBus.from_prefix(dut, "m_axi_gmem"), dut.ap_clk, dut.ap_rst_n,
                 reset_active_level=False, size=RAM_BYTES)
    ctl = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), dut.ap_clk,
                        dut.ap_rst_n, reset_active_level=False)
    dut.ap_rst_n.value = 0
    await ClockCycles(dut.ap_clk, 8)
    dut.ap_rst_n.value = 1
    await ClockCycles(dut.ap_clk, 2)

    async def wr(name, value):
        await ctl.write_dword(_reg(name), value & 0xFFFFFFFF)

    async def rd(name):
        return await ctl.read_dword(_reg(name))

    ctrl = await rd("ap_ctrl")
    assert ctrl & 0x4, f"kernel not idle after reset (ap_ctrl = {ctrl:#x})"
    outputs = []
    for run in job["runs"]:
        cmd = run["cmd"]
        capacity = run.get("res_capacity", (RAM_BYTES - RES_ADDR) // 4 - 1)
        ram.write(CMD_ADDR, cmd)
        ram.write(RES_ADDR, b"\xAA" * 64)      # stale data the kernel must overwrite
        await wr("cmd", CMD_ADDR)
        await wr("cmd_words", len(cmd) // 4)
        await ctl.write_dword(_reg("cmd") + 4, 0)
        await wr("res", RES_ADDR)
        await ctl.write_dword(_reg("res") + 4, 0)
        await wr("res_capacity", capacity)
        await wr("ap_ctrl", 1)
        cycles = 0
        limit = run.get("max_cycles", 2_000_000)
        while True:
            await ClockCycles(dut.ap_clk, 64)
            cycles += 64
            ctrl = await rd("ap_ctrl")
            if ctrl & 0x2:
                break
            assert cycles < limit, f"run {run['name']}: no ap_done after {cycles} cycles"
        assert ctrl & 0x4, f"run {run['name']}: done but not idle (ap_ctrl = {ctrl:#x})"
        count = int.from_bytes(ram.read(RES_ADDR, 4), "little")
        n = count & 0x7FFFFFFF
        data = ram.read(RES_ADDR + 4, 4 * n)
        outputs.append({"name": run["name"], "count": count, "res": data,
                        "res_words": await rd("res_words"), "status": await rd("status"),
                        "commands": await rd("commands"), "cycles": cycles})
        dut._log.info("run %s: %d result words in ~%d cycles", run["name"], n, cycles)
    with open(os.environ["SKIPCONV_BOARDS_OUT"], "wb") as f:
        pickle.dump(outputs, f)
    await RisingEdge(dut.ap_clk)
