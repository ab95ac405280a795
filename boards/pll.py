"""PLL settings for the boards' clocks: ECP5 ``EHXPLLL`` and iCE40 ``SB_PLL40_PAD``.

The searches follow the data-sheet limits the vendor tools (and ``ecppll``/``icepll``) use,
so a top gets its engine clock from the on-board oscillator without running those tools.
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Instance

__all__ = ["PLLError", "ECP5PLL", "ICE40PLL", "ecp5_pll", "ice40_pll"]


class PLLError(ValueError):
    """No PLL setting reaches the asked frequency closely enough."""


@dataclass(frozen=True)
class ECP5PLL:
    """An ``EHXPLLL`` setting: ``f_out = f_in / clki_div * clkfb_div`` (CLKOP feedback)."""

    f_in: float
    clki_div: int
    clkfb_div: int
    clkop_div: int

    @property
    def f_out(self) -> float:
        return self.f_in / self.clki_div * self.clkfb_div

    @property
    def f_vco(self) -> float:
        return self.f_out * self.clkop_div

    def instance(self, clkin, clkout, locked) -> Instance:
        """The ``EHXPLLL`` primitive: ``clkin`` in, ``clkout`` out (also its feedback)."""
        return Instance(
            "EHXPLLL",
            p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
            p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB",
            p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD",
            p_CLKI_DIV=self.clki_div, p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=self.clkop_div,
            p_CLKOP_CPHASE=self.clkop_div - 1, p_CLKOP_FPHASE=0,
            p_FEEDBK_PATH="CLKOP", p_CLKFB_DIV=self.clkfb_div,
            a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1",
            a_MFG_GMCREF_SEL="2",
            i_RST=0, i_STDBY=0, i_CLKI=clkin, o_CLKOP=clkout, i_CLKFB=clkout,
            i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1,
            i_PLLWAKESYNC=0, i_ENCLKOP=0, o_LOCK=locked)


def ecp5_pll(f_in: float, f_out: float, tolerance: float = 0.01) -> ECP5PLL:
    """Return the ``EHXPLLL`` setting closest to ``f_out`` (PFD 3.125–400 MHz, VCO 400–800)."""
    best = None
    for clki in range(1, 129):
        pfd = f_in / clki
        if not 3.125e6 <= pfd <= 400e6:
            continue
        for fb in range(1, 81):
            out = pfd * fb
            for op in range(1, 129):
                if 400e6 <= out * op <= 800e6:
                    cand = ECP5PLL(f_in, clki, fb, op)
                    if best is None or abs(cand.f_out - f_out) < abs(best.f_out - f_out):
                        best = cand
                    break
    if best is None or abs(best.f_out - f_out) > tolerance * f_out:
        raise PLLError(f"ECP5 PLL cannot make {f_out / 1e6:g} MHz from {f_in / 1e6:g} MHz "
                       f"within {tolerance:.0%}")
    return best


@dataclass(frozen=True)
class ICE40PLL:
    """An ``SB_PLL40_PAD`` setting (SIMPLE feedback):
    ``f_out = f_in * (divf + 1) / ((divr + 1) * 2**divq)``."""

    f_in: float
    divr: int
    divf: int
    divq: int

    @property
    def f_out(self) -> float:
        return self.f_in * (self.divf + 1) / ((self.divr + 1) * 2 ** self.divq)

    @property
    def filter_range(self) -> int:
        pfd = self.f_in / (self.divr + 1)
        for limit, value in ((17e6, 1), (26e6, 2), (44e6, 3), (66e6, 4), (101e6, 5)):
            if pfd < limit:
                return value
        return 6

    def instance(self, pad, clkout, locked) -> Instance:
        """The ``SB_PLL40_PAD`` primitive on the clock pin ``pad`` (an IO port)."""
        return Instance(
            "SB_PLL40_PAD",
            p_FEEDBACK_PATH="SIMPLE", p_DIVR=self.divr, p_DIVF=self.divf, p_DIVQ=self.divq,
            p_FILTER_RANGE=self.filter_range,
            io_PACKAGEPIN=pad, o_PLLOUTGLOBAL=clkout, o_LOCK=locked,
            i_RESETB=1, i_BYPASS=0)


def ice40_pll(f_in: float, f_out: float, tolerance: float = 0.01) -> ICE40PLL:
    """Return the ``SB_PLL40`` setting closest to ``f_out`` (PFD 10–133 MHz, VCO 533–1066)."""
    best = None
    for divr in range(16):
        pfd = f_in / (divr + 1)
        if not 10e6 <= pfd <= 133e6:
            continue
        for divf in range(128):
            vco = pfd * (divf + 1)
            if not 533e6 <= vco <= 1066e6:
                continue
            for divq in range(1, 7):
                cand = ICE40PLL(f_in, divr, divf, divq)
                if best is None or abs(cand.f_out - f_out) < abs(best.f_out - f_out):
                    best = cand
    if best is None or abs(best.f_out - f_out) > tolerance * f_out:
        raise PLLError(f"iCE40 PLL cannot make {f_out / 1e6:g} MHz from {f_in / 1e6:g} MHz "
                       f"within {tolerance:.0%}")
    return best
