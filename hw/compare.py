"""Comparisons with a constant, or with a narrower value, written as logic.

yosys turns ``x > c`` into a subtraction whose carry chain it keeps on iCE40 (the carry
logic is mapped before ABC sees it): one logic cell per bit, its LUT mostly unused. As
an AND/OR of the bits it is a LUT tree, about a third of the cells.
"""

from __future__ import annotations

from amaranth import Const, Value

__all__ = ["ge_const", "ge_narrow", "gt_const", "gt_narrow"]


def ge_const(x: Value, c: int) -> Value:
    """``x >= c`` for an unsigned ``x``."""
    x = Value.cast(x)
    n = len(x)
    if c <= 0:
        return Const(1)
    if c >= 1 << n:
        return Const(0)
    # from the least significant bit up: "x[:i+1] >= c[:i+1]"
    ge = Const(1)
    for i in range(n):
        if (c >> i) & 1:
            ge = x[i] & ge
        else:
            ge = x[i] | ge
    return ge


def gt_const(x: Value, c: int) -> Value:
    """``x > c``; a signed ``x`` needs ``c >= 0``."""
    x = Value.cast(x)
    if x.shape().signed:
        if c < 0:
            raise ValueError(f"gt_const: a signed x needs c >= 0, not {c!r}")
        return ~x[-1] & ge_const(x[:-1], c + 1)
    return ge_const(x, c + 1)


def gt_narrow(x: Value, y: Value) -> Value:
    """``x > y`` for unsigned ``x`` and a narrower ``y``: a carry chain only as wide as ``y``
    (yosys keeps it as wide as ``x``), and an OR of ``x``'s bits above."""
    x, y = Value.cast(x), Value.cast(y)
    n = len(y)
    if len(x) <= n:
        return x > y
    return x[n:].any() | (x[:n] > y)


def ge_narrow(x: Value, y: Value) -> Value:
    """``x >= y`` for unsigned ``x`` and a narrower ``y`` (see :func:`gt_narrow`)."""
    x, y = Value.cast(x), Value.cast(y)
    n = len(y)
    if len(x) <= n:
        return x >= y
    return x[n:].any() | (x[:n] >= y)
