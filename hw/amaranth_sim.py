"""Run command messages through :class:`Engine` in the Amaranth simulator (for unit tests).

Slow (pure Python): meant for small layers. The cocotb + Verilator benches in ``sim/`` are the
fast path.
"""

from __future__ import annotations

import random

from amaranth.sim import Simulator

from ..sw import protocol
from ..sw.config import EngineConfig
from .engine import Engine

__all__ = ["expected_replies", "run_messages"]


def expected_replies(msg: list[int]) -> int:
    """How many result messages answer the command ``msg`` when it is accepted."""
    op = (msg[0] >> 8) & 0xFF
    if op == protocol.Op.RUN:
        return 3 if (len(msg) > 2 and msg[2] & 1) else 2
    return 1


def run_messages(config: EngineConfig, messages, *, replies=None, stall=0.0, seed=0,
                 max_cycles=200_000, engine=None, vcd=None, chunks=None):
    """Send ``messages`` (lists of words) and return the parsed result messages.

    ``replies`` is the number of result messages to wait for (default: as if every command is
    accepted). ``stall`` is the probability of dropping valid/ready on a cycle (backpressure).
    ``chunks`` (instead of messages): ``[(words, last)]`` sent as beats, ``tlast`` on the final
    beat of a chunk only when ``last`` (for malformed streams).
    """
    if chunks is None:
        chunks = [(msg, True) for msg in messages]
    else:
        messages = []
    dut = engine if engine is not None else Engine(config)
    rng = random.Random(seed)
    want = replies if replies is not None else sum(expected_replies(m) for m in messages)
    got = []
    parser = protocol.ResultParser(config)
    state = {"cycles": 0}

    async def sender(ctx):
        for msg, msg_last in chunks:
            for data, last in protocol.beats(msg, config):
                last = last and msg_last
                while stall and rng.random() < stall:
                    await ctx.tick()
                ctx.set(dut.s_axis_tdata, data)
                ctx.set(dut.s_axis_tlast, int(last))
                ctx.set(dut.s_axis_tvalid, 1)
                await ctx.tick().until(dut.s_axis_tready)
                ctx.set(dut.s_axis_tvalid, 0)

    async def receiver(ctx):
        words_per_beat = config.bus_bits // 32
        while len(got) < want:
            ready = 0 if (stall and rng.random() < stall) else 1
            ctx.set(dut.m_axis_tready, ready)
            _, _, valid, data = await ctx.tick().sample(dut.m_axis_tvalid, dut.m_axis_tdata)
            state["cycles"] += 1
            if state["cycles"] > max_cycles:
                raise TimeoutError(f"no complete reply after {max_cycles} cycles "
                                   f"({len(got)} of {want} messages)")
            if valid and ready:
                words = [(data >> (32 * j)) & 0xFFFFFFFF for j in range(words_per_beat)]
                got.extend(parser.feed_words(words))
        ctx.set(dut.m_axis_tready, 0)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(sender, background=True)
    sim.add_testbench(receiver)
    if vcd:
        with sim.write_vcd(vcd):
            sim.run()
    else:
        sim.run()
    return got
