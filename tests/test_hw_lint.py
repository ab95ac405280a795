"""The generated Verilog passes ``verilator --lint-only -Wall`` (waivers: docs/engine.md)."""

import pytest

from skipconv.hw.lint import lint
from skipconv.sim.runner import verilog_for
from skipconv.sw.config import FEATURES, EngineConfig

SMALL = dict(max_taps=64, max_ifmap=256, max_cout=4, max_ofmap=256, max_k=3, max_p=2)
CONFIGS = {
    "dense lanes=1": EngineConfig(**SMALL, lanes=1, features=frozenset(), trace=False),
    "all features g=2 bus=64": EngineConfig(**SMALL, lanes=2, g=2, bus_bits=64,
                                            features=frozenset(FEATURES)),
    "icebreaker": EngineConfig(**SMALL, lanes=2, features=frozenset(("zero_pred", "velcro")),
                               trace=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_verilator_lint_clean(name):
    path = verilog_for(CONFIGS[name])
    text = path.read_text()
    assert "module skipconv_engine(" in text.replace(" (", "(")
    for port in ("s_axis_tdata", "s_axis_tvalid", "s_axis_tready", "s_axis_tlast",
                 "m_axis_tdata", "m_axis_tvalid", "m_axis_tready", "m_axis_tlast", "busy",
                 "error", "clk", "rst"):
        assert f" {port}" in text, port
    result = lint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generate_is_deterministic(tmp_path):
    from skipconv.hw.generate import write_verilog
    cfg = CONFIGS["dense lanes=1"]
    a = write_verilog(cfg, tmp_path / "a").read_text()
    b = write_verilog(cfg, tmp_path / "b").read_text()
    assert a == b
    assert EngineConfig.from_json((tmp_path / "a" / "config.json").read_text()) == cfg
