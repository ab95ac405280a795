"""The command decoder: checks every command of docs/protocol.md and writes the memories.

The loader consumes 32-bit words (see :mod:`.words`), validates headers, lengths, limits,
features and values as they arrive, and writes weights (decoded into ifmap offsets), the ifmap,
the plan, the NN table and the per-channel parameters through write buses that the engine
fans out to every replica. A refused message is dropped up to its ``tlast`` and answered by
one ``ERROR``; the flags ``layer_ok``, ``plan_ok`` and ``ifmap_ok`` are cleared when a load
starts and set only when it completed, so no partial layer can ever run.
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.hdl import Value
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from .compare import ge_narrow, gt_const, gt_narrow
from .divider import Divider
from .layouts import (kind_layout, layer_layout, param_layout, plan_layout,
                      reader_param_layout, weight_layout, write_bus)
from .memories import no_collision_memory, registered_read
from .multiplier import Multiplier
from .params import FEATURE_BITS, MAGIC, Err, HwParams, Op, _bits
from .words import word_layout

__all__ = ["Loader"]

PLAN_FEATURES = (FEATURE_BITS["zero_pred"] | FEATURE_BITS["velcro"]
                 | FEATURE_BITS["perforation"])


def _sticky(value: Value, width: int) -> Value:
    """The low ``width - 1`` bits of ``value``, and above them "any higher bit is set"."""
    return Cat(value[:width - 1], value[width - 1:].any())


class _Faults:
    """The faults the loader can answer, each known by a small index.

    A fault site registers its index; the loader keeps every word taken while it may fault;
    one lookup forms ``err_code`` and the 32-bit detail (a field of that word, a register
    that stays put until the reply, or a constant) the cycle after. Each site assigning its
    own code and 32-bit detail made a 40-bit priority mux over all ~45 sites (on iCE40 the
    loader shrank from 2,555 to 1,940 LUT4 without it; it was also its longest path). Code
    and detail are ready two cycles after the fault; the responder sends them as the third
    and fourth words of the reply.
    """

    def __init__(self, word: Value):
        self._word = word          # the word being taken (the stream's data)
        self._index = {}           # (code, detail key) -> fault index
        self._faults = []          # (code, detail as a function of the registered word)

    def index(self, code, detail) -> int:
        if isinstance(detail, int):
            key, value = ("const", detail), (lambda word: Const(detail, 32))
        elif detail is self._word:
            key, value = ("word", 0, 32), (lambda word: word)
        elif getattr(detail, "value", None) is self._word:       # a slice of the word
            lo, hi = detail.start, detail.stop
            key, value = ("word", lo, hi), (lambda word: word[lo:hi])
        else:                                                    # a register
            key, value = ("register", id(detail)), (lambda word: detail)
        key = (int(code), key)
        if key not in self._index:
            self._index[key] = len(self._faults)
            self._faults.append((int(code), value))
        return self._index[key]

    def __len__(self):
        return len(self._faults)

    def decode(self, m, sel: Value, word: Value, code: Value, detail: Value):
        """Register ``code`` and ``detail`` of fault ``sel``; ``word`` is the registered word."""
        with m.Switch(sel):
            for k, (c, value) in enumerate(self._faults):
                with m.Case(k):
                    m.d.sync += [code.eq(c), detail.eq(value(word))]


class Loader(wiring.Component):
    """Decode commands, validate them, write the memories, request replies and runs.

    Members
    -------
    words : In(stream of word_layout)
    layer : Out(layer_layout)
        The loaded layer (valid while ``layer_ok``).
    layer_ok, plan_ok, ifmap_ok : Out(1)
    reply_req : Out(1)
        Held until ``reply_ack``: answer ``OK`` or, with ``reply_err``, ``ERROR`` with
        ``err_code`` and ``err_detail``.
    run_start : Out(1)
        Pulse: a valid ``RUN`` (with ``run_trace``) was received; the loader then waits for
        ``run_done``.
    wt, ifm, plan, kind, nn, prm : Out(write buses)
    error : Out(1)
        The last command was refused.
    """

    def __init__(self, hp: HwParams):
        self._hp = hp
        c = hp.config
        lane_bits = max(1, ceil_log2(c.g))
        super().__init__({
            "words": In(stream.Signature(word_layout())),
            "layer": Out(layer_layout(hp)),
            "layer_ok": Out(1), "plan_ok": Out(1), "ifmap_ok": Out(1),
            "reply_req": Out(1), "reply_err": Out(1), "err_code": Out(8), "err_detail": Out(32),
            "reply_ack": In(1),
            "run_start": Out(1), "run_trace": Out(1), "run_done": In(1),
            "error": Out(1),
            "wt": Out(write_bus(hp.row_bits, weight_layout(hp), {"lane": lane_bits})),
            "ifm": Out(write_bus(hp.ifa_bits, c.act_bits)),
            "plan": Out(write_bus(hp.ofa_bits, plan_layout())),
            "kind": Out(write_bus(hp.ofa_bits, kind_layout())),
            "nn": Out(write_bus(hp.ofa_bits, hp.ofa_bits)),
            "prm": Out(write_bus(hp.c_bits, param_layout(hp))),
        })

    def elaborate(self, platform):
        m = Module()
        hp = self._hp
        cfg = hp.config
        L = self.layer
        w = self.words.p
        data = w.data
        msg_end = w.tlast & w.beat_end
        take = Signal()                       # a word is accepted this cycle
        m.d.comb += take.eq(self.words.valid & self.words.ready)

        op = Signal(8)
        n = Signal(32)
        i = Signal(32)                        # body word index
        # Where the next body word falls, registered when the previous word is taken, so
        # that no 32-bit compare of ``i`` sits in front of ``ready`` and the fault logic.
        hdr = Signal(5)                       # one-hot: i == 0 .. 4 (LOAD_LAYER's header)
        in_par = Signal()                     # i < n_params (LOAD_LAYER)
        last = Signal()                       # i == n - 1
        # CONST values a plan may hold (2**out_bits - 1 as a mask), set with the layer's
        # word 3, so that a plan word's range check is an AND, not a shift and a compare
        const_mask = Signal(24)
        err_code = self.err_code
        err_detail = self.err_detail
        per_word = 4 if cfg.act_bits <= 8 else 2
        act_field = 32 // per_word

        # -- derived sizes, computed while the header word that needs them waits ---------------
        # Output size: a sequential divider; products: one sequential multiplier, one
        # product after another (H*W and Cin*H*W on word 1; Ho*Wo, Cout*Ho*Wo, K*K, Cin*K*K
        # and the dispatcher's tile steps on word 2; Cout*T on word 4). No wide multiplier
        # sits on any path, and none runs at RUN.
        # Each is as wide as the value it can have when it matters: a size checked against a
        # limit keeps the 32 bits an error reply reports and a sticky "larger" bit above them
        # (:func:`_sticky`); a product of fields already checked against their limits (K,
        # Cout, T) needs only their product's bits.
        hw_ = Signal(32)                      # H*W
        cin_hw = Signal(33)                   # Cin*H*W (sticky bit 32)
        howo = Signal(32)                     # Ho*Wo
        n_out = Signal(33)                    # Cout*Ho*Wo (sticky bit 32)
        kk = Signal(_bits(cfg.max_k ** 2))    # K*K, K <= max_k once word 2 is taken
        cin_kk = Signal(_bits(0xFFFF * cfg.max_k ** 2))   # Cin*K*K
        # Cout*T: compared (n_mismatch) only once Cout <= max_cout and T <= max_taps
        ct = Signal(_bits(cfg.max_cout * cfg.max_taps))
        # 5 + 5*Cout: header and parameter words (used once Cout <= max_cout)
        n_params = Signal(_bits(5 + 5 * cfg.max_cout))
        m.submodules.mul = mul = Multiplier(32, 18)
        # One divider, Ho first, then Wo: they are needed together, once per layer.
        m.submodules.div = div = Divider(18)
        m.d.sync += div.start.eq(0)
        div_wo = Signal()                     # the divider works on Wo (Ho is in ho_q)
        ho_q = Signal(18)                     # (H + 2P - K) // S
        div_idle = Signal()                   # done, and no start on its way
        m.d.comb += div_idle.eq(div.done & ~div.start)
        settle = Signal(2)
        sizes_ready = Signal()
        div_started = Signal()
        step = Signal(4)                      # products done for the waiting word
        mul_busy = Signal()

        sticky = (cin_hw, n_out)

        def products(jobs):
            """Run ``jobs`` = ``[(a, b, dest)]`` in order; the word waits for the result."""
            for k, (a, b, dest) in enumerate(jobs):
                value = mul.product
                if any(dest is v for v in sticky):
                    value = _sticky(value, len(dest))
                with m.If(step == k):
                    with m.If(~mul_busy):
                        m.d.comb += [mul.start.eq(1), mul.a.eq(a), mul.b.eq(b)]
                        m.d.sync += mul_busy.eq(1)
                    with m.Elif(mul.done):
                        m.d.sync += [dest.eq(value), step.eq(k + 1), mul_busy.eq(0)]
            return step == len(jobs)

        # Header checks, registered: a header word is taken one cycle after its inputs (the
        # word, the layer registers, the products) are final (``hold``), so its checks are
        # registers here instead of comparators in front of the fault logic.
        hd = data
        checks = {
            "lo_zero": hd[0:16] == 0, "hi_zero": hd[16:32] == 0,            # words 0, 1
            "cout_limit": gt_const(hd[16:32], cfg.max_cout),
            "size_limit": gt_const(cin_hw, cfg.max_ifmap),
            "k_zero": hd[0:8] == 0, "k_limit": gt_const(hd[0:8], cfg.max_k),  # word 2
            "s_zero": hd[8:16] == 0, "pad_ge_k": hd[16:24] >= hd[0:8],
            "p_one": hd[24:32] == 1, "p_nonzero": hd[24:32] != 0,
            "p_limit": gt_const(hd[24:32], cfg.max_p),
            "h_lt_k": L.h + 2 * hd[16:24] < hd[0:8], "w_lt_k": L.w + 2 * hd[16:24] < hd[0:8],
            "nout_limit": gt_const(n_out, cfg.max_ofmap),
            "et_three": hd[2:4] == 3, "et_nonzero": hd[2:4] != 0,           # word 3
            "ob_zero": hd[8:16] == 0, "ob_limit": gt_const(hd[8:16], cfg.out_bits),
            "t_ne_kk": hd != cin_kk, "t_limit": gt_const(hd, cfg.max_taps),  # word 4
            "n_mismatch": n != n_params + ct,
        }
        hc = {}
        for name, cond in checks.items():
            hc[name] = Signal(name=f"hchk_{name}")
            m.d.sync += hc[name].eq(cond)
        hold = Signal()

        with m.If(div_wo & div_idle):
            with m.If(settle != 3):
                m.d.sync += settle.eq(settle + 1)
        m.d.comb += sizes_ready.eq(div_wo & div_idle & (settle == 3))

        # -- tap table: tap index -> (ifmap offset, ky, kx) -----------------------------------
        tap_shape = weight_layout(hp)
        m.submodules.taptab = taptab = no_collision_memory(shape=tap_shape, depth=cfg.max_taps)
        tt_w = taptab.write_port()
        tt_r = registered_read(m, taptab, "taptab")
        b_run = Signal()
        b_t = Signal(hp.tap_bits)
        b_ci = Signal(16)
        b_ky = Signal(hp.k_bits)
        b_kx = Signal(hp.k_bits)
        # ifmap offsets modulo the address width: the entry keeps only those bits
        b_offc = Signal(hp.ifa_bits)
        b_offy = Signal(hp.ifa_bits)
        m.d.comb += [
            tt_w.addr.eq(b_t), tt_w.en.eq(b_run),
            tt_w.data.off.eq(b_offc + b_offy + b_kx), tt_w.data.ky.eq(b_ky),
            tt_w.data.kx.eq(b_kx),
        ]
        with m.If(b_run):
            m.d.sync += b_t.eq(b_t + 1)
            with m.If((b_t + 1 >= cfg.max_taps) | (b_t + 1 >= cin_kk)):
                m.d.sync += b_run.eq(0)
            with m.If(b_kx == L.k - 1):
                m.d.sync += [b_kx.eq(0), b_offy.eq(b_offy + L.w), b_ky.eq(b_ky + 1)]
                with m.If(b_ky == L.k - 1):
                    m.d.sync += [b_ky.eq(0), b_offy.eq(0), b_ci.eq(b_ci + 1),
                                 b_offc.eq(b_offc + hw_)]
            with m.Else():
                m.d.sync += b_kx.eq(b_kx + 1)

        # -- weight write pipeline: tap table read, then write the decoded entry -------------
        wp_valid = Signal()
        wp_w = Signal(signed(cfg.weight_bits))
        wp_row = Signal(hp.row_bits)
        wp_lane = Signal(len(self.wt.lane))
        m.d.sync += wp_valid.eq(0)
        m.d.comb += [
            self.wt.en.eq(wp_valid), self.wt.addr.eq(wp_row), self.wt.lane.eq(wp_lane),
            self.wt.data.w.eq(wp_w), self.wt.data.off.eq(tt_r.data.off),
            self.wt.data.ky.eq(tt_r.data.ky), self.wt.data.kx.eq(tt_r.data.kx),
        ]
        wc_e = Signal(hp.tap_bits)            # tap within the channel
        wc_lane = Signal(len(self.wt.lane))
        wc_row = Signal(hp.row_bits)
        wc_c = Signal(hp.c_bits)              # the weight's channel

        # -- ifmap unpacker ------------------------------------------------------------------
        up_word = Signal(32)
        up_cnt = Signal(range(per_word + 1))
        up_addr = Signal(hp.ifn_bits + 1)
        m.d.comb += [self.ifm.addr.eq(up_addr), self.ifm.data.eq(up_word[:cfg.act_bits]),
                     self.ifm.en.eq((up_cnt != 0) & (up_addr < cin_hw))]
        with m.If(up_cnt != 0):
            m.d.sync += [up_cnt.eq(up_cnt - 1), up_word.eq(up_word >> act_field),
                         up_addr.eq(up_addr + 1)]

        # -- per-channel parameter assembly --------------------------------------------------
        pc_j = Signal(range(5))
        pc_c = Signal(hp.c_bits + 1)
        pc = Signal(param_layout(hp))
        m.d.sync += self.prm.en.eq(0)
        m.d.comb += [self.prm.addr.eq(pc_c), self.prm.data.eq(pc)]
        with m.If(self.prm.en):               # the entry is written the cycle after its last word
            m.d.sync += pc_c.eq(pc_c + 1)

        # -- early termination: each weight row's "only non-positive weights remain" --------
        # The channel's neg_start is kept here, written with its parameters, and turned into
        # the row's flag (weight_layout) as its weights stream by (weights follow all
        # parameters): one compare here instead of one per PE and round.
        if cfg.has("early_term"):
            m.submodules.points = points = Memory(shape=reader_param_layout(hp, "loader"),
                                                  depth=cfg.max_cout, init=[])
            pt_w = points.write_port()
            pt_r = points.read_port(domain="comb")
            m.d.comb += [pt_w.addr.eq(pc_c), pt_w.en.eq(self.prm.en),
                         pt_w.data.neg_start.eq(pc.neg_start), pt_r.addr.eq(wc_c)]
            row_e = Signal(hp.tap_bits + 1)   # tap count after the weight's row
            m.d.comb += row_e.eq(wc_e - wc_lane + cfg.g)
            e_after = Mux(row_e > L.taps, L.taps, row_e)
            # registered with every word, used with the weight word's (wp_valid)
            wp_neg = Signal()
            m.d.sync += wp_neg.eq(e_after >= pt_r.data.neg_start)
            m.d.comb += self.wt.data.neg.eq(wp_neg)

        # -- plan / NN counters --------------------------------------------------------------
        has_nn = Signal()
        q = Signal(hp.ofn_bits + 1)
        m.d.sync += [self.plan.en.eq(0), self.kind.en.eq(0), self.nn.en.eq(0)]

        m.d.sync += [self.run_start.eq(0)]
        m.d.comb += tt_r.addr.eq(data[16:32])

        content_fault = Signal()
        faults = _Faults(data)
        err_sel = Signal(6)                   # the fault (_Faults)
        err_word = Signal(32)                 # the word taken at the fault

        def fail(code, detail, drop=True, content=True):
            if content:
                m.d.comb += content_fault.eq(1)
            m.d.sync += err_sel.eq(faults.index(code, detail))
            if drop:
                with m.If(msg_end):
                    m.next = "REPLY_ERR"
                with m.Else():
                    m.next = "DROP"
            else:
                m.next = "REPLY_ERR"

        def end_of_body():
            """The message's last body word was taken without a content fault."""
            with m.If(~w.tlast | ((op == Op.LOAD_LAYER) & hdr[:4].any())):
                fail(Err.BAD_LENGTH, n, content=False)
            with m.Elif(~w.beat_end):
                m.next = "PAD"
            with m.Else():
                m.next = "SUCCEED"

        with m.FSM(name="loader") as fsm:
            with m.State("HDR0"):
                m.d.comb += self.words.ready.eq(1)
                with m.If(take):
                    m.d.sync += [op.eq(data[8:16]), i.eq(0)]
                    opc = data[8:16]
                    with m.If(data[0:8] != MAGIC):
                        fail(Err.BAD_MAGIC, data)
                    with m.Elif(~opc.matches(Op.LOAD_LAYER, Op.LOAD_PLAN, Op.LOAD_IFMAP,
                                             Op.RUN)):
                        fail(Err.BAD_OPCODE, opc)
                    with m.Elif((opc == Op.LOAD_PLAN) & (not hp.plan)):
                        fail(Err.FEATURE, PLAN_FEATURES)
                    with m.Elif((opc != Op.LOAD_LAYER) & ~self.layer_ok):
                        fail(Err.NOT_READY, opc)
                    with m.Elif((opc == Op.RUN) & (~self.ifmap_ok |
                                                  (L.has_plan & ~self.plan_ok))):
                        fail(Err.NOT_READY, opc)
                    with m.Elif(msg_end):
                        fail(Err.BAD_LENGTH, 0)
                    with m.Else():
                        m.next = "HDR1"
                    with m.Switch(Mux(data[0:8] == MAGIC, opc, 0)):
                        with m.Case(Op.LOAD_LAYER):
                            m.d.sync += [self.layer_ok.eq(0), self.plan_ok.eq(0),
                                         self.ifmap_ok.eq(0)]
                        with m.Case(Op.LOAD_PLAN):
                            m.d.sync += self.plan_ok.eq(0)
                        with m.Case(Op.LOAD_IFMAP):
                            m.d.sync += self.ifmap_ok.eq(0)

            with m.State("HDR1"):
                m.d.comb += self.words.ready.eq(1)
                with m.If(take):
                    m.d.sync += n.eq(data)
                    ifmap_words = (cin_hw + per_word - 1) // per_word
                    bad_len = Signal()
                    with m.Switch(op):
                        with m.Case(Op.LOAD_LAYER, Op.LOAD_PLAN):
                            m.d.comb += bad_len.eq(data == 0)
                        with m.Case(Op.LOAD_IFMAP):
                            m.d.comb += bad_len.eq(data != ifmap_words)
                        with m.Case(Op.RUN):
                            m.d.comb += bad_len.eq(data != 1)
                    m.d.sync += [hdr.eq(1), in_par.eq(1), last.eq(data == 1)]
                    with m.If(bad_len | msg_end):
                        fail(Err.BAD_LENGTH, data)
                    with m.Else():
                        m.next = "BODY"
                    m.d.sync += [up_addr.eq(0), q.eq(0), pc_j.eq(0), pc_c.eq(0), div_started.eq(0),
                                 step.eq(0), wc_e.eq(0), wc_lane.eq(0), wc_row.eq(0),
                                 wc_c.eq(0)]

            with m.State("BODY"):
                ready = Signal()
                # Stalls: header words wait for their products (and word 2 for the output
                # size) plus one cycle for their registered checks (``hold``); weights wait
                # for the tap table, activations for the unpacker.
                with m.Switch(op):
                    with m.Case(Op.LOAD_LAYER):
                        base = Signal()               # a header word's inputs are final
                        with m.If(hdr[1]):
                            with m.If(self.words.valid):
                                m.d.comb += base.eq(products([
                                    (data[0:16], data[16:32], hw_), (hw_, L.cin, cin_hw)]))
                        with m.Elif(hdr[4]):
                            with m.If(self.words.valid):
                                m.d.comb += base.eq(products([(data, L.cout, ct)]))
                        with m.Elif(hdr[2]):
                            # the output size is checked on this word: divide first
                            k, s, pad = data[0:8], data[8:16], data[16:24]
                            num_h = Signal(signed(20))
                            num_w = Signal(signed(20))
                            m.d.comb += [num_h.eq(L.h + 2 * pad - k),
                                         num_w.eq(L.w + 2 * pad - k)]
                            with m.If(self.words.valid & ~div_started):
                                m.d.sync += [
                                    div.start.eq(1), div.num.eq(Mux(num_h < 0, 0, num_h)),
                                    div.den.eq(s), div_wo.eq(0), settle.eq(0),
                                    div_started.eq(1)]
                            with m.Elif(div_started & ~div_wo & div_idle):
                                m.d.sync += [
                                    ho_q.eq(div.quotient), div.start.eq(1),
                                    div.num.eq(Mux(num_w < 0, 0, num_w)), div_wo.eq(1)]
                            with m.If(div_started & sizes_ready):
                                k, s, pad, p = data[0:8], data[8:16], data[16:24], data[24:32]
                                if not cfg.has("zero_pred"):
                                    p = Const(0, 8)   # P != 0 is refused on this word
                                # the dispatcher's tile (layer_layout): P x P, else a row
                                th = Mux(p != 0, p, 1)
                                tw = Mux(p != 0, p, hp.unit_width)
                                m.d.comb += base.eq(products([
                                    (ho_q + 1, div.quotient + 1, howo),
                                    (howo, L.cout, n_out), (k, k, kk), (kk, L.cin, cin_kk),
                                    (L.w + 1, pad, L.pad_off), (s, th, L.tile_dy),
                                    (s, tw, L.tile_dx), (div.quotient + 1, th, L.tile_dout),
                                    (L.w, s, L.row_dbase), (L.row_dbase, th, L.tile_dbase)]))
                        with m.Elif(hdr.any()):
                            m.d.comb += base.eq(1)
                        with m.Elif(~in_par):
                            m.d.comb += ready.eq(~b_run)
                        with m.Else():
                            m.d.comb += ready.eq(1)
                        with m.If(hdr.any()):
                            m.d.comb += ready.eq(base & hold)
                            m.d.sync += hold.eq(self.words.valid & base & ~take)
                    with m.Case(Op.LOAD_IFMAP):
                        m.d.comb += ready.eq(up_cnt <= 1)
                    with m.Default():
                        m.d.comb += ready.eq(1)
                m.d.comb += self.words.ready.eq(ready)
                with m.If(take):
                    m.d.sync += [i.eq(i + 1), step.eq(0), hdr.eq(hdr << 1),
                                 last.eq(i + 2 == n),
                                 # word 0 sets n_params, and the header words all precede
                                 # the parameters
                                 in_par.eq(hdr[:4].any() | (i + 1 < n_params))]
                    if True:
                        with m.Switch(op):
                            with m.Case(Op.LOAD_LAYER):
                                self._layer_word(m, hp, data, hdr, in_par, n, L, fail,
                                                 ho_q, div.quotient,
                                                 cin_kk, n_out, howo, cin_hw, ct, n_params,
                                                 b_run, b_t,
                                                 b_ci, b_ky, b_kx, b_offc, b_offy, pc, pc_j,
                                                 wp_valid, wp_w, wp_row, wp_lane, wc_e,
                                                 wc_lane, wc_row, wc_c, div_started, hc,
                                                 const_mask)
                            with m.Case(Op.LOAD_PLAN):
                                self._plan_word(m, hp, data, hdr, n, L, fail, has_nn, q,
                                                const_mask)
                            with m.Case(Op.LOAD_IFMAP):
                                m.d.sync += [up_word.eq(data), up_cnt.eq(per_word)]
                            with m.Case(Op.RUN):
                                m.d.sync += self.run_trace.eq(data[0])
                                if not cfg.trace:
                                    with m.If(data[0]):
                                        fail(Err.FEATURE, FEATURE_BITS["trace"])
                        # length faults come after the word's content checks
                        with m.If(~content_fault):
                            with m.If(last):
                                end_of_body()
                            with m.Elif(msg_end):
                                fail(Err.BAD_LENGTH, n, drop=False, content=False)

            with m.State("PAD"):
                m.d.comb += self.words.ready.eq(1)
                with m.If(take & w.beat_end):
                    m.next = "SUCCEED"

            with m.State("DROP"):
                m.d.comb += self.words.ready.eq(1)
                with m.If(take & msg_end):
                    m.next = "REPLY_ERR"

            with m.State("SUCCEED"):
                m.d.sync += self.error.eq(0)
                with m.Switch(op):
                    with m.Case(Op.LOAD_LAYER):
                        m.d.sync += self.layer_ok.eq(1)
                        m.next = "REPLY_OK"
                    with m.Case(Op.LOAD_PLAN):
                        m.d.sync += self.plan_ok.eq(1)
                        m.next = "REPLY_OK"
                    with m.Case(Op.LOAD_IFMAP):
                        m.d.sync += self.ifmap_ok.eq(1)
                        m.next = "REPLY_OK"
                    with m.Case(Op.RUN):
                        m.d.sync += self.run_start.eq(1)
                        m.next = "RUNNING"

            with m.State("REPLY_OK"):
                m.d.comb += [self.reply_req.eq(1), self.reply_err.eq(0)]
                with m.If(self.reply_ack):
                    m.next = "HDR0"

            with m.State("REPLY_ERR"):
                m.d.comb += [self.reply_req.eq(1), self.reply_err.eq(1)]
                m.d.sync += self.error.eq(1)
                with m.If(self.reply_ack):
                    m.next = "HDR0"

            with m.State("RUNNING"):
                with m.If(self.run_done):
                    m.next = "HDR0"
        # Every word taken where a fault can occur is kept: a fault leaves those states, so
        # the word kept is the faulting one. Registering it under "any fault" put the whole
        # check logic in front of 32 enables (the routed critical path).
        with m.If(take & (fsm.ongoing("HDR0") | fsm.ongoing("HDR1") | fsm.ongoing("BODY"))):
            m.d.sync += err_word.eq(data)
        assert len(faults) <= 2 ** len(err_sel)
        faults.decode(m, err_sel, err_word, err_code, err_detail)
        return m

    # -- LOAD_LAYER body ---------------------------------------------------------------------

    def _layer_word(self, m, hp, data, hdr, in_par, n, L, fail, ho_q, wo_q, cin_kk, n_out,
                    howo, cin_hw, ct, n_params, b_run, b_t, b_ci, b_ky, b_kx, b_offc, b_offy,
                    pc, pc_j, wp_valid, wp_w, wp_row, wp_lane, wc_e, wc_lane, wc_row, wc_c,
                    div_started, hc, const_mask):
        cfg = hp.config
        g = cfg.g
        with m.If(hdr[0]):
            cin, cout = data[0:16], data[16:32]
            m.d.sync += [L.cin.eq(cin), L.cout.eq(cout), n_params.eq(5 + (cout << 2) + cout)]
            with m.If(hc["lo_zero"]):
                fail(Err.BAD_VALUE, cin)
            with m.Elif(hc["hi_zero"]):
                fail(Err.BAD_VALUE, cout)
            with m.Elif(hc["cout_limit"]):
                fail(Err.LIMIT, cout)
        with m.Elif(hdr[1]):
            h, w = data[0:16], data[16:32]
            m.d.sync += [L.h.eq(h), L.w.eq(w)]
            with m.If(hc["lo_zero"]):
                fail(Err.BAD_VALUE, h)
            with m.Elif(hc["hi_zero"]):
                fail(Err.BAD_VALUE, w)
            with m.Elif(hc["size_limit"]):
                fail(Err.LIMIT, cin_hw)
        with m.Elif(hdr[2]):
            k, s, pad, p = data[0:8], data[8:16], data[16:24], data[24:32]
            # A field whose mechanism is not built stays 0 in the layer registers (a nonzero
            # value is refused on its word, so no layer with one ever runs): the blocks'
            # logic for it then folds away.
            m.d.sync += [L.k.eq(k), L.stride.eq(s), L.pad.eq(pad),
                         L.p.eq(p if cfg.has("zero_pred") else 0),
                         L.ho.eq(ho_q + 1), L.wo.eq(wo_q + 1),
                         L.howo.eq(howo), L.n_out.eq(n_out), div_started.eq(0),
                         # the tap table for this geometry (bounded by the table size)
                         b_run.eq(k != 0), b_t.eq(0), b_ci.eq(0), b_ky.eq(0), b_kx.eq(0),
                         b_offc.eq(0), b_offy.eq(0)]
            with m.If(hc["k_zero"]):
                fail(Err.BAD_VALUE, k)
            with m.Elif(hc["k_limit"]):
                fail(Err.LIMIT, k)
            with m.Elif(hc["s_zero"]):
                fail(Err.BAD_VALUE, s)
            with m.Elif(hc["pad_ge_k"]):
                fail(Err.BAD_VALUE, pad)
            with m.Elif(hc["p_one"]):
                fail(Err.BAD_VALUE, p)
            with m.Elif(hc["p_nonzero"] & (not cfg.has("zero_pred"))):
                fail(Err.FEATURE, FEATURE_BITS["zero_pred"])
            with m.Elif(hc["p_limit"]):
                fail(Err.LIMIT, p)
            with m.Elif(hc["h_lt_k"]):
                fail(Err.BAD_VALUE, L.h)
            with m.Elif(hc["w_lt_k"]):
                fail(Err.BAD_VALUE, L.w)
            with m.Elif(hc["nout_limit"]):
                fail(Err.LIMIT, n_out)
        with m.Elif(hdr[3]):
            et = data[2:4]
            has_plan = data[4]
            ob = data[8:16]
            m.d.sync += [L.act_signed.eq(data[0]), L.raw.eq(data[1]),
                         L.et.eq(et if cfg.has("early_term") else 0),
                         L.has_plan.eq(has_plan if hp.plan else 0), L.out_bits.eq(ob),
                         const_mask.eq(Mux(ob >= 24, (1 << 24) - 1, (1 << ob[:5]) - 1))]
            with m.If(hc["et_three"]):
                fail(Err.BAD_VALUE, et)
            with m.Elif(hc["et_nonzero"] & (not cfg.has("early_term"))):
                fail(Err.FEATURE, FEATURE_BITS["early_term"])
            with m.Elif(has_plan & (not hp.plan)):
                fail(Err.FEATURE, PLAN_FEATURES)
            with m.Elif(hc["ob_zero"]):
                fail(Err.BAD_VALUE, ob)
            with m.Elif(hc["ob_limit"]):
                fail(Err.LIMIT, ob)
        with m.Elif(hdr[4]):
            t = data
            m.d.sync += [L.taps.eq(t), L.rows.eq((t + g - 1) // g)]
            with m.If(hc["t_ne_kk"]):
                fail(Err.BAD_VALUE, t)
            with m.Elif(hc["t_limit"]):
                fail(Err.LIMIT, t)
            with m.Elif(hc["n_mismatch"]):
                fail(Err.BAD_LENGTH, n)
        with m.Elif(in_par):
            # per-channel parameters: bias, M/sh, neg_start, spec, th
            with m.Switch(pc_j):
                with m.Case(0):
                    m.d.sync += [pc.bias.eq(data), pc_j.eq(1)]
                with m.Case(1):
                    mm, sh = data[0:16], data[16:24]
                    m.d.sync += [pc.m.eq(mm), pc.sh.eq(sh), pc_j.eq(2)]
                    with m.If(mm == 0):
                        fail(Err.BAD_VALUE, mm)
                    with m.Elif(gt_const(sh, 47)):
                        fail(Err.BAD_VALUE, sh)
                with m.Case(2):
                    m.d.sync += [pc.neg_start.eq(data), pc_j.eq(3)]
                    with m.If(gt_narrow(data, L.taps)):
                        fail(Err.BAD_VALUE, data)
                with m.Case(3):
                    m.d.sync += [pc.spec.eq(data), pc_j.eq(4)]
                    with m.If(gt_narrow(data, L.taps) | (data % g != 0)):
                        fail(Err.BAD_VALUE, data)
                with m.Case(4):
                    th = data.as_signed()
                    et_on = L.et != 0
                    stop0 = ((et_on & (pc.neg_start == 0) & (pc.bias <= 0))
                             | ((L.et == 2) & (pc.spec == 0) & (pc.bias <= th)))
                    if not cfg.has("early_term"):
                        # et != 0 was refused on word 3: nothing reads neg_start, spec, th
                        stop0 = Const(0)
                    # the PEs' bounds for a sum without the bias (param_layout)
                    m.d.sync += [pc.th_b.eq(th - pc.bias), pc.nb.eq(-pc.bias),
                                 pc.th_neg.eq(th < 0), pc.stop0.eq(stop0), pc_j.eq(0),
                                 self.prm.en.eq(1)]
        with m.Else():
            # weights in tap order: [15:0] weight (low weight_bits used), [31:16] tap index
            tap = data[16:32]
            m.d.sync += [wp_valid.eq(1), wp_w.eq(data[:cfg.weight_bits]), wp_row.eq(wc_row),
                         wp_lane.eq(wc_lane)]
            chan_end = wc_e == L.taps - 1
            with m.If(chan_end):
                m.d.sync += [wc_e.eq(0), wc_lane.eq(0), wc_row.eq(wc_row + 1), wc_c.eq(wc_c + 1)]
            with m.Elif(wc_lane == g - 1):
                m.d.sync += [wc_e.eq(wc_e + 1), wc_lane.eq(0), wc_row.eq(wc_row + 1)]
            with m.Else():
                m.d.sync += [wc_e.eq(wc_e + 1), wc_lane.eq(wc_lane + 1)]
            with m.If(ge_narrow(tap, L.taps)):
                fail(Err.BAD_VALUE, tap)

    # -- LOAD_PLAN body ----------------------------------------------------------------------

    def _plan_word(self, m, hp, data, hdr, n, L, fail, has_nn, q, const_mask):
        cfg = hp.config
        with m.If(hdr[0]):
            hn = data[0]
            m.d.sync += [has_nn.eq(hn), q.eq(0)]
            with m.If(hn & (not cfg.has("perforation"))):
                fail(Err.FEATURE, FEATURE_BITS["perforation"])
            with m.Elif(n != 1 + L.n_out + Mux(hn, L.howo, 0)):
                fail(Err.BAD_LENGTH, n)
        with m.Elif(q < L.n_out):
            kind, leader, const = data[0:2], data[2], data[8:32]
            m.d.sync += [
                q.eq(q + 1),
                self.plan.en.eq(1), self.plan.addr.eq(q), self.plan.data.kind.eq(kind),
                self.plan.data.leader.eq(leader), self.plan.data.const.eq(const),
                self.kind.en.eq(1), self.kind.addr.eq(q), self.kind.data.kind.eq(kind),
                self.kind.data.leader.eq(leader), self.kind.data.const_nz.eq(const != 0),
            ]
            with m.If(kind == 3):
                fail(Err.BAD_VALUE, kind)
            with m.Elif((kind == 1) & (not cfg.has("velcro"))):
                fail(Err.FEATURE, FEATURE_BITS["velcro"])
            with m.Elif((kind == 2) & (not cfg.has("perforation"))):
                fail(Err.FEATURE, FEATURE_BITS["perforation"])
            with m.Elif((kind == 2) & ~has_nn):
                fail(Err.BAD_VALUE, kind)
            with m.Elif((kind == 1) & ~L.raw & (const & ~const_mask).any()):
                fail(Err.BAD_VALUE, const)
        with m.Else():
            nx, ny = data[0:16], data[16:32]
            m.d.sync += [q.eq(q + 1), self.nn.en.eq(1), self.nn.addr.eq(q - L.n_out),
                         self.nn.data.eq(ny * L.wo + nx)]
            with m.If((ny >= L.ho) | (nx >= L.wo)):
                fail(Err.BAD_VALUE, data)
