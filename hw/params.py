"""Hardware constants derived from an :class:`~skipconv.sw.config.EngineConfig`.

Every width and depth the gateware uses is computed here, once, from the config, so that no
block carries its own magic numbers.
"""

from __future__ import annotations

from amaranth.utils import ceil_log2

from ..sw.config import EngineConfig

__all__ = ["HwParams", "RING_DEPTH", "UNIT_WIDTH", "SLOTS", "MAGIC", "Op", "Reply", "Err",
           "FEATURE_BITS", "COUNTER_WORDS", "PREFETCH_SLOTS"]

#: Pipeline stages of a PE (issue, registered weight row, address, ifmap read, registered
#: read data, multiply, accumulate); the ring holds this many independent contexts so that
#: each one's partial sum is up to date when its next taps issue.
RING_DEPTH = 7
#: The two stages that only register block RAM read data a second time (for Fmax on the
#: LUT-RAM FPGAs); targets without LUT RAM (iCE40) are built for a slow clock and go without.
READ_REGISTER_STAGES = 2
#: Positions per work unit when the layer does not use zero prediction: small enough that the
#: end-of-layer imbalance between PEs stays a few positions, large enough that the dispatcher
#: (one unit per cycle for all PEs) never starves them.
UNIT_WIDTH = 4
#: Work units (windows) a PE holds at once with zero prediction: leaders of later windows run
#: while earlier windows wait for their decision.
SLOTS = 4
#: ... and without it, where a unit is done once scanned: one unit in hand while another is
#: scanned hides the dispatcher's round trip (the same cycles as 4 slots on dense and
#: early-termination layers down to 1x1 kernels; on iCE40 the two slots saved are ~210
#: logic cells of flip-flops and read multiplexers, docs/benchmarks.md, Boards).
PREFETCH_SLOTS = 2
#: Depth of a PE's queue of positions ready to enter the ring.
READY_DEPTH = 4
#: Depth of a PE's result FIFO towards the writer.
RESULT_DEPTH = 4

#: Result streams one round-robin of the writer's gather serves; more lanes are gathered in
#: registered groups of this many (eight in one arbiter were the ECP5 build's critical path).
GATHER_FAN = 4

MAGIC = 0xC5


class Op:
    LOAD_LAYER = 0x01
    LOAD_PLAN = 0x02
    LOAD_IFMAP = 0x03
    RUN = 0x04


class Reply:
    OK = 0x80
    OFMAP = 0x81
    TRACE = 0x82
    COUNTERS = 0x83
    ERROR = 0xEE


class Err:
    BAD_MAGIC = 1
    BAD_OPCODE = 2
    BAD_LENGTH = 3
    LIMIT = 4
    FEATURE = 5
    BAD_VALUE = 6
    NOT_READY = 7


FEATURE_BITS = {"early_term": 1, "zero_pred": 2, "velcro": 4, "perforation": 8, "trace": 16}
COUNTER_WORDS = 19


def _bits(n: int) -> int:
    """Unsigned width holding 0..n."""
    return max(1, int(n).bit_length())


class HwParams:
    """Widths and depths of the engine built for ``config``.

    ``lut_ram``: the target has distributed (LUT) RAM, where small memories and FIFOs are
    cheapest; without it (iCE40) they go to block RAM instead of flip-flops, and the PE ring
    leaves out its read-register stages (``read_registers``): two contexts fewer, each a
    copy of every field in flip-flops that an iCE40 logic cell holds alone.
    """

    def __init__(self, config: EngineConfig, *, lut_ram: bool = True):
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, not {config!r}")
        c = config
        self.config = c
        self.lut_ram = bool(lut_ram)
        self.lanes = c.lanes
        self.g = c.g
        self.read_registers = self.lut_ram
        self.depth = RING_DEPTH if self.read_registers else RING_DEPTH - READ_REGISTER_STAGES
        self.slots = SLOTS if c.has("zero_pred") else PREFETCH_SLOTS
        self.slot_bits = ceil_log2(self.slots)
        self.unit_width = UNIT_WIDTH
        self.gather_fan = GATHER_FAN
        self.acc_bits = c.acc_bits
        self.tap_bits = c.tap_bits                      # 0..max_taps
        self.cout_bits = _bits(c.max_cout)              # 0..max_cout
        self.c_bits = max(1, ceil_log2(c.max_cout))     # channel index
        self.rows = c.max_cout * -(-c.max_taps // c.g)  # weight rows (g taps each)
        self.row_bits = _bits(self.rows)
        self.ifa_bits = max(1, ceil_log2(c.max_ifmap))  # ifmap address
        self.ifn_bits = _bits(c.max_ifmap)
        self.ofa_bits = max(1, ceil_log2(c.max_ofmap))  # ofmap address
        self.ofn_bits = _bits(c.max_ofmap)
        self.dim_bits = min(16, _bits(c.max_ifmap))     # H, W (and Ho, Wo)
        self.k_bits = _bits(c.max_k)
        # Signed input coordinate (y*S - P can be -P; y*S can reach H + P).
        self.coord_bits = self.dim_bits + 2
        # Signed ifmap base address of a position: iy0*W + ix0, iy0 >= -P.
        self.base_bits = self.ifa_bits + self.k_bits + 3
        self.plan = bool(c.features & {"velcro", "perforation", "zero_pred"})
        self.value_bits = 31                            # raw outputs saturate at int32 max
        # early-termination bounds for a sum without the bias: th - bias, -bias (int32 each)
        self.bound_bits = 33
        # A layer's counters: at most Cout*Ho*Wo <= max_ofmap positions of <= max_taps MACs
        # (the loader refuses bigger layers); the protocol's words stay 64 and 32 bits wide.
        self.mac_bits = _bits(c.max_ofmap * c.max_taps)
        self.pos_bits = self.ofn_bits
        self.prod_bits = c.act_bits + 1 + c.weight_bits
        self.words_per_beat = c.bus_bits // 32

    def memory_bits(self) -> dict:
        """Bits of every memory of the engine (replicas counted), by memory name."""
        from .layouts import (PARAM_READERS, kind_layout, ofmap_layout, plan_layout,
                              reader_param_layout, weight_layout)
        c = self.config
        lanes, g = c.lanes, c.g
        bits = {
            "weights (per-PE replicas)": lanes * self.rows * g * weight_layout(self).size,
            "ifmap (per-PE, per-read-port replicas)": lanes * g * c.max_ifmap * c.act_bits,
            "tap table": c.max_taps * weight_layout(self).size,
            "channel parameters (per reader)": c.max_cout * sum(
                reader_param_layout(self, r).size for r in PARAM_READERS
                if r not in ("pe", "loader")),
            "ofmap buffer": c.max_ofmap * ofmap_layout(self).size,
        }
        if c.has("early_term"):
            bits["early-termination spec and th (per-PE replicas)"] = (
                lanes * c.max_cout * reader_param_layout(self, "pe").size)
            bits["early-termination neg_start (loader)"] = (
                c.max_cout * reader_param_layout(self, "loader").size)
        if self.plan:
            bits["plan kinds (per-PE replicas)"] = lanes * c.max_ofmap * kind_layout().size
            bits["plan"] = c.max_ofmap * plan_layout().size
        if c.has("perforation"):
            bits["NN table"] = c.max_ofmap * self.ofa_bits
        if c.has("zero_pred"):
            bits["window flags"] = c.max_ofmap
        return bits
