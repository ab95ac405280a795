# amaranth: UnusedElaboratable=no
"""The ULX3S UART top (bridge + engine) in cocotb + Verilator, driven bit by bit from the host
driver's serial backend through a pseudo-terminal: real layers end to end equal to golden,
a corrupted host frame (NAK, retransmission) and a corrupted result frame (reported, rerun)."""

import numpy as np
import pytest

from skipconv.boards.core import UARTEngine
from skipconv.sw import golden, randlayer
from skipconv.sw.config import FEATURES, EngineConfig

CONFIG = EngineConfig(lanes=2, g=1, max_taps=64, max_ifmap=512, max_cout=8, max_ofmap=512,
                      max_k=3, max_p=2, features=frozenset(FEATURES), trace=True)
#: Clocks per UART bit in simulation (on the board: clock / baud rate).
DIVISOR = 8
TOP = "skipconv_uart_top"


@pytest.mark.slow
def test_ulx3s_uart_top_over_pty(tmp_path):
    from skipconv.boards.simbuild import build_top, run_cocotb

    rng = np.random.default_rng(61)
    layer = randlayer.random_layer(rng, cin=2, cout=3, h=6, w=6,
                                   features=("early_term", "velcro", "perforation"))
    x = randlayer.random_input(rng, layer.in_shape)
    layer2 = randlayer.random_layer(rng, cin=2, cout=2, h=5, w=5, features=("zero_pred",), p=2)
    x2 = randlayer.random_input(rng, layer2.in_shape)
    steps = [{"name": "noisy-in", "layer": layer, "x": x, "rx_flip": [10]},
             {"name": "corrupt-out", "layer": layer2, "x": x2, "tx_corrupt": True}]
    build = build_top(TOP, CONFIG, lambda: UARTEngine(CONFIG, DIVISOR))
    out = run_cocotb(build, TOP, "skipconv.boards.cocotb_uart",
                     {"config": CONFIG.to_dict(), "divisor": DIVISOR, "steps": steps},
                     workdir=tmp_path)
    assert out["error"] is None
    got = {s["name"]: s for s in out["steps"]}
    for step in steps:
        s = got[step["name"]]
        want = golden.run(step["layer"], step["x"], CONFIG.g)
        res = s["result"]
        np.testing.assert_array_equal(res.out, want.out, err_msg=step["name"])
        np.testing.assert_array_equal(res.macs, want.macs, err_msg=step["name"])
        assert res.accounting() == want.accounting()
    # The flipped byte was caught by the board's CRC check, NAKed and sent again.
    assert got["noisy-in"]["naks"] >= 1 and got["noisy-in"]["retransmissions"] >= 1
    assert got["noisy-in"]["first_error"] is None
    # The corrupted result frame was reported to the host, and the rerun was exact.
    assert got["corrupt-out"]["first_error"].startswith("CorruptResult")
