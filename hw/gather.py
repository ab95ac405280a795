"""Many streams into one, round-robin, in a tree whose levels are registered."""

from __future__ import annotations

from amaranth import Cat, Module
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arbiter import RoundRobin
from .skid import SkidBuffer

__all__ = ["Gather", "gathered_layout"]


def gathered_layout(shape, n: int) -> data.StructLayout:
    """A gathered word: the payload and the index of the stream it came from."""
    return data.StructLayout({"data": shape, "lane": range(max(2, n))})


def _merge(m, name, inputs, out, lane_of):
    """Round-robin ``inputs`` into ``out``; ``lane_of(k, payload)`` is the ``lane`` that
    input ``k``'s word carries on."""
    n = len(inputs)
    m.submodules[name] = rr = RoundRobin(n)
    for k, s in enumerate(inputs):
        m.d.comb += [rr.req[k].eq(s.valid), s.ready.eq(rr.grant[k] & out.ready)]
    m.d.comb += [rr.advance.eq(out.ready), out.valid.eq(rr.valid)]
    for k, s in enumerate(inputs):
        with m.If(rr.index == k):
            data_, lane = lane_of(k, s.payload)
            m.d.comb += [out.payload.data.eq(data_), out.payload.lane.eq(lane)]


class Gather(wiring.Component):
    """Merge ``n`` streams into one, each word tagged with its stream's index.

    Up to ``fan`` streams share one combinational round-robin. More are split into groups of
    ``fan``, each group's choice registered (a skid buffer, so that neither the grant nor the
    payload crosses two arbiters in one cycle), and the groups merged by another round-robin.
    Eight lanes in one arbiter were the critical path of the ECP5 build: the grant over eight
    requests and the eight-way payload multiplexer in series.

    Members
    -------
    i : In(stream of ``shape``).array(n)
    o : Out(stream of :func:`gathered_layout`)
        Combinational from the last level's arbiter: register it at the consumer.
    busy : Out(1)
        A word is held inside (in a group's register).
    """

    def __init__(self, shape, n: int, fan: int):
        if n < 1 or fan < 2:
            raise ValueError(f"Gather needs n >= 1 and fan >= 2, not n={n}, fan={fan}")
        self._shape, self._n, self._fan = shape, n, fan
        super().__init__({"i": In(stream.Signature(shape)).array(n),
                          "o": Out(stream.Signature(gathered_layout(shape, n))),
                          "busy": Out(1)})

    def elaborate(self, platform):
        m = Module()
        n, fan = self._n, self._fan
        if n <= fan:
            _merge(m, "rr", list(self.i), self.o, lambda k, p: (p, k))
            m.d.comb += self.busy.eq(0)
            return m
        starts = range(0, n, fan)
        held = []
        for g, lo in enumerate(starts):
            lanes = range(lo, min(lo + fan, n))
            m.submodules[f"group{g}"] = reg = SkidBuffer(gathered_layout(self._shape, len(lanes)))
            _merge(m, f"rr{g}", [self.i[k] for k in lanes], reg.i, lambda k, p: (p, k))
            held.append(reg.o)
        # a group's word: its lane is the group's first lane plus its index within the group
        _merge(m, "rr_top", held, self.o, lambda g, p: (p.data, starts[g] + p.lane))
        m.d.comb += self.busy.eq(Cat(*[h.valid for h in held]).any())
        return m
