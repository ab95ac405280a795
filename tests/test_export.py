"""PyTorch export: BN folding, quantization rules, the integer network, files, the CLI."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from skipconv.sw import data, export, golden, quant, zoo
from skipconv.sw.layer import LayerError, load_case


@pytest.fixture(scope="module")
def lenet():
    model = zoo.get_model("lenet", progress=False)
    return model, export.export(model, data.mnist_split("calib").x, spec={"zoo": "lenet"})


@pytest.fixture(scope="module")
def lenet_inputs(lenet):
    """Every engine layer's integer input for 100 test images."""
    return lenet[1].layer_inputs(data.mnist_split("test").x[:100])


# -- BN folding and the prepared float graph -----------------------------------------------

def test_fold_bn_equals_conv_then_bn_in_float():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():       # non-trivial statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    ref = nn.Sequential(conv, bn).eval()
    fused = quant.fold_bn(conv, bn)
    x = torch.randn(4, 3, 11, 11)
    assert torch.allclose(fused(x), ref(x), atol=1e-5)
    assert not torch.allclose(fused(x), conv(x), atol=1e-2)   # folding did something


def test_prepared_graph_equals_the_model(lenet):
    model, net = lenet
    x = data.mnist_split("test").x[:200]
    with torch.no_grad():
        assert torch.allclose(net.forward_float(x), model(x), atol=1e-4)
    stages = [m for m in net.gm.modules() if isinstance(m, export.EngineStage)]
    assert len(stages) == len(net.layers) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.gm.modules())


# -- quantization rules ----------------------------------------------------------------------

def test_requant_params_ranges_and_precision():
    rng = np.random.default_rng(0)
    ratio = 10.0 ** rng.uniform(-9, 3, 500)
    M, sh = quant.requant_params(ratio)
    assert M.min() >= 1 and M.max() <= quant.M_MAX and sh.min() >= 0 and sh.max() <= quant.SH_MAX
    approx = M / 2.0 ** sh
    ok = (sh < quant.SH_MAX) & (sh > 0)
    # The largest shift keeping M < 2**16: M >= 2**15, relative error <= 2**-16.
    assert np.all(M[ok] >= 1 << 15)
    assert np.max(np.abs(approx[ok] / ratio[ok] - 1)) <= 2.0 ** -16
    assert quant.requant_params([1e6]) == ([65535], [0])
    M, sh = quant.requant_params([1e-20])
    assert (M[0], sh[0]) == (1, 47)
    with pytest.raises(ValueError, match="ratio"):
        quant.requant_params([0.0])


def test_weight_and_activation_quantization():
    w = np.array([[[[0.5, -1.0]]], [[[0.0, 0.0]]], [[[2.0, 0.2]]]])
    wq, s_w = quant.quantize_weights(w, 8)
    assert wq[:, 0, 0].tolist() == [[64, -127], [0, 0], [127, 13]]
    assert s_w[0] == pytest.approx(1 / 127) and s_w[1] == 1.0
    s = quant.act_scale(2.0, 8, signed=True)
    assert quant.quantize_act(np.array([-3.0, -2.0, 0.0, 2.0]), s, 8, True).tolist() == \
        [-128, -127, 0, 127]
    s = quant.act_scale(2.55, 8, signed=False)
    assert quant.quantize_act(np.array([-1.0, 0.005, 2.55, 9.0]), s, 8, False).tolist() == \
        [0, 1, 255, 255]
    assert quant.quantize_bias([1.0, -1.0], 0.5, np.array([0.25, 0.1])).tolist() == [8, -20]


def test_exported_layers_carry_scales_and_signedness(lenet):
    _, net = lenet
    first, *rest = net.layers
    assert first.act_signed and first.meta["input_from"] is None
    for i, L in enumerate(rest, start=1):
        assert not L.act_signed and L.meta["input_from"] == i - 1
        # The integers pass unchanged: this layer's input scale is the last one's output scale.
        assert L.meta["s_x"] == net.layers[i - 1].meta["s_y"]
    for L in net.layers:
        ratio = L.meta["s_x"] * np.asarray(L.meta["s_w"]) / L.meta["s_y"]
        assert np.allclose(L.M / 2.0 ** L.sh, ratio, rtol=2e-5)
        assert L.meta["source"] == L.name


