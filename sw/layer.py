"""One engine layer: the quantized conv, its static plan and skip parameters (docs/semantics.md).

A :class:`Layer` holds exactly the arrays of the case-file format (semantics section 7), less
the input ``x``, plus the input shape and a little metadata. It is written two ways:

* a *case file* (``save_case`` / ``load_case``): the section-7 ``.npz`` with ``x``, the
  interchange format for replaying one layer on the golden model, the simulator or a board;
* a *layer package* (``save`` / ``load``): the same arrays without ``x``, with a format
  version, metadata and a checksum (docs/package-format.md).

Every load validates every rule of docs/semantics.md; a bad value raises :class:`LayerError`
naming the field and the value, and nothing is half-loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "COMPUTE", "CONST", "COPY", "ET_MODES", "PACKAGE_FORMAT", "PACKAGE_VERSION",
    "Layer", "LayerError", "load", "save", "load_case", "save_case", "atomic_write_bytes",
]

COMPUTE, CONST, COPY = 0, 1, 2
ET_MODES = ("off", "exact", "predictive")
PACKAGE_FORMAT = "skipconv-layer"
PACKAGE_VERSION = 1

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


class LayerError(ValueError):
    """A layer, case file or package breaks a rule; the message names the field and value."""


def _err(field_name, value, why):
    return LayerError(f"{field_name} = {value!r}: {why}")


@dataclass(eq=False)
class Layer:
    """A conv2d + bias + ReLU + requantize layer with its skip plan (docs/semantics.md).

    Array fields use the names of the case-file format. Optional ones may be ``None``
    (feature off); :meth:`normalized` fills them with their neutral values.
    """

    in_shape: tuple          # (Cin, H, W)
    w: np.ndarray            # (Cout, Cin, K, K) signed weight_bits
    b: np.ndarray            # (Cout,) int32, accumulator units
    stride: int = 1
    pad: int = 0
    M: np.ndarray | None = None      # (Cout,) 1..65535; None: 1
    sh: np.ndarray | None = None     # (Cout,) 0..47; None: 0
    out_bits: int = 8
    act_bits: int = 8
    weight_bits: int = 8
    act_signed: bool = False
    raw: bool = False
    kind: np.ndarray | None = None   # (Cout, Ho, Wo) COMPUTE/CONST/COPY
    const: np.ndarray | None = None  # (Cout, Ho, Wo)
    nn: np.ndarray | None = None     # (Ho, Wo, 2)
    p: int = 0
    leader: np.ndarray | None = None  # (Cout, Ho, Wo) bool
    et: str = "off"
    order: np.ndarray | None = None   # (Cout, T)
    neg_start: np.ndarray | None = None  # (Cout,)
    spec: np.ndarray | None = None    # (Cout,)
    th: np.ndarray | None = None      # (Cout,)
    name: str = ""
    meta: dict = field(default_factory=dict)  # scales and provenance (not used by the engine)

    # -- shape helpers ---------------------------------------------------------------------

    @property
    def cin(self) -> int:
        return int(self.in_shape[0])

    @property
    def cout(self) -> int:
        return int(self.w.shape[0])

    @property
    def k(self) -> int:
        return int(self.w.shape[2])

    @property
    def taps(self) -> int:
        """``|T| = Cin*K*K``."""
        return self.cin * self.k * self.k

    @property
    def out_hw(self) -> tuple[int, int]:
        _, h, w = self.in_shape
        return ((h + 2 * self.pad - self.k) // self.stride + 1,
                (w + 2 * self.pad - self.k) // self.stride + 1)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return (self.cout, *self.out_hw)

    @property
    def dense_macs(self) -> int:
        ho, wo = self.out_hw
        return self.cout * ho * wo * self.taps

    @property
    def out_max(self) -> int:
        """Largest output value: ``2**out_bits - 1``, or int32 max in raw mode."""
        return INT32_MAX if self.raw else (1 << self.out_bits) - 1

    def x_range(self) -> tuple[int, int]:
        """Inclusive range of input values."""
        if self.act_signed:
            return -(1 << (self.act_bits - 1)), (1 << (self.act_bits - 1)) - 1
        return 0, (1 << self.act_bits) - 1

    @property
    def features(self) -> frozenset:
        """The skip mechanisms this layer uses (names of :data:`skipconv.sw.config.FEATURES`)."""
        used = set()
        if self.et != "off":
            used.add("early_term")
        if self.p:
            used.add("zero_pred")
        if self.kind is not None:
            kind = np.asarray(self.kind)
            if (kind == CONST).any():
                used.add("velcro")
            if (kind == COPY).any():
                used.add("perforation")
        return frozenset(used)

    # -- normalization and validation ------------------------------------------------------

    def normalized(self, validate: bool = True) -> "Layer":
        """Return a copy with every optional array filled (int64 / bool arrays).

        The layer is validated first unless the caller has just done so (``validate=False``).
        """
        if validate:
            self.validate()
        cout, ho, wo = self.out_shape
        t = self.taps
        i64 = lambda a: np.asarray(a, dtype=np.int64)  # noqa: E731
        return dataclasses.replace(
            self,
            in_shape=tuple(int(v) for v in self.in_shape),
            w=i64(self.w), b=i64(self.b),
            M=i64(self.M) if self.M is not None else np.ones(cout, np.int64),
            sh=i64(self.sh) if self.sh is not None else np.zeros(cout, np.int64),
            kind=i64(self.kind) if self.kind is not None else np.zeros((cout, ho, wo), np.int64),
            const=i64(self.const) if self.const is not None else np.zeros((cout, ho, wo), np.int64),
            nn=i64(self.nn) if self.nn is not None else np.zeros((ho, wo, 2), np.int64),
            leader=(np.asarray(self.leader, bool) if self.leader is not None
                    else np.zeros((cout, ho, wo), bool)),
            # The identity order as a read-only view: no (Cout, T) table for layers without ET.
            order=(i64(self.order) if self.order is not None
                   else np.broadcast_to(np.arange(t, dtype=np.int64), (cout, t))),
            neg_start=(i64(self.neg_start) if self.neg_start is not None
                       else np.full(cout, t, np.int64)),
            spec=i64(self.spec) if self.spec is not None else np.zeros(cout, np.int64),
            th=i64(self.th) if self.th is not None else np.zeros(cout, np.int64),
        )

    def validate(self, g: int | None = None, x: np.ndarray | None = None) -> None:
        """Check every rule of docs/semantics.md; raise :class:`LayerError` on the first broken one.

        ``g`` (the engine's MACs per step) is needed to check ``spec``; ``x``, when given, is
        checked against ``in_shape`` and the activation range.
        """
        _validate(self, g, x)

    # -- arrays <-> dict -------------------------------------------------------------------

    def case_arrays(self) -> dict:
        """The section-7 arrays of this layer (``x`` excluded), absent features left out."""
        out = {
            "w": np.asarray(self.w, np.int64), "b": np.asarray(self.b, np.int64),
            "stride": np.int64(self.stride), "pad": np.int64(self.pad),
            "out_bits": np.int64(self.out_bits), "act_signed": np.bool_(self.act_signed),
            "raw": np.bool_(self.raw), "p": np.int64(self.p), "et": np.str_(self.et),
        }
        for name in ("M", "sh", "kind", "const", "nn", "order", "neg_start", "spec", "th"):
            value = getattr(self, name)
            if value is not None:
                out[name] = np.asarray(value, np.int64)
        if self.leader is not None:
            out["leader"] = np.asarray(self.leader, bool)
        if self.act_bits != 8:
            out["act_bits"] = np.int64(self.act_bits)
        if self.weight_bits != 8:
            out["weight_bits"] = np.int64(self.weight_bits)
        return out

    @classmethod
    def from_case_arrays(cls, arrays: dict, in_shape, *, name: str = "", meta=None) -> "Layer":
        """Build a layer from section-7 arrays (unknown names are refused)."""
        known = {"w", "b", "stride", "pad", "M", "sh", "out_bits", "act_signed", "raw", "kind",
                 "const", "nn", "p", "leader", "et", "order", "neg_start", "spec", "th",
                 "act_bits", "weight_bits"}
        unknown = sorted(set(arrays) - known)
        if unknown:
            raise _err("array name", unknown[0], "not a field of the case format")
        for req in ("w", "b"):
            if req not in arrays:
                raise _err(req, None, "required array is missing")

        def scalar(name, default, conv):
            if name not in arrays:
                return default
            a = np.asarray(arrays[name])
            if a.shape != ():
                raise _err(name, a.shape, "must be a scalar")
            try:
                return conv(a.item())
            except (TypeError, ValueError):
                raise _err(name, a.item(), "has the wrong type") from None

        def opt(name):
            return np.asarray(arrays[name]) if name in arrays else None

        return cls(
            in_shape=tuple(int(v) for v in in_shape),
            w=np.asarray(arrays["w"]), b=np.asarray(arrays["b"]),
            stride=scalar("stride", 1, _as_int), pad=scalar("pad", 0, _as_int),
            M=opt("M"), sh=opt("sh"),
            out_bits=scalar("out_bits", 8, _as_int),
            act_bits=scalar("act_bits", 8, _as_int),
            weight_bits=scalar("weight_bits", 8, _as_int),
            act_signed=scalar("act_signed", False, _as_bool),
            raw=scalar("raw", False, _as_bool),
            kind=opt("kind"), const=opt("const"), nn=opt("nn"),
            p=scalar("p", 0, _as_int), leader=opt("leader"),
            et=scalar("et", "off", str),
            order=opt("order"), neg_start=opt("neg_start"), spec=opt("spec"), th=opt("th"),
            name=name, meta=dict(meta or {}),
        )


def _as_int(v):
    if isinstance(v, (bool, np.bool_)) or not float(v).is_integer():
        raise ValueError(v)
    return int(v)


def _as_bool(v):
    if not isinstance(v, (bool, np.bool_, int, np.integer)) or int(v) not in (0, 1):
        raise ValueError(v)
    return bool(v)


# -- validation ------------------------------------------------------------------------------

_BLOCK = 1 << 15      # elements of a range-check block (256 KB of int64: stays in cache)


def _int_array(name, a, shape, lo=None, hi=None, positive=None):
    """Check an integer array's shape and inclusive range; return it as int64.

    ``positive``, a bool array of the shape, is filled with ``a > 0`` (while the range check
    has each block in cache: no second pass over a large array).
    """
    a = np.asarray(a)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer)
                               or (np.issubdtype(a.dtype, np.floating)
                                   and np.all(np.isfinite(a)) and np.all(a == np.round(a)))):
        raise _err(name, str(a.dtype), "must hold integers")
    if a.shape != tuple(shape):
        raise _err(f"{name}.shape", a.shape, f"must be {tuple(shape)}")
    a = np.asarray(a, np.int64)      # no copy when it is int64 already (read-only use)
    if a.size > 4096 and lo is not None and hi is not None and a.flags.c_contiguous:
        # One pass over memory instead of two on large arrays.
        if lo == 0 and positive is None:
            # As unsigned, a <= hi iff 0 <= a <= hi (negative values are huge).
            if int(a.view(np.uint64).max()) <= hi:
                return a
        else:
            # Both reductions of a cache-sized block before the next block.
            flat = a.reshape(-1)
            pos = positive.reshape(-1) if positive is not None else None
            for i in range(0, flat.size, _BLOCK):
                block = flat[i:i + _BLOCK]
                if int(block.min()) < lo or int(block.max()) > hi:
                    break                    # named below
                if pos is not None:
                    np.greater(block, 0, out=pos[i:i + _BLOCK])
            else:
                return a
    if a.size and lo is not None and a.min() < lo:
        idx = tuple(int(i) for i in np.unravel_index(np.argmin(a), a.shape))
        raise _err(f"{name}{list(idx)}", int(a.min()), f"below the minimum {lo}")
    if a.size and hi is not None and a.max() > hi:
        idx = tuple(int(i) for i in np.unravel_index(np.argmax(a), a.shape))
        raise _err(f"{name}{list(idx)}", int(a.max()), f"above the maximum {hi}")
    if positive is not None:
        np.greater(a, 0, out=positive)
    return a


def _check_scalar(name, v, lo, hi):
    if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
        raise _err(name, v, "must be an integer")
    if not lo <= v <= hi:
        raise _err(name, v, f"must be in {lo}..{hi}")


def take_rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[c, idx[c, j]]`` for 2-D ``a`` and ``idx`` (``take_along_axis(a, idx, 1)``, but one
    flat gather: several times faster on large weight tables)."""
    rows, width = a.shape
    return np.take(np.ascontiguousarray(a).ravel(), (np.arange(rows) * width)[:, None] + idx)


def _validate(layer: Layer, g, x):
    _check_scalar("act_bits", layer.act_bits, 2, 16)
    _check_scalar("weight_bits", layer.weight_bits, 2, 16)
    _check_scalar("out_bits", layer.out_bits, 1, 16)
    if len(tuple(layer.in_shape)) != 3 or any(int(v) < 1 for v in layer.in_shape):
        raise _err("in_shape", tuple(layer.in_shape), "must be (Cin, H, W) with every size >= 1")
    w = np.asarray(layer.w)
    if w.ndim != 4 or w.shape[2] != w.shape[3] or min(w.shape) < 1:
        raise _err("w.shape", w.shape, "must be (Cout, Cin, K, K) with every size >= 1")
    if w.shape[1] != layer.in_shape[0]:
        raise _err("w.shape", w.shape, f"Cin must match the input's {layer.in_shape[0]} channels")
    wlim = 1 << (layer.weight_bits - 1)
    # The weights' signs, for the neg_start check below (taken during the range check).
    w_pos = (np.empty(w.shape, bool) if layer.order is not None and layer.neg_start is not None
             else None)
    w = _int_array("w", w, w.shape, -wlim, wlim - 1, positive=w_pos)
    cout, k = layer.cout, layer.k
    _int_array("b", layer.b, (cout,), INT32_MIN, INT32_MAX)
    _check_scalar("stride", layer.stride, 1, 64)
    _check_scalar("pad", layer.pad, 0, k - 1)
    _, h, wd = layer.in_shape
    if h + 2 * layer.pad < k or wd + 2 * layer.pad < k:
        raise _err("in_shape", tuple(layer.in_shape),
                   f"smaller than the kernel ({k}) after padding {layer.pad}")
    ho, wo = layer.out_hw
    t = layer.taps
    if not layer.raw:
        if layer.M is not None:
            _int_array("M", layer.M, (cout,), 1, 65535)
        if layer.sh is not None:
            _int_array("sh", layer.sh, (cout,), 0, 47)
    if not isinstance(layer.act_signed, (bool, np.bool_)):
        raise _err("act_signed", layer.act_signed, "must be a bool")
    if not isinstance(layer.raw, (bool, np.bool_)):
        raise _err("raw", layer.raw, "must be a bool")

    # Static plan.
    kind = None
    if layer.kind is not None:
        kind = _int_array("kind", layer.kind, (cout, ho, wo), 0, 2)
    if layer.const is not None:
        const = _int_array("const", layer.const, (cout, ho, wo))
        if kind is not None:
            vals = np.take(const, np.flatnonzero(kind == CONST))   # (faster than a bool mask)
            if vals.size and (vals.min() < 0 or vals.max() > layer.out_max):
                bad = int(vals.min()) if vals.min() < 0 else int(vals.max())
                raise _err("const", bad, f"CONST values must be in 0..{layer.out_max}")
    elif kind is not None and (kind == CONST).any():
        raise _err("const", None, "required when kind has CONST positions")
    if kind is not None and (kind == COPY).any():
        perforated = (kind == COPY).any(axis=0)
        mixed = perforated & (kind == COMPUTE).any(axis=0)
        if mixed.any():
            y, xx = (int(v) for v in np.argwhere(mixed)[0])
            raise _err(f"kind[:, {y}, {xx}]", "COPY and COMPUTE",
                       "the perforation mask is per (y, x): a perforated position is COPY "
                       "(or CONST) in every channel")
        if layer.nn is None:
            raise _err("nn", None, "required when kind has COPY positions")
        nn = _int_array("nn", layer.nn, (ho, wo, 2), 0)
        ny, nx = nn[..., 0], nn[..., 1]
        if (ny[perforated] >= ho).any() or (nx[perforated] >= wo).any():
            y, xx = (int(v) for v in np.argwhere(perforated & ((ny >= ho) | (nx >= wo)))[0])
            raise _err(f"nn[{y}, {xx}]", (int(ny[y, xx]), int(nx[y, xx])),
                       f"target outside the {ho}x{wo} ofmap")
        tgt_perf = np.zeros_like(perforated)
        tgt_perf[perforated] = perforated[ny[perforated], nx[perforated]]
        if tgt_perf.any():
            y, xx = (int(v) for v in np.argwhere(tgt_perf)[0])
            raise _err(f"nn[{y}, {xx}]", (int(ny[y, xx]), int(nx[y, xx])),
                       "an NN target must be a computed (not perforated) position")
    elif layer.nn is not None:
        _int_array("nn", layer.nn, (ho, wo, 2), 0)

    # Zero prediction.
    _check_scalar("p", layer.p, 0, 8)
    if layer.p == 1:
        raise _err("p", 1, "zero-prediction window must be 0 (off) or 2..8")
    if layer.p:
        if layer.leader is None:
            raise _err("leader", None, "required when p > 0")
        if kind is not None and (kind == COPY).any():
            raise _err("p", layer.p, "zero prediction cannot be combined with perforation "
                       "(the layer has COPY positions)")
    if layer.leader is not None:
        leader = np.asarray(layer.leader)
        if leader.dtype != bool and not (np.issubdtype(leader.dtype, np.integer)
                                         and set(np.unique(leader)) <= {0, 1}):
            raise _err("leader", str(leader.dtype), "must be boolean")
        if leader.shape != (cout, ho, wo):
            raise _err("leader.shape", leader.shape, f"must be {(cout, ho, wo)}")

    # Early termination.
    if layer.et not in ET_MODES:
        raise _err("et", layer.et, f"must be one of {', '.join(ET_MODES)}")
    if layer.et == "exact" and layer.act_signed:
        raise _err("et", "exact", "exact early termination needs a non-negative input "
                   "(act_signed is true)")
    neg = neg_error = None
    hit = None
    if layer.order is not None:
        order = _int_array("order", layer.order, (cout, t))    # range: block by block below
        if layer.neg_start is not None:
            try:                            # reported after the order's own checks
                neg = _int_array("neg_start", layer.neg_start, (cout,), 0, t)
            except LayerError as exc:
                neg_error = exc
        # Values in 0..t-1 and t of them in a row: a permutation iff every tap is hit. One
        # scatter marks each tap 0 (before neg_start) or 1 (at or after it) over a table of 2s
        # (not hit): the neg_start check below then needs no gather of the weights in tap
        # order. In blocks of rows that stay in cache: each block's range check, flat indices,
        # scatter and checks read cached data (one pass over the (Cout, T) arrays in memory).
        # A block's rows are final after its scatter (values in range: no row writes into
        # another).
        hit = np.full(cout * t, 2, np.int8)
        itype = np.int16 if t < (1 << 15) else np.int64        # ranks and neg_start
        ranks = np.arange(t, dtype=itype)[None, :]
        neg_i = neg.astype(itype) if neg is not None else None
        step = max(1, (1 << 17) // t)
        flat = np.empty((min(step, cout), t), np.int64)
        after = np.empty((min(step, cout), t), bool)
        row_start = (np.arange(cout) * t)[:, None]
        complete = True
        positive_after = False              # a positive weight at or after neg_start
        for r0 in range(0, cout, step):
            r1 = min(cout, r0 + step)
            n = r1 - r0
            block_order = order[r0:r1]
            # As unsigned, 0 <= v <= t-1 iff v <= t-1 (negative values are huge).
            if int(block_order.view(np.uint64).max()) > t - 1:
                _int_array("order", order, (cout, t), 0, t - 1)     # raises, naming the value
            np.add(block_order, row_start[r0:r1], out=flat[:n])
            if neg_i is None:
                hit[flat[:n]] = 0
            else:
                hit[flat[:n]] = np.greater_equal(ranks, neg_i[r0:r1, None],
                                                 out=after[:n]).view(np.int8)
            block = hit[r0 * t:r1 * t].reshape(n, t)
            if int(block.max()) > 1:
                complete = False                # reported after every block's range check
            elif neg_i is not None and not positive_after:
                positive_after = bool(np.logical_and(block.view(bool),
                                                     w_pos.reshape(cout, t)[r0:r1],
                                                     out=after[:n]).any())
        if not complete:
            c = int(np.argmax(hit.reshape(cout, t).max(axis=1) > 1))
            dup = np.nonzero(np.bincount(order[c], minlength=t) != 1)[0][0]
            raise _err(f"order[{c}]", f"tap {int(dup)} appears "
                       f"{int(np.count_nonzero(order[c] == dup))} times",
                       f"must be a permutation of 0..{t - 1}")
    else:
        order = np.broadcast_to(np.arange(t), (cout, t))
    if neg_error is not None:
        raise neg_error
    if layer.neg_start is not None and neg is None:
        neg = _int_array("neg_start", layer.neg_start, (cout,), 0, t)
    if neg is not None:
        wflat = w.reshape(cout, t)
        if hit is None:                              # identity order
            positive_after = bool(((np.arange(t)[None, :] >= neg[:, None]) & (wflat > 0)).any())
        if positive_after:
            ordered_w = take_rows(wflat, order)      # only to name the offending tap
            after = np.arange(t)[None, :] >= neg[:, None]
            pos_after = after & (ordered_w > 0)
            c, j = (int(v) for v in np.argwhere(pos_after)[0])
            raise _err(f"neg_start[{c}]", int(neg[c]),
                       f"tap order[{c}][{j}] = {int(order[c, j])} has positive weight "
                       f"{int(ordered_w[c, j])} at or after neg_start")
        if layer.act_signed and layer.et != "off" and (neg != t).any():
            c = int(np.nonzero(neg != t)[0][0])
            raise _err(f"neg_start[{c}]", int(neg[c]),
                       f"a signed input allows only neg_start = |T| = {t}")
    if layer.et == "predictive":
        if layer.spec is None or layer.th is None:
            raise _err("spec" if layer.spec is None else "th", None,
                       "required when et is 'predictive'")
        spec = _int_array("spec", layer.spec, (cout,), 0, t)
        _int_array("th", layer.th, (cout,), INT32_MIN, INT32_MAX)
        if g is not None:
            bad = np.nonzero(spec % g)[0]
            if bad.size:
                c = int(bad[0])
                raise _err(f"spec[{c}]", int(spec[c]), f"must be a multiple of g = {g}")
    if g is not None and (not isinstance(g, int) or g < 1):
        raise _err("g", g, "must be an integer >= 1")

    if x is not None:
        x = np.asarray(x)
        if x.shape != tuple(layer.in_shape):
            raise _err("x.shape", x.shape, f"must be the layer's input shape {tuple(layer.in_shape)}")
        lo, hi = layer.x_range()
        _int_array("x", x, x.shape, lo, hi)


# -- files -----------------------------------------------------------------------------------

def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _read_npz(path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise LayerError(f"file {os.fspath(path)!r}: not a readable .npz ({e})") from None


def _checksum(arrays: dict) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_case(path, layer: Layer, x: np.ndarray) -> None:
    """Write a section-7 case file: the layer's arrays and its input ``x``."""
    layer.validate(x=x)
    arrays = layer.case_arrays()
    arrays["x"] = np.asarray(x, np.int64)
    atomic_write_bytes(path, _npz_bytes(arrays))


def load_case(path) -> tuple[Layer, np.ndarray]:
    """Read and validate a section-7 case file; return ``(layer, x)``."""
    arrays = _read_npz(path)
    if "x" not in arrays:
        raise _err("x", None, "required array is missing from the case file")
    x = arrays.pop("x")
    if x.ndim != 3:
        raise _err("x.shape", x.shape, "must be (Cin, H, W)")
    layer = Layer.from_case_arrays(arrays, x.shape, name=os.path.basename(os.fspath(path)))
    layer.validate(x=x)
    return layer, x.astype(np.int64)


def save(path, layer: Layer) -> None:
    """Write a layer package (docs/package-format.md), validated, atomically."""
    layer.validate()
    arrays = layer.case_arrays()
    arrays["in_shape"] = np.asarray(layer.in_shape, np.int64)
    header = {"format": PACKAGE_FORMAT, "version": PACKAGE_VERSION, "name": layer.name,
              "meta": layer.meta}
    arrays["header"] = np.str_(json.dumps(header, sort_keys=True))
    arrays["checksum"] = np.str_(_checksum(arrays))
    atomic_write_bytes(path, _npz_bytes(arrays))


def load(path) -> Layer:
    """Read a layer package; check format, version, checksum and every semantic rule."""
    arrays = _read_npz(path)
    for req in ("header", "checksum", "in_shape"):
        if req not in arrays:
            raise _err(req, None, f"missing from package {os.fspath(path)!r}")
    stored = str(arrays.pop("checksum"))
    actual = _checksum(arrays)
    if stored != actual:
        raise _err("checksum", stored, f"does not match the contents ({actual}); "
                   "the file is corrupted")
    try:
        header = json.loads(str(arrays.pop("header")))
    except json.JSONDecodeError as e:
        raise _err("header", "unparsable", str(e)) from None
    if header.get("format") != PACKAGE_FORMAT:
        raise _err("header.format", header.get("format"), f"must be {PACKAGE_FORMAT!r}")
    if header.get("version") != PACKAGE_VERSION:
        raise _err("header.version", header.get("version"),
                   f"this skipconv reads version {PACKAGE_VERSION}")
    in_shape = arrays.pop("in_shape")
    if in_shape.shape != (3,):
        raise _err("in_shape", in_shape.tolist(), "must be (Cin, H, W)")
    layer = Layer.from_case_arrays(arrays, in_shape, name=header.get("name", ""),
                                   meta=header.get("meta") or {})
    layer.validate()
    return layer
