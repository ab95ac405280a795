"""Quantization rules of the exporter (docs/export.md), as small pure functions.

* Weights: symmetric per output channel, ``s_w[c] = max|W[c]| / (2**(weight_bits-1) - 1)``,
  ``Wq = round(W / s_w)`` in ``-(2**(weight_bits-1)-1) .. 2**(weight_bits-1)-1``.
* Activations: per tensor, zero point 0. Unsigned (post-ReLU): ``s = max / (2**bits - 1)``;
  signed (a network's first layer): ``s = max|x| / (2**(bits-1) - 1)``, values clamped to
  ``-2**(bits-1) .. 2**(bits-1)-1``. ``max`` comes from a calibration batch.
* Bias: ``round(b / (s_x * s_w[c]))`` as int32 (accumulator units).
* Requantization: ``M[c] * 2**-sh[c] ~= s_x * s_w[c] / s_y`` with ``M`` in 1..65535 and ``sh``
  in 0..47, the largest ``sh`` that keeps ``M`` in range (most precision), as semantics.md
  section 1's ``q()`` consumes them.

Rounding is half away from zero (``np.round`` would round half to even; the difference only
matters at exact .5 and we pick one rule and keep it).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

__all__ = ["fold_bn", "round_half_away", "weight_scales", "quantize_weights", "act_scale",
           "quantize_act", "quantize_bias", "requant_params", "torch_quantized_conv", "M_MAX", "SH_MAX"]

M_MAX = 65535
SH_MAX = 47
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def round_half_away(a):
    """Round to the nearest integer, halves away from zero (NumPy array in, int64 out)."""
    a = np.asarray(a, np.float64)
    return (np.sign(a) * np.floor(np.abs(a) + 0.5)).astype(np.int64)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) equal in eval mode to ``bn(conv(x))``.

    ``W' = W * gamma / sqrt(var + eps)`` per output channel,
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
    """
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn.num_features = {bn.num_features}: must equal the conv's "
                         f"out_channels {conv.out_channels}")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(f"bn.track_running_stats = {bn.track_running_stats}: folding needs "
                         "running statistics")
    with torch.no_grad():
        std = torch.sqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
        scale = gamma / std
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(std)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                          stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                          groups=conv.groups, bias=True, padding_mode=conv.padding_mode)
        fused.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        fused.bias.copy_(((b - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype))
    return fused.eval()


def weight_scales(w: np.ndarray, bits: int) -> np.ndarray:
    """Per-output-channel symmetric scales (an all-zero channel gets scale 1)."""
    w = np.asarray(w, np.float64)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    return np.where(amax > 0, amax / ((1 << (bits - 1)) - 1), 1.0)


def quantize_weights(w, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Wq int64, s_w float64 per channel)`` with ``W ~= Wq * s_w[c]``."""
    w = np.asarray(w, np.float64)
    s_w = weight_scales(w, bits)
    qmax = (1 << (bits - 1)) - 1
    wq = np.clip(round_half_away(w / s_w.reshape(-1, *([1] * (w.ndim - 1)))), -qmax, qmax)
    return wq, s_w


def act_scale(amax: float, bits: int, signed: bool) -> float:
    """Per-tensor scale for activations of magnitude up to ``amax`` (0 -> 1, any positive)."""
    amax = float(amax)
    if not np.isfinite(amax) or amax < 0:
        raise ValueError(f"amax = {amax!r}: must be a finite magnitude")
    levels = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    return amax / levels if amax > 0 else 1.0


def quantize_act(x, scale: float, bits: int, signed: bool) -> np.ndarray:
    """Float activations -> integers ``round(x / scale)`` clamped to the ``bits`` range."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    lo, hi = ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1))
    return np.clip(round_half_away(np.asarray(x, np.float64) / scale), lo, hi)


def quantize_bias(b, s_x: float, s_w: np.ndarray) -> np.ndarray:
    """Bias in accumulator units ``round(b / (s_x * s_w[c]))``, saturated to int32."""
    b = np.asarray(b, np.float64)
    return np.clip(round_half_away(b / (s_x * np.asarray(s_w, np.float64))), INT32_MIN, INT32_MAX)


def requant_params(ratio) -> tuple[np.ndarray, np.ndarray]:
    """``(M, sh)`` per channel with ``M * 2**-sh`` closest to ``ratio`` (see module doc).

    A ratio too large for ``M <= 65535`` at ``sh = 0`` saturates to ``M = 65535``; a ratio
    below ``2**-48`` becomes ``M = 1, sh = 47`` (every output rounds to 0 or 1 anyway).
    """
    ratio = np.asarray(ratio, np.float64)
    if not np.all(np.isfinite(ratio)) or np.any(ratio <= 0):
        raise ValueError(f"ratio = {ratio!r}: requantization ratios must be finite and > 0")
    M = np.empty(ratio.shape, np.int64)
    sh = np.empty(ratio.shape, np.int64)
    for i, r in np.ndenumerate(ratio):
        s = int(np.clip(np.floor(np.log2((M_MAX + 0.5) / r)), 0, SH_MAX))
        m = int(np.floor(r * 2.0 ** s + 0.5))
        while m > M_MAX and s > 0:          # guard the floor(log2) edge
            s -= 1
            m = int(np.floor(r * 2.0 ** s + 0.5))
        M[i], sh[i] = int(np.clip(m, 1, M_MAX)), s
    return M, sh


def torch_quantized_conv(layer, x_int, engine: str = "fbgemm") -> np.ndarray:
    """PyTorch's own quantized Conv2d + ReLU on the same integers and scales (a reference).

    Uses ``torch.ao.nn.intrinsic.quantized.ConvReLU2d`` with per-channel ``qint8`` weights
    (``layer.w``, scales ``meta["s_w"]``), ``quint8`` input of scale ``meta["s_x"]`` (a signed
    input is shifted to zero point 128, the same real values) and output scale
    ``meta["s_y"]``, zero point 0. PyTorch requantizes with a float multiplier and rounds
    half to even, so it may differ from ``q()`` by one LSB. 8-bit layers only.
    """
    from torch.ao.nn.intrinsic.quantized import ConvReLU2d

    if (layer.act_bits, layer.weight_bits, layer.out_bits) != (8, 8, 8) or layer.raw:
        raise ValueError(f"layer {layer.name!r}: the torch reference needs 8-bit activations, "
                         "weights and outputs (requantized, not raw)")
    s_x, s_y = float(layer.meta["s_x"]), float(layer.meta["s_y"])
    s_w = np.asarray(layer.meta["s_w"], np.float64)
    zp = 128 if layer.act_signed else 0
    x = np.asarray(x_int, np.int64)
    single = x.ndim == 3
    xb = x[None] if single else x
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # quantized dtypes are deprecated
            m = ConvReLU2d(layer.cin, layer.cout, layer.k, stride=layer.stride,
                           padding=layer.pad)
            wq = torch._make_per_channel_quantized_tensor(
                torch.from_numpy(np.asarray(layer.w, np.int8)), torch.from_numpy(s_w),
                torch.zeros(layer.cout, dtype=torch.int64), 0)
            bias = torch.from_numpy(np.asarray(layer.b, np.float64) * s_x * s_w).float()
            m.set_weight_bias(wq, bias)
            m.scale, m.zero_point = s_y, 0
            xq = torch._make_per_tensor_quantized_tensor(
                torch.from_numpy((xb + zp).astype(np.uint8)), s_x, zp)
            out = m(xq).int_repr().numpy().astype(np.int64)
    finally:
        torch.backends.quantized.engine = before
    return out[0] if single else out
