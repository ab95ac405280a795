"""A Vitis RTL kernel around the engine, for Alveo cards.

The kernel ``skipconv_kernel`` reads a command buffer from card memory, streams it into the
engine and writes the engine's result stream into a result buffer, both through one AXI4
master (``m_axi_gmem``, 32-bit data, 64-bit addresses, bursts of up to 16 beats that never
cross a 4 KB boundary). An AXI4-Lite slave (``s_axi_control``) holds the ``ap_ctrl_hs``
block-level control and the arguments (:data:`REGISTERS`), which ``kernel.xml`` declares to
XRT and the ``xrt`` driver backend writes.

Command buffer: messages exactly as on the command stream (docs/protocol.md), little-endian
words, beat padding included. The kernel finds ``tlast`` from each message's header (word 1
is the body length); a message cut short by the end of the buffer gets ``tlast`` on its last
word, so the engine answers it with ``BAD_LENGTH`` and the kernel never hangs on it.

Result buffer: word 0 receives, at the end of the run, the number ``n`` of result words
written after it (bit 31 set when results overflowed ``res_capacity`` and the rest was
dropped); words 1..n are the result stream, in order, beat padding included. The kernel finishes (``ap_done``) when the whole command buffer has been
sent and every command has been answered: each command ends its replies with exactly one
``OK``, ``COUNTERS`` or ``ERROR`` message, which the kernel counts.

:func:`write_kernel` writes the Verilog, ``kernel.xml``, ``package_kernel.tcl`` and the
``v++`` link command for a card (:data:`CARDS`).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from amaranth.hdl import ClockDomain, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..sw.config import EngineConfig
from ..sw.layer import atomic_write_bytes

__all__ = ["KERNEL", "REGISTERS", "CARDS", "AlveoKernel", "kernel_verilog", "write_kernel",
           "AXI_DATA_BITS", "BURST_BEATS"]

#: Name of the RTL kernel (module, kernel.xml, .xo).
KERNEL = "skipconv_kernel"
#: Width of the AXI4 master data bus.
AXI_DATA_BITS = 32
#: Longest AXI4 burst the kernel issues (beats).
BURST_BEATS = 16
#: Address bits of the AXI4-Lite control slave.
CTRL_ADDR_BITS = 7

#: The control register map: name -> (byte offset, bytes, access, meaning).
REGISTERS = {
    "ap_ctrl":      (0x00, 4, "rw", "bit 0 ap_start, 1 ap_done (clear on read), 2 ap_idle, "
                                    "3 ap_ready (clear on read)"),
    "gie":          (0x04, 4, "rw", "bit 0 global interrupt enable"),
    "ier":          (0x08, 4, "rw", "bit 0 interrupt on ap_done"),
    "isr":          (0x0C, 4, "rw", "bit 0 ap_done interrupt pending (write 1 to toggle)"),
    "cmd":          (0x10, 8, "rw", "argument 0: command buffer address (4-byte aligned)"),
    "cmd_words":    (0x18, 4, "rw", "argument 1: command buffer length in 32-bit words"),
    "res":          (0x20, 8, "rw", "argument 2: result buffer address (4-byte aligned)"),
    "res_capacity": (0x28, 4, "rw", "argument 3: result words the buffer holds after word 0"),
    "res_words":    (0x30, 4, "r",  "result words written by the last run (as word 0)"),
    "status":       (0x34, 4, "r",  "bit 0 result buffer overflow (results dropped)"),
    "commands":     (0x38, 4, "r",  "commands sent to the engine by the last run"),
}

#: Alveo cards: name -> (Vitis platform, memory bank for the m_axi_gmem port).
CARDS = {
    "alveo-u280": ("xilinx_u280_gen3x16_xdma_1_202211_1", "HBM[0]"),
    "alveo-u250": ("xilinx_u250_gen3x16_xdma_4_1_202210_1", "DDR[0]"),
    "alveo-u55c": ("xilinx_u55c_gen3x16_xdma_3_202210_1", "HBM[0]"),
}

_OK, _COUNTERS, _ERROR = 0x80, 0x83, 0xEE


def _axi_master_members():
    a, d = 64, AXI_DATA_BITS
    return {
        "awid": Out(1), "awvalid": Out(1), "awready": In(1), "awaddr": Out(a), "awlen": Out(8),
        "awsize": Out(3), "awburst": Out(2),
        "wvalid": Out(1), "wready": In(1), "wdata": Out(d), "wstrb": Out(d // 8),
        "wlast": Out(1),
        "bid": In(1), "bvalid": In(1), "bready": Out(1), "bresp": In(2),
        "arid": Out(1), "arvalid": Out(1), "arready": In(1), "araddr": Out(a), "arlen": Out(8),
        "arsize": Out(3), "arburst": Out(2),
        "rid": In(1), "rvalid": In(1), "rready": Out(1), "rdata": In(d), "rlast": In(1), "rresp": In(2),
    }


def _axil_slave_members():
    a = CTRL_ADDR_BITS
    return {
        "awvalid": In(1), "awready": Out(1), "awaddr": In(a),
        "wvalid": In(1), "wready": Out(1), "wdata": In(32), "wstrb": In(4),
        "bvalid": Out(1), "bready": In(1), "bresp": Out(2),
        "arvalid": In(1), "arready": Out(1), "araddr": In(a),
        "rvalid": Out(1), "rready": In(1), "rdata": Out(32), "rresp": Out(2),
    }


class AlveoKernel(wiring.Component):
    """The engine for ``config`` as a Vitis RTL kernel (ports named as Vitis expects).

    Members
    -------
    ap_clk, ap_rst_n : In(1)
        Kernel clock and active-low synchronous reset.
    m_axi_gmem_* : the AXI4 master to card memory.
    s_axi_control_* : the AXI4-Lite control slave (:data:`REGISTERS`).
    interrupt : Out(1)
        ``ap_done`` interrupt (when enabled in ``gie`` and ``ier``).
    """

    def __init__(self, config: EngineConfig):
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, not {config!r}")
        self._config = config
        members = {"ap_clk": In(1), "ap_rst_n": In(1), "interrupt": Out(1)}
        members.update({f"m_axi_gmem_{k}": v for k, v in _axi_master_members().items()})
        members.update({f"s_axi_control_{k}": v for k, v in _axil_slave_members().items()})
        super().__init__(members)

    @property
    def config(self) -> EngineConfig:
        return self._config

    def _port(self, prefix, name):
        return getattr(self, f"{prefix}_{name}")

    def elaborate(self, platform):
        from ..hw.engine import Engine

        m = Module()
        m.domains.sync = cd = ClockDomain("sync")
        m.d.comb += [cd.clk.eq(self.ap_clk), cd.rst.eq(~self.ap_rst_n)]
        cfg = self._config
        wpb = cfg.bus_bits // 32
        m.submodules.engine = engine = Engine(cfg)

        def ax(name):
            return self._port("m_axi_gmem", name)

        def cl(name):
            return self._port("s_axi_control", name)

        # -- control registers ----------------------------------------------------------------
        ap_start = Signal()
        ap_done = Signal()
        ap_idle = Signal(init=1)
        ap_ready = Signal()
        gie = Signal()
        ier = Signal()
        isr = Signal()
        cmd_addr = Signal(64)
        res_addr = Signal(64)
        cmd_words = Signal(32)
        res_cap = Signal(32)
        res_words = Signal(32)
        overflow = Signal()
        commands = Signal(32)
        finish = Signal()         # one-cycle pulse: the run is over

        m.d.comb += self.interrupt.eq(gie & isr)

        # Write channel: take address and data together, answer OKAY.
        take_w = cl("awvalid") & cl("wvalid") & ~cl("bvalid")
        m.d.comb += [cl("awready").eq(take_w), cl("wready").eq(take_w), cl("bresp").eq(0),
                     cl("rresp").eq(0)]
        with m.If(cl("bvalid") & cl("bready")):
            m.d.sync += cl("bvalid").eq(0)
        wd = cl("wdata")
        regs64 = {0x10: cmd_addr, 0x20: res_addr}
        with m.If(take_w):
            m.d.sync += cl("bvalid").eq(1)
            with m.Switch(cl("awaddr")):
                with m.Case(0x00):
                    with m.If(wd[0] & ap_idle):
                        m.d.sync += ap_start.eq(1)
                with m.Case(0x04):
                    m.d.sync += gie.eq(wd[0])
                with m.Case(0x08):
                    m.d.sync += ier.eq(wd[0])
                with m.Case(0x0C):
                    m.d.sync += isr.eq(isr ^ wd[0])
                for off, reg in regs64.items():
                    with m.Case(off):
                        m.d.sync += reg[:32].eq(wd)
                    with m.Case(off + 4):
                        m.d.sync += reg[32:].eq(wd)
                with m.Case(0x18):
                    m.d.sync += cmd_words.eq(wd)
                with m.Case(0x28):
                    m.d.sync += res_cap.eq(wd)

        # Read channel: registered data; ap_done and ap_ready clear when read.
        with m.If(cl("rvalid") & cl("rready")):
            m.d.sync += cl("rvalid").eq(0)
        with m.If(cl("arvalid") & ~cl("rvalid")):
            m.d.comb += cl("arready").eq(1)
            m.d.sync += cl("rvalid").eq(1)
            with m.Switch(cl("araddr")):
                with m.Case(0x00):
                    m.d.sync += cl("rdata").eq(
                        ap_start | (ap_done << 1) | (ap_idle << 2) | (ap_ready << 3))
                    m.d.sync += [ap_done.eq(0), ap_ready.eq(0)]
                with m.Case(0x04):
                    m.d.sync += cl("rdata").eq(gie)
                with m.Case(0x08):
                    m.d.sync += cl("rdata").eq(ier)
                with m.Case(0x0C):
                    m.d.sync += cl("rdata").eq(isr)
                for off, reg in regs64.items():
                    with m.Case(off):
                        m.d.sync += cl("rdata").eq(reg[:32])
                    with m.Case(off + 4):
                        m.d.sync += cl("rdata").eq(reg[32:])
                with m.Case(0x18):
                    m.d.sync += cl("rdata").eq(cmd_words)
                with m.Case(0x28):
                    m.d.sync += cl("rdata").eq(res_cap)
                with m.Case(0x30):
                    m.d.sync += cl("rdata").eq(res_words)
                with m.Case(0x34):
                    m.d.sync += cl("rdata").eq(overflow)
                with m.Case(0x38):
                    m.d.sync += cl("rdata").eq(commands)
                with m.Default():
                    m.d.sync += cl("rdata").eq(0)

        running = Signal()
        starting = Signal()
        m.d.comb += starting.eq(ap_start & ~running)
        with m.If(starting):
            m.d.sync += [running.eq(1), ap_idle.eq(0)]
        with m.If(finish):
            m.d.sync += [running.eq(0), ap_start.eq(0), ap_idle.eq(1), ap_done.eq(1),
                         ap_ready.eq(1)]
            with m.If(ier):
                m.d.sync += isr.eq(1)

        # -- command buffer -> engine -----------------------------------------------------
        m.submodules.rfifo = rfifo = SyncFIFOBuffered(width=32, depth=2 * BURST_BEATS)
        rd_addr = Signal(64)
        rd_left = Signal(32)          # words not yet requested
        rd_busy = Signal()            # a read burst is outstanding
        rd_pending = Signal(range(2 * BURST_BEATS + 1))   # words requested, not yet in the FIFO
        fed_left = Signal(32)         # words not yet handed to the engine
        to_4k = (4096 - rd_addr[:12])[2:]        # words before the next 4 KB boundary
        burst = Signal(range(BURST_BEATS + 1))
        m.d.comb += burst.eq(Mux(rd_left < BURST_BEATS, rd_left, BURST_BEATS))
        burst_4k = Mux(to_4k < burst, to_4k, burst)
        room = rfifo.level + rd_pending <= 2 * BURST_BEATS - BURST_BEATS
        m.d.comb += [ax("arvalid").eq(running & ~rd_busy & (rd_left != 0) & room),
                     ax("araddr").eq(rd_addr), ax("arlen").eq(burst_4k - 1),
                     ax("arsize").eq(2), ax("arburst").eq(1)]
        with m.If(starting):
            m.d.sync += [rd_addr.eq(cmd_addr), rd_left.eq(cmd_words),
                         fed_left.eq(cmd_words), rd_busy.eq(0)]
        ar_fire = ax("arvalid") & ax("arready")
        with m.If(ar_fire):
            m.d.sync += [rd_busy.eq(1), rd_addr.eq(rd_addr + (burst_4k << 2)),
                         rd_left.eq(rd_left - burst_4k)]
        m.d.comb += [ax("rready").eq(1), rfifo.w_data.eq(ax("rdata")),
                     rfifo.w_en.eq(ax("rvalid"))]
        m.d.sync += rd_pending.eq(rd_pending + Mux(ar_fire, burst_4k, 0) - ax("rvalid"))
        with m.If(ax("rvalid") & ax("rlast")):
            m.d.sync += rd_busy.eq(0)

        # Pack words into beats; tlast from each message's header (or the buffer's end).
        beat = Signal(cfg.bus_bits)
        fill = Signal(range(wpb + 1))
        beat_full = Signal()
        beat_last = Signal()
        msg_idx = Signal(33)          # word index inside the current message
        msg_total = Signal(33)        # words of the current message, beat padding included
        word = rfifo.r_data
        is_final = fed_left == 1
        with m.If(~beat_full & rfifo.r_rdy & running):
            m.d.comb += rfifo.r_en.eq(1)
            with m.Switch(fill):
                for i in range(wpb):
                    with m.Case(i):
                        m.d.sync += beat[32 * i:32 * (i + 1)].eq(word)
            m.d.sync += [fill.eq(fill + 1), fed_left.eq(fed_left - 1)]
            padded = (word + 2 + (wpb - 1)) // wpb * wpb if wpb > 1 else word + 2
            ends = Signal()
            with m.If(msg_idx == 1):
                m.d.comb += ends.eq(padded <= 2)
                m.d.sync += msg_total.eq(padded)
            with m.Elif(msg_idx >= 2):
                m.d.comb += ends.eq(msg_idx + 1 >= msg_total)
            m.d.sync += msg_idx.eq(Mux(ends | is_final, 0, msg_idx + 1))
            with m.If((fill == wpb - 1) | ends | is_final):
                m.d.sync += [beat_full.eq(1), beat_last.eq(ends | is_final)]
        m.d.comb += [engine.s_axis_tdata.eq(beat), engine.s_axis_tlast.eq(beat_last),
                     engine.s_axis_tvalid.eq(beat_full)]
        with m.If(engine.s_axis_tvalid & engine.s_axis_tready):
            m.d.sync += [beat_full.eq(0), fill.eq(0), beat.eq(0), beat_last.eq(0)]
            with m.If(beat_last):
                m.d.sync += commands.eq(commands + 1)
        with m.If(starting):
            m.d.sync += [commands.eq(0), msg_idx.eq(0), fill.eq(0), beat_full.eq(0)]

        # -- engine -> result buffer ------------------------------------------------------
        m.submodules.wfifo = wfifo = SyncFIFOBuffered(width=32, depth=4 * BURST_BEATS)
        out_beat = Signal(cfg.bus_bits)
        out_left = Signal(range(wpb + 1))      # words of out_beat not yet in the FIFO
        first_word = Signal(init=1)            # the next beat starts a message
        msg_type = Signal(8)
        answered = Signal(32)                  # commands whose replies have ended
        m.d.comb += engine.m_axis_tready.eq(out_left == 0)
        with m.If(engine.m_axis_tvalid & engine.m_axis_tready):
            m.d.sync += [out_beat.eq(engine.m_axis_tdata), out_left.eq(wpb),
                         first_word.eq(engine.m_axis_tlast)]
            mtype = Mux(first_word, engine.m_axis_tdata[8:16], msg_type)
            m.d.sync += msg_type.eq(mtype)
            with m.If(engine.m_axis_tlast & mtype.matches(_OK, _COUNTERS, _ERROR)):
                m.d.sync += answered.eq(answered + 1)
        with m.If((out_left != 0) & wfifo.w_rdy):
            m.d.comb += [wfifo.w_en.eq(1), wfifo.w_data.eq(out_beat[:32])]
            m.d.sync += [out_beat.eq(out_beat >> 32), out_left.eq(out_left - 1)]
        with m.If(starting):
            m.d.sync += [answered.eq(0), first_word.eq(1)]

        wr_addr = Signal(64)
        wr_len = Signal(range(BURST_BEATS + 1))
        wr_sent = Signal(range(BURST_BEATS + 1))
        drop = Signal()
        inputs_done = (fed_left == 0) & ~beat_full & (answered == commands) & (out_left == 0)
        wr_to_4k = (4096 - wr_addr[:12])[2:]
        avail = Mux(wfifo.level < BURST_BEATS, wfifo.level, BURST_BEATS)
        wlen = Mux(wr_to_4k < avail, wr_to_4k, avail)
        m.d.comb += [ax("awaddr").eq(wr_addr), ax("awlen").eq(wr_len - 1), ax("awsize").eq(2),
                     ax("awburst").eq(1), ax("wstrb").eq(0xF), ax("bready").eq(1)]
        with m.If(starting):
            m.d.sync += [wr_addr.eq(res_addr + 4), res_words.eq(0), overflow.eq(0)]
        with m.FSM(name="writer"):
            with m.State("IDLE"):
                with m.If(running & ~starting & ((wfifo.level >= BURST_BEATS)
                                                 | (inputs_done & (wfifo.level != 0)))):
                    over = res_words + wlen > res_cap
                    m.d.sync += [wr_len.eq(wlen), wr_sent.eq(0), drop.eq(over)]
                    with m.If(over):
                        m.d.sync += overflow.eq(1)
                        m.next = "DROP"
                    with m.Else():
                        m.next = "ADDR"
                with m.Elif(running & ~starting & inputs_done):
                    m.next = "COUNT_ADDR"
            # Last, word 0: how many result words follow it.
            with m.State("COUNT_ADDR"):
                m.d.comb += [ax("awvalid").eq(1), ax("awaddr").eq(res_addr), ax("awlen").eq(0)]
                with m.If(ax("awready")):
                    m.next = "COUNT_DATA"
            with m.State("COUNT_DATA"):
                m.d.comb += [ax("wvalid").eq(1), ax("wdata").eq(res_words | (overflow << 31)),
                             ax("wlast").eq(1)]
                with m.If(ax("wready")):
                    m.next = "COUNT_RESP"
            with m.State("COUNT_RESP"):
                with m.If(ax("bvalid")):
                    m.d.comb += finish.eq(1)
                    m.next = "IDLE"
            with m.State("ADDR"):
                m.d.comb += ax("awvalid").eq(1)
                with m.If(ax("awready")):
                    m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += [ax("wvalid").eq(1), ax("wdata").eq(wfifo.r_data),
                             ax("wlast").eq(wr_sent + 1 == wr_len)]
                with m.If(ax("wready")):
                    m.d.comb += wfifo.r_en.eq(1)
                    m.d.sync += wr_sent.eq(wr_sent + 1)
                    with m.If(wr_sent + 1 == wr_len):
                        m.next = "RESP"
            with m.State("RESP"):
                with m.If(ax("bvalid")):
                    m.d.sync += [wr_addr.eq(wr_addr + (wr_len << 2)),
                                 res_words.eq(res_words + wr_len)]
                    m.next = "IDLE"
            with m.State("DROP"):
                # No room left: results are drained from the engine and dropped.
                m.d.comb += wfifo.r_en.eq(1)
                m.d.sync += wr_sent.eq(wr_sent + 1)
                with m.If(wr_sent + 1 == wr_len):
                    m.next = "IDLE"
        return m


def kernel_verilog(config: EngineConfig) -> str:
    """Return the kernel's Verilog (module :data:`KERNEL`)."""
    from amaranth.back import verilog
    return verilog.convert(AlveoKernel(config), name=KERNEL, emit_src=False)


