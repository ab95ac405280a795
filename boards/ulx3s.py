"""ULX3S (ECP5 LFE5U-85F) top: PLL from the 25 MHz oscillator, the engine behind the FTDI UART.

LEDs: 0 busy, 1 error (the last command was refused), 2 link error (a host frame was dropped,
held for about 0.1 s), 7 PLL locked.
"""

from __future__ import annotations

from amaranth.hdl import ClockDomain, Elaboratable, Module, Signal
from amaranth.lib import io
from amaranth.lib.cdc import ResetSynchronizer

from ..sw.config import EngineConfig
from .core import UARTEngine
from .pll import ecp5_pll
from .uart import divisor_for

__all__ = ["ULX3STop", "OSC_HZ", "stretch"]

#: The board's oscillator.
OSC_HZ = 25e6


def stretch(m, pulse, clocks: int):
    """Return a signal that stays high ``clocks`` cycles after each ``pulse`` (for an LED)."""
    count = Signal(range(clocks + 1))
    with m.If(pulse):
        m.d.sync += count.eq(clocks)
    with m.Elif(count != 0):
        m.d.sync += count.eq(count - 1)
    return count != 0


def output(m, platform, name, number, value):
    """Drive the output resource ``name#number`` with ``value`` through an output buffer."""
    port = platform.request(name, number, dir="-")
    buf = io.Buffer("o", port)
    m.submodules[f"{name}_{number}"] = buf
    m.d.comb += buf.o.eq(value)


class ULX3STop(Elaboratable):
    """The engine for ``config`` on a ULX3S, clocked at ``clk_hz`` from the PLL."""

    def __init__(self, config: EngineConfig, clk_hz: float = 50e6, baud: int = 115200):
        self.config = config
        self.pll = ecp5_pll(OSC_HZ, clk_hz)
        self.clk_hz = self.pll.f_out
        self.divisor = divisor_for(self.clk_hz, baud)

    def elaborate(self, platform):
        m = Module()
        clk25 = platform.request("clk25", 0, dir="-")
        m.submodules.clk25_buf = clk_in = io.Buffer("i", clk25)
        m.domains.sync = cd = ClockDomain("sync")
        locked = Signal()
        m.submodules.pll = self.pll.instance(clk_in.i, cd.clk, locked)
        platform.add_clock_constraint(cd.clk, self.clk_hz)
        m.submodules.reset_sync = ResetSynchronizer(~locked, domain="sync")

        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx = rx = io.Buffer("i", uart.rx)
        m.submodules.uart_tx = tx = io.Buffer("o", uart.tx)

        m.submodules.core = core = UARTEngine(self.config, self.divisor)
        m.d.comb += [core.rx.eq(rx.i), tx.o.eq(core.tx)]
        output(m, platform, "led", 0, core.busy)
        output(m, platform, "led", 1, core.error)
        output(m, platform, "led", 2, stretch(m, core.link_error, int(self.clk_hz // 10)))
        output(m, platform, "led", 7, locked)
        return m
