"""The ``sim`` backend: the generated engine under Verilator, one simulator for many layers.

Uses the smallest config of the engine benches (tests/test_sim_engine.py), so the Verilator
build is shared with them through the cache. The example network does not fit its buffers:
every engine layer of LeNet is tiled (row bands, channel groups) on the simulated engine.
"""

import numpy as np
import pytest
import torch

from skipconv.sw import data, export, golden, protocol, randlayer, zoo
from skipconv.sw.config import FEATURES, EngineConfig
from skipconv.sw.driver import tiling
from skipconv.sw.driver.device import EngineDevice, GoldenDevice
from skipconv.sw.driver.offload import offload

pytestmark = pytest.mark.slow

CONFIG = EngineConfig(lanes=3, g=1, bus_bits=32, features=frozenset(FEATURES), max_taps=256,
                      max_ifmap=1024, max_cout=16, max_ofmap=1024, max_k=5, max_p=4)


def test_sim_backend_session():
    """One simulator process for every check below (one test: xdist keeps it on one worker)."""
    from skipconv.sw.driver.sim_backend import open_sim
    sim = open_sim(CONFIG, progress=False)
    try:
        _random_layers_every_mechanism_bit_exact(sim)
        _offload_lenet_sim_equals_golden_tiled(sim)
        _engine_error_then_next_layer_on_the_same_simulator(sim)
        assert sim.stats["layers"] >= 4 + 6 + 1
    finally:
        sim.close()
    assert sim.transport._proc.returncode == 0


def _random_layers_every_mechanism_bit_exact(sim):
    rng = np.random.default_rng(11)
    mixes = [(), ("early_term",), ("early_term", "zero_pred", "velcro"),
             ("early_term", "perforation", "velcro")]
    for feats in mixes:
        layer = randlayer.random_layer(rng, cin=3, cout=5, h=7, w=9, features=feats,
                                       et="predictive" if feats else "exact", p=3)
        x = randlayer.random_input(rng, layer.in_shape)
        r = sim.run(layer, x)
        assert golden.run(layer, x).mismatches(r) == [], feats
        assert r.cycles > 0


def _offload_lenet_sim_equals_golden_tiled(sim):
    net = export.export(zoo.get_model("lenet", progress=False), data.mnist_split("calib").x)
    for L in net.layers:
        assert len(tiling.plan_tiles(L, CONFIG)) > 1          # every layer is tiled here
    x = data.mnist_split("test").x[:2]
    tiles0 = sim.stats["tiles"]
    res = offload(net, sim, x, compare=True, progress=False)
    ref = offload(net, GoldenDevice(CONFIG), x, progress=False)
    assert res.mismatch is None
    assert torch.equal(res.logits, ref.logits)
    assert sim.stats["tiles"] - tiles0 > 3 * 2
    for s in res.layers:
        assert s.cycles and s.cycles > 0


def _engine_error_then_next_layer_on_the_same_simulator(sim):
    """A driver told of bigger buffers than the engine has gets the engine's LIMIT error."""
    rng = np.random.default_rng(12)
    big = randlayer.random_layer(rng, cin=4, cout=3, h=18, w=16, features=())
    liar = EngineDevice(CONFIG.replace(max_ifmap=4096), sim.transport, name="sim")
    with pytest.raises(protocol.EngineError, match="LIMIT.*detail 1152.*LOAD_LAYER"):
        liar.run(big, randlayer.random_input(rng, big.in_shape))
    small = randlayer.random_layer(rng, cin=2, cout=3, h=6, w=6, features=("early_term",))
    x = randlayer.random_input(rng, small.in_shape)
    assert golden.run(small, x).mismatches(sim.run(small, x)) == []
