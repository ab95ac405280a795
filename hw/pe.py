"""One processing element: a unit scanner feeding a barrel ring of independent positions.

The ring holds one context per pipeline stage (``HwParams.depth``: 7, or 5 on iCE40 without
the read-register stages); each cycle the context in
stage 0 checks early termination on its (up to date) partial sum, and either finishes
(handing its result to the writer and taking a new position in the same cycle) or issues its
next ``g`` taps. A stop therefore frees the PE at once and costs no pipeline bubbles.

The scanner walks the units (tiles or zero-prediction windows) the dispatcher gave this PE.
It issues the COMPUTE leaders of a window first, keeps scanning later windows, and decides a
window once all its leaders came back from the writer: a predicted window is recorded (its
followers never enter the ring), otherwise its followers are issued. CONST, COPY and
positions of a channel that stops at check point 0 are never issued.
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .fifo import LayoutFIFO
from .layouts import (kind_layout, layer_layout, ofmap_layout, ready_layout,
                      reader_param_layout, result_layout, unit_layout, weight_layout, write_bus)
from .memories import no_collision_memory, registered_read
from .params import READY_DEPTH, RESULT_DEPTH, HwParams

__all__ = ["PE", "context_layout"]

COMPUTE, CONST = 0, 1


def context_layout(hp: HwParams):
    """A position in flight in the ring."""
    fields = {
        "valid": 1, "issued": 1, "lv": hp.g,          # lanes holding a real tap this round
        "c": hp.c_bits, "oaddr": hp.ofa_bits, "psum": signed(hp.acc_bits), "e": hp.tap_bits,
        "wrow": hp.row_bits, "leader": 1, "slot": hp.slot_bits,
        "iy0": signed(hp.coord_bits), "ix0": signed(hp.coord_bits), "base": signed(hp.base_bits),
    }
    if hp.config.has("early_term"):
        # the last issued row's "only non-positive weights remain" (the ring is a loop of
        # registers: a field nobody reads is still never removed, so only where it is used)
        fields |= {"neg": 1}
    return data.StructLayout(fields)


class PE(wiring.Component):
    """A processing element with its own weight, ifmap and plan-kind replicas.

    Members
    -------
    layer : In(layer_layout)
    req : Out(1)
        Asks the dispatcher for a unit.
    grant : In(1)
        ``unit`` is this PE's this cycle.
    unit : In(unit_layout)
    wt, ifm, kind, prm : In(write buses)
        The loader's writes, shared by all replicas (``prm``: the channel's speculation point
        and threshold, looked up by channel in the ring; "only non-positive weights remain"
        comes with the weight rows).
    result : Out(stream of result_layout)
        Finished positions and window decisions, to the writer.
    fb_valid, fb_slot, fb_nz : In
        The writer's decision on one of this PE's leaders (requantized output nonzero).
    idle : Out(1)
        Nothing held or in flight.
    """

    def __init__(self, hp: HwParams):
        self._hp = hp
        c = hp.config
        lane_bits = max(1, (c.g - 1).bit_length())
        super().__init__({
            "layer": In(layer_layout(hp)),
            "req": Out(1), "grant": In(1), "unit": In(unit_layout(hp)),
            "wt": In(write_bus(hp.row_bits, weight_layout(hp), {"lane": lane_bits})),
            "ifm": In(write_bus(hp.ifa_bits, c.act_bits)),
            "kind": In(write_bus(hp.ofa_bits, kind_layout())),
            "prm": In(write_bus(hp.c_bits, reader_param_layout(hp, "pe"))),
            "result": Out(stream.Signature(result_layout(hp))),
            "fb_valid": In(1), "fb_slot": In(hp.slot_bits), "fb_nz": In(1),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        hp = self._hp
        cfg = hp.config
        g = cfg.g
        # The loader's writes and the layer's header, registered on arrival when there are
        # several PEs: the loader then drives one register per PE, not every block RAM and
        # compare of every replica across the device. (Both settle long before a run reads
        # them.) A single PE has no fan-out to cut.
        L, wt, ifm, kind, prm = self.layer, self.wt, self.ifm, self.kind, self.prm
        if hp.lanes > 1:
            L, wt, ifm, kind, prm = (Signal(v.shape(), name=f"arrived_{n}") for v, n in
                                     ((L, "layer"), (wt, "wt"), (ifm, "ifm"), (kind, "kind"),
                                      (prm, "prm")))
            m.d.sync += [L.eq(self.layer), wt.eq(self.wt), ifm.eq(self.ifm),
                         kind.eq(self.kind), prm.eq(self.prm)]
        NS = hp.slots
        D = hp.depth
        wl = weight_layout(hp)
        ew = wl.size

        # -- replicas ------------------------------------------------------------------------
        m.submodules.wmem = wmem = no_collision_memory(shape=ew * g, depth=hp.rows)
        w_wr = wmem.write_port(granularity=ew)
        w_rd = registered_read(m, wmem, "w_rd")
        m.d.comb += [w_wr.addr.eq(wt.addr),
                     w_wr.data.eq(Cat(*[wt.data for _ in range(g)]))]
        for j in range(g):
            m.d.comb += w_wr.en[j].eq(wt.en & (wt.lane == j))
        m.submodules.imem = imem = no_collision_memory(shape=cfg.act_bits, depth=cfg.max_ifmap)
        i_wr = imem.write_port()
        i_rd = [registered_read(m, imem, f"i_rd{j}") for j in range(g)]
        m.d.comb += [i_wr.addr.eq(ifm.addr), i_wr.data.eq(ifm.data),
                     i_wr.en.eq(ifm.en)]
        if hp.plan:
            m.submodules.kmem = kmem = no_collision_memory(shape=kind_layout(), depth=cfg.max_ofmap)
            k_wr = kmem.write_port()
            k_rd = registered_read(m, kmem, "k_rd")
            m.d.comb += [k_wr.addr.eq(kind.addr), k_wr.data.eq(kind.data),
                         k_wr.en.eq(kind.en)]

        if cfg.has("early_term"):
            m.submodules.pmem = pmem = no_collision_memory(shape=reader_param_layout(hp, "pe"),
                                                     depth=cfg.max_cout)
            # block RAM, not LUT RAM: on ECP5 spec and th take 11 DPR16X4 (22 LUT4) per PE
            # at 16 channels, or 2 DP16KD (docs/benchmarks.md, Boards)
            pmem.attrs["ram_style"] = "block"
            p_wr = pmem.write_port()
            p_rd = registered_read(m, pmem, "p_rd")
            m.d.comb += [p_wr.addr.eq(prm.addr), p_wr.data.eq(prm.data),
                         p_wr.en.eq(prm.en)]

        # Fields that are 0, or read by nobody, without their mechanism take no FIFO storage:
        # leaders, their slots and window decisions (zero prediction), fired (early
        # termination); the performed taps only where the ofmap buffer keeps them.
        zero = set() if cfg.has("zero_pred") else {"leader", "slot", "win"}
        if not cfg.has("early_term"):
            zero.add("fired")
        if "e" not in ofmap_layout(hp).members:
            zero.add("e")
        m.submodules.rq = rq = LayoutFIFO(ready_layout(hp), depth=READY_DEPTH,
                                          lut_ram=hp.lut_ram, zero=zero & {"leader", "slot"})
        m.submodules.res = res = LayoutFIFO(result_layout(hp), depth=RESULT_DEPTH,
                                            lut_ram=hp.lut_ram, zero=zero)
        m.d.comb += [self.result.valid.eq(res.r_rdy), self.result.payload.eq(res.r_data),
                     res.r_en.eq(self.result.ready)]
        res_in = Signal(result_layout(hp))
        m.d.comb += res.w_data.eq(res_in)

        zp = Signal()
        m.d.comb += zp.eq(L.p != 0)
        if not cfg.has("zero_pred"):
            zp = Const(0)
        et_on = Signal()
        pred = Signal()
        if cfg.has("early_term"):
            m.d.comb += [et_on.eq(L.et != 0), pred.eq(L.et == 2)]

        # -- unit slots (a FIFO of windows) --------------------------------------------------
        # A memory read asynchronously by slot index (LUT RAM on ECP5), not registers and a
        # wide multiplexer: a slot is never read in the cycle it is written (the scan reads a
        # slot before the tail, the window decision the head).
        m.submodules.slots = slots = Memory(shape=unit_layout(hp), depth=NS, init=[])
        slot_wr = slots.write_port()
        slot_rd = slots.read_port(domain="comb")
        # the window decision's index, read at the head: its own copy (one read port each)
        m.submodules.slot_widx = slot_widx = Memory(shape=hp.ofa_bits, depth=NS, init=[])
        widx_wr = slot_widx.write_port()
        widx_rd = slot_widx.read_port(domain="comb")
        # leaders in flight per slot: at most a whole p x p window
        out_shape = range(cfg.max_p ** 2 + 1)
        outstanding = [Signal(out_shape, name=f"slot{s}_out") for s in range(NS)]
        nz = [Signal(name=f"slot{s}_nz") for s in range(NS)]
        head = Signal(hp.slot_bits)
        count = Signal(range(NS + 1))
        nscan = Signal(range(NS + 1))
        tail = Signal(hp.slot_bits)
        m.d.comb += tail.eq(head + count)
        count_inc = Signal()
        count_dec = Signal()
        nscan_inc = Signal()
        nscan_dec = Signal()
        m.d.sync += [count.eq(count + count_inc - count_dec),
                     nscan.eq(nscan + nscan_inc - nscan_dec)]
        with m.If(count_dec):
            m.d.sync += head.eq(head + 1)

        # The request is registered (the dispatcher's round robin then starts from one
        # flip-flop per PE, not from every PE's slot counters: the routed lanes-8 critical path),
        # and so are the dispatcher's grant and unit. A request is answered in the cycle
        # after it or not at all, so a PE asks at most every other cycle and not while its
        # grant arrives: at most one unit is ever on its way, and never to a full PE.
        req = Signal()
        m.d.sync += req.eq((count < NS) & (nscan == count) & ~self.grant & ~req)
        m.d.comb += self.req.eq(req)

        # a granted unit goes to the tail slot; the window decision reads the head's index
        m.d.comb += [slot_wr.addr.eq(tail), slot_wr.data.eq(self.unit),
                     slot_wr.en.eq(self.grant), widx_wr.addr.eq(tail),
                     widx_wr.data.eq(self.unit.widx), widx_wr.en.eq(self.grant),
                     widx_rd.addr.eq(head)]
        with m.If(self.grant):
            m.d.comb += count_inc.eq(1)
            for s in range(NS):
                with m.If(tail == s):
                    m.d.sync += nz[s].eq(0)

        # -- scanner ---------------------------------------------------------------------------
        cur = Signal(unit_layout(hp))       # the unit being scanned
        cur_slot = Signal(hp.slot_bits)
        follow = Signal()                   # scanning followers (else leaders / everything)
        walking = Signal()
        dy = Signal(4)
        dx = Signal(4)
        p_oaddr = Signal(hp.ofa_bits)
        p_iy0 = Signal(signed(hp.coord_bits))  # the same along a row
        p_ix0 = Signal(signed(hp.coord_bits))
        p_base = Signal(signed(hp.base_bits))
        r_oaddr = Signal(hp.ofa_bits)       # row starts
        r_base = Signal(signed(hp.base_bits))
        scanning = Signal()                 # a scan is in progress (walking or draining)

        b_valid = Signal()                  # stage B: plan kind read
        b_pos = Signal(ready_layout(hp))
        b_follow = Signal()
        c_valid = Signal()                  # stage C: plan kind arrived
        c_pos = Signal(ready_layout(hp))
        c_follow = Signal()

        row_step = L.row_dbase                        # S * W, multiplied out by the loader
        credit = Signal()
        m.d.comb += credit.eq(rq.level + b_valid + c_valid < READY_DEPTH)
        advance = Signal()
        m.d.comb += advance.eq(walking & credit)
        if hp.plan:
            m.d.comb += k_rd.addr.eq(p_oaddr)
        m.d.sync += b_valid.eq(advance)
        with m.If(advance):
            m.d.sync += [
                b_follow.eq(follow),
                b_pos.c.eq(cur.c), b_pos.wbase.eq(cur.wbase),
                b_pos.oaddr.eq(p_oaddr), b_pos.iy0.eq(p_iy0), b_pos.ix0.eq(p_ix0),
                b_pos.base.eq(p_base), b_pos.slot.eq(cur_slot),
            ]
            with m.If(dx + 1 < cur.wmax):
                m.d.sync += [dx.eq(dx + 1), p_oaddr.eq(p_oaddr + 1),
                             p_ix0.eq(p_ix0 + L.stride), p_base.eq(p_base + L.stride)]
            with m.Else():
                m.d.sync += dx.eq(0)
                if cfg.has("zero_pred"):
                    # only a zero-prediction window spans several rows (the dispatcher's
                    # other units are one row): without it the row walk is not built
                    m.d.sync += [dy.eq(dy + 1),
                                 p_oaddr.eq(r_oaddr + L.wo), r_oaddr.eq(r_oaddr + L.wo),
                                 p_iy0.eq(p_iy0 + L.stride),
                                 p_ix0.eq(cur.ix0),
                                 p_base.eq(r_base + row_step), r_base.eq(r_base + row_step)]
                    with m.If(dy + 1 >= cur.hmax):
                        m.d.sync += walking.eq(0)
                else:
                    m.d.sync += walking.eq(0)

        # stage B: the plan kind is registered as it leaves the block RAM (its clock-to-out
        # would otherwise sit in front of the decision below: a routed lanes-8 critical path)
        kd = Signal(kind_layout())
        if hp.plan:
            m.d.sync += kd.eq(k_rd.data)
            with m.If(~L.has_plan):
                m.d.sync += kd.eq(0)
        m.d.sync += [c_valid.eq(b_valid), c_pos.eq(b_pos), c_follow.eq(b_follow)]

        # stage C: decide whether the position enters the ring
        is_leader = Signal()
        m.d.comb += is_leader.eq(zp & kd.leader)
        issue = Signal()
        m.d.comb += issue.eq(c_valid & (kd.kind == COMPUTE) & ~cur.stop0 &
                             Mux(zp, is_leader != c_follow, 1))
        rq_in = Signal(ready_layout(hp))
        m.d.comb += [rq_in.eq(c_pos), rq_in.leader.eq(is_leader)]
        m.d.comb += [rq.w_en.eq(issue), rq.w_data.eq(rq_in)]
        const_nz = Signal()
        m.d.comb += const_nz.eq(c_valid & zp & ~c_follow & is_leader & (kd.kind == CONST) &
                                kd.const_nz)

        # outstanding leaders and nonzero flags per slot
        for s in range(NS):
            inc = issue & is_leader & (c_pos.slot == s)
            dec = self.fb_valid & (self.fb_slot == s)
            m.d.sync += outstanding[s].eq(outstanding[s] + inc - dec)
            with m.If((const_nz & (c_pos.slot == s)) | (dec & self.fb_nz)):
                m.d.sync += nz[s].eq(1)
            with m.If(self.grant & (tail == s)):
                m.d.sync += outstanding[s].eq(0)

        head_out = Signal(out_shape)
        head_nz = Signal()
        for s in range(NS):
            with m.If(head == s):
                m.d.comb += [head_out.eq(outstanding[s]), head_nz.eq(nz[s])]

        win_push = Signal()
        ring_push = Signal()
        # A decided window waits here for a result FIFO slot the ring leaves free: the
        # decision then never waits on the ring's finishing context, which kept the ring's
        # turn-around (c0_end, ring_push) in front of the scanner's unit registers.
        win_pending = Signal()
        win_widx = Signal(hp.ofa_bits)
        win_fired = Signal()
        win_write = Signal()

        # A scan starts from one slot: the head's followers or the next unscanned unit's
        # leaders. A window decided to need its followers waits one cycle in ``fol_go``: the
        # scan's start and slot select then come from registers only, not from the decision
        # (outstanding leaders, nonzero flags) in front of every bit of ``cur``.
        scan_go = Signal()
        fol_go = Signal()
        scan_slot = Signal(hp.slot_bits)
        m.d.comb += scan_slot.eq(Mux(fol_go, head, head + nscan))
        m.d.comb += slot_rd.addr.eq(scan_slot)
        with m.If(scan_go):
            u = slot_rd.data
            m.d.sync += [cur.eq(u), p_oaddr.eq(u.oaddr), r_oaddr.eq(u.oaddr),
                         p_iy0.eq(u.iy0), p_ix0.eq(u.ix0),
                         p_base.eq(u.base), r_base.eq(u.base),
                         cur_slot.eq(scan_slot), follow.eq(fol_go), walking.eq(1),
                         scanning.eq(1), dx.eq(0), dy.eq(0)]

        with m.If(scanning):
            with m.If(~walking & ~b_valid & ~c_valid):
                m.d.sync += scanning.eq(0)
                with m.If(follow):
                    m.d.comb += [count_dec.eq(1), nscan_dec.eq(1)]
                with m.Else():
                    m.d.comb += nscan_inc.eq(1)
        with m.Elif(fol_go):
            m.d.comb += scan_go.eq(1)
            m.d.sync += fol_go.eq(0)
        with m.Else():
            # The next unit's leaders may start while the oldest unit is decided: its slot
            # index is absolute, so the head leaving in the same cycle does not move it.
            with m.If(nscan < count):
                m.d.comb += scan_go.eq(1)
            with m.If((nscan != 0) & (head_out == 0)):
                # the oldest unit is scanned and all its leaders are back: decide it
                with m.If(~zp):
                    m.d.comb += [count_dec.eq(1), nscan_dec.eq(1)]
                with m.Elif(~win_pending):
                    m.d.comb += [win_push.eq(1)]
                    with m.If(head_nz):
                        m.d.sync += fol_go.eq(1)
                    with m.Else():
                        m.d.comb += [count_dec.eq(1), nscan_dec.eq(1)]

        # -- the ring --------------------------------------------------------------------------
        cl = context_layout(hp)
        ctx = [Signal(cl, name=f"ctx{k}") for k in range(D)]
        c0 = ctx[0]
        T = L.taps
        # Stage 0's checks and its next tap count were decided in stage 6 (below), on the
        # up-to-date sum: stage 0 only selects, which keeps the ring's turn-around short.
        c0_fired = Signal()                 # semantics.md section 4 fires at this check
        c0_end = Signal()                   # every tap is done
        c0_enext = Signal(hp.tap_bits + 1)  # the tap count after this context's next issue
        c0_lv = Signal(g)                   # lanes holding a real tap at that issue
        fired = c0_fired
        finishing = Signal()
        m.d.comb += finishing.eq(c0.valid & (fired | c0_end))
        m.d.comb += ring_push.eq(finishing & res.w_rdy)
        free = Signal()
        m.d.comb += free.eq(~c0.valid | ring_push)
        take_new = Signal()
        m.d.comb += take_new.eq(free & rq.r_rdy)
        m.d.comb += rq.r_en.eq(take_new)
        nq = Signal(ready_layout(hp))
        m.d.comb += nq.eq(rq.r_data)

        with m.If(ring_push):
            m.d.comb += [res.w_en.eq(1), res_in.win.eq(0), res_in.oaddr.eq(c0.oaddr),
                         res_in.c.eq(c0.c), res_in.psum.eq(c0.psum), res_in.fired.eq(fired),
                         res_in.e.eq(c0.e), res_in.leader.eq(c0.leader), res_in.slot.eq(c0.slot)]
        with m.Elif(win_write):
            m.d.comb += [res.w_en.eq(1), res_in.win.eq(1), res_in.oaddr.eq(win_widx),
                         res_in.fired.eq(win_fired)]
        m.d.comb += win_write.eq(win_pending & ~finishing & res.w_rdy)
        with m.If(win_push):
            m.d.sync += [win_pending.eq(1), win_widx.eq(widx_rd.data),
                         win_fired.eq(~head_nz)]
        with m.Elif(win_write):
            m.d.sync += win_pending.eq(0)

        def next_issue(e):
            """Tap count after issuing ``g`` taps from ``e``, and the lanes holding one."""
            return Mux(e + g > T, T, e + g), Cat(*[(e + j) < T for j in range(g)])

        first_enext, first_lv = next_issue(0)
        e_next = Signal(hp.tap_bits + 1)
        lv = Signal(g)
        m.d.comb += [e_next.eq(Mux(take_new, first_enext, c0_enext)),
                     lv.eq(Mux(take_new, first_lv, c0_lv))]
        n1 = ctx[1]
        with m.If(take_new):
            m.d.sync += [
                n1.valid.eq(1), n1.issued.eq(1), n1.lv.eq(lv), n1.c.eq(nq.c),
                n1.oaddr.eq(nq.oaddr), n1.psum.eq(0), n1.e.eq(e_next),
                n1.wrow.eq(nq.wbase + 1), n1.leader.eq(nq.leader), n1.slot.eq(nq.slot),
                n1.iy0.eq(nq.iy0), n1.ix0.eq(nq.ix0), n1.base.eq(nq.base),
            ]
            m.d.comb += w_rd.addr.eq(nq.wbase)
        with m.Elif(c0.valid & ~finishing):
            m.d.sync += [n1.eq(c0), n1.issued.eq(1), n1.lv.eq(lv), n1.e.eq(e_next),
                         n1.wrow.eq(c0.wrow + 1)]
            m.d.comb += w_rd.addr.eq(c0.wrow)
        with m.Elif(c0.valid & ~ring_push):
            m.d.sync += [n1.eq(c0), n1.issued.eq(0)]      # result FIFO full: retry next round
        with m.Else():
            m.d.sync += [n1.valid.eq(0), n1.issued.eq(0)]

        # The stages after stage 0, numbered for the full ring; without the read registers
        # (``hp.read_registers``, iCE40) stages 1 and 4 are left out, and ``k`` is the
        # context that each stage works on.
        k = 1
        regs = hp.read_registers

        # stage 1: register the weight row (BRAM output register)
        if regs:
            wrow = Signal(ew * g)
            m.d.sync += [wrow.eq(w_rd.data), ctx[k + 1].eq(ctx[k])]
            k += 1
        else:
            wrow = w_rd.data

        # stage 2: ifmap addresses and padding checks
        s3_addr = [Signal(hp.ifa_bits, name=f"s3_addr{j}") for j in range(g)]
        s3_use = [Signal(name=f"s3_use{j}") for j in range(g)]
        s3_w = [Signal(signed(cfg.weight_bits), name=f"s3_w{j}") for j in range(g)]
        c2 = ctx[k]
        for j in range(g):
            ent = wl(wrow[j * ew:(j + 1) * ew])
            iy = c2.iy0 + ent.ky
            ix = c2.ix0 + ent.kx
            inb = (iy >= 0) & (iy < L.h) & (ix >= 0) & (ix < L.w)
            m.d.sync += [s3_addr[j].eq(c2.base + ent.off), s3_w[j].eq(ent.w),
                         s3_use[j].eq(inb & c2.issued & c2.lv[j])]
        m.d.sync += ctx[k + 1].eq(c2)
        if cfg.has("early_term"):
            # a round that issued nothing (a retry) keeps the flag it had
            with m.If(c2.issued):
                m.d.sync += ctx[k + 1].neg.eq(wl(wrow[:ew]).neg)
        k += 1

        # stage 3: ifmap read; the channel's spec and th are read with it
        s4_use = [Signal(name=f"s4_use{j}") for j in range(g)]
        s4_w = [Signal(signed(cfg.weight_bits), name=f"s4_w{j}") for j in range(g)]
        for j in range(g):
            m.d.comb += i_rd[j].addr.eq(s3_addr[j])
            m.d.sync += [s4_use[j].eq(s3_use[j]), s4_w[j].eq(s3_w[j])]
        if cfg.has("early_term"):
            m.d.comb += p_rd.addr.eq(ctx[k].c)
        m.d.sync += ctx[k + 1].eq(ctx[k])
        k += 1

        # stage 4: the ifmap data arrives (registered again with the read registers). The
        # row's flag and the channel's spec and th decide which check this round's sum
        # faces: "sum <= th" at the speculation point, "sum <= 0" once only non-positive
        # weights remain, "sum <= max(th, 0)" when both apply. One bound x, so that the
        # accumulate stage needs a single compare. The ring's sum has no bias (the writer
        # adds it): the bounds come moved by it (param_layout).
        act = [Mux(s4_use[j], Mux(L.act_signed, i_rd[j].data.as_signed(), i_rd[j].data), 0)
               for j in range(g)]
        check = Const(0)                    # a rule of semantics.md section 4 applies
        bound = Const(0, signed(hp.bound_bits))  # its bound: th - bias or -bias
        if cfg.has("early_term"):
            prm_c = p_rd.data
            neg = ctx[k].neg
            at_spec = pred & (ctx[k].e == prm_c.spec)
            check = at_spec | (et_on & neg)
            bound = Mux(at_spec & ~(neg & prm_c.th_neg), prm_c.th_b, prm_c.nb)
        s5_check = Signal()
        s5_x = Signal(signed(hp.bound_bits))
        if regs:
            s5_a = [Signal(signed(cfg.act_bits + 1), name=f"s5_a{j}") for j in range(g)]
            s5_w = [Signal(signed(cfg.weight_bits), name=f"s5_w{j}") for j in range(g)]
            for j in range(g):
                m.d.sync += [s5_a[j].eq(act[j]), s5_w[j].eq(s4_w[j])]
            m.d.sync += [s5_check.eq(check), s5_x.eq(bound), ctx[k + 1].eq(ctx[k])]
            k += 1
        else:
            s5_a, s5_w = act, s4_w
            m.d.comb += [s5_check.eq(check), s5_x.eq(bound)]

        # stage 5: multiply (product registered); the bound moves on with its round
        s6_p = [Signal(signed(hp.prod_bits), name=f"s6_p{j}") for j in range(g)]
        for j in range(g):
            m.d.sync += s6_p[j].eq(s5_a[j] * s5_w[j])
        s6_x = Signal(signed(hp.bound_bits))
        s6_check = Signal()
        m.d.sync += [ctx[k + 1].eq(ctx[k]), s6_x.eq(s5_x), s6_check.eq(s5_check)]
        k += 1

        # stage 6: accumulate into the context's partial sum; stage 0's decisions. "sum <=
        # x" compares the new sum itself: a compare behind the add, instead of a full-width
        # psum - x - 1 in stage 5 plus a second add of the products to it (53 fewer LUT4
        # per PE on ECP5; docs/benchmarks.md, Boards, ninth round).
        total = s6_p[0]
        for j in range(1, g):
            total = total + s6_p[j]
        c6 = ctx[k]
        new_sum = Signal(signed(hp.acc_bits))
        m.d.comb += new_sum.eq(c6.psum + total)
        enext6, lv6 = next_issue(c6.e)
        m.d.sync += [ctx[0].eq(c6), ctx[0].psum.eq(new_sum),
                     c0_fired.eq(s6_check & (new_sum <= s6_x)),
                     c0_end.eq(c6.e >= T), c0_enext.eq(enext6), c0_lv.eq(lv6)]
        assert k == D - 1, "one context per stage of the ring"

        busy = Signal()
        m.d.comb += busy.eq(Cat(*[k.valid for k in ctx]).any() | (count != 0) | scanning |
                            b_valid | c_valid | win_pending | rq.r_rdy | res.r_rdy |
                            self.grant)
        m.d.comb += self.idle.eq(~busy)
        return m

