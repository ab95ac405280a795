"""The simulation runner's pure-Python parts (no simulator needed)."""

import threading
import time

from skipconv.sim import runner


def test_zero_memory_init_blocks_are_dropped_and_others_kept():
    text = (
        "module m;\n"
        "  reg [7:0] a [2:0];\n"
        "  initial begin\n    a[0] = 8'h00;\n    a[1] = 8'h0;\n    a[2] = 8'h00;\n  end\n"
        "  reg [3:0] \\b$1  [1:0];\n"
        "  initial begin\n    \\b$1 [0] = 4'h0;\n    \\b$1 [1] = 4'h3;\n  end\n"
        "  initial begin\n    c = 1'h0;\n  end\n"
        "endmodule\n")
    out = runner.strip_zero_memory_init(text)
    assert "a[0]" not in out and "a[2]" not in out          # all-zero memory init: gone
    assert "\\b$1 [1] = 4'h3;" in out and "\\b$1 [0] = 4'h0;" in out   # a non-zero word
    assert "c = 1'h0;" in out                                # not a memory word
    assert out.count("initial begin") == 2 and out.endswith("endmodule\n")


def test_build_lock_serializes_two_builders(tmp_path):
    order = []

    def builder(name):
        with runner._locked(tmp_path / "x.lock"):
            order.append(f"{name} in")
            time.sleep(0.2)
            order.append(f"{name} out")

    threads = [threading.Thread(target=builder, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


def test_unknown_simulator_is_refused():
    from skipconv.sw.config import EngineConfig
    try:
        runner.build(EngineConfig(), "modelsim")
    except runner.SimError as e:
        assert "modelsim" in str(e)
    else:
        raise AssertionError("no error")