def kernel_xml(config: EngineConfig) -> str:
    """The ``kernel.xml`` XRT reads: ports, arguments and their register offsets."""
    args = [("cmd", 0, "0x10", "0x8", "m_axi_gmem", "int*", "global"),
            ("cmd_words", 1, "0x18", "0x4", "s_axi_control", "uint", "scalar"),
            ("res", 2, "0x20", "0x8", "m_axi_gmem", "int*", "global"),
            ("res_capacity", 3, "0x28", "0x4", "s_axi_control", "uint", "scalar")]
    arg_lines = "\n".join(
        f'        <arg name="{n}" addressQualifier="{1 if q == "global" else 0}" id="{i}" '
        f'port="{p}" size="{s}" offset="{o}" type="{t}" hostOffset="0x0" hostSize="{s}"/>'
        for n, i, o, s, p, t, q in args)
    return textwrap.dedent(f"""\
        <?xml version="1.0" encoding="UTF-8"?>
        <root versionMajor="1" versionMinor="6">
          <kernel name="{KERNEL}" language="ip_c" vlnv="skipconv:kernel:{KERNEL}:1.0"
                  attributes="" preferredWorkGroupSizeMultiple="0" workGroupSize="1"
                  interrupt="true" hwControlProtocol="ap_ctrl_hs">
            <ports>
              <port name="s_axi_control" mode="slave" range="0x{1 << CTRL_ADDR_BITS:x}"
                    dataWidth="32" portType="addressable" base="0x0"/>
              <port name="m_axi_gmem" mode="master" range="0xFFFFFFFFFFFFFFFF"
                    dataWidth="{AXI_DATA_BITS}" portType="addressable" base="0x0"/>
            </ports>
            <args>
        {{args}}
            </args>
          </kernel>
        </root>
        """).replace("{args}", arg_lines)


