"""Split a layer that exceeds the engine's buffers into tiles, and put the results back together.

Tiles are row bands of the output (full width) times groups of output channels. The rules
that keep outputs and MAC accounting bit-identical to the whole layer (docs/semantics.md
section 6; docs/driver.md "Tiling" has the argument):

* **Input halo and padding.** A band of output rows ``[y0, y1)`` needs padded-input rows
  ``[y0*S, (y1-1)*S + K)``. The host cuts them out of the zero-padded input and sends the tile
  with ``pad = 0``: a band's interior edges get real neighbour rows, the layer's true borders
  get explicit zeros, so every tap term is the one of the whole layer.
* **Zero prediction.** Band starts are multiples of ``p``, so every window of the layer lies in
  exactly one tile, with its leaders; windows that run past the ofmap's bottom or right edge
  are the same partial windows as in the whole layer.
* **Perforation.** A COPY position whose NN target lies in another band stays COPY in its tile
  (the engine counts it: no MACs, ``perforation += |T|``) but is pointed at an in-band
  computed position; after all tiles ran, the host overwrites its value with the target's final
  output from the other band. Every band holds at least one computed position (bands are
  merged otherwise).
* **Channel groups** split per-channel parameters and plan planes; nothing crosses channels.
* **Accounting** is a sum over positions, so the tiles' counters add up to the layer's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config import EngineConfig
from ..golden import OUTCOMES, Result
from ..layer import COPY, Layer

__all__ = ["TilingError", "Tile", "plan_tiles", "assemble", "fits_whole"]


class TilingError(ValueError):
    """A layer cannot be split to fit this engine; the message names the limit and values."""


@dataclass
class Tile:
    """One engine pass: output channels ``[c0, c1)`` times output rows ``[y0, y1)``.

    ``layer`` is what the engine runs; :meth:`input` cuts its input out of the layer's.
    ``fix`` marks (in tile coordinates, ``(c1-c0, y1-y0, Wo)``) the COPY positions whose value
    the host takes from another band, or is ``None``.
    """

    c0: int
    c1: int
    y0: int
    y1: int
    layer: Layer
    whole_rows: bool            # True: input and padding are the layer's own
    fix: np.ndarray | None = None

    def input(self, x: np.ndarray, parent: Layer) -> np.ndarray:
        """The tile's input, cut (with halo and explicit zero padding) from the layer's ``x``."""
        if self.whole_rows:
            return x
        s, k, pad = parent.stride, parent.k, parent.pad
        r0, r1 = self.y0 * s, (self.y1 - 1) * s + k          # padded-input rows
        cin, h, w = x.shape
        out = np.zeros((cin, r1 - r0, w + 2 * pad), dtype=x.dtype)
        src0, src1 = max(r0 - pad, 0), min(r1 - pad, h)      # real rows in range
        if src1 > src0:
            out[:, src0 + pad - r0:src1 + pad - r0, pad:pad + w] = x[:, src0:src1]
        return out


def _ifmap_rows_fit(layer: Layer, rows: int) -> int:
    """Activations of an explicit-padding band of ``rows`` output rows."""
    _, _, w = layer.in_shape
    return layer.cin * ((rows - 1) * layer.stride + layer.k) * (w + 2 * layer.pad)


def fits_whole(layer: Layer, config: EngineConfig) -> bool:
    """Whether the layer runs in one pass."""
    cin, h, w = layer.in_shape
    cout, ho, wo = layer.out_shape
    return (cin * h * w <= config.max_ifmap and cout <= config.max_cout
            and cout * ho * wo <= config.max_ofmap)


def _perforated(layer: Layer) -> np.ndarray | None:
    if layer.kind is None:
        return None
    perf = (np.asarray(layer.kind) == COPY).any(axis=0)
    return perf if perf.any() else None


def _bands(layer: Layer, config: EngineConfig, cg: int, rows: int) -> list[tuple[int, int]]:
    ho = layer.out_hw[0]
    bands = [(y, min(y + rows, ho)) for y in range(0, ho, rows)]
    perf = _perforated(layer)
    if perf is None:
        return bands
    # Every band needs a computed position to stand in as the in-band COPY target.
    merged = []
    for y0, y1 in bands:
        if merged and perf[merged[-1][0]:merged[-1][1]].all():
            merged[-1] = (merged[-1][0], y1)
        else:
            merged.append((y0, y1))
    if len(merged) > 1 and perf[merged[-1][0]:merged[-1][1]].all():
        last = merged.pop()
        merged[-1] = (merged[-1][0], last[1])
    for y0, y1 in merged:
        if y1 - y0 > rows and (_ifmap_rows_fit(layer, y1 - y0) > config.max_ifmap
                               or cg * (y1 - y0) * layer.out_hw[1] > config.max_ofmap):
            raise TilingError(f"output rows {y0}..{y1 - 1} are all perforated and the band "
                              "holding them with a computed row exceeds max_ifmap or max_ofmap")
    return merged


def plan_tiles(layer: Layer, config: EngineConfig) -> list[Tile]:
    """Return the tiles that run ``layer`` on an engine with ``config``'s buffers.

    ``layer`` must be valid and fit the engine's per-pass limits that tiling cannot change
    (``max_taps``, ``max_k``, ``max_p``); :func:`skipconv.sw.driver.device.check_layer`
    checks those first.
    """
    L = layer
    cin, h, w = L.in_shape
    cout, ho, wo = L.out_shape
    if fits_whole(L, config):
        return [Tile(0, cout, 0, ho, L, whole_rows=True)]

    unit = L.p if L.p else 1
    if cin * h * w <= config.max_ifmap:
        # The input fits: channel groups over all rows, the layer's own geometry.
        cg = min(cout, config.max_cout, config.max_ofmap // (ho * wo))
        if cg >= 1:
            bands = [(0, ho)]
        else:
            cg = 0
    else:
        cg = 0
    if cg == 0:
        cg = min(cout, config.max_cout, config.max_ofmap // (min(unit, ho) * wo))
        if cg < 1:
            raise TilingError(
                f"max_ofmap = {config.max_ofmap}: one band of {min(unit, ho)} output row(s) of "
                f"width {wo} (p = {L.p}) needs {min(unit, ho) * wo} positions per channel")
        band_in = config.max_ifmap // (cin * (w + 2 * L.pad))
        r_if = (band_in - L.k) // L.stride + 1 if band_in >= L.k else 0
        r_of = config.max_ofmap // (cg * wo)
        rows = min(r_if, r_of, ho)
        if rows < ho:
            rows -= rows % unit
        if rows < 1:
            need = _ifmap_rows_fit(L, min(unit, ho))
            raise TilingError(
                f"max_ifmap = {config.max_ifmap}: one band of {min(unit, ho)} output row(s) "
                f"needs {need} activations ({cin} channels x "
                f"{(min(unit, ho) - 1) * L.stride + L.k} rows x {w + 2 * L.pad} padded columns)")
        bands = _bands(L, config, cg, rows)

    tiles = []
    for c0 in range(0, cout, cg):
        c1 = min(c0 + cg, cout)
        for y0, y1 in bands:
            tiles.append(_make_tile(L, c0, c1, y0, y1, whole=(y0 == 0 and y1 == ho
                                                               and cin * h * w <= config.max_ifmap)))
    return tiles


def _slice_c(a, c0, c1):
    return None if a is None else np.asarray(a)[c0:c1]


def _make_tile(L: Layer, c0: int, c1: int, y0: int, y1: int, whole: bool) -> Tile:
    ho, wo = L.out_hw
    plane = lambda a: None if a is None else np.asarray(a)[c0:c1, y0:y1]  # noqa: E731
    kind = plane(L.kind)
    nn, fix = None, None
    if kind is not None and (kind == COPY).any():
        nn, fix = _band_nn(L, kind, y0, y1)
    if whole:
        geometry = dict(in_shape=tuple(L.in_shape), pad=L.pad)
    else:
        rows = (y1 - y0 - 1) * L.stride + L.k
        geometry = dict(in_shape=(L.cin, rows, L.in_shape[2] + 2 * L.pad), pad=0)
    sub = dataclasses.replace(
        L, **geometry,
        w=np.asarray(L.w)[c0:c1], b=np.asarray(L.b)[c0:c1],
        M=_slice_c(L.M, c0, c1), sh=_slice_c(L.sh, c0, c1),
        kind=kind, const=plane(L.const), nn=nn, leader=plane(L.leader),
        order=_slice_c(L.order, c0, c1), neg_start=_slice_c(L.neg_start, c0, c1),
        spec=_slice_c(L.spec, c0, c1), th=_slice_c(L.th, c0, c1),
        name=f"{L.name}[c{c0}:{c1},y{y0}:{y1}]", meta=dict(L.meta),
    )
    return Tile(c0, c1, y0, y1, sub, whole_rows=whole, fix=fix)


def _band_nn(L: Layer, kind: np.ndarray, y0: int, y1: int):
    """The band's NN table in band coordinates, and the COPY positions fixed by the host."""
    nn = np.asarray(L.nn, np.int64)[y0:y1].copy()
    nn[..., 0] -= y0
    rows, wo = nn.shape[:2]
    copy = kind == COPY
    perforated = copy.any(axis=0)
    outside = perforated & ((nn[..., 0] < 0) | (nn[..., 0] >= rows))
    yy, xx = np.mgrid[0:rows, 0:wo]
    own = np.stack([yy, xx], axis=-1)
    nn = np.where(perforated[..., None], nn, own)       # unused entries: the position itself
    fix = None
    if outside.any():
        cand = np.argwhere(~perforated)                  # exists: see _bands
        for y, x in np.argwhere(outside):
            d = (cand[:, 0] - y) ** 2 + (cand[:, 1] - x) ** 2
            nn[y, x] = cand[int(np.argmin(d))]
        fix = copy & outside[None]
    return nn, fix