# -- the integer network ---------------------------------------------------------------------

def test_integer_top1_within_one_point_of_float(lenet):
    _, net = lenet
    res = net.evaluate(data.mnist_split("test"))         # golden model for every engine layer
    assert res["float_top1"] > 0.95
    assert abs(res["float_top1"] - res["int_top1"]) <= 0.01


def _fbgemm_emulation(L, x, saturate):
    """fbgemm's u8 x s8 arithmetic: pairs of products along (ky, kx, ci) summed in int16.

    With ``saturate`` the pair sums clamp to int16 as AVX2's ``vpmaddubsw`` does; returns the
    requantized output and where a pair saturated.
    """
    zp = 128 if L.act_signed else 0
    xu = np.pad(x + zp, ((0, 0), (0, 0), (L.pad, L.pad), (L.pad, L.pad)), constant_values=zp)
    ho, wo = L.out_hw
    k, s = L.k, L.stride
    cols = np.stack([xu[:, :, ky:ky + s * ho:s, kx:kx + s * wo:s]
                     for ky in range(k) for kx in range(k)], axis=1)
    cols = cols.reshape(x.shape[0], -1, ho, wo)
    wk = L.w.transpose(0, 2, 3, 1).reshape(L.cout, -1)
    if wk.shape[1] % 2:
        cols = np.concatenate([cols, np.zeros_like(cols[:, :1])], axis=1)
        wk = np.concatenate([wk, np.zeros_like(wk[:, :1])], axis=1)
    prod = np.einsum("ntyx,ct->nctyx", cols, wk)
    pairs = prod[:, :, 0::2] + prod[:, :, 1::2]
    clipped = np.clip(pairs, -32768, 32767) if saturate else pairs
    acc = clipped.sum(2) - zp * wk.sum(1)[None, :, None, None] + L.b[None, :, None, None]
    mult = L.meta["s_x"] * np.asarray(L.meta["s_w"]) / L.meta["s_y"]
    out = np.clip(np.round(np.maximum(acc, 0) * mult[None, :, None, None]), 0, 255)
    return out.astype(np.int64), (pairs != np.clip(pairs, -32768, 32767)).any(axis=2)


def test_golden_layers_match_torch_quantized_conv(lenet, lenet_inputs):
    """Golden vs PyTorch's quantized ConvReLU2d (same integers, scales, zero points).

    qnnpack accumulates in int32: at most 1 LSB on >= 99.9% of outputs of every layer.
    fbgemm on a CPU without VNNI sums pairs of u8 x s8 products in saturating int16; we show
    that it equals the emulation of exactly that arithmetic, and that wherever no pair
    saturated the golden output is within 1 LSB on >= 99.9% of outputs; on layers with an
    unsigned input that holds for all outputs.
    """
    _, net = lenet
    for L, x in zip(net.layers, lenet_inputs):
        g = export.golden_conv(L, x)
        q = quant.torch_quantized_conv(L, x, engine="qnnpack")
        assert np.mean(np.abs(g - q) <= 1) >= 0.999, L.name
        fb = quant.torch_quantized_conv(L, x, engine="fbgemm")
        sat_out, saturated = _fbgemm_emulation(L, x, saturate=True)
        exact_out, _ = _fbgemm_emulation(L, x, saturate=False)
        # fbgemm requantizes in float32: the emulation (float64) may differ by 1 LSB rarely.
        assert any(np.abs(fb - e).max() <= 1 and np.mean(fb == e) >= 0.9999
                   for e in (sat_out, exact_out)), L.name
        close = np.abs(g - fb) <= 1
        assert np.mean(close | saturated) >= 0.999, L.name
        if not L.act_signed:
            assert np.mean(close) >= 0.999, L.name


