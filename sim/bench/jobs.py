"""Steps of a bench job (see :mod:`skipconv.sim.bench.tb_engine`) and the decoding of its output."""

from __future__ import annotations

import numpy as np

from skipconv.sw import protocol as P
from skipconv.sw.config import EngineConfig
from skipconv.sw.layer import Layer

__all__ = ["layer_step", "fault_step", "reset_step", "run_result", "job"]


def layer_step(layer: Layer, x: np.ndarray, config: EngineConfig, *, tag: str = "",
               trace: bool | None = None, stall_in: float = 0.0, stall_out: float = 0.0,
               seed: int = 0) -> dict:
    """Load and run one layer (trace on when the engine has it, unless told otherwise)."""
    trace = config.trace if trace is None else trace
    chunks = [(w, True) for w in P.encode_commands(layer, x, config, trace=trace)]
    ho, wo = layer.out_hw
    return {"op": "commands", "tag": tag or layer.name or "layer", "chunks": chunks,
            "stall_in": stall_in, "stall_out": stall_out, "seed": seed, "trace": trace,
            "dense_macs": int(layer.cout * ho * wo * layer.taps),
            "positions": int(layer.cout * ho * wo)}


def fault_step(case, *, stall_in: float = 0.0, stall_out: float = 0.0, seed: int = 0) -> dict:
    """Send a :class:`~skipconv.sim.bench.malformed.FaultCase`."""
    return {"op": "commands", "tag": f"fault: {case.name}", "chunks": case.chunks,
            "stall_in": stall_in, "stall_out": stall_out, "seed": seed,
            "codes": [int(c) for c in case.codes]}


def reset_step(layer: Layer, x: np.ndarray, config: EngineConfig, *, after: int,
               tag: str = "reset in the middle of a layer") -> dict:
    """Start ``layer``, pulse ``rst`` ``after`` cycles into its computation."""
    chunks = [(w, True) for w in P.encode_commands(layer, x, config, trace=config.trace)]
    return {"op": "reset", "tag": tag, "chunks": chunks, "after": int(after)}


def job(steps: list[dict], *, bulk: bool = True, responder: bool = True) -> dict:
    """A job; ``bulk`` = False sends every step through cocotbext-axi (beat by beat).

    ``responder`` = False (only for jobs of :func:`layer_step` steps whose results the caller
    compares with ``golden.run`` itself, as ``skipconv bench engine --check host`` does): the
    bench does not run the protocol responder on the command words; it checks only the reply
    sequence (one ``OK`` per load, then ``OFMAP``, ``TRACE``, ``COUNTERS``).
    """
    return {"steps": steps, "bulk": bool(bulk), "responder": bool(responder)}


def run_result(step_output: dict, layer: Layer, trace: bool = True):
    """The :class:`~skipconv.sw.golden.Result` of a layer step, decoded from the engine's replies."""
    replies = step_output["actual"]
    n = 3 if trace else 2
    if len(replies) < n:
        raise P.ProtocolError(f"step {step_output['tag']!r}: the engine sent "
                              f"{len(replies)} replies")
    for m in replies[:-n]:
        m.raise_for_error(f"step {step_output['tag']!r}")
    return P.decode_run(replies[-n:], layer, trace=trace)
