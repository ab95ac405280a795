"""cocotb bench components for the engine, in the shape of cocotb's matrix_multiplier example.

* :class:`CommandDriver` sends command messages (AxiStreamSource, optional random
  ``tvalid`` stalls);
* :class:`CommandMonitor` watches what the engine actually accepted on the command stream and
  feeds it to the :class:`Model`;
* :class:`Model` is :class:`~skipconv.sw.protocol.GoldenResponder`: the expected result
  messages of the accepted commands;
* :class:`ResultMonitor` receives the result stream (AxiStreamSink, optional random
  ``tready`` stalls) and splits it into messages;
* :class:`InOrderChecker` compares expected and actual messages word for word (only the
  ``cycles`` words of ``COUNTERS`` are the engine's own).

The cocotbext-axi models are created on first use (a job that runs only bulk steps, see
:mod:`skipconv.sim.bulk`, has none: their value-change callbacks would be checked at every
edge). Python stays off the per-cycle path while the engine computes: every component waits on
queue events or on edges of ``tvalid``, and the stall generators run only while a stream is
transferring.

All three AXI-Stream models use ``byte_lanes=1``: one frame element is one whole beat.
"""

from __future__ import annotations

import itertools
import random

import cocotb
from cocotb.triggers import Event, RisingEdge, Timer
from cocotbext.axi import AxiStreamBus, AxiStreamFrame, AxiStreamMonitor, AxiStreamSink, AxiStreamSource

from skipconv.sw import protocol as P

__all__ = ["CommandDriver", "CommandMonitor", "Model", "ResultMonitor", "InOrderChecker",
           "stall_pattern", "CLOCK_NS"]

CLOCK_NS = 10


def stall_pattern(seed: int, rate: float, length: int = 997):
    """A repeating pseudo-random pause pattern (1 = stall) with about ``rate`` stalls."""
    rng = random.Random(seed)
    return itertools.cycle([int(rng.random() < rate) for _ in range(length)])


def _quiet(*components):
    for c in components:
        c.log.setLevel("WARNING")


class CommandDriver:
    """Sends chunks of command words as AXI-Stream frames (``tlast`` where a chunk asks)."""

    def __init__(self, dut, config):
        self.dut = dut
        self.config = config
        self.source = None
        self.frames_sent = 0

    def start(self):
        """Create the AXI-Stream source (on first use: a bulk-only job never needs it)."""
        if self.source is None:
            dut = self.dut
            self.source = AxiStreamSource(AxiStreamBus.from_prefix(dut, "s_axis"), dut.clk,
                                          dut.rst, byte_lanes=1)
            _quiet(self.source)

    def frames(self, chunks, config=None):
        """Group chunks into frames: a frame ends with a chunk whose ``last`` is set."""
        config = config or self.config
        beats = []
        for words, last in chunks:
            for data, _ in P.beats(words, config):
                beats.append(data)
            if last:
                yield beats
                beats = []
        if beats:
            raise ValueError("the last chunk of a command sequence must carry tlast")

    async def send(self, chunks, stall: float = 0.0, seed: int = 0):
        """Queue every frame of ``chunks``; return when the engine has accepted them all."""
        self.start()
        if stall:
            self.source.set_pause_generator(stall_pattern(seed, stall))
        for beats in self.frames(chunks):
            await self.source.send(AxiStreamFrame(beats))
            self.frames_sent += 1
        await self.source.wait()
        if stall:
            self.source.clear_pause_generator()
            self.source.pause = False


class Model:
    """The golden model of the engine's stream behaviour (the protocol responder)."""

    def __init__(self, config):
        self.config = config
        self.responder = P.GoldenResponder(config)
        self.expected: list[P.Message] = []

    def commands(self, beats: list[int]):
        words = []
        n = P.words_per_beat(self.config)
        for data in beats:
            words += [(int(data) >> (32 * j)) & P.WORD_MASK for j in range(n)]
        self.command_words(words)

    def command_words(self, words):
        """One accepted frame as its words (whole beats, ``tlast`` on the last; a list or an
        integer array)."""
        self.expected += self.responder.feed(words, last=True)

    def reset(self):
        self.responder.reset()


class CommandMonitor:
    """Passes every frame the engine accepted on ``s_axis`` to the model."""

    def __init__(self, dut, model: Model):
        self.dut = dut
        self.mon = None
        self.model = model
        self.frames_seen = 0
        self.seen = Event()

    def start(self):
        """Start watching (on first use: every value-change callback costs at every edge)."""
        if self.mon is None:
            dut = self.dut
            self.mon = AxiStreamMonitor(AxiStreamBus.from_prefix(dut, "s_axis"), dut.clk,
                                        dut.rst, byte_lanes=1)
            _quiet(self.mon)
            self._task = cocotb.start_soon(self._run())

    async def _run(self):
        while True:
            frame = await self.mon.recv()
            self.model.commands(list(frame.tdata))
            self.frames_seen += 1
            self.seen.set()