def test_forward_int_batches_and_layer_identity(lenet):
    _, net = lenet
    x = data.mnist_split("test").x[:12]
    calls = []

    def conv(layer, x_int):
        assert any(layer is L for L in net.layers)
        assert x_int.ndim == 4 and x_int.dtype == np.int64
        calls.append((layer.name, x_int.shape[0]))
        return export.golden_conv(layer, x_int)

    whole = net.forward_int(x, conv)
    chunked = net.forward_int(x, conv, batch=5)
    # Engine layers see the same integers; torch's float GEMMs may round per batch size.
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert calls[:3] == [("conv1", 12), ("conv2", 12), ("conv3", 12)]
    assert [n for _, n in calls[3:]] == [5] * 3 + [5] * 3 + [2] * 3
    for a, b in zip(net.layer_inputs(x), net.layer_inputs(x, batch=5)):
        assert np.array_equal(a, b)
    # The fast dense path equals the golden model for plain layers.
    assert torch.equal(net.forward_int(x, export.dense_conv), whole)


def test_forward_int_rejects_a_conv_returning_the_wrong_shape(lenet):
    _, net = lenet
    with pytest.raises(export.ExportError, match="returned shape"):
        net.forward_int(data.mnist_split("test").x[:2], lambda L, x: x)


# -- what stays in torch ---------------------------------------------------------------------

class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.ok = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.leaky = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.rect = nn.Conv2d(4, 4, (1, 3), padding=(0, 1))
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.plain = nn.Conv2d(4, 4, 3, padding=1)
        self.last = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        x = self.ok(x)
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.dilated(x))
        x = self.act(self.leaky(x))
        x = torch.relu(self.rect(x))
        x = torch.relu(self.reflect(x))
        x = self.plain(x).relu()       # engine layer (method-call ReLU), float input
        return self.last(x)


def test_unsupported_layers_stay_in_torch_with_reasons():
    torch.manual_seed(0)
    model = _Mixed().eval()
    x = data.mnist_split("calib").x[:64]
    net = export.export(model, x)
    assert [L.name for L in net.layers] == ["ok.0", "plain"]
    reasons = dict(net.skipped)
    assert "groups = 2" in reasons["grouped"]
    assert "dilation (2, 2)" in reasons["dilated"]
    assert "LeakyReLU, not ReLU" in reasons["leaky"]
    assert "non-square kernel (1, 3)" in reasons["rect"]
    assert "padding_mode = 'reflect'" in reasons["reflect"]
    assert "network's output" in reasons["last"]
    # "plain" takes a float tensor from torch (a ReLU output): unsigned, own scale.
    plain = net.layers[1]
    assert plain.meta["input_from"] is None and not plain.act_signed
    # The mixed integer network still tracks the float one.
    with torch.no_grad():
        ref = model(x)
    out = net.forward_int(x, export.dense_conv)
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.99


def test_residual_network_keeps_convs_before_adds_in_torch():
    torch.manual_seed(2)
    model = zoo.build("resnet_small").eval()
    with torch.no_grad():       # BN statistics that make folding matter, in torch convs too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    x = data.mnist_split("calib").x[:32]
    net = export.export(model, x)
    with torch.no_grad():
        assert torch.allclose(net.forward_float(x), model(x), atol=1e-4)
    assert [L.name for L in net.layers] == ["stem.0", "layer1.conv1", "layer2.conv1",
                                            "layer3.conv1"]
    skipped = dict(net.skipped)
    assert set(skipped) == {"layer1.conv2", "layer2.conv2", "layer2.shortcut.0",
                            "layer3.conv2", "layer3.shortcut.0"}
    assert all("feeds an add" in r for r in skipped.values())
    # layer1.conv1 takes the stem's integers; layer2.conv1 takes a torch ReLU(add) output.
    assert net.layers[1].meta["input_from"] == 0 and net.layers[2].meta["input_from"] is None


