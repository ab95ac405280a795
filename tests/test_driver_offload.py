"""Offload of the example network: logits, per-layer statistics, comparison with golden."""

import numpy as np
import pytest
import torch

from skipconv.sw import data, export, zoo
from skipconv.sw.config import EngineConfig
from skipconv.sw.driver.device import EngineDevice, GoldenDevice, open_device, responder_engine
from skipconv.sw.driver.offload import OffloadMismatch, offload
from skipconv.sw.driver.transport import CallTransport
from skipconv.sw.randlayer import exact_et_params


@pytest.fixture(scope="module")
def lenet():
    model = zoo.get_model("lenet", progress=False)
    net = export.export(model, data.mnist_split("calib").x)
    return model, net, data.mnist_split("test")


def _exact_et(net):
    """The exported layers with exact early termination on every unsigned-input layer."""
    import dataclasses
    out = []
    for L in net.layers:
        if L.act_signed:
            out.append(L)
            continue
        order, neg_start = exact_et_params(np.asarray(L.w))
        out.append(dataclasses.replace(L, et="exact", order=order, neg_start=neg_start))
    return out


def test_offload_golden_and_engine_protocol_give_identical_logits(lenet):
    _, net, test = lenet
    x = test.x[:4]
    golden_res = offload(net, GoldenDevice(EngineConfig()), x, progress=False)
    engine_res = offload(net, open_device("responder", EngineConfig()), x, compare=True,
                         progress=False)
    assert torch.equal(golden_res.logits, engine_res.logits)
    assert engine_res.mismatch is None and engine_res.compared
    # The integer network with the golden model in place of the device.
    assert torch.equal(golden_res.logits, net.forward_int(x))
    for s in engine_res.layers:
        assert s.images == 4 and s.dense == 4 * net.layers[s.index].dense_macs
        assert s.cycles is not None and s.cycles > 0


def test_offload_statistics_with_skipping_and_tiling(lenet):
    _, net, test = lenet
    layers = _exact_et(net)
    x = test.x[:3]
    small = EngineConfig(max_ifmap=600, max_ofmap=400, max_cout=8)     # forces tiles
    whole = offload(net, GoldenDevice(EngineConfig()), x, layers=layers, progress=False)
    tiled = offload(net, GoldenDevice(small), x, layers=layers, compare=True, progress=False)
    assert torch.equal(whole.logits, tiled.logits)
    assert tiled.mismatch is None
    assert [s.tiles for s in tiled.layers][1] > 3 * 1
    for a, b in zip(whole.layers, tiled.layers):
        assert (a.dense, a.performed, a.early_term) == (b.dense, b.performed, b.early_term)
    assert tiled.layers[1].early_term > 0 and tiled.totals()["performed"] < \
        tiled.totals()["dense"]


def test_compare_reports_first_mismatch_layer_channel_position(lenet):
    """An engine with g = 2 behind a driver told g = 1: ET check points (MACs) differ."""
    _, net, test = lenet
    layers = _exact_et(net)
    driver_cfg = EngineConfig()
    engine = responder_engine(driver_cfg.replace(g=2))
    dev = EngineDevice(driver_cfg, CallTransport(engine), name="g-mismatch")
    res = offload(net, dev, test.x[:2], layers=layers, compare=True, progress=False)
    mm = res.mismatch
    assert mm is not None and mm.layer == 1 and mm.field == "macs" and mm.image == 0
    assert mm.channel is not None and mm.got != mm.expected
    assert "layer 1 (conv2), image 0: macs channel" in str(mm)
    with pytest.raises(OffloadMismatch, match="layer 1"):
        res.raise_for_mismatch()


def test_offload_refuses_mismatched_layers(lenet):
    _, net, test = lenet
    with pytest.raises(ValueError, match="layers has 2 entries"):
        offload(net, GoldenDevice(EngineConfig()), test.x[:1], layers=net.layers[:2],
                progress=False)
    with pytest.raises(ValueError, match="calib="):
        offload(zoo.build("lenet"), GoldenDevice(EngineConfig()), test.x[:1], progress=False)
