"""Packed records shared between the engine's blocks (``lib.data`` layouts built from HwParams)."""

from __future__ import annotations

from amaranth import signed
from amaranth.lib import data

from .params import HwParams

__all__ = ["layer_layout", "param_layout", "weight_layout", "unit_layout", "ready_layout",
           "result_layout", "plan_layout", "kind_layout", "ofmap_layout", "write_bus"]


def layer_layout(hp: HwParams):
    """The loaded layer's header and the sizes derived from it (held by the loader)."""
    return data.StructLayout({
        "cin": 16, "cout": hp.cout_bits, "h": hp.dim_bits, "w": hp.dim_bits,
        "k": hp.k_bits, "stride": 8, "pad": 8, "p": 4,
        "act_signed": 1, "raw": 1, "et": 2, "has_plan": 1, "out_bits": 5,
        "taps": hp.tap_bits, "rows": hp.tap_bits,          # weight rows per channel
        "ho": hp.dim_bits, "wo": hp.dim_bits,
        "howo": hp.ofn_bits, "n_out": hp.ofn_bits,          # Ho*Wo, Cout*Ho*Wo
        # the dispatcher's steps for a th x tw tile (th = tw = P with zero prediction, else
        # 1 x UNIT_WIDTH), multiplied out at load time so that no multiplier runs at RUN
        "pad_off": hp.base_bits + 1,                        # P*W + P
        "tile_dy": 12,                                      # th*S (input rows per tile row)
        "tile_dx": hp.dim_bits + 8,                         # tw*S
        "tile_dout": hp.ofn_bits + 4,                       # th*Wo
        "tile_dbase": hp.base_bits + 1,                     # th*S*W (modulo the base width)
        "row_dbase": hp.base_bits + 1,                      # S*W (the PE's row step)
    })


def param_layout(hp: HwParams):
    """Per-channel parameters; ``stop0`` = early termination fires at check point 0.

    The PEs sum products only; the writer adds the bias. Their early-termination bounds are
    therefore moved by the bias at load time: ``th_b = th - bias`` (``sum + bias <= th``),
    ``nb = -bias`` (``sum + bias <= 0``), and ``th_neg`` (``th < 0``: where both rules apply,
    the exact one is the tighter).
    """
    return data.StructLayout({
        "bias": signed(32), "m": 16, "sh": 6, "neg_start": hp.tap_bits, "spec": hp.tap_bits,
        "th_b": signed(hp.bound_bits), "nb": signed(hp.bound_bits), "th_neg": 1, "stop0": 1,
    })


#: The fields of :func:`param_layout` each reader of the channel parameters uses; every reader
#: has its own memory of just these (one read port each). The PEs look their early-termination
#: parameters up by channel in the ring instead of carrying them with every position, and
#: the bias joins the sum only in the writer: no position carries it through the
#: dispatcher, the PE's slots, its ready queue and its ring.
PARAM_READERS = {
    "dispatch": ("stop0",),
    # a replica in every PE (early termination; "only non-positive weights remain" is a flag
    # of the weight rows, weight_layout)
    "pe": ("spec", "th_b", "nb", "th_neg"),
    "loader": ("neg_start",),           # the loader's, to set that flag (early termination)
    "writer": ("m", "sh", "bias"),
    "responder": ("stop0",),
}


def reader_param_layout(hp: HwParams, reader: str):
    """The channel parameters one reader (:data:`PARAM_READERS`) holds.

    ``stop0`` only with early termination: without it no channel stops at check point 0, and
    the readers' ``stop0`` stays 0 (the responder then holds nothing).
    """
    pl = param_layout(hp)
    return data.StructLayout({f: pl[f].shape for f in PARAM_READERS[reader]
                              if f != "stop0" or hp.config.has("early_term")})


def weight_layout(hp: HwParams):
    """One tap of a channel, decoded at load time: weight, ifmap offset and kernel position.

    With early termination, every tap of a weight row also carries ``neg``: only
    non-positive weights remain after the row (``e >= neg_start`` for the tap count ``e``
    after it; the PE reads lane 0's), decided once by the loader from the channel's
    ``neg_start`` instead of by a compare in every PE and round. (The speculation point stays
    a compare in the PE: one bit more per tap would cost block RAM where the entry just fits.)
    """
    fields = {"w": signed(hp.config.weight_bits), "off": hp.ifa_bits, "ky": hp.k_bits,
              "kx": hp.k_bits}
    if hp.config.has("early_term"):
        fields |= {"neg": 1}
    return data.StructLayout(fields)


def plan_layout():
    """A position of the static plan (central copy, read by the responder)."""
    return data.StructLayout({"kind": 2, "leader": 1, "const": 24})


def kind_layout():
    """A position of the static plan as the PE scanner needs it."""
    return data.StructLayout({"kind": 2, "leader": 1, "const_nz": 1})


def ofmap_layout(hp: HwParams):
    """An ofmap buffer entry written by the writer: final value and performed taps.

    The taps only where they can differ from ``T`` (early termination) or are sent (trace):
    otherwise every computed position performs all of them.
    """
    fields = {"value": hp.value_bits}
    if hp.config.has("early_term") or hp.config.trace:
        fields |= {"e": hp.tap_bits}
    return data.StructLayout(fields)


def _position_fields(hp: HwParams):
    return {
        "oaddr": hp.ofa_bits,                       # c*Ho*Wo + y*Wo + x
        "iy0": signed(hp.coord_bits),               # y*S - P
        "ix0": signed(hp.coord_bits),               # x*S - P
        "base": signed(hp.base_bits),               # iy0*W + ix0
    }


def _channel_fields(hp: HwParams):
    return {
        "c": hp.c_bits, "wbase": hp.row_bits,
    }


def unit_layout(hp: HwParams):
    """A work unit: one channel, one tile (``hmax`` x ``wmax`` positions from its origin)."""
    return data.StructLayout({
        **_channel_fields(hp), **_position_fields(hp), "stop0": 1,
        "widx": hp.ofa_bits, "hmax": 4, "wmax": 4,
    })


def ready_layout(hp: HwParams):
    """A position ready to enter a PE's ring."""
    return data.StructLayout({
        **_channel_fields(hp), **_position_fields(hp), "leader": 1, "slot": hp.slot_bits,
    })


def result_layout(hp: HwParams):
    """What a PE hands to the writer: a finished position, or a window decision (``win``).

    ``psum`` is the sum of the products, without the bias (the writer adds it).
    """
    return data.StructLayout({
        "win": 1, "oaddr": hp.ofa_bits, "c": hp.c_bits, "psum": signed(hp.acc_bits),
        "fired": 1, "e": hp.tap_bits, "leader": 1, "slot": hp.slot_bits,
    })


def write_bus(addr_bits: int, shape, extra=None):
    """A memory write request: enable, address, data (plus ``extra`` fields)."""
    return data.StructLayout({"en": 1, "addr": addr_bits, "data": shape, **(extra or {})})
