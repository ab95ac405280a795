# amaranth: UnusedElaboratable=no
"""One ULX3S build of a small engine to a bitstream with its report.json (cached by content),
and the parts of the build flow that need no toolchain run."""

import json
from pathlib import Path

import pytest

from skipconv.boards.build import (BOARDS, BuildError, _run_build_script, build_board,
                                   cached_build, parse_report, router2_divergence, tool_options)
from skipconv.boards.pll import PLLError, ecp5_pll, ice40_pll
from skipconv.sw.config import EngineConfig

#: The smallest useful engine: one lane, every mechanism, small buffers.
SMALL = EngineConfig(lanes=1, max_taps=64, max_ifmap=256, max_cout=4, max_ofmap=256, max_k=3,
                     max_p=2, trace=False)
#: Well below the ~70 MHz this small build reaches today (docs/benchmarks.md, Boards), so the
#: build meets its own clock.
CLOCK_MHZ = 30.0


def test_pll_settings():
    p = ecp5_pll(25e6, 125e6)
    assert p.f_out == 125e6 and 400e6 <= p.f_vco <= 800e6
    assert abs(ecp5_pll(25e6, 50e6).f_out - 50e6) < 1
    q = ice40_pll(12e6, 24e6)
    assert abs(q.f_out - 24e6) < 0.01 * 24e6 and 1 <= q.filter_range <= 6
    with pytest.raises(PLLError, match="cannot make 2000 MHz"):
        ecp5_pll(25e6, 2000e6)


def test_unknown_board_is_refused(tmp_path):
    with pytest.raises(BuildError, match="board 'de10': choose one of ulx3s, icebreaker"):
        build_board("de10", SMALL, tmp_path)


def test_map_at_clock_sets_abc9_delay_target():
    assert "script_after_read" not in tool_options("ulx3s", 80.0)
    opts = tool_options("ulx3s", 80.0, seed=3, pack_only=True, map_at_clock=True)
    assert opts["script_after_read"] == "scratchpad -set abc9.D 12500"      # ps at 80 MHz
    assert "--seed 3" in opts["nextpnr_opts"] and "--pack-only" in opts["nextpnr_opts"]
    ice = tool_options("icebreaker", 24.0, map_at_clock=True)
    assert ice["synth_opts"] == "-dsp -device u"                          # the UP5K's timing
    assert ice["script_after_read"].endswith("abc9.D 41667")


def test_router_option():
    assert "--router" not in tool_options("ulx3s", 80.0)["nextpnr_opts"]
    assert "--router router2" in tool_options("ulx3s", 80.0, router="router2")["nextpnr_opts"]
    with pytest.raises(BuildError, match="router 'router3': choose one of router1, router2"):
        tool_options("ulx3s", 80.0, router="router3")


def _router2_log(overuse):
    return "".join(f"Info:     iter={i} wires={400000 + i} overused={o} overuse={o} archfail=NA\n"
                   for i, o in enumerate(overuse, start=1))


def test_router2_divergence():
    # converging runs bump up by a few wires (the worst seen: 26 over the best so far)
    assert router2_divergence(_router2_log([3295, 1363, 467, 222, 200, 226, 18, 20, 7, 0])) is None
    assert router2_divergence(_router2_log([40, 2, 7, 1])) is None     # x3.5 but 5 wires
    # a diverging one (seed 2 of the tenth round: 1,024 at best, then climbing)
    why = router2_divergence(_router2_log([3295, 1366, 1026, 1143, 2100, 6244]))
    assert why == "router2 diverged: 2100 overused wires at iteration 5, 1026 at best before"


def test_build_script_stopped_when_router2_diverges(tmp_path, monkeypatch):
    """The watchdog reads the nextpnr log while the build runs and stops the whole script.

    The script stands in for nextpnr's log output only: it writes router2's lines, then
    would sleep for a minute."""
    lines = _router2_log([3000, 1000, 900, 2500]).replace("\n", "\\n")
    (tmp_path / "build_top.sh").write_text(f"printf '{lines}' > top.tim\nsleep 60\n"
                                           "echo finished > done.txt\n")
    monkeypatch.setattr("skipconv.boards.build._WATCH_PERIOD_S", 0.2)
    code, why = _run_build_script(tmp_path, "top", tmp_path / "build.log")
    assert why == "router2 diverged: 2500 overused wires at iteration 4, 900 at best before"
    assert code != 0 and not (tmp_path / "done.txt").exists()


