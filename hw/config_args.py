"""Command-line options for an EngineConfig: ``--config FILE``, ``--preset`` and every field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..sw.config import FEATURES, PRESETS, EngineConfig

__all__ = ["add_config_arguments", "config_from_args"]

_INT_FIELDS = [f.name for f in dataclasses.fields(EngineConfig)
               if f.name not in ("features", "trace")]


def add_config_arguments(parser) -> None:
    """Add ``--config``, ``--preset``, one option per integer field, ``--features``, ``--trace``."""
    grp = parser.add_argument_group("engine configuration (applied over --config / --preset)")
    grp.add_argument("--config", metavar="FILE", help="EngineConfig JSON file")
    grp.add_argument("--preset", choices=sorted(PRESETS), help="a named preset (default: default)")
    for name in _INT_FIELDS:
        grp.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None,
                         metavar="N", help=f"EngineConfig.{name}")
    grp.add_argument("--features", default=None, metavar="LIST",
                     help=f"comma-separated subset of {','.join(FEATURES)}; 'none' = dense")
    grp.add_argument("--trace", dest="trace", action="store_true", default=None,
                     help="build the MAC trace")
    grp.add_argument("--no-trace", dest="trace", action="store_false", help="no MAC trace")


def config_from_args(args) -> EngineConfig:
    """The EngineConfig the options describe (raises ConfigError naming a bad value)."""
    if getattr(args, "config", None):
        config = EngineConfig.from_json(Path(args.config).read_text())
    else:
        config = PRESETS[getattr(args, "preset", None) or "default"]
    changes = {n: getattr(args, n) for n in _INT_FIELDS if getattr(args, n, None) is not None}
    feats = getattr(args, "features", None)
    if feats is not None:
        changes["features"] = frozenset() if feats.strip() in ("", "none") else frozenset(
            f.strip() for f in feats.split(","))
    if getattr(args, "trace", None) is not None:
        changes["trace"] = args.trace
    return config.replace(**changes) if changes else config