def package_tcl() -> str:
    """Vivado Tcl that packages the Verilog as an IP and then as ``skipconv_kernel.xo``."""
    return textwrap.dedent(f"""\
        # Run: vivado -mode batch -source package_kernel.tcl
        # Packages {KERNEL}.v as a Vivado IP and then as the Vitis kernel object {KERNEL}.xo.
        set here [file dirname [file normalize [info script]]]
        create_project -force kernel_pack $here/kernel_pack
        add_files -norecurse $here/{KERNEL}.v
        set_property top {KERNEL} [current_fileset]
        update_compile_order -fileset sources_1
        ipx::package_project -root_dir $here/ip -vendor skipconv -library kernel \\
            -taxonomy /KernelIP -import_files -set_current false
        ipx::unload_core $here/ip/component.xml
        ipx::edit_ip_in_project -upgrade true -name tmp_edit_project \\
            -directory $here/ip $here/ip/component.xml
        set core [ipx::current_core]
        set_property core_revision 1 $core
        foreach up [ipx::get_user_parameters] {{ ipx::remove_user_parameter [get_property NAME $up] $core }}
        ipx::associate_bus_interfaces -busif m_axi_gmem -clock ap_clk $core
        ipx::associate_bus_interfaces -busif s_axi_control -clock ap_clk $core
        ipx::infer_bus_interface ap_rst_n xilinx.com:signal:reset_rtl:1.0 $core
        ipx::infer_bus_interface interrupt xilinx.com:signal:interrupt_rtl:1.0 $core
        set mm [ipx::add_memory_map s_axi_control $core]
        set_property slave_memory_map_ref s_axi_control [ipx::get_bus_interfaces s_axi_control -of_objects $core]
        set blk [ipx::add_address_block reg0 $mm]
        set_property range 0x{1 << CTRL_ADDR_BITS:x} $blk
        foreach {{name off size}} {{cmd 0x10 64 cmd_words 0x18 32 res 0x20 64 res_capacity 0x28 32}} {{
            set reg [ipx::add_register $name $blk]
            set_property address_offset $off $reg
            set_property size $size $reg
        }}
        foreach name {{cmd res}} {{
            set_property value m_axi_gmem [ipx::add_register_parameter ASSOCIATED_BUSIF \\
                [ipx::get_registers $name -of_objects $blk]]
        }}
        set_property sdx_kernel true $core
        set_property sdx_kernel_type rtl $core
        set_property ipi_drc {{ignore_freq_hz true}} $core
        ipx::create_xgui_files $core
        ipx::update_checksums $core
        ipx::check_integrity -kernel $core
        ipx::save_core $core
        close_project -delete
        package_xo -force -xo_path $here/{KERNEL}.xo -kernel_name {KERNEL} \\
            -ip_directory $here/ip -kernel_xml $here/kernel.xml
        """)