def test_parse_report_counts_and_fmax(tmp_path):
    rep = {"utilization": {"TRELLIS_COMB": {"used": 100, "available": 83640},
                           "TRELLIS_FF": {"used": 50, "available": 83640},
                           "MULT18X18D": {"used": 2, "available": 156},
                           "DP16KD": {"used": 3, "available": 208}},
           "fmax": {"$glbnet$clk": {"achieved": 101.234, "constraint": 50.0}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rep))
    out = parse_report(BOARDS["ulx3s"], path)
    assert out["luts"] == {"used": 100, "available": 83640}
    assert out["dsps"]["used"] == 2 and out["brams"]["used"] == 3
    assert out["fmax"] == {"$glbnet$clk": {"achieved_mhz": 101.23, "constraint_mhz": 50.0}}


@pytest.mark.slow
def test_ulx3s_small_build_to_bitstream():
    rep = cached_build("ulx3s", SMALL, CLOCK_MHZ, seed=1)
    assert rep["status"] == "ok", rep.get("error")
    bit = Path(rep["bitstream"])
    assert bit.suffix == ".bit" and bit.stat().st_size > 100_000
    report = json.loads((bit.parent / "report.json").read_text())
    assert report == rep
    for key in ("luts", "ffs", "dsps", "brams"):
        assert 0 <= report[key]["used"] <= report[key]["available"], key
    assert report["luts"]["available"] == 83640 and report["luts"]["used"] > 500
    assert report["dsps"]["used"] >= 1            # the MAC is a MULT18X18D
    assert min(v["achieved_mhz"] for v in report["fmax"].values()) >= CLOCK_MHZ
    assert report["config_key"] == SMALL.key
    # Stopping nextpnr after packing gives the same resources, with no Fmax or bitstream.
    packed = cached_build("ulx3s", SMALL, CLOCK_MHZ, seed=1, pack_only=True)
    assert packed["status"] == "packed", packed.get("error")
    assert {k: packed[k] for k in ("luts", "ffs", "dsps", "brams")} == \
        {k: report[k] for k in ("luts", "ffs", "dsps", "brams")}
    assert not packed.get("fmax") and "bitstream" not in packed


@pytest.mark.parametrize("checked", [False, True])
def test_no_collision_memory_is_block_ram_alone(tmp_path, checked):
    """hw/memories.py: yosys maps a no_collision_memory read to one DP16KD with no logic
    around it; an ordinary synchronous read port gets the collision emulation (the check)."""
    import re
    import subprocess

    from amaranth import Elaboratable, Module, Signal
    from amaranth.back import rtlil
    from amaranth.lib.memory import Memory

    from skipconv.boards.build import toolchain_env
    from skipconv.hw.memories import no_collision_memory, registered_read

    class Top(Elaboratable):
        def __init__(self):
            self.wa, self.ra = Signal(10), Signal(10)
            self.wd, self.rd, self.we = Signal(18), Signal(18), Signal()

        def elaborate(self, platform):
            m = Module()
            if checked:
                m.submodules.mem = mem = Memory(shape=18, depth=1024, init=[])
                rp = mem.read_port()
            else:
                m.submodules.mem = mem = no_collision_memory(shape=18, depth=1024)
                rp = registered_read(m, mem, "rd")
            wp = mem.write_port()
            m.d.comb += [wp.addr.eq(self.wa), wp.data.eq(self.wd), wp.en.eq(self.we),
                         rp.addr.eq(self.ra), self.rd.eq(rp.data)]
            return m

    top = Top()
    (tmp_path / "t.il").write_text(rtlil.convert(top, ports=[top.wa, top.ra, top.wd, top.rd,
                                                              top.we]))
    subprocess.run([toolchain_env()["YOSYS"], "-q", "-p",
                    "read_rtlil t.il; synth_ecp5 -top top; tee -q -o stat.txt stat"],
                   cwd=tmp_path, env=toolchain_env(), check=True)
    cells = {k: int(n) for n, k in re.findall(r"^\s+(\d+)\s+(\w+)\s*$",
                                               (tmp_path / "stat.txt").read_text(), re.M)}
    assert cells.get("DP16KD") == 1
    logic = cells.get("LUT4", 0) + cells.get("TRELLIS_FF", 0)
    assert (logic > 0) if checked else (logic == 0), cells


def test_bench_summary_lists_failed_seeds():
    """Fmax is over the seeds that routed; the others are named with their error."""
    from skipconv.boards.bench_boards import _summary
    res = {"used": 1, "available": 2}
    ok = [{"status": "ok", "seed": s, "fmax": {"clk": {"achieved_mhz": f}}, "luts": res,
           "ffs": res, "dsps": res, "brams": res} for s, f in ((2, 62.0), (3, 64.5))]
    failed = {"status": "failed", "seed": 1, "error": "router2 diverged: 1301 overused wires"}
    out = _summary([failed] + ok)
    assert out["status"] == "ok" and out["fmax_mhz"] == 62.0 and out["seeds"] == [2, 3]
    assert out["seeds_failed"] == {"1": "router2 diverged: 1301 overused wires"}
    assert "seeds_failed" not in _summary(ok)
