"""Device API: backends agree with golden; bad inputs and engine errors raise clear errors."""

import sys
import time

import numpy as np

import pytest
import torch

from skipconv.sw import golden, protocol
from skipconv.sw.config import EngineConfig
from skipconv.sw.driver.device import (DeviceError, EngineDevice, GoldenDevice, open_device,
                                       responder_engine)
from skipconv.sw.driver.pty import PtyPair
from skipconv.sw.driver.transport import (CallTransport, CorruptResult, LinkTimeout,
                                          SerialTransport)
from skipconv.sw.framing import FramedPeer
from skipconv.sw.randlayer import random_input, random_layer

CONFIG = EngineConfig(lanes=2, max_taps=64, max_ifmap=512, max_cout=8, max_ofmap=256, max_p=4)


def _layers(seed, n=3):
    rng = np.random.default_rng(seed)
    mixes = [("early_term", "zero_pred", "velcro"), ("early_term", "perforation", "velcro"),
             ("zero_pred",)]
    out = []
    for i in range(n):
        layer = random_layer(rng, cin=2, cout=4, h=9, w=7, k=3, pad=1,
                             features=mixes[i % len(mixes)], p=2)
        layer.name = f"layer{i}"
        out.append((layer, random_input(rng, layer.in_shape)))
    return out


def test_responder_backend_equals_golden_with_counters_from_the_stream():
    dev = open_device("responder", CONFIG)
    for layer, x in _layers(1):
        want = golden.run(layer, x, g=CONFIG.g)
        got = dev.run(layer, x)
        assert want.mismatches(got) == []
        assert got.cycles is not None and got.cycles > 0
    assert dev.stats["layers"] == 3


def test_bad_input_shape_dtype_range():
    layer, x = _layers(2, 1)[0]
    dev = GoldenDevice(CONFIG)
    with pytest.raises(DeviceError, match=r"input shape \(2, 9, 8\).*\(2, 9, 7\)"):
        dev.run(layer, np.zeros((2, 9, 8), np.int64))
    with pytest.raises(DeviceError, match="input dtype float32.*quantize"):
        dev.run(layer, x.astype(np.float32))
    with pytest.raises(DeviceError, match="input dtype torch.float32|input dtype float32"):
        dev.run(layer, torch.zeros(layer.in_shape))
    with pytest.raises(DeviceError, match="input value 256 outside the unsigned 8-bit range"):
        dev.run(layer, np.full(layer.in_shape, 256))
    with pytest.raises(DeviceError, match="type list"):
        dev.run(layer, x.tolist())
    # A torch integer tensor is fine.
    assert golden.run(layer, x).mismatches(dev.run(layer, torch.from_numpy(x))) == []


def test_package_for_another_config():
    layer, x = _layers(3, 1)[0]        # uses early_term, zero_pred, velcro
    dense = CONFIG.replace(features=frozenset())
    with pytest.raises(DeviceError, match="uses early_term, which this engine was built "
                                          "without"):
        GoldenDevice(dense).run(layer, x)
    with pytest.raises(DeviceError, match=r"taps Cin\*K\*K = 18 exceeds the engine's "
                                          "max_taps = 9"):
        GoldenDevice(CONFIG.replace(max_taps=9)).run(layer, x)
    wide = random_layer(np.random.default_rng(3), cin=2, cout=4, h=9, w=7,
                        features=("zero_pred",), p=3)
    with pytest.raises(DeviceError, match="p = 3 exceeds the engine's max_p = 2"):
        GoldenDevice(CONFIG.replace(max_p=2)).run(wide, x)
    with pytest.raises(DeviceError, match="act_bits = 8 exceeds the engine's act_bits = 6"):
        GoldenDevice(CONFIG.replace(act_bits=6)).run(layer, x)


def test_error_result_from_the_engine_names_code_and_command():
    """The host believes in bigger buffers than the engine has: the engine refuses."""
    layer, x = _layers(4, 1)[0]
    engine_cfg = CONFIG.replace(max_ifmap=100)
    dev = EngineDevice(CONFIG, CallTransport(responder_engine(engine_cfg)), name="mismatched")
    with pytest.raises(protocol.EngineError, match="LIMIT.*detail 126.*LOAD_LAYER of layer "
                                                   "'layer0'") as err:
        dev.run(layer, x)
    assert err.value.name == "LIMIT" and err.value.detail == 2 * 9 * 7
    # The link is clean afterwards: a layer that fits the engine runs correctly.
    lay = random_layer(np.random.default_rng(9), cin=1, cout=2, h=6, w=6, k=3, pad=1)
    xx = random_input(np.random.default_rng(9), lay.in_shape)
    assert golden.run(lay, xx).mismatches(dev.run(lay, xx)) == []


