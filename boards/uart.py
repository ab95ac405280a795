"""8N1 UART receiver and transmitter, and the board's UART bridge to the engine.

:class:`UARTRx` and :class:`UARTTx` move bytes between a pin and a byte stream at a fixed
number of clocks per bit. :class:`UARTBridge` joins them with the frame bridge
(:class:`skipconv.boards.framer.FrameBridge`): the device side of the byte-link framing of
docs/protocol.md, between the UART pins and the engine's command and result streams.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

from .framer import FrameBridge, beat_layout

__all__ = ["UARTRx", "UARTTx", "UARTBridge", "divisor_for", "MIN_DIVISOR"]

#: Fewest clocks per bit: the receiver samples mid-bit and needs a few clocks of slack.
MIN_DIVISOR = 4


def _check_divisor(divisor):
    if not isinstance(divisor, int) or isinstance(divisor, bool) or divisor < MIN_DIVISOR:
        raise ValueError(f"UART divisor (clocks per bit) must be an integer >= {MIN_DIVISOR}, "
                         f"not {divisor!r}")


def divisor_for(clk_hz: float, baud: int) -> int:
    """Return clocks per bit for ``baud`` at ``clk_hz``; refuse a rate off by more than 2%."""
    if baud <= 0:
        raise ValueError(f"UART baud rate must be > 0, not {baud!r}")
    divisor = round(clk_hz / baud)
    _check_divisor(divisor)
    error = abs(clk_hz / divisor - baud) / baud
    if error > 0.02:
        raise ValueError(f"UART baud rate {baud} is {error:.1%} off at {clk_hz / 1e6:g} MHz "
                         f"(divisor {divisor}); choose a rate closer to a divisor of the clock")
    return divisor


class UARTRx(wiring.Component):
    """8N1 receiver: samples each bit in its middle, after a two-flop synchronizer.

    A byte whose stop bit is 0 (a break or line noise) is dropped and counted in
    ``framing_errors``. A byte completed while the previous one still waits is dropped
    (``overruns``): the consumer must keep up, which the frame bridge does by design.

    Members
    -------
    rx : In(1)
        The pin (idle high).
    o : Out(stream.Signature(8))
        Received bytes.
    framing_errors, overruns : Out(16)
        Saturating counts of dropped bytes, for debugging on a board.
    """

    def __init__(self, divisor: int):
        _check_divisor(divisor)
        self._divisor = divisor
        super().__init__({
            "rx": In(1, init=1),
            "o": Out(stream.Signature(8)),
            "framing_errors": Out(16),
            "overruns": Out(16),
        })

    @property
    def divisor(self) -> int:
        """Clocks per bit."""
        return self._divisor

    def elaborate(self, platform):
        m = Module()
        div = self._divisor
        rx = Signal(init=1)
        m.submodules.sync_rx = FFSynchronizer(self.rx, rx, init=1)

        timer = Signal(range(div))
        bit = Signal(range(8))
        shreg = Signal(8)

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~rx):
                    m.d.sync += timer.eq(div // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                # Check the start bit in its middle, to reject glitches; from there on every
                # sample falls in the middle of a bit.
                with m.If(timer == 0):
                    with m.If(rx):
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [timer.eq(div - 1), bit.eq(0)]
                        m.next = "DATA"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("DATA"):
                with m.If(timer == 0):
                    m.d.sync += [shreg.eq(Cat(shreg[1:], rx)), timer.eq(div - 1),
                                 bit.eq(bit + 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("STOP"):
                with m.If(timer == 0):
                    with m.If(~rx):
                        m.d.sync += self.framing_errors.eq(
                            self.framing_errors + (self.framing_errors != 0xFFFF))
                    with m.Elif(self.o.valid & ~self.o.ready):
                        m.d.sync += self.overruns.eq(self.overruns + (self.overruns != 0xFFFF))
                    with m.Else():
                        m.d.sync += [self.o.payload.eq(shreg), self.o.valid.eq(1)]
                    # Back to IDLE mid-stop-bit: the next start edge may come half a bit later.
                    m.next = "IDLE"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
        return m


class UARTTx(wiring.Component):
    """8N1 transmitter.

    Members
    -------
    i : In(stream.Signature(8))
        Bytes to send; one is taken whenever the line is free.
    tx : Out(1)
        The pin (idle high).
    """

    def __init__(self, divisor: int):
        _check_divisor(divisor)
        self._divisor = divisor
        super().__init__({
            "i": In(stream.Signature(8)),
            "tx": Out(1, init=1),
        })

    @property
    def divisor(self) -> int:
        """Clocks per bit."""
        return self._divisor

    def elaborate(self, platform):
        m = Module()
        div = self._divisor
        timer = Signal(range(div))
        bits = Signal(range(11))     # bits left of the current character, start and stop included
        shreg = Signal(10, init=0x3FF)

        m.d.comb += self.tx.eq(shreg[0])
        with m.If(bits == 0):
            m.d.comb += self.i.ready.eq(1)
            with m.If(self.i.valid):
                # stop bit (1), data LSB first, start bit (0)
                m.d.sync += [shreg.eq((1 << 9) | (self.i.payload << 1)),
                             bits.eq(10), timer.eq(div - 1)]
        with m.Elif(timer == 0):
            m.d.sync += [shreg.eq((shreg >> 1) | (1 << 9)), bits.eq(bits - 1),
                         timer.eq(div - 1)]
        with m.Else():
            m.d.sync += timer.eq(timer - 1)
        return m


class UARTBridge(wiring.Component):
    """UART pins to and from the engine's streams, framed and CRC-checked (docs/protocol.md).

    Parameters
    ----------
    divisor : int
        Clocks per UART bit.
    bus_bits : int
        Width of the engine's stream data (``EngineConfig.bus_bits``).
    byte_timeout : int
        Clocks without a byte after which a partial host frame is dropped (NAK, timeout).

    Members
    -------
    rx : In(1), tx : Out(1)
        The UART pins.
    cmd : Out(stream.Signature(beat_layout(bus_bits)))
        Command beats to the engine.
    res : In(stream.Signature(beat_layout(bus_bits)))
        Result beats from the engine.
    link_error : Out(1)
        Pulses when a host frame is dropped (bad CRC, length or timeout).
    """

    def __init__(self, divisor: int, bus_bits: int, byte_timeout: int):
        _check_divisor(divisor)
        self._divisor = divisor
        self._bus_bits = bus_bits
        self._byte_timeout = byte_timeout
        layout = beat_layout(bus_bits)
        super().__init__({
            "rx": In(1, init=1),
            "tx": Out(1, init=1),
            "cmd": Out(stream.Signature(layout)),
            "res": In(stream.Signature(layout)),
            "link_error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.urx = urx = UARTRx(self._divisor)
        m.submodules.utx = utx = UARTTx(self._divisor)
        m.submodules.framer = framer = FrameBridge(self._bus_bits, self._byte_timeout)
        m.d.comb += [urx.rx.eq(self.rx), self.tx.eq(utx.tx),
                     self.link_error.eq(framer.link_error)]
        wiring.connect(m, uart_rx=urx.o, framer_rx=framer.rx_byte)
        wiring.connect(m, framer_tx=framer.tx_byte, uart_tx=utx.i)
        wiring.connect(m, wiring.flipped(self.cmd), framer.cmd)
        wiring.connect(m, wiring.flipped(self.res), framer.res)
        return m
