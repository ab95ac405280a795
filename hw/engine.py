"""The engine top: command stream in, result stream out, every block and memory wired.

Port names are those of docs/protocol.md (``s_axis_tdata`` ...); inside, the blocks talk
through ``lib.stream`` interfaces and write buses.
"""

from __future__ import annotations

from amaranth import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..sw.config import EngineConfig
from .dispatch import Dispatcher
from .layouts import PARAM_READERS, ofmap_layout, plan_layout, reader_param_layout
from .loader import Loader
from .memories import no_collision_memory, registered_read
from .params import HwParams
from .pe import PE
from .responder import Responder
from .skid import SkidBuffer
from .words import BeatPacker, BeatSplitter
from .writer import Writer

__all__ = ["Engine"]


class Engine(wiring.Component):
    """A conv2d+ReLU engine with the skip mechanisms of ``config.features``.

    Parameters
    ----------
    config : EngineConfig
    lut_ram : bool
        The target has distributed RAM (see :class:`~.params.HwParams`); ``False`` on iCE40.

    Members
    -------
    s_axis_tdata, s_axis_tvalid, s_axis_tready, s_axis_tlast
        Command stream (AXI-Stream).
    m_axis_tdata, m_axis_tvalid, m_axis_tready, m_axis_tlast
        Result stream (AXI-Stream).
    busy : Out(1)
        A layer is running (from RUN until its last reply word is queued).
    error : Out(1)
        The last command was refused.
    """

    def __init__(self, config: EngineConfig, *, lut_ram: bool = True):
        self._hp = HwParams(config, lut_ram=lut_ram)
        b = config.bus_bits
        super().__init__({
            "s_axis_tdata": In(b), "s_axis_tvalid": In(1), "s_axis_tready": Out(1),
            "s_axis_tlast": In(1),
            "m_axis_tdata": Out(b), "m_axis_tvalid": Out(1), "m_axis_tready": In(1),
            "m_axis_tlast": Out(1),
            "busy": Out(1), "error": Out(1),
        })

    @property
    def config(self) -> EngineConfig:
        """The configuration this engine was built for."""
        return self._hp.config

    def elaborate(self, platform):
        m = Module()
        hp = self._hp
        cfg = hp.config
        nwb = hp.words_per_beat

        m.submodules.split = split = BeatSplitter(nwb)
        m.submodules.pack = pack = BeatPacker(nwb)
        m.d.comb += [
            split.beats.valid.eq(self.s_axis_tvalid), split.beats.p.data.eq(self.s_axis_tdata),
            split.beats.p.last.eq(self.s_axis_tlast), self.s_axis_tready.eq(split.beats.ready),
            self.m_axis_tvalid.eq(pack.beats.valid), self.m_axis_tdata.eq(pack.beats.p.data),
            self.m_axis_tlast.eq(pack.beats.p.last), pack.beats.ready.eq(self.m_axis_tready),
        ]
        m.submodules.loader = loader = Loader(hp)
        m.submodules.dispatch = disp = Dispatcher(hp)
        m.submodules.writer = writer = Writer(hp)
        m.submodules.responder = resp = Responder(hp)
        m.submodules.words_reg = words_reg = SkidBuffer(split.words.p.shape())
        wiring.connect(m, split=split.words, reg=words_reg.i)
        wiring.connect(m, reg=words_reg.o, loader=loader.words)
        wiring.connect(m, responder=resp.words, pack=pack.words)
        L = loader.layer
        m.d.comb += [disp.layer.eq(L), writer.layer.eq(L), resp.layer.eq(L)]

        # loader <-> responder handshakes
        m.d.comb += [
            resp.reply_req.eq(loader.reply_req), resp.reply_err.eq(loader.reply_err),
            resp.err_code.eq(loader.err_code), resp.err_detail.eq(loader.err_detail),
            loader.reply_ack.eq(resp.reply_ack),
            resp.run_start.eq(loader.run_start), resp.run_trace.eq(loader.run_trace),
            loader.run_done.eq(resp.run_done),
            disp.start.eq(loader.run_start),
            self.error.eq(loader.error), self.busy.eq(resp.reading),
        ]

        # per-channel parameters, written by the loader: one memory per reader with only the
        # fields it reads, so each has one read port (block or LUT RAM, not registers)
        for reader, blk in (("dispatch", disp), ("writer", writer), ("responder", resp)):
            layout = reader_param_layout(hp, reader)
            if not layout.size:
                continue
            mem = no_collision_memory(shape=layout, depth=cfg.max_cout)
            if not hp.lut_ram and layout.size > 1:
                # a few channels only: without this yosys keeps them in flip-flops on iCE40
                # (4 channels: ~220 FF and their read multiplexers for dispatch and writer)
                mem.attrs["ram_style"] = "block"
            m.submodules[f"prm_{reader}"] = mem
            pw = mem.write_port()
            rp = registered_read(m, mem, f"prm_{reader}")
            m.d.comb += [pw.en.eq(loader.prm.en), pw.addr.eq(loader.prm.addr),
                         rp.addr.eq(blk.prm_addr)]
            for f, _ in layout:
                m.d.comb += [pw.data[f].eq(loader.prm.data[f]), blk.prm_data[f].eq(rp.data[f])]

        # the ofmap buffer: written by the writer, read by the responder
        m.submodules.ofm = ofm = no_collision_memory(shape=ofmap_layout(hp), depth=cfg.max_ofmap)
        ow = ofm.write_port()
        orp = registered_read(m, ofm, "ofm")
        m.d.comb += [ow.en.eq(writer.ofmap.en), ow.addr.eq(writer.ofmap.addr),
                     ow.data.eq(writer.ofmap.data),
                     orp.addr.eq(resp.ofm_addr), resp.ofm_data.eq(orp.data)]

        if hp.plan:
            m.submodules.plan = plan = no_collision_memory(shape=plan_layout(), depth=cfg.max_ofmap)
            plw = plan.write_port()
            m.d.comb += [plw.en.eq(loader.plan.en), plw.addr.eq(loader.plan.addr),
                         plw.data.eq(loader.plan.data)]
            for name, addr, dat in (("plan_a", resp.plan_a_addr, resp.plan_a_data),
                                    ("plan_b", resp.plan_b_addr, resp.plan_b_data)):
                rp = registered_read(m, plan, name)
                m.d.comb += [rp.addr.eq(addr), dat.eq(rp.data)]
        if cfg.has("perforation"):
            m.submodules.nn = nn = no_collision_memory(shape=hp.ofa_bits, depth=cfg.max_ofmap)
            nw = nn.write_port()
            nr = registered_read(m, nn, "nn")
            m.d.comb += [nw.en.eq(loader.nn.en), nw.addr.eq(loader.nn.addr),
                         nw.data.eq(loader.nn.data),
                         nr.addr.eq(resp.nn_addr), resp.nn_data.eq(nr.data)]
        if cfg.has("zero_pred"):
            m.submodules.win = win = no_collision_memory(shape=1, depth=cfg.max_ofmap)
            ww = win.write_port()
            wr = registered_read(m, win, "win")
            m.d.comb += [ww.en.eq(writer.winflag.en), ww.addr.eq(writer.winflag.addr),
                         ww.data.eq(writer.winflag.data),
                         wr.addr.eq(resp.win_addr), resp.win_data.eq(wr.data)]

        idle = []
        for i in range(hp.lanes):
            pe = PE(hp)
            m.submodules[f"pe{i}"] = pe
            m.d.comb += [
                pe.layer.eq(L), pe.unit.eq(disp.unit), pe.grant.eq(disp.grant[i]),
                disp.req[i].eq(pe.req),
                pe.wt.eq(loader.wt), pe.ifm.eq(loader.ifm), pe.kind.eq(loader.kind),
                pe.prm.en.eq(loader.prm.en), pe.prm.addr.eq(loader.prm.addr),
                pe.fb_valid.eq(writer.fb_valid[i]), pe.fb_slot.eq(writer.fb_slot),
                pe.fb_nz.eq(writer.fb_nz),
            ]
            m.d.comb += [pe.prm.data[f].eq(loader.prm.data[f]) for f in PARAM_READERS["pe"]]
            if hp.lanes > 1:
                # Registered both ways beside the writer: the writer's round-robin answers
                # lanes spread over the device, and its grant would otherwise travel back to
                # each PE's result FIFO in the same cycle as that FIFO's valid came in.
                m.submodules[f"res_reg{i}"] = res_reg = SkidBuffer(pe.result.payload.shape())
                wiring.connect(m, pe=pe.result, reg=res_reg.i)
                wiring.connect(m, reg=res_reg.o, writer=writer.results[i])
                idle.append(pe.idle & ~res_reg.o.valid)
            else:
                wiring.connect(m, pe=pe.result, writer=writer.results[i])
                idle.append(pe.idle)

        computing = Signal()
        cycles = Signal(64)
        done = Signal()
        m.d.comb += done.eq(computing & disp.done & Cat(*idle).all() & ~writer.busy)
        with m.If(loader.run_start):
            m.d.sync += [computing.eq(1), cycles.eq(0)]
        with m.Elif(done):
            m.d.sync += computing.eq(0)
        with m.Elif(computing):
            m.d.sync += cycles.eq(cycles + 1)
        m.d.comb += [resp.compute_done.eq(done), resp.cycles.eq(cycles)]
        return m
