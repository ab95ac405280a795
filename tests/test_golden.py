"""The golden model against PyTorch (dense) and against a literal reading of the rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import reference
from skipconv.sw import golden, randlayer
from skipconv.sw.layer import COMPUTE, CONST, COPY, Layer

FEATURE_SETS = [
    (), ("early_term",), ("zero_pred",), ("velcro",), ("perforation",),
    ("early_term", "zero_pred", "velcro"), ("early_term", "perforation", "velcro"),
]


def torch_q(acc: torch.Tensor, M, sh, out_bits) -> torch.Tensor:
    """q(acc) written independently of the golden model, in torch int64."""
    M = torch.as_tensor(M, dtype=torch.int64)[:, None, None]
    sh = torch.as_tensor(sh, dtype=torch.int64)[:, None, None]
    rnd = torch.where(sh > 0, torch.ones_like(sh) << (sh - 1).clamp(min=0), 0)
    scaled = torch.clamp((acc.clamp(min=0) * M + rnd) >> sh, max=(1 << out_bits) - 1)
    return torch.where(acc <= 0, torch.zeros_like(acc), scaled)


def _random_dense_case(rng):
    """One random dense layer within the issue's ranges, kept under ~40 M MACs."""
    k = int(rng.choice([1, 3, 5, 7]))
    stride = int(rng.choice([1, 2]))
    pad = int(rng.integers(0, k // 2 + 1))
    for _ in range(100):
        cin = int(rng.choice([1, 2, 3, 8, 16, 32, 64, 128, 256]))
        cout = int(rng.choice([1, 4, 16, 64, 128, 256]))
        h, w = (int(v) for v in rng.integers(max(1, k - 2 * pad), 65, size=2))
        ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        if cout * ho * wo * cin * k * k <= 40_000_000:
            break
    signed = bool(rng.random() < 0.4)
    raw = bool(rng.random() < 0.3)
    layer = randlayer.random_layer(rng, cin=cin, cout=cout, h=h, w=w, k=k, stride=stride,
                                   pad=pad, act_signed=signed, raw=raw)
    x = randlayer.random_input(rng, layer.in_shape, signed=signed, zero_frac=0.2)
    return layer, x


@pytest.mark.parametrize("chunk", range(4))
def test_dense_equals_torch_conv2d_then_q(chunk):
    """200 random layers: golden == conv2d in float64 on the same integers, then q."""
    rng = np.random.default_rng(1000 + chunk)
    seen = set()
    for _ in range(50):
        layer, x = _random_dense_case(rng)
        seen.add((layer.k, layer.stride, layer.act_signed, layer.raw))
        res = golden.run(layer, x)
        acc = torch.nn.functional.conv2d(
            torch.from_numpy(x.astype(np.float64))[None],
            torch.from_numpy(layer.w.astype(np.float64)),
            torch.from_numpy(layer.b.astype(np.float64)),
            stride=layer.stride, padding=layer.pad)[0].round().to(torch.int64)
        if layer.raw:
            want = acc.clamp(min=0, max=(1 << 31) - 1)
        else:
            want = torch_q(acc, layer.M, layer.sh, layer.out_bits)
        np.testing.assert_array_equal(res.out, want.numpy(), err_msg=f"layer {layer.w.shape}")
        assert res.performed == res.dense == layer.dense_macs
        assert res.positions["computed"] == res.out.size
    assert len(seen) >= 10   # the draw really covers strides, kernels, signedness, raw


@pytest.mark.parametrize("seed", range(6))
def test_every_mechanism_equals_literal_reference(seed):
    """Position by position: outputs, MACs and outcomes equal the slow literal model."""
    rng = np.random.default_rng(seed)
    for i in range(35):
        features = FEATURE_SETS[i % len(FEATURE_SETS)]
        g = int(rng.choice([1, 2, 4]))
        signed = bool(rng.random() < 0.25)
        k = int(rng.choice([1, 3, 5]))
        layer = randlayer.random_layer(
            rng, cin=int(rng.integers(1, 4)), cout=int(rng.integers(1, 5)),
            h=int(rng.integers(k, 10)), w=int(rng.integers(k, 10)), k=k,
            stride=int(rng.choice([1, 2])), pad=int(rng.integers(0, k // 2 + 1)),
            features=features, et=str(rng.choice(["exact", "predictive"])),
            p=int(rng.choice([2, 3, 4])), g=g, act_signed=signed, raw=bool(rng.random() < 0.2),
            leaders=str(rng.choice(["diagonal", "random"])))
        x = randlayer.random_input(rng, layer.in_shape, signed=signed)
        res = golden.run(layer, x, g=g)
        out, macs, outcome, counters = reference.run(layer, x, g=g)
        np.testing.assert_array_equal(res.out, out)
        np.testing.assert_array_equal(res.macs, macs)
        np.testing.assert_array_equal(res.outcome, outcome)
        assert res.accounting() == counters
        assert sum(res.positions.values()) == res.out.size


def _negatives_before_neg_start(rng, layer):
    """Move some non-positive taps of each channel before ``neg_start`` (still valid)."""
    order, neg = layer.order.copy(), layer.neg_start.copy()
    for c in range(len(order)):
        tail = order[c, neg[c]:]
        moved = tail[rng.random(len(tail)) < 0.3]
        rest = tail[~np.isin(tail, moved)]
        order[c] = np.concatenate([order[c, :neg[c]], moved, rest])
        neg[c] += len(moved)
    return dataclasses.replace(layer, order=order, neg_start=neg)


@pytest.mark.parametrize("seed", range(4))
def test_early_termination_search_equals_literal_reference(seed, monkeypatch):
    """The exact stop-point search on long tap orders against the literal model.

    Exercises every path of the backward search: several rounds (first widths 1, 3, 16),
    pairs in small chunks, both ways of gathering the input (copied rows, flat indices),
    rounds on a subset of the channels, g = 1..4, predictive mode, negative taps before
    neg_start (the rank-table path), int64 sums (16-bit weights), 16-bit input taps (10-bit
    activations), batches, and small weights and inputs, which make exact zeros and ties at
    check points common.
    """
    rng = np.random.default_rng(50 + seed)
    for i in range(8):
        monkeypatch.setattr(golden, "_FIRST_WIDTH", int(rng.choice([1, 3, 16])))
        monkeypatch.setattr(golden, "_SEARCH_BLOCK", int(rng.choice([64, 1 << 21])))
        monkeypatch.setattr(golden, "_ROWS_SHARE", int(rng.choice([0, 8, 1 << 30])))
        g = int(rng.choice([1, 2, 3, 4]))
        small = i % 2 == 0
        act_bits = 2 if small else (10 if i % 4 == 1 else 8)
        features = [("early_term",), ("early_term", "zero_pred", "velcro"),
                    ("early_term", "perforation", "velcro")][i % 3]
        layer = randlayer.random_layer(
            rng, cin=int(rng.integers(8, 25)), cout=int(rng.integers(1, 7)), h=6, w=7, k=3,
            pad=1, features=features, et="predictive" if i % 4 == 3 else "exact", g=g,
            weight_bits=3 if small else (16 if i % 4 == 3 else 8), act_bits=act_bits)
        if i % 4 == 1:
            layer = _negatives_before_neg_start(rng, layer)
        xs = np.stack([randlayer.random_input(rng, layer.in_shape, act_bits=act_bits)
                       for _ in range(2)])
        before = {k: np.array(v, copy=True) for k, v in layer.case_arrays().items()}
        res = golden.run(layer, xs, g=g)
        for k, v in layer.case_arrays().items():           # the layer is not modified
            np.testing.assert_array_equal(v, before[k], err_msg=k)
        totals = dict.fromkeys(res.accounting(), 0)
        for n in range(2):
            out, macs, outcome, counters = reference.run(layer, xs[n], g=g)
            np.testing.assert_array_equal(res.out[n], out)
            np.testing.assert_array_equal(res.macs[n], macs)
            np.testing.assert_array_equal(res.outcome[n], outcome)
            for name, v in counters.items():
                totals[name] += v
        assert res.accounting() == totals
        assert res.early_term > 0


def _tiny(w, b, x_shape, **kw):
    return Layer(in_shape=x_shape, w=np.asarray(w), b=np.asarray(b), **kw)


def test_const_positions_output_their_constant_and_cost_nothing():
    rng = np.random.default_rng(5)
    layer = randlayer.random_layer(rng, cin=2, cout=3, h=6, w=6, features=("velcro",),
                                   const_frac=0.3)
    x = randlayer.random_input(rng, layer.in_shape)
    res = golden.run(layer, x)
    const = layer.kind == CONST
    assert const.sum() > 0
    np.testing.assert_array_equal(res.out[const], layer.const[const])
    assert (res.macs[const] == 0).all()
    assert res.velcro == const.sum() * layer.taps
    dense = golden.run(dataclasses.replace(layer, kind=None, const=None), x)
    np.testing.assert_array_equal(res.out[~const], dense.out[~const])


def test_copy_takes_the_nn_targets_final_output_including_constants():
    rng = np.random.default_rng(6)
    layer = randlayer.random_layer(rng, cin=2, cout=2, h=6, w=6, features=("perforation",),
                                   perf_frac=0.4)
    kind = layer.kind.copy()
    ny, nx = layer.nn[..., 0], layer.nn[..., 1]
    perforated = (kind == COPY).any(axis=0)
    y0, x0 = np.argwhere(perforated)[0]
    ty, tx = ny[y0, x0], nx[y0, x0]
    kind[1, ty, tx] = CONST                      # the target is CONST in channel 1 only
    const = np.zeros_like(kind)
    const[1, ty, tx] = 77
    layer = dataclasses.replace(layer, kind=kind, const=const)
    x = randlayer.random_input(rng, layer.in_shape)
    res = golden.run(layer, x)
    for c in range(2):
        for y, xx in np.argwhere(perforated):
            assert res.out[c, y, xx] == res.out[c, ny[y, xx], nx[y, xx]]
            assert res.macs[c, y, xx] == 0 and res.outcome[c, y, xx] == COPY
    assert res.out[1, y0, x0] == 77
    assert res.perforation == (kind == COPY).sum() * layer.taps


def test_zero_prediction_border_windows_and_const_leaders():
    """3x3 ofmap, p = 2: windows cross the border; out-of-ofmap leaders count as zero."""
    # 1x1 conv on a 1-channel 3x3 input with weight 1: the output equals the input.
    w = np.ones((2, 1, 1, 1), np.int64)
    x = np.array([[[0, 5, 0],
                   [4, 0, 0],
                   [6, 7, 0]]])
    leader = np.zeros((2, 3, 3), bool)
    leader[:, 0, 0] = leader[:, 1, 1] = True     # window (0,0): diagonal leaders
    leader[:, 2, 2] = True                       # window (1,1): leader (2,2); (3,3) is outside
    leader[:, 2, 0] = True                       # window (1,0): (2,0) leader; (3,1) outside
    kind = np.zeros((2, 3, 3), np.int64)
    const = np.zeros((2, 3, 3), np.int64)
    kind[1, 0, 0], const[1, 0, 0] = CONST, 9     # a nonzero CONST leader keeps window computed
    layer = _tiny(w, [0, 0], (1, 3, 3), M=[1, 1], sh=[0, 0], p=2, leader=leader,
                  kind=kind, const=const)
    res = golden.run(layer, x)
    # channel 0: window (0,0) leaders (0,0)=0,(1,1)=0 -> predicted: (0,1)=5 and (1,0)=4 -> 0
    assert res.out[0, 0, 1] == 0 and res.out[0, 1, 0] == 0
    assert res.outcome[0, 0, 1] == golden.PREDICTED
    # window (0,1) has no leader in the ofmap (its diagonal (0,2),(1,3)): predicted
    assert res.outcome[0, 0, 2] == golden.PREDICTED and res.outcome[0, 1, 2] == golden.PREDICTED
    # window (1,0): leader (2,0)=6 != 0 -> follower (2,1)=7 computed
    assert res.out[0, 2, 1] == 7 and res.outcome[0, 2, 1] == golden.COMPUTED
    # window (1,1): only leader (2,2)=0 -> nothing else in the ofmap to predict
    # channel 1: the CONST leader 9 keeps window (0,0) alive
    assert res.out[1, 0, 1] == 5 and res.out[1, 1, 0] == 4
    assert res.zero_pred == res.positions["predicted"] * layer.taps
    # channel 0: 2 in window (0,0) + 2 in window (0,1); channel 1: 2 in window (0,1)
    assert res.positions["predicted"] == 6
    assert res.outcome[1, 0, 2] == golden.PREDICTED


def test_exact_early_termination_never_changes_an_output_and_saves_macs():
    rng = np.random.default_rng(7)
    saved = 0
    for _ in range(10):
        layer = randlayer.random_layer(rng, cin=8, cout=6, h=9, w=9, features=("early_term",),
                                       et="exact")
        x = randlayer.random_input(rng, layer.in_shape)        # post-ReLU: non-negative
        res = golden.run(layer, x)
        dense = golden.run(dataclasses.replace(layer, et="off"), x)
        np.testing.assert_array_equal(res.out, dense.out)
        assert res.performed + res.early_term == res.dense
        saved += res.early_term
    assert saved > 0


@pytest.mark.parametrize("g", [1, 4])
def test_predictive_early_termination_stops_at_spec(g):
    """One channel, taps 1..8 all weight +1 on input 1, bias -20: psum(spec) decides."""
    w = np.ones((2, 8, 1, 1), np.int64)
    x = np.ones((8, 1, 1), np.int64)
    b = np.array([-20, -20])
    spec = np.array([4, 4])
    th = np.array([-16, -17])     # channel 0: psum(4) = -16 <= -16 stops; channel 1 does not
    layer = _tiny(w, b, (8, 1, 1), M=[1, 1], sh=[0, 0], et="predictive",
                  order=np.tile(np.arange(8), (2, 1)), neg_start=[8, 8], spec=spec, th=th)
    res = golden.run(layer, x, g=g)
    assert res.macs[0, 0, 0] == 4 and res.out[0, 0, 0] == 0
    assert res.outcome[0, 0, 0] == golden.STOPPED
    # channel 1 runs on: acc = -12 <= 0 at the end check, 8 MACs, output 0
    assert res.macs[1, 0, 0] == 8 and res.out[1, 0, 0] == 0
    assert res.early_term == 4
    # a positive output turned to zero by the threshold: bias +1 -> acc 9 but psum(4) = 5
    layer2 = dataclasses.replace(layer, b=np.array([1, 1]), th=np.array([5, 4]))
    res2 = golden.run(layer2, x, g=g)
    assert res2.out[0, 0, 0] == 0 and res2.macs[0, 0, 0] == 4
    assert res2.out[1, 0, 0] == 9 and res2.macs[1, 0, 0] == 8


def test_check_points_follow_g_and_include_the_end():
    """T = 9, g = 4: check points 0, 4, 8, 9; neg_start 5 -> first rule-2 check at 8."""
    w = np.array([[[[3]], [[-1]], [[-1]], [[-1]], [[-1]], [[-1]], [[-1]], [[-1]], [[-1]]]])
    x = np.ones((9, 1, 1), np.int64)
    order = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8]])
    layer = _tiny(w, [1], (9, 1, 1), M=[1], sh=[0], et="exact", order=order, neg_start=[1])
    # psum: e0=4 (first check >= 1): 1+3-3 = 1 > 0; e=8: 1+3-7 = -3 <= 0 -> stop at 8
    res = golden.run(layer, x, g=4)
    assert res.macs[0, 0, 0] == 8 and res.early_term == 1
    res1 = golden.run(layer, x, g=1)   # g = 1: psum(5) = 0 -> stop at 5
    assert res1.macs[0, 0, 0] == 5


def test_mac_identity_and_outcome_counts_on_every_feature_mix():
    rng = np.random.default_rng(8)
    for features in FEATURE_SETS:
        layer = randlayer.random_layer(rng, cin=3, cout=4, h=10, w=10, features=features)
        res = golden.run(layer, randlayer.random_input(rng, layer.in_shape))
        a = res.accounting()
        assert a["dense"] == a["performed"] + a["velcro"] + a["perforation"] + a["zero_pred"] \
            + a["early_term"]
        assert res.positions["const"] * layer.taps == a["velcro"]
        assert res.positions["copy"] * layer.taps == a["perforation"]
        assert res.positions["predicted"] * layer.taps == a["zero_pred"]


def test_result_file_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    layer = randlayer.random_layer(rng, features=("early_term", "velcro"))
    res = golden.run(layer, randlayer.random_input(rng, layer.in_shape))
    res.to_npz(tmp_path / "r.npz")
    back = golden.Result.from_npz(tmp_path / "r.npz")
    assert res.mismatches(back) == []
    back.out[0, 0, 0] += 1
    assert "out[0, 0, 0]" in res.mismatches(back)[0]


def test_bad_g_is_refused():
    rng = np.random.default_rng(10)
    layer = randlayer.random_layer(rng, features=("early_term",), et="predictive", g=2)
    x = randlayer.random_input(rng, layer.in_shape)
    with pytest.raises(ValueError, match="g = 0"):
        golden.run(layer, x, g=0)
    odd = np.nonzero(layer.spec % 4)[0]
    if odd.size:
        with pytest.raises(ValueError, match=r"spec\[\d+\].*multiple of g = 4"):
            golden.run(layer, x, g=4)


@pytest.mark.parametrize("features", FEATURE_SETS)
def test_batch_equals_one_image_at_a_time(features, monkeypatch):
    """A batch is only more columns: every image's result equals its own run."""
    rng = np.random.default_rng(11)
    layer = randlayer.random_layer(rng, cin=3, cout=4, h=7, w=9, features=features, g=2,
                                   et="predictive")
    xs = np.stack([randlayer.random_input(rng, layer.in_shape) for _ in range(5)])
    # Force several chunks so the chunked path is exercised too.
    monkeypatch.setattr(golden, "_BATCH_ELEMENTS", layer.taps * 7 * 9 * 2)
    batch = golden.run(layer, xs, g=2)
    singles = [golden.run(layer, x, g=2) for x in xs]
    for i, one in enumerate(singles):
        np.testing.assert_array_equal(batch.out[i], one.out)
        np.testing.assert_array_equal(batch.macs[i], one.macs)
        np.testing.assert_array_equal(batch.outcome[i], one.outcome)
    for name in ("dense", "performed", "velcro", "perforation", "zero_pred", "early_term"):
        assert getattr(batch, name) == sum(getattr(r, name) for r in singles)
    assert batch.positions == {k: sum(r.positions[k] for r in singles) for k in golden.OUTCOMES}
    with pytest.raises(ValueError, match=r"x.shape = \(5, 3, 7, 8\): a batch must be"):
        golden.run(layer, xs[..., :8], g=2)
