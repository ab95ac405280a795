"""Small synchronous FIFOs: distributed RAM where the target has it, block RAM where not.

:class:`amaranth.lib.fifo.SyncFIFO` reads its storage asynchronously. On a target with LUT
RAM (ECP5, Xilinx) that is a few LUTs; on iCE40, which has none, yosys builds it from
flip-flops and read multiplexers (a PE's 4-deep ready queue: ~330 FF and ~290 LUT4, each FF
a logic cell of its own since its data comes from another register). :class:`BlockFIFO` has
the same ports and the same cycle behaviour, but a synchronous read: block RAM.
"""

from __future__ import annotations

from amaranth import Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .memories import no_collision_memory

__all__ = ["BlockFIFO", "BufferedFIFO", "LayoutFIFO", "small_fifo"]


def _fifo_members(shape, depth: int) -> dict:
    """The ports every FIFO here shares with :class:`amaranth.lib.fifo.SyncFIFO`."""
    return {
        "w_en": In(1), "w_data": In(shape), "w_rdy": Out(1),
        "r_en": In(1), "r_data": Out(shape), "r_rdy": Out(1),
        "level": Out(range(depth + 1)),
    }


def _wrap_incr(v, depth: int):
    """The next index of a ring of ``depth`` entries."""
    return Mux(v == depth - 1, 0, v + 1)


class BlockFIFO(wiring.Component):
    """A first-word-fall-through FIFO in block RAM, cycle for cycle a :class:`SyncFIFO`.

    The read port reads ahead: each cycle it fetches the entry that will be at the head in
    the next cycle (the next one when the head is taken now). It is transparent to the write
    port, so a word written into an empty FIFO is at ``r_data`` the next cycle, as with the
    asynchronous read of :class:`SyncFIFO` (yosys adds the bypass register that needs).

    Members
    -------
    w_en, w_data : In; w_rdy : Out(1)
    r_en : In(1); r_data : Out(width); r_rdy : Out(1)
    level : Out(range(depth + 1))
        Entries held.
    """

    def __init__(self, *, width: int, depth: int):
        if depth < 1:
            raise ValueError(f"BlockFIFO depth must be >= 1, not {depth!r}")
        self.width = width
        self.depth = depth
        super().__init__(_fifo_members(width, depth))

    def elaborate(self, platform):
        m = Module()
        depth = self.depth
        m.submodules.storage = mem = Memory(shape=self.width, depth=depth, init=[])
        # a few words only: without this yosys keeps them in flip-flops
        mem.attrs["ram_style"] = "block"
        wp = mem.write_port()
        rp = mem.read_port(transparent_for=(wp,))

        produce = Signal(range(depth))
        consume = Signal(range(depth))
        do_write = Signal()
        do_read = Signal()
        m.d.comb += [
            self.w_rdy.eq(self.level != depth), self.r_rdy.eq(self.level != 0),
            do_write.eq(self.w_en & self.w_rdy), do_read.eq(self.r_en & self.r_rdy),
        ]

        def incr(v):
            return _wrap_incr(v, depth)

        head = Signal(range(depth))         # the head of the next cycle
        m.d.comb += head.eq(Mux(do_read, incr(consume), consume))
        m.d.comb += [wp.addr.eq(produce), wp.data.eq(self.w_data), wp.en.eq(do_write),
                     rp.addr.eq(head), self.r_data.eq(rp.data)]
        m.d.sync += [consume.eq(head), self.level.eq(self.level + do_write - do_read)]
        with m.If(do_write):
            m.d.sync += produce.eq(incr(produce))
        return m


