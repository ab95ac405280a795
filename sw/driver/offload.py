"""Offload: run a model's engine layers on a device and the rest in PyTorch.

:func:`offload` takes an exported network (:class:`skipconv.sw.export.ExportedNet`), the
folder it was saved to, or a float ``nn.Module`` (exported on the spot with a calibration
batch), runs every engine layer image by image on a :class:`~.device.Device`, and returns
the logits with per-layer statistics summed over the images. With ``compare=True`` every
engine layer's result is checked against the golden model on the same input; the first
difference is reported with its layer, image, channel and position.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .. import golden
from ..golden import OUTCOMES, Result
from .device import Device

__all__ = ["LayerStats", "Mismatch", "OffloadResult", "OffloadMismatch", "offload",
           "load_network", "dense_engine_cycles"]

_COUNTERS = ("dense", "performed", "velcro", "perforation", "zero_pred", "early_term")


class OffloadMismatch(AssertionError):
    """An engine layer's result differs from the golden model's (see :class:`Mismatch`)."""


@dataclass
class Mismatch:
    """The first difference between a device result and golden: where and what."""

    layer: int
    name: str
    image: int
    field: str                  # "out", "macs" or a counter name
    channel: int | None = None
    y: int | None = None
    x: int | None = None
    got: int | None = None
    expected: int | None = None
    count: int = 1              # differing positions (or 1 for a counter)

    def __str__(self):
        where = (f" channel {self.channel}, position (y={self.y}, x={self.x})"
                 if self.channel is not None else "")
        return (f"layer {self.layer} ({self.name}), image {self.image}: {self.field}{where} = "
                f"{self.got}, golden {self.expected} ({self.count} differ)")


@dataclass
class LayerStats:
    """One engine layer's totals over every image run."""

    index: int
    name: str
    images: int = 0
    tiles: int = 0
    dense: int = 0
    performed: int = 0
    velcro: int = 0
    perforation: int = 0
    zero_pred: int = 0
    early_term: int = 0
    positions: dict = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    cycles: int | None = 0          # None when the device does not count cycles
    dense_cycles: int = 0           # the dense engine's ideal cycles on the same work
    wall_s: float = 0.0

    @property
    def skipped(self) -> int:
        return self.dense - self.performed

    @property
    def mac_saving(self) -> float:
        return self.skipped / self.dense if self.dense else 0.0

    @property
    def cycle_saving(self) -> float | None:
        if self.cycles is None or not self.dense_cycles:
            return None
        return 1.0 - self.cycles / self.dense_cycles

    def add(self, r: Result, dense_cycles: int, wall_s: float, tiles: int):
        self.images += 1
        self.tiles += tiles
        for k in _COUNTERS:
            setattr(self, k, getattr(self, k) + int(getattr(r, k)))
        for k in OUTCOMES:
            self.positions[k] += int(r.positions.get(k, 0))
        self.cycles = None if (self.cycles is None or r.cycles is None) else \
            self.cycles + int(r.cycles)
        self.dense_cycles += dense_cycles
        self.wall_s += wall_s

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("index", "name", "images", "tiles", *_COUNTERS,
                                           "cycles", "dense_cycles")}
        d["positions"] = dict(self.positions)
        d["mac_saving"] = round(self.mac_saving, 6)
        cs = self.cycle_saving
        d["cycle_saving"] = None if cs is None else round(cs, 6)
        d["wall_s"] = round(self.wall_s, 4)
        return d


@dataclass
class OffloadResult:
    """What :func:`offload` returns."""

    logits: "object"                 # torch.Tensor (N, classes)
    layers: list
    device: str
    mismatch: Mismatch | None = None
    compared: bool = False
    wall_s: float = 0.0

    def totals(self) -> dict:
        out = {k: sum(getattr(s, k) for s in self.layers) for k in _COUNTERS}
        cyc = [s.cycles for s in self.layers]
        out["cycles"] = None if any(c is None for c in cyc) else sum(cyc)
        out["dense_cycles"] = sum(s.dense_cycles for s in self.layers)
        return out

    def accuracy(self, labels) -> float:
        import torch
        labels = torch.as_tensor(labels)
        return float((self.logits.argmax(1) == labels).float().mean().item())

    def raise_for_mismatch(self):
        if self.mismatch is not None:
            raise OffloadMismatch(str(self.mismatch))


def dense_engine_cycles(layer, config) -> int:
    """Cycles of the dense engine (no skipping) with the same lanes and ``g``, ideally fed:
    every position takes ``ceil(T / g)`` steps, spread evenly over the lanes."""
    cout, ho, wo = layer.out_shape
    return math.ceil(cout * ho * wo * math.ceil(layer.taps / config.g) / config.lanes)