class ResultMonitor:
    """Receives the result stream and splits it into :class:`~skipconv.sw.protocol.Message`."""

    def __init__(self, dut, config):
        self.dut = dut
        self.config = config
        self.sink = None
        self.parser = P.ResultParser(config)
        self.actual: list[P.Message] = []
        self.changed = Event()          # for the test: a message arrived
        self._arrived = Event()         # for the stall control
        self.errors: list[str] = []
        self.stall = 0.0
        self.seed = 0
        self._stall_task = None

    def start(self):
        """Create the AXI-Stream sink (on first use: a bulk-only job never needs it)."""
        if self.sink is None:
            dut = self.dut
            self.sink = AxiStreamSink(AxiStreamBus.from_prefix(dut, "m_axis"), dut.clk, dut.rst,
                                      byte_lanes=1)
            _quiet(self.sink)
            self._task = cocotb.start_soon(self._run())

    def reset(self):
        self.parser = P.ResultParser(self.config)
        while self.sink is not None and not self.sink.empty():
            self.sink.recv_nowait()

    async def _run(self):
        while True:
            frame = await self.sink.recv()
            self.frame(list(frame.tdata))

    def frame(self, beats: list[int]):
        """One result frame (the beats up to a ``tlast``): it must hold exactly one message."""
        n = P.words_per_beat(self.config)
        words = [(int(d) >> (32 * j)) & P.WORD_MASK for d in beats for j in range(n)]
        try:
            msgs = self.parser.feed_words(words)
        except P.ProtocolError as e:
            self.errors.append(f"result stream: {e}")
            self.parser = P.ResultParser(self.config)
            msgs = []
        if len(msgs) != 1 or not self.parser.idle:
            self.errors.append(f"a result frame of {len(beats)} beats held "
                               f"{len(msgs)} messages (tlast must end each message)")
            self.parser = P.ResultParser(self.config)
        self.actual += msgs
        self.changed.set()
        self._arrived.set()

    def bulk_beats(self, beats: list[tuple[int, bool]]) -> list[int]:
        """Beats captured by the bulk wrapper: whole frames go to :meth:`frame`; returns the
        beats of an unfinished frame (no ``tlast`` yet)."""
        frame = []
        for data, last in beats:
            frame.append(data)
            if last:
                self.frame(frame)
                frame = []
        return frame

    def start_stalls(self, rate: float, seed: int):
        """Random ``tready`` stalls while results flow; none while the engine computes."""
        self.stall, self.seed = rate, seed
        if rate and self._stall_task is None:
            self._stall_task = cocotb.start_soon(self._stall_control())

    def stop_stalls(self):
        if self._stall_task is not None:
            self._stall_task.cancel()
            self._stall_task = None
        if self.sink is not None:
            self.sink.clear_pause_generator()
            self.sink.pause = False

    async def _stall_control(self):
        tvalid = self.dut.m_axis_tvalid
        k = 0
        while True:
            if not tvalid.value:
                self.sink.clear_pause_generator()
                self.sink.pause = False
                await RisingEdge(tvalid)
            k += 1
            self.sink.set_pause_generator(stall_pattern(self.seed * 1000 + k, self.stall))
            # Keep stalling while messages keep coming; re-arm when the stream goes quiet.
            self._arrived.clear()
            await self._arrived.wait()
            await Timer(CLOCK_NS, "ns")


class InOrderChecker:
    """Compares expected and actual messages in order; counts and describes mismatches."""

    def __init__(self):
        self.errors: list[str] = []
        self.checked = 0
        self.engine_cycles: list[int] = []

    def check(self, expected: P.Message, actual: P.Message, where: str) -> bool:
        self.checked += 1
        if expected.type != actual.type:
            self.errors.append(f"{where}: got {actual.name} {list(actual.body)[:4]}, "
                               f"expected {expected.name} {list(expected.body)[:4]}")
            return False
        exp, act = list(expected.body), list(actual.body)
        if expected.type == P.Res.COUNTERS and len(act) == len(exp):
            self.engine_cycles.append(act[0] | act[1] << 32)
            exp[:2] = act[:2]            # cycles: the engine's own count
        if exp != act:
            if len(exp) != len(act):
                self.errors.append(f"{where}: {actual.name} has {len(act)} words, "
                                   f"expected {len(exp)}")
            else:
                i = next(i for i in range(len(exp)) if exp[i] != act[i])
                self.errors.append(f"{where}: {actual.name} word {i} = 0x{act[i]:08X}, expected "
                                   f"0x{exp[i]:08X} ({sum(a != b for a, b in zip(exp, act))} "
                                   "words differ)")
            return False
        return True
