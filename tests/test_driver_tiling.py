"""Tiling (semantics.md section 6): tiled runs equal the whole layer bit for bit."""

import numpy as np
import pytest

from skipconv.sw import golden
from skipconv.sw.config import EngineConfig
from skipconv.sw.driver import tiling
from skipconv.sw.driver.device import GoldenDevice, open_device
from skipconv.sw.layer import COMPUTE, COPY, Layer
from skipconv.sw.randlayer import nearest_neighbours, random_input, random_layer

FEATURE_MIXES = [
    ("early_term", "zero_pred", "velcro"),
    ("early_term", "perforation", "velcro"),
    ("perforation",),
    ("zero_pred",),
]


def _small_config(rng, layer):
    """A config whose buffers force ``layer`` into several tiles (when it can be tiled)."""
    cin, h, w = layer.in_shape
    cout, ho, wo = layer.out_shape
    lo = cin * (layer.k + layer.stride) * (w + 2 * layer.pad)
    lo2 = wo * 4
    return EngineConfig(
        max_ifmap=int(rng.integers(lo, max(lo + 1, cin * h * w))),
        max_ofmap=int(rng.integers(lo2, max(lo2 + 1, cout * ho * wo))),
        max_cout=int(rng.integers(1, cout + 1)), max_p=4)


def _assert_same(whole, tiled):
    assert whole.mismatches(tiled) == []
    np.testing.assert_array_equal(tiled.outcome, whole.outcome)
    assert tiled.positions == whole.positions


@pytest.mark.parametrize("seed", range(4))
def test_random_tiled_layers_equal_whole(seed):
    rng = np.random.default_rng(1000 + seed)
    tiled_cases = fixed_cases = 0
    for trial in range(24):
        feats = FEATURE_MIXES[trial % len(FEATURE_MIXES)]
        k = int(rng.choice([1, 3, 5]))
        layer = random_layer(
            rng, cin=int(rng.integers(1, 4)), cout=int(rng.integers(1, 7)),
            h=int(rng.integers(max(k, 3), 17)), w=int(rng.integers(max(k, 3), 13)), k=k,
            stride=int(rng.choice([1, 2])), pad=int(rng.integers(0, k)), features=feats,
            p=int(rng.integers(2, 5)), et=str(rng.choice(["exact", "predictive"])),
            perf_frac=0.2)
        x = random_input(rng, layer.in_shape)
        whole = golden.run(layer, x)
        config = _small_config(rng, layer)
        try:
            tiles = tiling.plan_tiles(layer, config)
        except tiling.TilingError:
            continue
        tiled_cases += len(tiles) > 1
        fixed_cases += any(t.fix is not None for t in tiles)
        for t in tiles:
            assert t.c1 - t.c0 <= config.max_cout
            assert t.layer.cin * t.layer.in_shape[1] * t.layer.in_shape[2] <= config.max_ifmap
            assert (t.c1 - t.c0) * (t.y1 - t.y0) * layer.out_hw[1] <= config.max_ofmap
            if layer.p:
                assert t.y0 % layer.p == 0
        _assert_same(whole, GoldenDevice(config).run(layer, x))
        # The same tiles through the protocol bytes and the software engine.
        _assert_same(whole, open_device("responder", config).run(layer, x))
    assert tiled_cases >= 15


def test_zero_prediction_windows_stay_whole():
    """p = 3 on 10 rows: bands start at multiples of 3; the partial last window is the same."""
    rng = np.random.default_rng(7)
    layer = random_layer(rng, cin=2, cout=3, h=10, w=9, k=3, pad=1,
                         features=("zero_pred", "early_term"), p=3)
    x = random_input(rng, layer.in_shape, zero_frac=0.7)
    whole = golden.run(layer, x)
    assert whole.zero_pred > 0
    config = EngineConfig(max_ifmap=2 * 8 * 11, max_ofmap=3 * 3 * 9, max_cout=3)
    tiles = tiling.plan_tiles(layer, config)
    assert [(t.y0, t.y1) for t in tiles] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    _assert_same(whole, GoldenDevice(config).run(layer, x))