def test_unknown_device_name():
    with pytest.raises(DeviceError, match="device 'fpga0'"):
        open_device("fpga0")
    with pytest.raises(DeviceError, match="names no port"):
        open_device("serial:")


def test_xrt_absent_is_a_clear_error(monkeypatch):
    from skipconv.sw.driver.xrt_backend import XrtUnavailable
    # a machine without XRT, also where pyxrt is installed (None in sys.modules: import fails)
    monkeypatch.setitem(sys.modules, "pyxrt", None)
    with pytest.raises(XrtUnavailable, match="pyxrt"):
        open_device("xrt", CONFIG)


# -- serial: a real pseudo-terminal with the protocol's software engine on the other end ----

@pytest.fixture
def serial_device():
    with PtyPair() as pair:
        peer = FramedPeer(pair.device, responder_engine(CONFIG)).start()
        dev = EngineDevice(CONFIG, SerialTransport(pair.port_name, timeout=0.5, attempts=3),
                           name="serial")
        try:
            yield dev, peer
        finally:
            peer.stop()
            dev.close()
        assert peer.error is None


def test_serial_layers_equal_golden(serial_device):
    dev, peer = serial_device
    for layer, x in _layers(6):
        assert golden.run(layer, x).mismatches(dev.run(layer, x)) == []


def test_serial_corrupted_command_frame_is_retransmitted(serial_device):
    dev, peer = serial_device
    (layer, x), = _layers(7, 1)
    peer.corrupt_rx = {40, 700}              # inside the first LOAD_LAYER frame and later
    assert golden.run(layer, x).mismatches(dev.run(layer, x)) == []
    assert dev.transport.retransmissions == 2 and peer.naks == 2


def test_serial_corrupted_result_frame_then_next_layer_correct(serial_device):
    dev, peer = serial_device
    (a, xa), (b, xb) = _layers(8, 2)
    peer.corrupt_tx = {4}                    # OK, OK, OK, then the OFMAP frame of RUN
    with pytest.raises(CorruptResult, match="CRC.*run the layer again"):
        dev.run(a, xa)
    assert golden.run(b, xb).mismatches(dev.run(b, xb)) == []
    assert golden.run(a, xa).mismatches(dev.run(a, xa)) == []


def test_serial_silent_device_times_out_without_hanging():
    with PtyPair() as pair:
        peer = FramedPeer(pair.device, responder_engine(CONFIG))
        peer.silent = True
        peer.start()
        dev = EngineDevice(CONFIG, SerialTransport(pair.port_name, timeout=0.2, attempts=2),
                           name="serial")
        (layer, x), = _layers(9, 1)
        t0 = time.monotonic()
        with pytest.raises(LinkTimeout, match="not accepted after 2 attempts"):
            dev.run(layer, x)
        assert time.monotonic() - t0 < 5
        peer.stop()
        dev.close()


@pytest.mark.parametrize("bus_bits", [32, 64, 128])
def test_message_bytes_equals_protocol_to_bytes(bus_bits):
    from skipconv.sw.driver.device import message_bytes
    config = EngineConfig(bus_bits=bus_bits)
    rng = np.random.default_rng(bus_bits)
    for n in range(1, 10):
        words = rng.integers(0, 1 << 32, size=n).tolist()
        assert message_bytes(words, config) == protocol.to_bytes(words, config)


def test_xrt_kernel_interface_matches_the_alveo_kernel():
    """The backend's kernel name, argument order and result buffer format are the boards'."""
    from skipconv.boards import alveo
    from skipconv.sw.driver import xrt_backend
    assert xrt_backend.KERNEL_NAME == alveo.KERNEL
    args = ["cmd", "cmd_words", "res", "res_capacity"]
    offsets = [alveo.REGISTERS[a][0] for a in args]
    assert offsets == sorted(offsets)               # XRT passes arguments in offset order
    # A result buffer as the kernel writes it: count, then the stream (the software engine's).
    (layer, x), = _layers(10, 1)
    engine = responder_engine(CONFIG)
    stream = b"".join(r for words in protocol.encode_commands(layer, x, CONFIG, trace=True)
                      for r in engine(protocol.to_bytes(words, CONFIG)))
    words = np.frombuffer(stream, "<u4")
    raw = np.concatenate([[len(words)], words]).astype(np.uint32)
    replies = xrt_backend.split_results(raw, CONFIG, res_capacity=len(words))
    assert b"".join(replies) == stream and len(replies) == 3 + 3
    with pytest.raises(xrt_backend.TransportError, match="overflowed"):
        xrt_backend.split_results(raw, CONFIG, res_capacity=len(words) - 1)
