"""The writer: one result per cycle from the PEs, requantized into the ofmap buffer."""

from __future__ import annotations

from amaranth import Cat, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .compare import gt_const
from .gather import Gather
from .layouts import layer_layout, ofmap_layout, param_layout, result_layout, write_bus
from .params import HwParams

__all__ = ["Writer"]

INT32_MAX = (1 << 31) - 1


def shift_right_window(m, x, amount, keep: int):
    """``(x >> amount)[:keep]``, and whether any bit of ``x >> amount`` above those is set.

    A logarithmic shifter, largest step first, that keeps only the bits the smaller steps can
    still bring into the window; bits beyond them will end above it, and are OR-ed into the
    flag at each step.
    """
    bits = x
    above = []
    for k in reversed(range(len(amount))):
        step = 1 << k
        y = Signal(len(bits), name=f"shr_step{k}")
        m.d.comb += y.eq(Mux(amount[k], bits >> step, bits))
        need = keep + step - 1          # the later steps shift by step - 1 at most
        if len(y) > need:
            above.append(y[need:].any())
            y = y[:need]
        bits = y
    lo = Signal(keep, name="shr_lo")
    flag = Signal(name="shr_above")
    m.d.comb += [lo.eq(bits), flag.eq(Cat(*above).any() if above else 0)]
    return lo, flag


class Writer(wiring.Component):
    """Gathers the PEs' result streams round-robin; ``q(acc)`` (or raw) into the ofmap buffer.

    Pipeline: choose (registered); read the channel's ``M``/``sh``; register them; multiply
    (registered); round and shift (registered); clamp; write. Window decisions go to the
    window-flag memory. The requantized value of a leader is returned to its PE (``fb_*``):
    the window decision needs the *final* output.

    Members
    -------
    layer : In(layer_layout)
    results : In(stream of result_layout).array(lanes)
    prm_addr : Out(channel), prm_data : In(param_layout)
    ofmap, winflag : Out(write buses)
    fb_valid : Out(lanes), fb_slot, fb_nz : Out
    busy : Out(1)
    """

    def __init__(self, hp: HwParams):
        self._hp = hp
        super().__init__({
            "layer": In(layer_layout(hp)),
            "results": In(stream.Signature(result_layout(hp))).array(hp.lanes),
            "prm_addr": Out(hp.c_bits), "prm_data": In(param_layout(hp)),
            "ofmap": Out(write_bus(hp.ofa_bits, ofmap_layout(hp))),
            "winflag": Out(write_bus(hp.ofa_bits, 1)),
            "fb_valid": Out(hp.lanes), "fb_slot": Out(hp.slot_bits), "fb_nz": Out(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        hp = self._hp
        L = self.layer
        n = hp.lanes
        rl = result_layout(hp)
        m.submodules.gather = gather = Gather(rl, n, hp.gather_fan)
        for i in range(n):
            wiring.connect(m, wiring.flipped(self.results[i]), gather.i[i])
        m.d.comb += gather.o.ready.eq(1)

        # stage 0: the chosen result, registered before it addresses the parameter memory
        # (the arbiter and the lanes' payload mux would otherwise sit in front of it)
        vc = Signal()
        rc = Signal(rl)
        pec = Signal(range(max(2, n)))
        m.d.sync += [vc.eq(gather.o.valid), rc.eq(gather.o.payload.data),
                     pec.eq(gather.o.payload.lane)]
        m.d.comb += self.prm_addr.eq(rc.c)

        # stage 1: the channel's parameters arrive (registered: no memory output feeds the
        # multiplier); the bias joins the sum (the PEs sum products only)
        v0 = Signal()
        r0 = Signal(rl)
        pe0 = Signal.like(pec)
        m.d.sync += [v0.eq(vc), r0.eq(rc), pe0.eq(pec)]
        v1 = Signal()
        r1 = Signal(rl)
        pe1 = Signal.like(pe0)
        m1 = Signal(16)
        sh1 = Signal(6)
        m.d.sync += [v1.eq(v0), r1.eq(r0), r1.psum.eq(r0.psum + self.prm_data.bias),
                     pe1.eq(pe0), m1.eq(self.prm_data.m), sh1.eq(self.prm_data.sh)]

        # stage 2: multiply (registered) and the sign of the sum; a sum that is not positive
        # outputs 0 (stage 3), whatever its product
        v2 = Signal()
        r2 = Signal(rl)
        pe2 = Signal.like(pe0)
        prod = Signal(hp.acc_bits + 16)
        sh2 = Signal(6)
        raw2 = Signal(hp.value_bits)
        pos2 = Signal()
        m.d.sync += [v2.eq(v1), r2.eq(r1), pe2.eq(pe1), sh2.eq(sh1),
                     pos2.eq(gt_const(r1.psum, 0) & ~r1.fired),
                     prod.eq(r1.psum.as_unsigned() * m1),
                     raw2.eq(Mux(gt_const(r1.psum, INT32_MAX), INT32_MAX, r1.psum))]

        # stage 2: round and shift (registered)
        va = Signal()
        ra = Signal(rl)
        pea = Signal.like(pe1)
        rawa = Signal(hp.value_bits)
        posa = Signal()
        rnd = Signal(hp.acc_bits + 17)
        m.d.comb += rnd.eq(prod + ((Mux(sh2 != 0, 1, 0) << sh2) >> 1))
        # The clamp's bound 2**out_bits - 1 fits the config's out_bits (word 3 refuses more):
        # only those low bits of the shifted value and "any bit above them" are needed, a
        # shifter a third the size of the whole word's on iCE40.
        ob = hp.config.out_bits
        lo, above = shift_right_window(m, rnd, sh2, ob)
        scaled = Signal(ob)
        scaled_over = Signal()
        m.d.sync += [va.eq(v2), ra.eq(r2), pea.eq(pe2), rawa.eq(raw2), posa.eq(pos2),
                     scaled.eq(lo), scaled_over.eq(above)]

        # stage 3: clamp (or raw)
        v3 = Signal()
        r3 = Signal(rl)
        pe3 = Signal.like(pe1)
        val3 = Signal(hp.value_bits)
        top = Signal(17)
        m.d.comb += top.eq((1 << L.out_bits) - 1)
        q = Mux(scaled_over | (scaled > top), top, scaled)
        m.d.sync += [v3.eq(va), r3.eq(ra), pe3.eq(pea),
                     val3.eq(Mux(~posa, 0, Mux(L.raw, rawa, q)))]

        # stage 3: write
        m.d.comb += [
            self.ofmap.en.eq(v3 & ~r3.win), self.ofmap.addr.eq(r3.oaddr),
            self.ofmap.data.value.eq(val3),
            self.winflag.en.eq(v3 & r3.win), self.winflag.addr.eq(r3.oaddr),
            self.winflag.data.eq(r3.fired),
            self.fb_slot.eq(r3.slot), self.fb_nz.eq(val3 != 0),
        ]
        if "e" in ofmap_layout(hp).members:
            m.d.comb += self.ofmap.data.e.eq(r3.e)
        for i in range(n):
            m.d.comb += self.fb_valid[i].eq(v3 & ~r3.win & r3.leader & (pe3 == i))
        m.d.comb += self.busy.eq(gather.busy | vc | v0 | v1 | v2 | va | v3)
        return m
