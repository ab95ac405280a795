"""The cocotb test module of the engine: runs one job (many steps) in one simulation.

Started by :func:`skipconv.sim.runner.run_bench` with a job built by
:mod:`skipconv.sim.bench.jobs`. A job is a list of steps:

* ``{"op": "commands", "tag", "chunks", "stall_in", "stall_out", "seed"}``: send the chunks,
  wait for every reply the model expects, check them word for word;
* ``{"op": "reset", "tag", "chunks", "after"}``: send the chunks, wait until the engine is
  ``busy``, let it run ``after`` cycles, pulse ``rst``; the replies received before the reset
  are checked, and after it the engine must stay silent and idle.

A ``commands`` step without stalls runs in bulk (unless the job says ``"bulk": False``): the
wrapper around the engine (:mod:`skipconv.sim.bulk`) streams all its command beats at full
rate and captures the result beats, which are then checked exactly as on the cocotbext-axi
path. Steps with stalls (and reset steps) go through cocotbext-axi, beat by beat.

The output (see :func:`run`) has, per step, the engine's reply messages, the expected ones and
every mismatch, plus the simulated cycles and wall time of the whole job.
"""

from __future__ import annotations

import gc
import time

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import RisingEdge, SimTimeoutError, Timer, with_timeout
from cocotb.utils import get_sim_time

from skipconv.sim import runner
from skipconv.sim.bulk import BulkStreams
from skipconv.sim.bench.components import (CLOCK_NS, CommandDriver, CommandMonitor,
                                           InOrderChecker, Model, ResultMonitor)
from skipconv.sw import protocol as P


def _frames(chunks, config):
    """``(words, beats)`` per frame of ``chunks`` (what :meth:`CommandDriver.frames` sends):
    the frame's words, each chunk padded to whole beats, and its beats as bus words (up to a
    64-bit bus both as ``uint64`` arrays, converted once; wider buses as lists of ints)."""
    n = P.words_per_beat(config)
    if n > 2:
        for beats in CommandDriver.frames(None, chunks, config):
            words = [(int(d) >> (32 * j)) & P.WORD_MASK for d in beats for j in range(n)]
            yield words, beats
        return
    parts = []
    for words, last in chunks:
        a = np.asarray(words, dtype=np.uint64) & np.uint64(P.WORD_MASK)
        if len(a) % n:
            a = np.concatenate([a, np.zeros(n - len(a) % n, np.uint64)])
        parts.append(a)
        if last:
            w = np.concatenate(parts)
            parts = []
            beats = w if n == 1 else w[0::2] | (w[1::2] << np.uint64(32))
            yield w, beats
    if parts:
        raise ValueError("the last chunk of a command sequence must carry tlast")


