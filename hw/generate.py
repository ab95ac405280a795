"""Verilog for an engine configuration: ``skipconv_engine.v`` and ``config.json``."""

from __future__ import annotations

import pathlib

from ..sw.config import EngineConfig
from ..sw.layer import atomic_write_bytes

__all__ = ["TOP", "verilog_text", "write_verilog"]

#: Name of the generated top module.
TOP = "skipconv_engine"


def verilog_text(config: EngineConfig) -> str:
    """Return the Verilog of the engine for ``config`` (deterministic for a config)."""
    from amaranth.back import verilog

    from .engine import Engine
    return verilog.convert(Engine(config), name=TOP, emit_src=False)


def write_verilog(config: EngineConfig, out_dir) -> pathlib.Path:
    """Write ``skipconv_engine.v`` and ``config.json`` into ``out_dir``; return the .v path."""
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig, not {config!r}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = verilog_text(config)
    path = out / f"{TOP}.v"
    atomic_write_bytes(path, text.encode())
    atomic_write_bytes(out / "config.json", (config.to_json() + "\n").encode())
    return path