def first_mismatch(index: int, name: str, image: int, got: Result, want: Result,
                   traced: bool = True) -> Mismatch | None:
    """The first difference of ``got`` from ``want`` (outputs, then MACs, then counters)."""
    fields = ["out"] + (["macs"] if traced else [])
    for f in fields:
        a, b = getattr(got, f), getattr(want, f)
        diff = np.argwhere(a != b)
        if diff.size:
            c, y, x = (int(v) for v in diff[0])
            return Mismatch(index, name, image, f, c, y, x, int(a[c, y, x]), int(b[c, y, x]),
                            len(diff))
    for k in _COUNTERS:
        if int(getattr(got, k)) != int(getattr(want, k)):
            return Mismatch(index, name, image, k, got=int(getattr(got, k)),
                            expected=int(getattr(want, k)))
    for k in OUTCOMES:
        if got.positions and got.positions.get(k, 0) != want.positions.get(k, 0):
            return Mismatch(index, name, image, f"positions[{k}]", got=got.positions.get(k, 0),
                            expected=want.positions.get(k, 0))
    return None


def load_network(model_or_packages, calib=None):
    """An :class:`~skipconv.sw.export.ExportedNet` from a net, a saved folder or a module."""
    from .. import export as export_mod
    obj = model_or_packages
    if isinstance(obj, export_mod.ExportedNet):
        return obj
    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        return export_mod.load(obj)
    import torch
    if isinstance(obj, torch.nn.Module):
        if calib is None:
            raise ValueError("offload of a torch.nn.Module needs calib= (a float batch "
                             "(N, C, H, W) that fixes the activation scales)")
        return export_mod.export(obj, calib)
    raise TypeError(f"model_or_packages of type {type(obj).__name__}: expected an "
                    "ExportedNet, a folder written by ExportedNet.save, or a torch.nn.Module")


def offload(model_or_packages, device: Device, x, *, compare: bool = False, layers=None,
            calib=None, batch: int | None = None, progress: bool = True,
            stop_on_mismatch: bool = False) -> OffloadResult:
    """Run float images ``x`` (N, C, H, W) through the network with engine layers on ``device``.

    Parameters
    ----------
    model_or_packages
        An ``ExportedNet``, a folder saved by it, or an ``nn.Module`` (then ``calib`` is needed).
    device : Device
        Where engine layers run (one image per pass, tiled as the device needs).
    compare : bool
        Check every engine layer of every image against the golden model on the same input;
        the first difference is stored in ``result.mismatch`` (the run continues with the
        device's outputs, as a deployed model would).
    layers : list of Layer, optional
        Configured layers (same order and shapes as the network's) to run instead of the
        exported ones, e.g. a skip configuration chosen by ``skipconv.sw.methods``.
    stop_on_mismatch : bool
        Raise :class:`OffloadMismatch` at the first difference instead of continuing.
    """
    from tqdm import tqdm

    net = load_network(model_or_packages, calib)
    if layers is not None:
        if len(layers) != len(net.layers):
            raise ValueError(f"layers has {len(layers)} entries; the network has "
                             f"{len(net.layers)} engine layers")
        for i, (a, b) in enumerate(zip(layers, net.layers)):
            if tuple(a.in_shape) != tuple(b.in_shape) or a.out_shape != b.out_shape:
                raise ValueError(f"layers[{i}] ({a.name}) has shape {tuple(a.in_shape)} -> "
                                 f"{a.out_shape}; the network's layer {i} is "
                                 f"{tuple(b.in_shape)} -> {b.out_shape}")
        run_layers = list(layers)
    else:
        run_layers = list(net.layers)
    index_of = {id(L): i for i, L in enumerate(net.layers)}
    stats = [LayerStats(i, L.name or f"layer{i}") for i, L in enumerate(run_layers)]
    state = {"mismatch": None}
    n_images = int(x.shape[0])
    bar = tqdm(total=n_images * len(run_layers), desc=f"offload on {device.name}", unit="layer",
               disable=not progress, leave=False)
    traced = getattr(device, "trace", True)

    def conv(layer, x_int):
        i = index_of[id(layer)]
        L = run_layers[i]
        outs = []
        dcyc = dense_engine_cycles(L, device.config)
        for j, xi in enumerate(np.asarray(x_int)):
            tiles0 = device.stats["tiles"]
            t0 = time.perf_counter()
            r = device.run(L, xi)
            stats[i].add(r, dcyc, time.perf_counter() - t0, device.stats["tiles"] - tiles0)
            if compare and state["mismatch"] is None:
                want = golden.run(L, xi, g=device.config.g)
                mm = first_mismatch(i, L.name, j + conv.offset, r, want, traced)
                if mm is not None:
                    state["mismatch"] = mm
                    if stop_on_mismatch:
                        raise OffloadMismatch(str(mm))
            outs.append(r.out)
            bar.update(1)
        if i == len(run_layers) - 1:
            conv.offset += len(outs)
        return np.stack(outs)

    conv.offset = 0
    t0 = time.perf_counter()
    try:
        logits = net.forward_int(x, conv, batch=batch)
    finally:
        bar.close()
    return OffloadResult(logits=logits, layers=stats, device=device.name,
                         mismatch=state["mismatch"], compared=compare,
                         wall_s=time.perf_counter() - t0)
