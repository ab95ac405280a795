# amaranth: UnusedElaboratable=no
"""The Alveo RTL kernel in cocotb + Verilator: card memory is an AxiRam, control an
AxiLiteMaster; real layers run through it and equal the golden model."""

import json

import numpy as np
import pytest

from skipconv.boards import alveo
from skipconv.sw import golden, protocol, randlayer
from skipconv.sw.config import FEATURES, EngineConfig

#: Small enough to build quickly, with every mechanism built.
CONFIG = EngineConfig(lanes=2, g=1, max_taps=64, max_ifmap=512, max_cout=8, max_ofmap=512,
                      max_k=3, max_p=2, features=frozenset(FEATURES), trace=True)


def _cmd_bytes(messages, config):
    return b"".join(protocol.to_bytes(msg, config) for msg in messages)


def _layers():
    rng = np.random.default_rng(6)
    cases = [("dense", randlayer.random_layer(rng, cin=2, cout=3, h=6, w=6, features=()), True),
             ("et+velcro+perf", randlayer.random_layer(
                 rng, cin=3, cout=4, h=6, w=5, features=("early_term", "velcro", "perforation")),
              True),
             ("zero_pred", randlayer.random_layer(
                 rng, cin=2, cout=3, h=6, w=6, features=("zero_pred", "early_term"), p=2),
              False)]
    out = []
    for name, layer, trace in cases:
        x = randlayer.random_input(rng, layer.in_shape)
        out.append((name, layer, x, trace))
    return out


@pytest.mark.slow
def test_alveo_kernel_runs_layers_equal_to_golden(tmp_path):
    from skipconv.boards.simbuild import build_top, run_cocotb

    cases = _layers()
    runs = [{"name": name, "cmd": _cmd_bytes(protocol.encode_commands(L, x, CONFIG, trace=tr),
                                             CONFIG)}
            for name, L, x, tr in cases]
    # A buffer cut inside LOAD_LAYER: the engine refuses it and the kernel still finishes.
    layer0 = protocol.encode_layer(cases[0][1], CONFIG)
    runs.append({"name": "truncated", "cmd": _cmd_bytes([layer0], CONFIG)[:4 * 7]})
    # A result buffer too small: the kernel drops the rest, flags it, and finishes.
    runs.append({"name": "overflow", "cmd": runs[0]["cmd"], "res_capacity": 4})

    build = build_top(alveo.KERNEL, CONFIG, lambda: alveo.AlveoKernel(CONFIG))
    outs = {o["name"]: o for o in run_cocotb(build, alveo.KERNEL, "skipconv.boards.cocotb_alveo",
                                             {"runs": runs}, workdir=tmp_path)}

    for name, L, x, trace in cases:
        o = outs[name]
        assert o["status"] == 0 and o["count"] == o["res_words"] == len(o["res"]) // 4
        msgs = protocol.ResultParser(CONFIG).feed_bytes(o["res"])
        nload = 3 if protocol.has_plan(L) else 2
        assert [m.type for m in msgs[:nload]] == [protocol.Res.OK] * nload, name
        assert o["commands"] == nload + 1
        got = protocol.decode_run(msgs[nload:], L, trace)
        want = golden.run(L, x, CONFIG.g)
        np.testing.assert_array_equal(got.out, want.out, err_msg=name)
        if trace:
            np.testing.assert_array_equal(got.macs, want.macs, err_msg=name)
        assert got.accounting() == want.accounting(), name
        assert got.positions == want.positions, name
        assert got.cycles > 0

    t = outs["truncated"]
    msgs = protocol.ResultParser(CONFIG).feed_bytes(t["res"])
    assert [(m.type, m.body[0]) for m in msgs] == [
        (protocol.Res.ERROR, int(protocol.ErrorCode.BAD_LENGTH))]
    assert t["commands"] == 1

    ov = outs["overflow"]
    assert ov["status"] == 1 and ov["count"] == (1 << 31) | ov["res_words"]
    assert ov["res_words"] <= 4


def test_kernel_files(tmp_path):
    info = alveo.write_kernel("alveo-u55c", CONFIG, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(info["files"] + ["kernel.json"])
    v = (tmp_path / f"{alveo.KERNEL}.v").read_text()
    assert f"module {alveo.KERNEL}(" in v.replace(" (", "(")
    for port in ("ap_clk", "ap_rst_n", "m_axi_gmem_awaddr", "s_axi_control_araddr", "interrupt"):
        assert port in v
    xml = (tmp_path / "kernel.xml").read_text()
    assert 'hwControlProtocol="ap_ctrl_hs"' in xml and 'name="res_capacity"' in xml
    assert "xilinx_u55c" in (tmp_path / "build.sh").read_text()
    assert json.loads((tmp_path / "kernel.json").read_text())["registers"]["cmd"]["offset"] == 0x10
    with pytest.raises(ValueError, match="card 'alveo-u999': choose one of"):
        alveo.write_kernel("alveo-u999", CONFIG, tmp_path)
