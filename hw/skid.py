"""A registered stream stage (skid buffer): cuts the valid, payload and ready paths."""

from __future__ import annotations

from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["SkidBuffer"]


class SkidBuffer(wiring.Component):
    """Pass a stream through with every output registered, at one transfer per cycle.

    ``i.ready`` comes from a register too, so no combinational path crosses the stage in
    either direction (the loader's checks and the sender's handshake are timed apart). While
    ``o`` stalls, the one word accepted in the meantime waits in the skid register.

    Members
    -------
    i : In(stream of ``shape``)
    o : Out(stream of ``shape``)
    """

    def __init__(self, shape):
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})

    def elaborate(self, platform):
        m = Module()
        skid = Signal.like(self.i.payload)
        skid_valid = Signal()
        m.d.comb += self.i.ready.eq(~skid_valid)
        with m.If(self.o.ready | ~self.o.valid):
            # the output register is free: take the skid word first, else the input
            m.d.sync += [self.o.valid.eq(skid_valid | self.i.valid), skid_valid.eq(0)]
            with m.If(skid_valid):
                m.d.sync += self.o.payload.eq(skid)
            with m.Else():
                m.d.sync += self.o.payload.eq(self.i.payload)
        with m.Elif(self.i.valid & ~skid_valid):
            m.d.sync += [skid.eq(self.i.payload), skid_valid.eq(1)]
        return m
