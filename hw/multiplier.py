"""A small sequential unsigned multiplier (shift and add, one bit of ``b`` per cycle)."""

from __future__ import annotations

from amaranth import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Multiplier"]


class Multiplier(wiring.Component):
    """Compute ``a * b`` in ``b_width`` cycles after ``start``.

    The loader's header products (H*W, Cin*H*W, Cout*Ho*Wo, Cin*K*K, Cout*T) are needed once
    per layer, so one shift-and-add unit replaces a dozen wide combinational multipliers: no
    DSP, a short carry chain, and no multiplier between the command stream and a check.

    Members
    -------
    start : In(1)
        Latch ``a`` and ``b`` at this clock edge and begin (``done`` falls at the same edge).
    a : In(a_width), b : In(b_width)
    product : Out(a_width + b_width)
    done : Out(1)
        High from the end of the product until the next ``start``.
    """

    def __init__(self, a_width: int, b_width: int):
        self._aw, self._bw = a_width, b_width
        super().__init__({
            "start": In(1), "a": In(a_width), "b": In(b_width),
            "product": Out(a_width + b_width), "done": Out(1, init=1),
        })

    def elaborate(self, platform):
        m = Module()
        aw, bw = self._aw, self._bw
        a = Signal(aw)
        b = Signal(bw)
        count = Signal(range(bw + 1))
        with m.If(self.start):
            m.d.sync += [a.eq(self.a), b.eq(self.b), count.eq(bw), self.product.eq(0),
                         self.done.eq(0)]
        with m.Elif(count != 0):
            # LSB first: add a * b[i] into the top of the product, shift it right (an adder
            # only as wide as ``a``).
            top = Signal(aw + 1)
            m.d.comb += top.eq(self.product[bw:] + (a & b[0].replicate(aw)))
            m.d.sync += [self.product.eq(Cat(self.product[1:bw], top)), b.eq(b >> 1),
                         count.eq(count - 1)]
            with m.If(count == 1):
                m.d.sync += self.done.eq(1)
        return m
