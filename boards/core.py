"""The part of a UART board top that is the same on every board: bridge plus engine.

:class:`UARTEngine` has only the UART pins and the status lines as ports, so the very
gateware that goes on a board is what the cocotb bench drives bit by bit
(``tests/test_boards_ulx3s_uart.py``); the board tops add the PLL, reset and pin buffers.
"""

from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..hw.engine import Engine
from ..sw.config import EngineConfig
from .uart import UARTBridge

__all__ = ["UARTEngine", "byte_timeout_clocks"]


def byte_timeout_clocks(divisor: int, byte_times: int = 64) -> int:
    """Byte timeout of the frame bridge: ``byte_times`` characters (10 bits each) of silence."""
    return max(16, divisor * 10 * byte_times)


class UARTEngine(wiring.Component):
    """An engine behind a framed UART link (docs/protocol.md).

    Parameters
    ----------
    config : EngineConfig
    divisor : int
        Clocks per UART bit.
    byte_timeout : int or None
        Clocks of line silence that drop a partial frame (default: 64 character times).
    lut_ram : bool
        The FPGA has distributed RAM (``False`` on iCE40: small memories go to block RAM).

    Members
    -------
    rx : In(1), tx : Out(1)
        UART pins (idle high).
    busy, error : Out(1)
        The engine's status (LEDs).
    link_error : Out(1)
        Pulses when a host frame is dropped (stretch it for an LED).
    """

    def __init__(self, config: EngineConfig, divisor: int, byte_timeout: int | None = None,
                 *, lut_ram: bool = True):
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, not {config!r}")
        self._config = config
        self._divisor = divisor
        self._byte_timeout = byte_timeout or byte_timeout_clocks(divisor)
        self._lut_ram = lut_ram
        super().__init__({
            "rx": In(1, init=1), "tx": Out(1, init=1),
            "busy": Out(1), "error": Out(1), "link_error": Out(1),
        })

    @property
    def config(self) -> EngineConfig:
        return self._config

    def elaborate(self, platform):
        m = Module()
        m.submodules.bridge = bridge = UARTBridge(self._divisor, self._config.bus_bits,
                                                  self._byte_timeout)
        m.submodules.engine = engine = Engine(self._config, lut_ram=self._lut_ram)
        m.d.comb += [
            bridge.rx.eq(self.rx), self.tx.eq(bridge.tx), self.link_error.eq(bridge.link_error),
            engine.s_axis_tdata.eq(bridge.cmd.payload.data),
            engine.s_axis_tlast.eq(bridge.cmd.payload.last),
            engine.s_axis_tvalid.eq(bridge.cmd.valid),
            bridge.cmd.ready.eq(engine.s_axis_tready),
            bridge.res.payload.data.eq(engine.m_axis_tdata),
            bridge.res.payload.last.eq(engine.m_axis_tlast),
            bridge.res.valid.eq(engine.m_axis_tvalid),
            engine.m_axis_tready.eq(bridge.res.ready),
            self.busy.eq(engine.busy), self.error.eq(engine.error),
        ]
        return m