class EngineTestbench:
    """Driver, monitors, model and checker around one engine instance."""

    def __init__(self, dut, config):
        self.dut = dut
        self.config = config
        self.model = Model(config)
        self.driver = CommandDriver(dut, config)
        self.cmd_mon = CommandMonitor(dut, self.model)
        self.results = ResultMonitor(dut, config)
        self.bulk = BulkStreams(dut, config.bus_bits, CLOCK_NS)
        self.clock = Clock(dut.clk, CLOCK_NS, unit="ns", impl="gpi")
        self.in_bulk = None
        self.pending: list[int] = []     # bulk path: beats of a result frame not yet ended
        self.responder = True            # False: reply sequence checked, not the words
        self.checker = InOrderChecker()
        self.exp_done = 0           # expected messages of the steps already checked
        self.act_done = 0           # actual messages of the steps already checked

    def cycles(self) -> int:
        return int(get_sim_time("ns") // CLOCK_NS)

    def mode(self, bulk: bool):
        """Bulk mode (the wrapper's clock and buffers) or the cocotbext-axi path (cocotb's
        clock on ``clk``); switched between steps, with both streams idle."""
        if bulk == self.in_bulk:
            return
        if bulk:
            if self.in_bulk is False:
                self.clock.stop()
            self.dut.bulk.value = 1
        else:
            self.dut.bulk.value = 0
            self.clock.start()
        self.in_bulk = bulk

    @property
    def clk(self):
        return self.dut.bulk_clk if self.in_bulk else self.dut.clk

    async def reset(self, cycles: int = 4):
        self.dut.rst.value = 1
        await Timer(cycles * CLOCK_NS, "ns")
        self.dut.rst.value = 0
        await RisingEdge(self.clk)

    async def _all_seen(self):
        while self.cmd_mon.frames_seen < self.driver.frames_sent:
            self.cmd_mon.seen.clear()
            if self.cmd_mon.frames_seen >= self.driver.frames_sent:
                break
            await self.cmd_mon.seen.wait()

    async def _replies(self, n: int):
        """Wait until ``n`` messages arrived in this step."""
        res = self.results
        while len(res.actual) - self.act_done < n:
            res.changed.clear()
            if len(res.actual) - self.act_done >= n:
                break
            await res.changed.wait()

    def _budget_cycles(self, chunks, expected) -> int:
        """Cycles within which a correct engine must answer (longer means it hung)."""
        words = sum(len(w) for w, _ in chunks) + sum(len(m.body) + 2 for m in expected)
        steps = 0
        for m in expected:
            if m.type == P.Res.COUNTERS:
                dense = m.body[2] | m.body[3] << 32
                steps += dense // (self.config.lanes * self.config.g)
        return 20_000 + 20 * words + 4 * steps

    def _close_step(self, tag):
        """Pair this step's expected and actual messages, then start the next step afresh.

        Each step is checked on its own: a missing or extra reply is reported once and does
        not shift the comparison of the steps after it.
        """
        exp = self.model.expected[self.exp_done:]
        act = self.results.actual[self.act_done:]
        errors = []
        for i, (e, a) in enumerate(zip(exp, act)):
            if not self.checker.check(e, a, f"{tag} reply {i}"):
                errors.append(self.checker.errors[-1])
        if len(act) > len(exp):
            errors.append(f"{tag}: {len(act) - len(exp)} replies more than expected: "
                          + ", ".join(m.name for m in act[len(exp):][:5]))
        self.exp_done = len(self.model.expected)
        self.act_done = len(self.results.actual)
        return exp, act, errors

    async def step_bulk(self, step) -> dict:
        """A step without stalls: the wrapper streams the commands and captures the results
        (:mod:`skipconv.sim.bulk`); the model and the checks are those of the other path."""
        tag, chunks = step["tag"], step["chunks"]
        t0 = self.cycles()
        self.mode(True)
        parts = []
        for words, beats in _frames(chunks, self.config):
            if self.responder:
                self.model.command_words(words)     # the wrapper streams every beat, in order
            parts.append(beats)
        frames = len(parts)
        if parts and isinstance(parts[0], np.ndarray):
            data = np.concatenate(parts)
        else:
            data = [d for beats in parts for d in beats]
        last = np.zeros(len(data), bool)
        last[np.cumsum([len(b) for b in parts], dtype=np.int64) - 1] = True
        if self.responder:
            expected = self.model.expected[self.exp_done:]
            want, budget = len(expected), self._budget_cycles(chunks, expected)
        else:
            types = ([P.Res.OK] * (frames - 1) + [P.Res.OFMAP]
                     + ([P.Res.TRACE] if step["trace"] else []) + [P.Res.COUNTERS])
            want = len(types)
            # As _budget_cycles: the result words are at most ~1 per position.
            budget = (20_000 + 20 * (len(data) + step["positions"])
                      + 4 * step["dense_macs"] // (self.config.lanes * self.config.g))
        beats, in_time = await self.bulk.exchange(data, last, want, budget_cycles=budget)
        rest = self.results.bulk_beats(self.pending + beats)
        self.pending = rest
        errors = []
        if not in_time:
            got = len(self.results.actual) - self.act_done
            errors.append(f"{tag}: engine hung: {got} of {want} replies after "
                          f"{self.cycles() - t0} cycles")
        if self.responder:
            expected, actual, more = self._close_step(tag)
        else:
            expected, actual = [], self.results.actual[self.act_done:]
            self.act_done = len(self.results.actual)
            more = []
            if [m.type for m in actual] != [int(t) for t in types]:
                more.append(f"{tag}: replies {', '.join(m.name for m in actual)}; expected "
                            + ", ".join(t.name for t in types))
        return {"tag": tag, "expected": expected, "actual": actual, "errors": errors + more,
                "cycles": self.cycles() - t0}

    def _axi(self):
        """The cocotbext-axi path: models on both streams, the wrapper's ports connected."""
        self.mode(False)
        self.driver.start()
        self.cmd_mon.start()
        self.results.start()

    async def step_commands(self, step) -> dict:
        tag, chunks = step["tag"], step["chunks"]
        t0 = self.cycles()
        self._axi()
        if step.get("stall_out"):
            self.results.start_stalls(step["stall_out"], step.get("seed", 0))
        await self.driver.send(chunks, step.get("stall_in", 0.0), step.get("seed", 0))
        await self._all_seen()
        expected = self.model.expected[self.exp_done:]
        errors = []
        try:
            await with_timeout(self._replies(len(expected)),
                               self._budget_cycles(chunks, expected) * CLOCK_NS, "ns")
        except SimTimeoutError:
            got = len(self.results.actual) - self.act_done
            errors.append(f"{tag}: engine hung: {got} of {len(expected)} replies "
                          f"({', '.join(m.name for m in expected)}) after "
                          f"{self.cycles() - t0} cycles")
        # A few quiet cycles: a reply beyond the expected ones shows up in this step.
        await Timer(20 * CLOCK_NS, "ns")
        self.results.stop_stalls()
        expected, actual, more = self._close_step(tag)
        return {"tag": tag, "expected": expected, "actual": actual, "errors": errors + more,
                "cycles": self.cycles() - t0}

    async def step_reset(self, step) -> dict:
        tag, chunks = step["tag"], step["chunks"]
        t0 = self.cycles()
        errors = []
        self._axi()
        await self.driver.send(chunks)
        await self._all_seen()
        try:
            if not self.dut.busy.value:
                await with_timeout(RisingEdge(self.dut.busy), 100_000 * CLOCK_NS, "ns")
        except SimTimeoutError:
            errors.append(f"{tag}: busy never rose")
        await Timer(max(1, step["after"]) * CLOCK_NS, "ns")
        if not self.dut.busy.value:
            errors.append(f"{tag}: the layer finished before the reset; pick a smaller 'after'")
        await self.reset()
        self.pending = []
        # The replies that came before the reset are checked; the rest is void.
        got = len(self.results.actual) - self.act_done
        self.model.reset()
        del self.model.expected[self.exp_done + got:]
        self.results.reset()
        expected, actual, more = self._close_step(tag)
        errors += more
        await Timer(200 * CLOCK_NS, "ns")
        if len(self.results.actual) != self.act_done:
            errors.append(f"{tag}: {len(self.results.actual) - self.act_done} messages after "
                          "the reset")
            self.act_done = len(self.results.actual)
        if self.dut.busy.value:
            errors.append(f"{tag}: still busy after the reset")
        return {"tag": tag, "expected": expected, "actual": actual, "errors": errors,
                "cycles": self.cycles() - t0}


@cocotb.test()
async def run(dut):
    """Run the job of :func:`skipconv.sim.runner.load_job` and save its output."""
    config, job = runner.load_job()
    # The clock: cocotb's (GPI) on the cocotbext-axi path, the wrapper's own in bulk mode
    # (skipconv.sim.bulk): no Python and no VPI write per edge.
    dut.s_axis_tvalid.value = 0
    dut.m_axis_tready.value = 0
    bulk = job.get("bulk", True)
    tb = EngineTestbench(dut, config)
    # Without the responder only layer steps in bulk can be checked (their results are
    # compared with golden.run by the caller); any other job keeps it.
    tb.responder = not (bulk and job.get("responder", True) is False and all(
        s["op"] == "commands" and "dense_macs" in s and "codes" not in s
        and not (s.get("stall_in") or s.get("stall_out")) for s in job["steps"]))
    first = job["steps"][0] if job["steps"] else {}
    tb.mode(bulk and first.get("op") == "commands" and not (first.get("stall_in")
                                                            or first.get("stall_out")))
    await tb.reset()
    # The objects of the set-up (modules, cocotb, the job) live to the end: keep them out of
    # the garbage collector's full passes (py-spy: the collector took ~1% of the process).
    gc.freeze()
    wall0, cpu0, cyc0 = time.perf_counter(), time.process_time(), tb.cycles()
    steps = []
    for k, step in enumerate(job["steps"]):
        runner.report_progress(k, len(job["steps"]))
        if step["op"] == "commands" and bulk and not (step.get("stall_in")
                                                     or step.get("stall_out")):
            steps.append(await tb.step_bulk(step))
        elif step["op"] == "commands":
            steps.append(await tb.step_commands(step))
        elif step["op"] == "reset":
            steps.append(await tb.step_reset(step))
        else:
            raise ValueError(f"unknown step op {step['op']!r}")
    # Nothing may come after the last expected reply.
    await Timer(100 * CLOCK_NS, "ns")
    tail = []
    if tb.bulk.beats_in:
        tb.mode(True)
        tb.bulk.captured = []
        await tb.bulk.drain()
        tb.pending = tb.results.bulk_beats(tb.pending + tb.bulk.captured)
        if tb.pending:
            tail.append(f"a result frame of {len(tb.pending)} beats without tlast at the end")
    if len(tb.results.actual) > tb.act_done:
        tail.append(f"{len(tb.results.actual) - tb.act_done} unexpected messages at the end: "
                    + ", ".join(m.name for m in tb.results.actual[tb.act_done:][:5]))
    output = {
        "steps": steps,
        "errors": [e for s in steps for e in s["errors"]] + tb.results.errors + tail,
        "sim_cycles": tb.cycles() - cyc0,
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,     # the simulator process (model + Python)
        "checked": tb.checker.checked,
    }
    runner.save_output(output)
