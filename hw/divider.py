"""A small sequential unsigned divider (one quotient bit per cycle)."""

from __future__ import annotations

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Divider"]


class Divider(wiring.Component):
    """Compute ``num // den`` in ``width`` cycles after ``start``.

    Used at load time only (output sizes), so a restoring divider is small and fast enough.

    Members
    -------
    start : In(1)
        Pulse: latch ``num`` and ``den`` and begin.
    num, den : In(width)
    quotient : Out(width)
    done : Out(1)
        High from the end of the division until the next ``start``; ``den == 0`` gives an
        all-ones quotient (callers check ``den`` first).
    """

    def __init__(self, width: int):
        self._w = width
        super().__init__({
            "start": In(1), "num": In(width), "den": In(width),
            "quotient": Out(width), "done": Out(1, init=1),
        })

    def elaborate(self, platform):
        m = Module()
        w = self._w
        rem = Signal(w + 1)
        num = Signal(w)
        den = Signal(w)
        count = Signal(range(w + 1))
        with m.If(self.start):
            m.d.sync += [num.eq(self.num), den.eq(self.den), rem.eq(0), count.eq(w),
                         self.done.eq(0), self.quotient.eq(0)]
        with m.Elif(count != 0):
            trial = Signal(w + 1)
            m.d.comb += trial.eq((rem << 1) | num[w - 1])
            m.d.sync += [num.eq(num << 1), count.eq(count - 1)]
            with m.If(trial >= den):
                m.d.sync += [rem.eq(trial - den), self.quotient.eq((self.quotient << 1) | 1)]
            with m.Else():
                m.d.sync += [rem.eq(trial), self.quotient.eq(self.quotient << 1)]
            with m.If(count == 1):
                m.d.sync += self.done.eq(1)
        return m