def assemble(layer: Layer, tiles: list[Tile], results: list[Result]) -> Result:
    """Put the tiles' results together into the whole layer's result (and fix cross-band COPY)."""
    if len(tiles) == 1 and tiles[0].whole_rows and tiles[0].c1 - tiles[0].c0 == layer.cout:
        return results[0]
    cout, ho, wo = layer.out_shape
    out = np.zeros((cout, ho, wo), np.int64)
    macs = np.zeros((cout, ho, wo), np.int64)
    outcome = np.zeros((cout, ho, wo), np.int8)
    fix = np.zeros((cout, ho, wo), bool)
    totals = dict.fromkeys(("dense", "performed", "velcro", "perforation", "zero_pred",
                            "early_term"), 0)
    positions = dict.fromkeys(OUTCOMES, 0)
    cycles = 0
    for t, r in zip(tiles, results):
        sl = (slice(t.c0, t.c1), slice(t.y0, t.y1))
        out[sl], macs[sl], outcome[sl] = r.out, r.macs, r.outcome
        if t.fix is not None:
            fix[sl] = t.fix
        for k in totals:
            totals[k] += int(getattr(r, k))
        for k in positions:
            positions[k] += int(r.positions.get(k, 0))
        cycles = None if (cycles is None or r.cycles is None) else cycles + int(r.cycles)
    if fix.any():
        nn = np.asarray(layer.nn, np.int64)
        c, y, x = np.nonzero(fix)
        out[c, y, x] = out[c, nn[y, x, 0], nn[y, x, 1]]
    return Result(out=out, macs=macs, outcome=outcome, positions=positions, cycles=cycles,
                  **totals)
