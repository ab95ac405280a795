"""Where skipconv keeps its caches (trained models, simulator and board builds)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(*parts: str) -> Path:
    """Return (and create) a cache folder: ``$SKIPCONV_CACHE`` or ``~/.cache/skipconv``.

    The Makefile points ``SKIPCONV_CACHE`` at the checkout's ``.cache/`` so that a fresh
    clone starts cold and ``make clean`` empties it.
    """
    root = os.environ.get("SKIPCONV_CACHE")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "skipconv"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
