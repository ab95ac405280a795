"""Beats of ``bus_bits`` to 32-bit words and back (docs/protocol.md, "Streams and words")."""

from __future__ import annotations

from amaranth import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["word_layout", "BeatSplitter", "BeatPacker"]


def word_layout():
    """One 32-bit word with its position in the beat stream."""
    return data.StructLayout({
        "data": 32,
        "beat_end": 1,    # last word of its beat
        "tlast": 1,       # the beat carried tlast
    })


class BeatSplitter(wiring.Component):
    """Cut each beat of the command stream into its 32-bit words, lowest word first.

    Members
    -------
    beats : In(stream)
        ``data`` (``32*n`` bits) and ``last`` per beat.
    words : Out(stream of :func:`word_layout`)
    """

    def __init__(self, words_per_beat: int):
        self._n = words_per_beat
        super().__init__({
            "beats": In(stream.Signature(data.StructLayout({"data": 32 * words_per_beat,
                                                            "last": 1}))),
            "words": Out(stream.Signature(word_layout())),
        })

    def elaborate(self, platform):
        m = Module()
        n = self._n
        if n == 1:
            m.d.comb += [
                self.words.valid.eq(self.beats.valid),
                self.words.p.data.eq(self.beats.p.data),
                self.words.p.beat_end.eq(1),
                self.words.p.tlast.eq(self.beats.p.last),
                self.beats.ready.eq(self.words.ready),
            ]
            return m
        idx = Signal(range(n))
        m.d.comb += [
            self.words.valid.eq(self.beats.valid),
            self.words.p.data.eq(self.beats.p.data.word_select(idx, 32)),
            self.words.p.beat_end.eq(idx == n - 1),
            self.words.p.tlast.eq(self.beats.p.last),
        ]
        with m.If(self.words.valid & self.words.ready):
            with m.If(idx == n - 1):
                m.d.sync += idx.eq(0)
                m.d.comb += self.beats.ready.eq(1)
            with m.Else():
                m.d.sync += idx.eq(idx + 1)
        return m


class BeatPacker(wiring.Component):
    """Gather 32-bit result words into beats; a message's last word ends its beat (zero padded).

    Members
    -------
    words : In(stream)
        ``data`` (32 bits) and ``last`` (last word of a message).
    beats : Out(stream)
        ``data`` (``32*n`` bits) and ``last`` (``tlast``).
    """

    def __init__(self, words_per_beat: int):
        self._n = words_per_beat
        super().__init__({
            "words": In(stream.Signature(data.StructLayout({"data": 32, "last": 1}))),
            "beats": Out(stream.Signature(data.StructLayout({"data": 32 * words_per_beat,
                                                             "last": 1}))),
        })

    def elaborate(self, platform):
        m = Module()
        n = self._n
        if n == 1:
            wiring.connect(m, wiring.flipped(self.words), wiring.flipped(self.beats))
            return m
        buf = Signal(32 * n)
        idx = Signal(range(n))
        full = Signal()
        with m.If(self.beats.valid & self.beats.ready):
            m.d.sync += [self.beats.valid.eq(0), buf.eq(0)]
        m.d.comb += [self.beats.p.data.eq(buf)]
        m.d.comb += self.words.ready.eq(~self.beats.valid | self.beats.ready)
        m.d.comb += full.eq(0)
        with m.If(self.words.valid & self.words.ready):
            cur = Signal(32 * n)
            m.d.comb += cur.eq(Mux(self.beats.valid, 0, buf))
            m.d.comb += cur.word_select(idx, 32).eq(self.words.p.data)
            with m.If((idx == n - 1) | self.words.p.last):
                m.d.sync += [self.beats.valid.eq(1), self.beats.p.last.eq(self.words.p.last),
                             idx.eq(0), buf.eq(cur)]
            with m.Else():
                m.d.sync += [idx.eq(idx + 1), buf.eq(cur)]
        return m
