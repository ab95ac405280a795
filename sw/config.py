"""The one engine configuration read by the gateware, golden model, protocol, driver and benches."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cached_property

__all__ = ["FEATURES", "EngineConfig", "ConfigError", "PRESETS"]

#: The skip mechanisms an engine can be built with. The empty set is the dense baseline.
FEATURES = ("early_term", "zero_pred", "velcro", "perforation")


class ConfigError(ValueError):
    """An engine parameter is out of range; the message names the field and the value."""


def _check_int(name, value, lo, hi=None):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"EngineConfig.{name} must be an integer, not {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"EngineConfig.{name} must be in {rng}, not {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Parameters of one generated engine.

    Parameters
    ----------
    lanes : int
        Processing elements working in parallel, each on its own output position.
    g : int
        MACs per PE per cycle (taps per accumulation step).
    act_bits, weight_bits, out_bits : int
        Input activation, weight and requantized output widths.
    max_taps : int
        Largest ``Cin*K*K`` a layer may have (at most 65535: tap indices are 16 bits).
    max_ifmap : int
        Largest ifmap tile, in activations (``Cin*H*W``).
    max_cout : int
        Largest number of output channels in one pass.
    max_ofmap : int
        Largest ofmap tile, in positions (``Cout*Ho*Wo``).
    max_k : int
        Largest kernel size.
    max_p : int
        Largest zero-prediction window (0 when ``zero_pred`` is not built).
    bus_bits : int
        Width of the command and result stream data (a multiple of 32).
    features : frozenset of str
        Subset of :data:`FEATURES`.
    trace : bool
        Build the per-position MAC trace buffer (``RUN`` with the trace bit answers ``TRACE``).
    """

    lanes: int = 8
    g: int = 1
    act_bits: int = 8
    weight_bits: int = 8
    out_bits: int = 8
    max_taps: int = 1152
    max_ifmap: int = 16384
    max_cout: int = 64
    max_ofmap: int = 16384
    max_k: int = 7
    max_p: int = 4
    bus_bits: int = 32
    features: frozenset = field(default_factory=lambda: frozenset(FEATURES))
    trace: bool = True

    def __post_init__(self):
        if not isinstance(self.features, frozenset):
            object.__setattr__(self, "features", frozenset(self.features))
        _check_int("lanes", self.lanes, 1, 256)
        _check_int("g", self.g, 1, 8)
        _check_int("act_bits", self.act_bits, 2, 16)
        _check_int("weight_bits", self.weight_bits, 2, 16)
        _check_int("out_bits", self.out_bits, 1, 16)
        _check_int("max_taps", self.max_taps, 1, 65535)
        _check_int("max_ifmap", self.max_ifmap, 1, 1 << 24)
        _check_int("max_cout", self.max_cout, 1, 1 << 16)
        _check_int("max_ofmap", self.max_ofmap, 1, 1 << 24)
        _check_int("max_k", self.max_k, 1, 15)
        _check_int("max_p", self.max_p, 0, 8)
        _check_int("bus_bits", self.bus_bits, 32, 1024)
        if self.bus_bits % 32:
            raise ConfigError(
                f"EngineConfig.bus_bits must be a multiple of 32, not {self.bus_bits!r}")
        if not isinstance(self.trace, bool):
            raise ConfigError(f"EngineConfig.trace must be a bool, not {self.trace!r}")
        unknown = sorted(self.features - set(FEATURES))
        if unknown:
            raise ConfigError(
                f"EngineConfig.features has unknown feature {unknown[0]!r}; "
                f"known: {', '.join(FEATURES)}")
        if "zero_pred" in self.features and self.max_p < 2:
            raise ConfigError(
                f"EngineConfig.max_p must be in 2..8 when zero_pred is built, not {self.max_p!r}")

    # -- derived values ------------------------------------------------------------------

    @cached_property
    def acc_bits(self) -> int:
        """Signed accumulator width that never wraps: int32 bias plus ``max_taps`` products."""
        amax = (1 << self.act_bits) - 1          # unsigned input is the larger range
        wmax = 1 << (self.weight_bits - 1)       # most negative weight
        bound = self.max_taps * amax * wmax + (1 << 31)
        return bound.bit_length() + 1

    @cached_property
    def tap_bits(self) -> int:
        """Width of a tap index (0..max_taps-1) and of a tap count (0..max_taps)."""
        return max(1, self.max_taps.bit_length())

    def has(self, feature: str) -> bool:
        """Whether the engine is built with ``feature``."""
        return feature in self.features

    @property
    def dense(self) -> bool:
        """Whether this is the dense baseline (no skip mechanism built)."""
        return not self.features

    def replace(self, **changes) -> "EngineConfig":
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    # -- serialization -------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["features"] = sorted(self.features, key=FEATURES.index)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"EngineConfig has no field {unknown[0]!r}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "EngineConfig":
        return cls.from_dict(json.loads(text))

    @property
    def key(self) -> str:
        """A short stable name for caches (simulator builds, board builds)."""
        import hashlib
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]


PRESETS = {
    "default": EngineConfig(),
    "dense": EngineConfig(features=frozenset()),
    # The iCEBreaker build's engine: two lanes and small buffers. It does not fit an iCE40
    # UP5K yet (5,280 logic cells, 8 SB_MAC16, 30 EBR; docs/boards.md, "Status and limits").
    "icebreaker": EngineConfig(lanes=2, max_taps=256, max_ifmap=2048, max_cout=16, trace=False,
                               max_ofmap=2048, max_k=5, max_p=2),
}
