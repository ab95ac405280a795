"""The dispatcher: hands out work units (one channel, one tile) to the PEs that ask."""

from __future__ import annotations

from amaranth import Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .arbiter import RoundRobin
from .layouts import layer_layout, param_layout, unit_layout
from .params import HwParams

__all__ = ["Dispatcher"]


class Dispatcher(wiring.Component):
    """Walk the layer's units in (channel, tile row, tile column) order, one per cycle at most.

    A unit is a ``p x p`` window when the layer uses zero prediction, else ``1 x UNIT_WIDTH``
    positions of one row. All sizes are advanced incrementally by the tile steps the loader
    multiplied out (``layer_layout``): no multiplier here.

    Members
    -------
    start : In(1)
        Pulse: begin the layer in ``layer``.
    layer : In(layer_layout)
    prm_addr : Out(channel)
    prm_data : In(param_layout)
        Synchronous read port of the parameter memory.
    req : In(lanes)
        PEs asking for a unit (each from a register in its PE).
    grant : Out(lanes)
        One-hot: this PE takes ``unit`` this cycle. Registered, with ``unit``: a cycle
        after the request it answers (the arbiter and the unit's adders would otherwise sit
        in front of every PE's slot memory).
    unit : Out(unit_layout)
    done : Out(1)
        Every unit of the layer has been handed out (low from ``start``).
    """

    def __init__(self, hp: HwParams):
        self._hp = hp
        super().__init__({
            "start": In(1), "layer": In(layer_layout(hp)),
            "prm_addr": Out(hp.c_bits), "prm_data": In(param_layout(hp)),
            "req": In(hp.lanes), "grant": Out(hp.lanes),
            "unit": Out(unit_layout(hp)), "done": Out(1, init=1),
        })

    def elaborate(self, platform):
        m = Module()
        hp = self._hp
        L = self.layer
        m.submodules.rr = rr = RoundRobin(hp.lanes)

        zp = Signal()
        th = Signal(4)
        tw = Signal(4)

        c = Signal(hp.cout_bits)
        y0 = Signal(hp.dim_bits + 4)
        x0 = Signal(hp.dim_bits + 4)
        x0s = Signal(hp.dim_bits + 8)              # x0 * S, kept by addition
        chbase = Signal(hp.ofn_bits + 1)
        rowaddr = Signal(hp.ofn_bits + 4)
        row_iy0 = Signal(signed(hp.coord_bits + 1))
        row_base = Signal(signed(hp.base_bits + 1))
        wbase = Signal(hp.row_bits + 1)
        widx = Signal(hp.ofn_bits + 1)

        u = Signal(unit_layout(hp))                 # the next unit, registered on a grant
        m.d.sync += self.grant.eq(0)
        with m.If(rr.valid):
            m.d.sync += [self.grant.eq(rr.grant), self.unit.eq(u)]
        m.d.comb += [
            u.c.eq(c), u.stop0.eq(self.prm_data.stop0),
            u.wbase.eq(wbase), u.widx.eq(widx),
            u.oaddr.eq(rowaddr + x0), u.iy0.eq(row_iy0),
            u.ix0.eq(x0s - L.pad), u.base.eq(row_base + x0s),
            u.hmax.eq(Mux(L.ho - y0 < th, L.ho - y0, th)),
            u.wmax.eq(Mux(L.wo - x0 < tw, L.wo - x0, tw)),
            self.prm_addr.eq(c),
        ]

        with m.FSM(name="dispatch"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [self.done.eq(0), zp.eq(L.p != 0)]
                    m.next = "SETUP"
            with m.State("SETUP"):
                m.d.sync += [
                    th.eq(Mux(zp, L.p, 1)), tw.eq(Mux(zp, L.p, hp.unit_width)),
                    c.eq(0), y0.eq(0), x0.eq(0), x0s.eq(0), chbase.eq(0), rowaddr.eq(0),
                    wbase.eq(0),
                    widx.eq(0), row_iy0.eq(-L.pad), row_base.eq(-L.pad_off),
                ]
                m.next = "FETCH"
            with m.State("FETCH"):          # parameter read of channel c
                m.next = "GEN"
            with m.State("GEN"):
                m.d.comb += [rr.req.eq(self.req), rr.advance.eq(1)]
                with m.If(rr.valid):
                    m.d.sync += widx.eq(widx + 1)
                    with m.If(x0 + tw < L.wo):
                        m.d.sync += [x0.eq(x0 + tw), x0s.eq(x0s + L.tile_dx)]
                    with m.Else():
                        m.d.sync += [x0.eq(0), x0s.eq(0)]
                        with m.If(y0 + th < L.ho):
                            m.d.sync += [y0.eq(y0 + th), rowaddr.eq(rowaddr + L.tile_dout),
                                         row_iy0.eq(row_iy0 + L.tile_dy),
                                         row_base.eq(row_base + L.tile_dbase)]
                        with m.Else():
                            m.d.sync += [y0.eq(0), c.eq(c + 1), chbase.eq(chbase + L.howo),
                                         rowaddr.eq(chbase + L.howo), row_iy0.eq(-L.pad),
                                         row_base.eq(-L.pad_off), wbase.eq(wbase + L.rows)]
                            with m.If(c + 1 == L.cout):
                                m.d.sync += self.done.eq(1)
                                m.next = "IDLE"
                            with m.Else():
                                m.next = "FETCH"
        return m