class LayoutFIFO(wiring.Component):
    """A :func:`small_fifo` of ``layout`` records that stores only the fields not in ``zero``.

    The fields in ``zero`` are always 0 in the build (their mechanism is not built), or
    nobody reads them: they read as 0 and take no storage. In block RAM a constant column
    is not removed by yosys, nor the logic behind it.

    Members
    -------
    w_en, w_data (``layout``) : In; w_rdy : Out(1)
    r_en : In(1); r_data (``layout``) : Out; r_rdy : Out(1)
    level : Out(range(depth + 1))
    """

    def __init__(self, layout, *, depth: int, lut_ram: bool, zero=()):
        unknown = set(zero) - set(layout.members)
        if unknown:
            raise ValueError(f"LayoutFIFO: no field {sorted(unknown)[0]!r} in {layout!r}")
        self._layout = layout
        self._kept = [f for f in layout.members if f not in zero]
        self._depth = depth
        self._lut_ram = lut_ram
        super().__init__(_fifo_members(layout, depth))

    def elaborate(self, platform):
        m = Module()
        fields = [self._layout[f] for f in self._kept]
        w_raw, r_raw = self.w_data.as_value(), self.r_data.as_value()
        packed_w = Cat(*[w_raw[f.offset:f.offset + f.width] for f in fields])
        m.submodules.fifo = fifo = small_fifo(width=len(packed_w), depth=self._depth,
                                              lut_ram=self._lut_ram)
        m.d.comb += [fifo.w_en.eq(self.w_en), fifo.w_data.eq(packed_w),
                     self.w_rdy.eq(fifo.w_rdy), fifo.r_en.eq(self.r_en),
                     self.r_rdy.eq(fifo.r_rdy), self.level.eq(fifo.level)]
        lo = 0
        for f in fields:
            m.d.comb += r_raw[f.offset:f.offset + f.width].eq(fifo.r_data[lo:lo + f.width])
            lo += f.width
        return m


def small_fifo(*, width: int, depth: int, lut_ram: bool):
    """A :class:`SyncFIFO` on targets with LUT RAM (``lut_ram``), else a :class:`BlockFIFO`."""
    if lut_ram:
        return SyncFIFO(width=width, depth=depth)
    return BlockFIFO(width=width, depth=depth)


class BufferedFIFO(wiring.Component):
    """:class:`amaranth.lib.fifo.SyncFIFOBuffered`, cycle for cycle, without collision logic.

    Its storage is read only while it holds an entry the write port is not writing (the
    write address meets the read address only when the storage is empty, and then nothing
    is read, or full, and then nothing is written), so the memory needs no read-during-write
    emulation: on iCE40 yosys added a register of the write data, an address compare and a
    multiplexer behind the block RAM (33 FF and ~45 LUT4 for the responder's queue).

    Members
    -------
    w_en, w_data : In; w_rdy : Out(1)
    r_en : In(1); r_data : Out(width); r_rdy : Out(1)
    level : Out(range(depth + 1))
        Entries held, the output register's included.
    """

    def __init__(self, *, width: int, depth: int):
        if depth < 2:
            raise ValueError(f"BufferedFIFO depth must be >= 2, not {depth!r}")
        self.width = width
        self.depth = depth
        super().__init__(_fifo_members(width, depth))

    def elaborate(self, platform):
        m = Module()
        inner = self.depth - 1              # the storage; the output register holds one more
        m.submodules.storage = mem = no_collision_memory(shape=self.width, depth=inner)
        wp = mem.write_port()
        rp = mem.read_port(domain="comb")   # registered below (see .memories)

        inner_level = Signal(range(inner + 1))
        produce = Signal(range(inner))
        consume = Signal(range(inner))
        do_write = Signal()
        do_read = Signal()                  # storage -> output register
        m.d.comb += [
            self.w_rdy.eq(inner_level != inner),
            do_write.eq(self.w_en & self.w_rdy),
            do_read.eq((inner_level != 0) & (~self.r_rdy | self.r_en)),
            wp.addr.eq(produce), wp.data.eq(self.w_data), wp.en.eq(do_write),
            rp.addr.eq(consume),
            self.level.eq(inner_level + self.r_rdy),
        ]

        def incr(v):
            return _wrap_incr(v, inner)

        with m.If(do_write):
            m.d.sync += produce.eq(incr(produce))
        with m.If(do_read):
            m.d.sync += [consume.eq(incr(consume)), self.r_data.eq(rp.data)]
        m.d.sync += inner_level.eq(inner_level + do_write - do_read)
        with m.If(do_read):
            m.d.sync += self.r_rdy.eq(1)
        with m.Elif(self.r_en):
            m.d.sync += self.r_rdy.eq(0)
        return m