def link_command(card: str) -> str:
    """The ``v++`` link command that makes the ``.xclbin`` for ``card``."""
    platform, bank = CARDS[card]
    return (f"v++ --link --target hw --platform {platform} "
            f"--connectivity.sp {KERNEL}_1.m_axi_gmem:{bank} "
            f"--output {KERNEL}.xclbin {KERNEL}.xo")


def write_kernel(card: str, config: EngineConfig, out_dir) -> dict:
    """Write the kernel for ``card`` into ``out_dir``; return what was written (also
    ``kernel.json``): Verilog, ``kernel.xml``, ``package_kernel.tcl``, ``build.sh``."""
    if card not in CARDS:
        raise ValueError(f"card {card!r}: choose one of {', '.join(CARDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        f"{KERNEL}.v": kernel_verilog(config),
        "kernel.xml": kernel_xml(config),
        "package_kernel.tcl": package_tcl(),
        "build.sh": ("#!/bin/sh\n# Needs Vivado and Vitis (source settings64.sh) and the "
                     f"{CARDS[card][0]} platform.\nset -e\ncd \"$(dirname \"$0\")\"\n"
                     "vivado -mode batch -source package_kernel.tcl\n"
                     f"{link_command(card)}\n"),
        "config.json": config.to_json() + "\n",
    }
    for name, text in files.items():
        atomic_write_bytes(out / name, text.encode())
    (out / "build.sh").chmod(0o755)
    info = {"card": card, "platform": CARDS[card][0], "kernel": KERNEL,
            "files": sorted(files), "link": link_command(card),
            "registers": {k: {"offset": v[0], "bytes": v[1], "access": v[2], "meaning": v[3]}
                          for k, v in REGISTERS.items()},
            "axi_data_bits": AXI_DATA_BITS, "config_key": config.key}
    atomic_write_bytes(out / "kernel.json", (json.dumps(info, indent=2) + "\n").encode())
    return info
