"""EngineConfig: validation messages, derived widths, JSON round trip."""

import pytest

from skipconv.sw.config import FEATURES, PRESETS, ConfigError, EngineConfig


@pytest.mark.parametrize("field, value, pattern", [
    ("lanes", 0, r"EngineConfig.lanes must be in 1\.\.256, not 0"),
    ("g", 9, r"EngineConfig.g must be in 1\.\.8, not 9"),
    ("g", 1.5, r"EngineConfig.g must be an integer, not 1.5"),
    ("act_bits", 1, r"EngineConfig.act_bits must be in 2\.\.16, not 1"),
    ("max_taps", 70000, r"EngineConfig.max_taps must be in 1\.\.65535, not 70000"),
    ("bus_bits", 48, r"EngineConfig.bus_bits must be a multiple of 32, not 48"),
    ("features", {"early_term", "magic"}, r"EngineConfig.features has unknown feature 'magic'"),
    ("trace", "yes", r"EngineConfig.trace must be a bool, not 'yes'"),
])
def test_bad_values_are_named(field, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        EngineConfig(**{field: value})


def test_zero_pred_needs_a_window():
    with pytest.raises(ConfigError, match="max_p must be in 2..8 when zero_pred is built, not 0"):
        EngineConfig(max_p=0)
    EngineConfig(max_p=0, features=frozenset({"early_term"}))


def test_accumulator_never_wraps():
    cfg = EngineConfig(max_taps=4608)
    worst = 4608 * 255 * 128 + (1 << 31)
    assert worst < (1 << (cfg.acc_bits - 1))
    assert -worst >= -(1 << (cfg.acc_bits - 1))


def test_json_round_trip_and_key():
    cfg = EngineConfig(lanes=4, g=2, features=frozenset({"velcro", "early_term"}))
    back = EngineConfig.from_json(cfg.to_json())
    assert back == cfg and back.key == cfg.key
    assert cfg.key != EngineConfig().key
    with pytest.raises(ConfigError, match="no field 'colour'"):
        EngineConfig.from_dict({"colour": 1})


def test_presets_are_valid():
    assert PRESETS["dense"].dense and not PRESETS["default"].dense
    assert set(PRESETS["default"].features) == set(FEATURES)
