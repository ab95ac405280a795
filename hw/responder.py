"""The responder: every reply of docs/protocol.md, and the readout pass that streams OFMAP.

The readout pass visits the positions in C order, one per cycle, and resolves the ones no PE
computed: CONST (the plan's constant), COPY (the final output of the NN target, read through
the same pipeline), predicted followers (window flag) and positions of a channel that stops at
check point 0. It packs OFMAP (or TRACE, the performed MACs) and, on the OFMAP pass,
accumulates the layer's counters from the very values it emits.
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .fifo import BufferedFIFO
from .layouts import layer_layout, ofmap_layout, param_layout, plan_layout
from .params import COUNTER_WORDS, MAGIC, HwParams, Reply

__all__ = ["Responder"]

OUT_DEPTH = 16
CONST_KIND, COPY_KIND = 1, 2


def _read(addr_bits, shape):
    return {"addr": Out(addr_bits), "data": In(shape)}


class Responder(wiring.Component):
    """Send replies: OK, ERROR, and for RUN: OFMAP, TRACE (if asked) and COUNTERS.

    Members
    -------
    words : Out(stream)
        ``data`` (32 bits) and ``last`` (last word of a message).
    reply_req, reply_err, err_code, err_detail : In
    reply_ack : Out(1)
    run_start, run_trace : In(1)
    compute_done : In(1)
        The PEs and the writer are finished: the readout may start.
    cycles : In(64)
    run_done : Out(1)
        Pulse: the last word of the run's replies is queued.
    reading : Out(1)
        The responder is streaming a run's replies.
    plan_a, plan_b, nn, win, ofm, prm : read ports (``*_addr`` out, ``*_data`` in)
    """

    def __init__(self, hp: HwParams):
        self._hp = hp
        super().__init__({
            "words": Out(stream.Signature(data.StructLayout({"data": 32, "last": 1}))),
            "layer": In(layer_layout(hp)),
            "reply_req": In(1), "reply_err": In(1), "err_code": In(8), "err_detail": In(32),
            "reply_ack": Out(1),
            "run_start": In(1), "run_trace": In(1), "compute_done": In(1), "cycles": In(64),
            "run_done": Out(1), "reading": Out(1),
            "plan_a_addr": Out(hp.ofa_bits), "plan_a_data": In(plan_layout()),
            "plan_b_addr": Out(hp.ofa_bits), "plan_b_data": In(plan_layout()),
            "nn_addr": Out(hp.ofa_bits), "nn_data": In(hp.ofa_bits),
            "win_addr": Out(hp.ofa_bits), "win_data": In(1),
            "ofm_addr": Out(hp.ofa_bits), "ofm_data": In(ofmap_layout(hp)),
            "prm_addr": Out(hp.c_bits), "prm_data": In(param_layout(hp)),
        })

    def elaborate(self, platform):
        m = Module()
        hp = self._hp
        cfg = hp.config
        L = self.layer
        # synchronous read: block RAM on iCE40 too (its RAM has no asynchronous read, and a
        # SyncFIFO of this size is ~400 LUT4 and ~450 FF of registers there)
        m.submodules.fifo = fifo = BufferedFIFO(width=33, depth=OUT_DEPTH)
        m.d.comb += [self.words.valid.eq(fifo.r_rdy), self.words.p.data.eq(fifo.r_data[:32]),
                     self.words.p.last.eq(fifo.r_data[32]), fifo.r_en.eq(self.words.ready)]
        f_data = Signal(32)
        f_last = Signal()
        f_en = Signal()
        m.d.comb += [fifo.w_data.eq(Cat(f_data, f_last)), fifo.w_en.eq(f_en)]

        def put(word, last=False):
            m.d.comb += [f_data.eq(word), f_last.eq(last), f_en.eq(1)]

        def header(typ):
            return Const(MAGIC | (typ << 8), 32)

        trace = Signal()
        trace_pass = Signal()
        seq = Signal(5)
        prod_ok = Signal()

        # counters (accumulated on the OFMAP pass): positions by outcome and the MACs
        # performed. Each reason's saved MACs are its position count times T (early
        # termination: computed and stopped positions times T, less the MACs performed),
        # formed at readout by one registered multiplier instead of a wide accumulator
        # per reason that adds on every position.
        names = ("dense", "performed", "velcro", "perforation", "zero_pred", "early_term")
        performed = Signal(hp.mac_bits)
        pos_names = ("computed", "stopped", "const", "copy", "predicted")
        pcnt = {k: Signal(hp.pos_bits, name=f"pos_{k}") for k in pos_names}
        mul_n = Signal(hp.pos_bits + 1)
        mul_p = Signal(hp.mac_bits + 1)
        m.d.sync += mul_p.eq(mul_n * L.taps)
        counted = {"dense": L.n_out[:hp.pos_bits], "velcro": pcnt["const"],
                   "perforation": pcnt["copy"], "zero_pred": pcnt["predicted"],
                   "early_term": pcnt["computed"] + pcnt["stopped"]}
        mac_value = {"dense": mul_p, "performed": performed, "velcro": mul_p,
                     "perforation": mul_p, "zero_pred": mul_p, "early_term": mul_p - performed}
        counter_words = [self.cycles[:32], self.cycles[32:]]
        for k in names:
            wide = Signal(64, name=f"cnt64_{k}")
            m.d.comb += wide.eq(mac_value[k][:hp.mac_bits])
            counter_words += [wide[:32], wide[32:]]
        counter_words += [pcnt[k] for k in pos_names]
        assert len(counter_words) == COUNTER_WORDS
        for idx, k in enumerate(names):
            if k in counted:
                with m.If((seq >> 1) == idx + 1):       # words 2 + 2 * idx and the next
                    m.d.comb += mul_n.eq(counted[k])

        # output packing
        per_word = Signal(3)               # items per word: 1, 2 or 4
        m.d.comb += per_word.eq(Mux(trace_pass, 2, Mux(L.raw, 1, Mux(L.out_bits <= 8, 4, 2))))
        body_words = Signal(32)
        m.d.comb += body_words.eq(Mux(per_word == 4, (L.n_out + 3) >> 2,
                                      Mux(per_word == 2, (L.n_out + 1) >> 1, L.n_out)))

        # readout pipeline -------------------------------------------------------------------
        issuing = Signal()
        ro_c = Signal(hp.cout_bits)
        ro_y = Signal(hp.dim_bits)
        ro_x = Signal(hp.dim_bits)
        ro_pos = Signal(hp.ofn_bits)
        ro_pix = Signal(hp.ofn_bits)
        ro_chbase = Signal(hp.ofn_bits)
        ro_xm = Signal(4)
        ro_ym = Signal(4)
        # Window indices run row-major within a channel, channels one after another (the
        # dispatcher's unit order), so the window after a row's last is the next window row's
        # first: two indices and increments, no windows-per-row count.
        ro_widx = Signal(hp.ofn_bits)       # window index of the position
        ro_wrow = Signal(hp.ofn_bits)       # window index of the window row's first window
        inflight = Signal(3)
        # Registered, so the FIFO level and the in-flight count are not in front of every
        # readout counter's enable: level + inflight grows by at most one a cycle, so one
        # slot more margin keeps the old bound (a routed critical path at lanes 2).
        credit = Signal()
        m.d.sync += credit.eq(fifo.level + inflight + 2 < OUT_DEPTH)
        go = Signal()
        m.d.comb += go.eq(issuing & credit)
        last_pos = Signal()
        m.d.comb += last_pos.eq(ro_pos == L.n_out - 1)
        p = L.p
        m.d.comb += [self.plan_a_addr.eq(ro_pos), self.nn_addr.eq(ro_pix),
                     self.win_addr.eq(ro_widx), self.prm_addr.eq(ro_c)]
        with m.If(go):
            with m.If(last_pos):
                m.d.sync += issuing.eq(0)
            m.d.sync += [ro_pos.eq(ro_pos + 1), ro_pix.eq(ro_pix + 1)]
            x_end = ro_x == L.wo - 1
            xm_wrap = ro_xm == p - 1
            with m.If(~x_end):
                m.d.sync += [ro_x.eq(ro_x + 1), ro_xm.eq(Mux(xm_wrap, 0, ro_xm + 1)),
                             ro_widx.eq(ro_widx + xm_wrap)]
            with m.Else():
                m.d.sync += [ro_x.eq(0), ro_xm.eq(0), ro_widx.eq(ro_wrow)]
                y_end = ro_y == L.ho - 1
                ym_wrap = ro_ym == p - 1
                with m.If(y_end | ym_wrap):
                    # the next window row (or channel) starts after this row's last window
                    m.d.sync += [ro_widx.eq(ro_widx + 1), ro_wrow.eq(ro_widx + 1)]
                with m.If(~y_end):
                    m.d.sync += [ro_y.eq(ro_y + 1), ro_ym.eq(Mux(ym_wrap, 0, ro_ym + 1))]
                with m.Else():
                    m.d.sync += [ro_y.eq(0), ro_ym.eq(0),
                                 ro_c.eq(ro_c + 1), ro_pix.eq(0),
                                 ro_chbase.eq(ro_chbase + L.howo)]

        # stage 1: plan, NN, window flag and channel parameters of the position
        v1 = Signal()
        last1 = Signal()
        pos1 = Signal(hp.ofn_bits)
        chb1 = Signal(hp.ofn_bits)
        m.d.sync += [v1.eq(go), last1.eq(last_pos), pos1.eq(ro_pos), chb1.eq(ro_chbase)]
        kind1 = Signal(plan_layout())
        if hp.plan:
            m.d.comb += kind1.eq(self.plan_a_data)
            with m.If(~L.has_plan):
                m.d.comb += kind1.eq(0)
        # stage 1r: the read data registered (block RAM outputs feed no logic directly)
        v1r = Signal()
        last1r = Signal()
        pos1r = Signal(hp.ofn_bits)
        chb1r = Signal(hp.ofn_bits)
        kind1r = Signal(plan_layout())
        nn1r = Signal.like(self.nn_data)
        win1r = Signal()
        stop01r = Signal()
        m.d.sync += [v1r.eq(v1), last1r.eq(last1), pos1r.eq(pos1), chb1r.eq(chb1),
                     kind1r.eq(kind1), nn1r.eq(self.nn_data), win1r.eq(self.win_data),
                     stop01r.eq(self.prm_data.stop0)]
        src = Mux(kind1r.kind == COPY_KIND, chb1r + nn1r, pos1r)
        m.d.comb += [self.plan_b_addr.eq(src), self.ofm_addr.eq(src)]
        v2 = Signal()
        last2 = Signal()
        k2 = Signal(plan_layout())
        pred2 = Signal()
        stop02 = Signal()
        m.d.sync += [v2.eq(v1r), last2.eq(last1r), k2.eq(kind1r),
                     pred2.eq(win1r & (p != 0) & (kind1r.kind == 0) & ~kind1r.leader),
                     stop02.eq(stop01r)]
        if not cfg.has("zero_pred"):
            m.d.sync += pred2.eq(0)
        src_plan2 = Signal(plan_layout())
        if hp.plan:
            m.d.comb += src_plan2.eq(self.plan_b_data)
            with m.If(~L.has_plan):
                m.d.comb += src_plan2.eq(0)

        # stage 2r: the source's plan entry and ofmap word registered
        v2r = Signal()
        last2r = Signal()
        k2r = Signal(plan_layout())
        pred2r = Signal()
        stop02r = Signal()
        src_plan = Signal(plan_layout())
        ofm = Signal.like(self.ofm_data)
        m.d.sync += [v2r.eq(v2), last2r.eq(last2), k2r.eq(k2), pred2r.eq(pred2),
                     stop02r.eq(stop02), src_plan.eq(src_plan2), ofm.eq(self.ofm_data)]

        # stage 3: the value, MACs and outcome
        T = L.taps
        value = Signal(32)
        macs = Signal(hp.tap_bits)
        outcome = Signal(3)   # index into pos_names
        with m.If(k2r.kind == CONST_KIND):
            m.d.comb += [value.eq(k2r.const), macs.eq(0), outcome.eq(2)]
        with m.Elif(k2r.kind == COPY_KIND):
            m.d.comb += [value.eq(Mux(src_plan.kind == CONST_KIND, src_plan.const,
                                      Mux(stop02r, 0, ofm.value))),
                         macs.eq(0), outcome.eq(3)]
        with m.Elif(pred2r):
            m.d.comb += [value.eq(0), macs.eq(0), outcome.eq(4)]
        with m.Elif(stop02r):
            m.d.comb += [value.eq(0), macs.eq(0), outcome.eq(1)]
        with m.Else():
            if "e" in ofmap_layout(hp).members:
                m.d.comb += [value.eq(ofm.value), macs.eq(ofm.e),
                             outcome.eq(Mux(ofm.e < T, 1, 0))]
            else:
                # without early termination a computed position performed all T taps
                m.d.comb += [value.eq(ofm.value), macs.eq(T), outcome.eq(0)]
        m.d.comb += inflight.eq(v1 + v1r + v2 + v2r)

        # packing
        pk = Signal(32)
        pk_n = Signal(3)
        item = Mux(trace_pass, macs, value)
        shifted = Signal(32)
        m.d.comb += shifted.eq(Mux(per_word == 4, item[:8] << (pk_n * 8),
                                   Mux(per_word == 2, item[:16] << (pk_n * 16), item)))
        word = Signal(32)
        m.d.comb += word.eq(pk | shifted)
        with m.If(v2r):
            with m.If((pk_n + 1 == per_word) | last2r):
                put(word, last2r)
                m.d.sync += [pk.eq(0), pk_n.eq(0)]
            with m.Else():
                m.d.sync += [pk.eq(word), pk_n.eq(pk_n + 1)]
            with m.If(~trace_pass):
                m.d.sync += performed.eq(performed + macs)
                for idx, k in enumerate(pos_names):
                    with m.If(outcome == idx):
                        m.d.sync += pcnt[k].eq(pcnt[k] + 1)

        def start_pass():
            m.d.sync += [issuing.eq(1), ro_c.eq(0), ro_y.eq(0), ro_x.eq(0), ro_pos.eq(0),
                         ro_pix.eq(0), ro_chbase.eq(0), ro_xm.eq(0), ro_ym.eq(0), ro_widx.eq(0),
                         ro_wrow.eq(0), pk.eq(0), pk_n.eq(0)]

        room = Signal()
        m.d.comb += room.eq(fifo.w_rdy)
        with m.FSM(name="responder"):
            with m.State("IDLE"):
                with m.If(self.run_start):
                    m.d.sync += [trace.eq(self.run_trace), seq.eq(0)]
                    m.d.sync += performed.eq(0)
                    m.d.sync += [pcnt[k].eq(0) for k in pos_names]
                    m.next = "COMPUTE"
                with m.Elif(self.reply_req & room):
                    put(Mux(self.reply_err, header(Reply.ERROR), header(Reply.OK)))
                    m.next = "REPLY_LEN"
            with m.State("REPLY_LEN"):
                with m.If(room):
                    with m.If(self.reply_err):
                        put(2)
                        m.next = "REPLY_CODE"
                    with m.Else():
                        put(0, True)
                        m.d.comb += self.reply_ack.eq(1)
                        m.next = "IDLE"
            with m.State("REPLY_CODE"):
                with m.If(room):
                    put(self.err_code)
                    m.next = "REPLY_DETAIL"
            with m.State("REPLY_DETAIL"):
                with m.If(room):
                    put(self.err_detail, True)
                    m.d.comb += self.reply_ack.eq(1)
                    m.next = "IDLE"
            with m.State("COMPUTE"):
                m.d.comb += self.reading.eq(1)
                with m.If(self.compute_done):
                    m.next = "OFMAP_HDR"
            with m.State("OFMAP_HDR"):
                m.d.comb += self.reading.eq(1)
                with m.If(room):
                    put(header(Reply.OFMAP))
                    m.d.sync += trace_pass.eq(0)
                    m.next = "OFMAP_LEN"
            with m.State("OFMAP_LEN"):
                m.d.comb += self.reading.eq(1)
                with m.If(room):
                    put(body_words)
                    start_pass()
                    m.next = "OFMAP_BODY"
            with m.State("OFMAP_BODY"):
                m.d.comb += self.reading.eq(1)
                with m.If(~issuing & (inflight == 0)):
                    with m.If(trace):
                        m.next = "TRACE_HDR"
                    with m.Else():
                        m.next = "CNT_HDR"
            with m.State("TRACE_HDR"):
                m.d.comb += self.reading.eq(1)
                with m.If(room):
                    put(header(Reply.TRACE))
                    m.d.sync += trace_pass.eq(1)
                    m.next = "TRACE_LEN"
            with m.State("TRACE_LEN"):
                m.d.comb += self.reading.eq(1)
                with m.If(room):
                    put(body_words)
                    start_pass()
                    m.next = "TRACE_BODY"
            with m.State("TRACE_BODY"):
                m.d.comb += self.reading.eq(1)
                with m.If(~issuing & (inflight == 0)):
                    m.next = "CNT_HDR"
            with m.State("CNT_HDR"):
                m.d.comb += self.reading.eq(1)
                with m.If(room):
                    put(header(Reply.COUNTERS))
                    m.next = "CNT_LEN"
            with m.State("CNT_LEN"):
                m.d.comb += self.reading.eq(1)
                with m.If(room):
                    put(COUNTER_WORDS)
                    m.d.sync += [seq.eq(0), prod_ok.eq(0)]
                    m.next = "CNT_BODY"
            with m.State("CNT_BODY"):
                m.d.comb += self.reading.eq(1)
                # a word waits one cycle after ``seq`` moved, for the product of its counter
                with m.If(~prod_ok):
                    m.d.sync += prod_ok.eq(1)
                with m.Elif(room):
                    with m.Switch(seq):
                        for idx, wv in enumerate(counter_words):
                            with m.Case(idx):
                                put(wv, idx == COUNTER_WORDS - 1)
                    m.d.sync += [seq.eq(seq + 1), prod_ok.eq(0)]
                    with m.If(seq == COUNTER_WORDS - 1):
                        m.d.comb += self.run_done.eq(1)
                        m.next = "IDLE"
        return m