def test_copy_target_in_another_band_is_fixed_by_host():
    """Row 2 copies row 1 (other band); every COPY is counted by the band that holds it."""
    rng = np.random.default_rng(3)
    cout, h, w = 2, 6, 5
    perforated = np.zeros((h, w), bool)
    perforated[2, :] = True              # the first row of the second band (rows 2..3)
    perforated[3, 1] = True
    kind = np.full((cout, h, w), COMPUTE)
    kind[:, perforated] = COPY
    wt = rng.integers(-8, 8, size=(cout, 1, 3, 3))
    layer = Layer(in_shape=(1, h, w), w=wt, b=np.array([5, -3]), pad=1, kind=kind,
                  const=np.zeros_like(kind), nn=nearest_neighbours(perforated), name="copy")
    assert tuple(layer.nn[2, 0]) == (1, 0)
    x = rng.integers(0, 255, size=(1, h, w))
    whole = golden.run(layer, x)
    config = EngineConfig(max_ifmap=1 * 4 * 7, max_ofmap=2 * 2 * 5)
    tiles = tiling.plan_tiles(layer, config)
    assert [(t.y0, t.y1) for t in tiles] == [(0, 2), (2, 4), (4, 6)]
    assert tiles[1].fix is not None and tiles[1].fix[:, 0].all()
    tiled = GoldenDevice(config).run(layer, x)
    _assert_same(whole, tiled)
    np.testing.assert_array_equal(tiled.out[:, 2, :], whole.out[:, 1, :])
    assert tiled.perforation == perforated.sum() * cout * 9


def test_band_without_computed_position_is_merged():
    rng = np.random.default_rng(4)
    h, w = 6, 4
    perforated = np.zeros((h, w), bool)
    perforated[2:4] = True               # a whole band of two rows is perforated
    kind = np.full((1, h, w), COMPUTE)
    kind[:, perforated] = COPY
    layer = Layer(in_shape=(1, h, w), w=rng.integers(-5, 5, size=(1, 1, 3, 3)),
                  b=np.array([1]), pad=1, kind=kind, const=np.zeros_like(kind),
                  nn=nearest_neighbours(perforated))
    config = EngineConfig(max_ifmap=1 * 6 * 6, max_ofmap=2 * 4 * 2)
    tiles = tiling.plan_tiles(layer, config)
    assert [(t.y0, t.y1) for t in tiles] == [(0, 4), (4, 6)]
    x = rng.integers(0, 255, size=(1, h, w))
    _assert_same(golden.run(layer, x), GoldenDevice(config).run(layer, x))


def test_untileable_layer_names_the_limit():
    rng = np.random.default_rng(5)
    layer = random_layer(rng, cin=3, cout=2, h=8, w=8, k=3, pad=1)
    with pytest.raises(tiling.TilingError, match="max_ifmap = 50"):
        tiling.plan_tiles(layer, EngineConfig(max_ifmap=50))
    with pytest.raises(tiling.TilingError, match="max_ofmap = 5"):
        tiling.plan_tiles(layer, EngineConfig(max_ofmap=5))


def test_whole_layer_is_one_untouched_tile():
    rng = np.random.default_rng(6)
    layer = random_layer(rng, features=("zero_pred",))
    tiles = tiling.plan_tiles(layer, EngineConfig())
    assert len(tiles) == 1 and tiles[0].layer is layer and tiles[0].whole_rows


def test_tiled_with_two_macs_per_step():
    """g = 2: early-termination check points are per position, so tiling keeps them."""
    rng = np.random.default_rng(8)
    for feats in [("early_term", "zero_pred", "velcro"), ("early_term", "perforation")]:
        layer = random_layer(rng, cin=3, cout=6, h=11, w=9, k=3, pad=1, features=feats,
                             et="predictive", g=2, p=2, perf_frac=0.2)
        x = random_input(rng, layer.in_shape)
        config = EngineConfig(g=2, max_ifmap=3 * 5 * 11, max_ofmap=3 * 2 * 9, max_cout=4)
        tiles = tiling.plan_tiles(layer, config)
        assert len(tiles) > 4
        _assert_same(golden.run(layer, x, g=2), GoldenDevice(config).run(layer, x))
        _assert_same(golden.run(layer, x, g=2), open_device("responder", config).run(layer, x))