def test_untraceable_model_is_refused_with_the_reason():
    class Dynamic(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x
    with pytest.raises(export.ExportError, match="torch.fx cannot trace Dynamic"):
        export.export(Dynamic(), torch.zeros(1, 1, 4, 4))


# -- files -----------------------------------------------------------------------------------

def test_save_load_round_trip(lenet, tmp_path):
    _, net = lenet
    net.save(tmp_path / "net")
    back = export.load(tmp_path / "net")
    assert len(back.layers) == len(net.layers) and back.skipped == net.skipped
    for a, b in zip(net.layers, back.layers):
        assert a.name == b.name and a.meta == b.meta and a.act_signed == b.act_signed
        for f in ("w", "b", "M", "sh"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), f
    x = data.mnist_split("test").x[:20]
    assert torch.equal(back.forward_int(x), net.forward_int(x))
    manifest = json.loads((tmp_path / "net" / "manifest.json").read_text())
    assert manifest["model"] == {"zoo": "lenet"} and len(manifest["layers"]) == 3


def test_load_refuses_missing_manifest_and_corrupt_layer(lenet, tmp_path):
    _, net = lenet
    with pytest.raises(export.ExportError, match="manifest"):
        export.load(tmp_path)
    net.save(tmp_path / "net")
    pkg = sorted((tmp_path / "net" / "layers").iterdir())[1]
    blob = bytearray(pkg.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    pkg.write_bytes(bytes(blob))
    with pytest.raises(LayerError):
        export.load(tmp_path / "net")


def test_case_files_load_and_run(lenet, lenet_inputs, tmp_path):
    _, net = lenet
    for i, (L, x) in enumerate(zip(net.layers, lenet_inputs)):
        path = tmp_path / f"case{i}.npz"
        net.write_case(i, x[3], path)
        layer, xi = load_case(path)
        assert np.array_equal(xi, x[3])
        assert np.array_equal(golden.run(layer, xi).out, export.golden_conv(L, x[3:4])[0])
    with pytest.raises(export.ExportError, match="layer_index = 7"):
        net.write_case(7, lenet_inputs[0][0], tmp_path / "bad.npz")


def test_cli_exports_a_user_module(tmp_path, capsys):
    from skipconv.sw.cli import main

    src = tmp_path / "mine.py"
    src.write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(3)\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2),\n"
        "                         nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),\n"
        "                         nn.Flatten(), nn.Linear(6 * 11 * 11, 10))\n")
    weights = tmp_path / "w.pt"
    torch.save(export.load_module_spec(f"{src}:make").state_dict(), weights)
    out = tmp_path / "out"
    rc = main(["export", "--module", f"{src}:make", "--weights", str(weights), "-o", str(out),
               "--calib", "50", "--conv", "dense"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "engine 0" in text and "engine 1" in text and "test top-1" in text
    net = export.load(out)
    assert [L.in_shape for L in net.layers] == [(1, 28, 28), (4, 13, 13)]
    assert net.layers[1].meta["input_from"] == 0
    assert main(["export", "--module", f"{src}:nothing", "-o", str(out)]) == 2


def test_with_layers_runs_configured_layers(lenet, tmp_path):
    import dataclasses

    _, net = lenet
    x = data.mnist_split("test").x[:8]
    # Exact early termination (positive weights first) never changes an output.
    L = net.layers[1]
    w = L.w.reshape(L.cout, -1)
    order = np.argsort(w <= 0, axis=1, kind="stable")
    neg_start = (w > 0).sum(axis=1)
    et = dataclasses.replace(L, et="exact", order=order, neg_start=neg_start, meta={})
    configured = net.with_layers([net.layers[0], et, net.layers[2]])
    assert configured.layers[1].meta["s_y"] == L.meta["s_y"]
    assert torch.equal(configured.forward_int(x), net.forward_int(x))
    configured.save(tmp_path / "cfg")
    assert export.load(tmp_path / "cfg").layers[1].et == "exact"
    with pytest.raises(export.ExportError, match="layers\\[0\\]"):
        net.with_layers([net.layers[1], net.layers[1], net.layers[2]])
