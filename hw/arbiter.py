"""Round-robin choice of one requester among many (no ``lib.coding``: deprecated in 0.5)."""

from __future__ import annotations

from amaranth import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["RoundRobin"]


class RoundRobin(wiring.Component):
    """Grant the first requester after the last one granted (wrapping around).

    Members
    -------
    req : In(n)
    grant : Out(n)
        One-hot (or zero when nobody asks), combinational.
    index : Out(range(n))
        Index of the granted requester.
    advance : In(1)
        The grant was used this cycle: remember it for fairness.
    """

    def __init__(self, n: int):
        self._n = n
        super().__init__({"req": In(n), "grant": Out(n), "index": Out(range(max(2, n))),
                          "valid": Out(1), "advance": In(1)})

    def elaborate(self, platform):
        m = Module()
        n = self._n
        last = Signal(range(max(2, n)))
        after = Signal(n)
        # bit 0 can never come after the last grant
        m.d.comb += after.eq(Cat(0, *[(self.req[i] & (i > last)) for i in range(1, n)]))
        pick = Signal(n)
        # lowest set bit of `after`, else of `req`
        src = Signal(n)
        m.d.comb += src.eq(self.req)
        with m.If(after.any()):
            m.d.comb += src.eq(after)
        for i in reversed(range(n)):
            with m.If(src[i]):
                m.d.comb += [pick.eq(1 << i), self.index.eq(i)]
        m.d.comb += [self.grant.eq(pick), self.valid.eq(self.req.any())]
        with m.If(self.advance & self.valid):
            m.d.sync += last.eq(self.index)
        return m
