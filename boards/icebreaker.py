"""iCEBreaker (iCE40 UP5K) top: PLL from the 12 MHz oscillator, the engine behind the FTDI UART.

LEDs (active low on the board, inverted by the platform): red = error (the last command was
refused, or a host frame was dropped, held about 0.1 s), green = busy.
"""

from __future__ import annotations

from amaranth.hdl import ClockDomain, Elaboratable, Module, Signal
from amaranth.lib import io
from amaranth.lib.cdc import ResetSynchronizer

from ..sw.config import EngineConfig
from .core import UARTEngine
from .pll import ice40_pll
from .uart import divisor_for
from .ulx3s import output, stretch

__all__ = ["ICEBreakerTop", "OSC_HZ"]

OSC_HZ = 12e6


class ICEBreakerTop(Elaboratable):
    """The engine for ``config`` on an iCEBreaker, clocked at ``clk_hz`` from the PLL."""

    def __init__(self, config: EngineConfig, clk_hz: float = 24e6, baud: int = 115200):
        self.config = config
        self.pll = ice40_pll(OSC_HZ, clk_hz)
        self.clk_hz = self.pll.f_out
        self.divisor = divisor_for(self.clk_hz, baud)

    def elaborate(self, platform):
        m = Module()
        clk12 = platform.request("clk12", 0, dir="-")
        m.domains.sync = cd = ClockDomain("sync")
        locked = Signal()
        # The PLL takes the oscillator straight from its pad (pin 35 feeds the PLL).
        m.submodules.pll = self.pll.instance(clk12.io, cd.clk, locked)
        platform.add_clock_constraint(cd.clk, self.clk_hz)
        m.submodules.reset_sync = ResetSynchronizer(~locked, domain="sync")

        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx = rx = io.Buffer("i", uart.rx)
        m.submodules.uart_tx = tx = io.Buffer("o", uart.tx)

        # iCE40 has no LUT RAM: small memories and FIFOs go to block RAM, not flip-flops
        m.submodules.core = core = UARTEngine(self.config, self.divisor, lut_ram=False)
        m.d.comb += [core.rx.eq(rx.i), tx.o.eq(core.tx)]
        link = stretch(m, core.link_error, int(self.clk_hz // 10))
        output(m, platform, "led_r", 0, core.error | link)
        output(m, platform, "led_g", 0, core.busy)
        return m
