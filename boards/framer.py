"""The device side of the byte-link framing (docs/protocol.md, "Framing on byte links").

:class:`FrameBridge` sits between a byte link (a UART) and the engine's command and result
streams. Host frames are buffered whole and CRC-checked before a single word reaches the
engine, then acknowledged; a bad frame is dropped and answered NAK; a retransmission (the
seq of the last accepted frame) is acknowledged again and not forwarded. Result beats are
gathered into device data frames of at most 1024 bytes, sent unacknowledged.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..hw.memories import no_collision_memory, registered_read

__all__ = ["beat_layout", "crc16_update", "FrameBridge",
           "SOF", "DATA", "DATA_LAST", "DEV_DATA", "DEV_DATA_LAST", "ACK", "NAK",
           "NAK_CRC", "NAK_LENGTH", "NAK_TIMEOUT", "MAX_PAYLOAD"]

# The numbers of the framing spec (docs/protocol.md); skipconv.sw.framing has the same ones.
SOF = 0xA5
DATA, DATA_LAST, DEV_DATA, DEV_DATA_LAST, ACK, NAK = 0x01, 0x11, 0x02, 0x12, 0x03, 0x04
NAK_CRC, NAK_LENGTH, NAK_TIMEOUT = 1, 2, 3
MAX_PAYLOAD = 1024
_KNOWN_TYPES = (DATA, DATA_LAST, DEV_DATA, DEV_DATA_LAST, ACK, NAK)


def beat_layout(bus_bits: int) -> data.StructLayout:
    """Payload of the engine's command and result streams: one beat and its ``tlast``."""
    return data.StructLayout({"data": unsigned(bus_bits), "last": unsigned(1)})


def crc16_update(m, crc, byte):
    """Return a signal: the CRC-16/CCITT-FALSE register after ``byte`` (combinational).

    One signal per bit step keeps the expression linear in size (a nested expression would
    repeat ``crc`` twice per step, 256 times in all).
    """
    for i in range(8):
        step = Signal(16, name=f"crc_step{i}")
        feedback = crc[15] ^ byte[7 - i]
        m.d.comb += step.eq(Cat(Const(0, 1), crc[:15]) ^ (feedback.replicate(16) & 0x1021))
        crc = step
    return crc


class FrameBridge(wiring.Component):
    """Framed, CRC-checked byte link to and from the engine's streams.

    Parameters
    ----------
    bus_bits : int
        Width of the engine's stream data (a multiple of 32). Words are packed into beats
        across frames; ``tlast`` goes on the beat holding the last word of a DATA_LAST frame.
    byte_timeout : int
        Clocks without a byte after which a partial host frame is dropped (NAK reason 3).

    Members
    -------
    rx_byte : In(stream.Signature(8))
        Bytes from the host (always accepted except while a frame is forwarded).
    tx_byte : Out(stream.Signature(8))
        Bytes to the host.
    cmd : Out(stream.Signature(beat_layout(bus_bits)))
        Command beats to the engine.
    res : In(stream.Signature(beat_layout(bus_bits)))
        Result beats from the engine.
    link_error : Out(1)
        One-cycle pulse whenever a host frame is dropped.
    """

    def __init__(self, bus_bits: int, byte_timeout: int):
        if not isinstance(bus_bits, int) or bus_bits < 32 or bus_bits % 32:
            raise ValueError(f"FrameBridge bus_bits must be a positive multiple of 32, "
                             f"not {bus_bits!r}")
        if not isinstance(byte_timeout, int) or byte_timeout < 16:
            raise ValueError(f"FrameBridge byte_timeout must be an integer >= 16 clocks, "
                             f"not {byte_timeout!r}")
        self._bus_bits = bus_bits
        self._byte_timeout = byte_timeout
        layout = beat_layout(bus_bits)
        super().__init__({
            "rx_byte": In(stream.Signature(8)),
            "tx_byte": Out(stream.Signature(8)),
            "cmd": Out(stream.Signature(layout)),
            "res": In(stream.Signature(layout)),
            "link_error": Out(1),
        })

    @property
    def words_per_beat(self) -> int:
        """32-bit words in one stream beat."""
        return self._bus_bits // 32

    @property
    def result_beats(self) -> int:
        """Result beats gathered into one device frame (whole beats, at most 1024 bytes)."""
        return max(1, (MAX_PAYLOAD // 4) // self.words_per_beat)

    def elaborate(self, platform):
        m = Module()
        wpb = self.words_per_beat
        max_words = MAX_PAYLOAD // 4

        # -- host frames in ------------------------------------------------------------------
        # written while a frame arrives, read while it is forwarded: never both at once
        m.submodules.rx_mem = rx_mem = no_collision_memory(shape=32, depth=max_words)
        # each byte straight into its lane of the word: no word assembly register
        rx_wr = rx_mem.write_port(granularity=8)
        rx_rd = registered_read(m, rx_mem, "rx_rd")

        crc = Signal(16)
        ftype = Signal(8)
        seq = Signal(8)
        length = Signal(16)
        count = Signal(range(MAX_PAYLOAD + 1))     # payload bytes received
        crc_lo = Signal(8)
        last_seq = Signal(8)
        have_seq = Signal()
        idle_clocks = Signal(range(self._byte_timeout + 1))

        # Pending control reply (ACK/NAK): set by the receiver, cleared when the transmitter
        # takes it.
        ctl_pend = Signal()
        ctl_type = Signal(8)
        ctl_seq = Signal(8)
        ctl_reason = Signal(8)
        ctl_take = Signal()

        def reply(m, ftype_, seq_, reason=0):
            m.d.sync += [ctl_pend.eq(1), ctl_type.eq(ftype_), ctl_seq.eq(seq_),
                         ctl_reason.eq(reason)]

        # Forwarding words into beats, which persist across frames.
        fwd_idx = Signal(range(max_words + 1))
        nwords = Signal(range(max_words + 1))
        beat = Signal(self._bus_bits)
        beat_fill = Signal(range(wpb + 1))
        beat_last = Signal()

        byte = self.rx_byte.payload
        rx_crc_next = crc16_update(m, crc, byte)
        got = Signal()
        m.d.comb += got.eq(self.rx_byte.valid & self.rx_byte.ready)

        with m.If(ctl_take):
            m.d.sync += ctl_pend.eq(0)

        in_frame = Signal()
        with m.If(got | ~in_frame):
            m.d.sync += idle_clocks.eq(0)
        with m.Else():
            m.d.sync += idle_clocks.eq(idle_clocks + 1)
        timed_out = in_frame & ~got & (idle_clocks == self._byte_timeout)

        def in_frame_state(m):
            """Accept bytes; drop the frame when they stop arriving (NAK, timeout)."""
            m.d.comb += [self.rx_byte.ready.eq(1), in_frame.eq(1)]
            with m.If(timed_out):
                reply(m, NAK, seq, NAK_TIMEOUT)
                m.d.comb += self.link_error.eq(1)
                m.next = "HUNT"

        with m.FSM(name="rx"):
            with m.State("HUNT"):
                m.d.comb += self.rx_byte.ready.eq(1)
                with m.If(got & (byte == SOF)):
                    m.d.sync += crc.eq(0xFFFF)
                    m.next = "TYPE"
            with m.State("TYPE"):
                in_frame_state(m)
                with m.If(got):
                    m.d.sync += [ftype.eq(byte), crc.eq(rx_crc_next)]
                    m.next = "SEQ"
            with m.State("SEQ"):
                in_frame_state(m)
                with m.If(got):
                    m.d.sync += [seq.eq(byte), crc.eq(rx_crc_next)]
                    m.next = "LEN0"
            with m.State("LEN0"):
                in_frame_state(m)
                with m.If(got):
                    m.d.sync += [length[:8].eq(byte), crc.eq(rx_crc_next)]
                    m.next = "LEN1"
            with m.State("LEN1"):
                in_frame_state(m)
                full_len = Cat(length[:8], byte)
                known = ftype.matches(*_KNOWN_TYPES)
                is_data = (ftype[:4] == 1) | (ftype[:4] == 2)
                bad_len = ((full_len > MAX_PAYLOAD) | (is_data & (full_len[:2] != 0))
                           | ((ftype == ACK) & (full_len != 0))
                           | ((ftype == NAK) & (full_len != 1)))
                with m.If(got):
                    m.d.sync += [length.eq(full_len), crc.eq(rx_crc_next),
                                 count.eq(0)]
                    with m.If(~known):
                        reply(m, NAK, 0, NAK_LENGTH)
                        m.d.comb += self.link_error.eq(1)
                        m.next = "HUNT"
                    with m.Elif(bad_len):
                        reply(m, NAK, seq, NAK_LENGTH)
                        m.d.comb += self.link_error.eq(1)
                        m.next = "HUNT"
                    with m.Elif(full_len == 0):
                        m.next = "CRC0"
                    with m.Else():
                        m.next = "PAYLOAD"
            with m.State("PAYLOAD"):
                in_frame_state(m)
                with m.If(got):
                    m.d.sync += [count.eq(count + 1), crc.eq(rx_crc_next)]
                    # Only data frames are stored (NAK's one byte is not a word).
                    m.d.comb += [rx_wr.addr.eq(count[2:]), rx_wr.data.eq(byte.replicate(4))]
                    with m.If(ftype[:4] == 1):
                        m.d.comb += rx_wr.en.eq(1 << count[:2])
                    with m.If(count + 1 == length):
                        m.next = "CRC0"
            with m.State("CRC0"):
                in_frame_state(m)
                with m.If(got):
                    m.d.sync += crc_lo.eq(byte)
                    m.next = "CRC1"
            with m.State("CRC1"):
                in_frame_state(m)
                with m.If(got):
                    with m.If(Cat(crc_lo, byte) != crc):
                        reply(m, NAK, seq, NAK_CRC)
                        m.d.comb += self.link_error.eq(1)
                        m.next = "HUNT"
                    with m.Elif((ftype != DATA) & (ftype != DATA_LAST)):
                        m.next = "HUNT"      # a well-formed frame not meant for the device
                    with m.Elif(have_seq & (seq == last_seq)):
                        reply(m, ACK, seq)   # a retransmission: the ACK was lost
                        m.next = "HUNT"
                    with m.Else():
                        m.d.sync += [fwd_idx.eq(0), nwords.eq(length[2:])]
                        m.next = "FWD_ADDR"
            # Forward the buffered words, one per two clocks plus backpressure.
            with m.State("FWD_ADDR"):
                m.d.comb += rx_rd.addr.eq(fwd_idx)
                with m.If(fwd_idx == nwords):
                    # Only reached for an empty frame or a frame ending inside a beat.
                    with m.If((ftype == DATA_LAST) & (beat_fill != 0)):
                        m.d.sync += beat_last.eq(1)
                        m.next = "FWD_SEND"
                    with m.Else():
                        m.next = "FWD_DONE"
                with m.Else():
                    m.next = "FWD_LOAD"
            with m.State("FWD_LOAD"):
                is_final = (fwd_idx + 1 == nwords) & (ftype == DATA_LAST)
                slots = [beat[32 * i:32 * (i + 1)] for i in range(wpb)]
                with m.Switch(beat_fill):
                    for i in range(wpb):
                        with m.Case(i):
                            m.d.sync += slots[i].eq(rx_rd.data)
                m.d.sync += [beat_fill.eq(beat_fill + 1), fwd_idx.eq(fwd_idx + 1),
                             beat_last.eq(is_final)]
                with m.If((beat_fill == wpb - 1) | is_final):
                    m.next = "FWD_SEND"
                with m.Else():
                    m.next = "FWD_ADDR"
            with m.State("FWD_SEND"):
                m.d.comb += [self.cmd.valid.eq(1), self.cmd.payload.data.eq(beat),
                             self.cmd.payload.last.eq(beat_last)]
                with m.If(self.cmd.ready):
                    m.d.sync += [beat.eq(0), beat_fill.eq(0), beat_last.eq(0)]
                    with m.If(fwd_idx == nwords):
                        m.next = "FWD_DONE"
                    with m.Else():
                        m.next = "FWD_ADDR"
            with m.State("FWD_DONE"):
                m.d.sync += [last_seq.eq(seq), have_seq.eq(1)]
                reply(m, ACK, seq)
                m.next = "HUNT"


        # -- result frames out ---------------------------------------------------------------
        nbeats = self.result_beats
        # filled while not sending, read while sending: never both at once
        m.submodules.tx_mem = tx_mem = no_collision_memory(shape=self._bus_bits, depth=nbeats)
        tx_wr = tx_mem.write_port()
        tx_rd = registered_read(m, tx_mem, "tx_rd")

        fill = Signal(range(nbeats + 1))     # result beats buffered
        fill_last = Signal()                 # the buffered beats end a message
        sending = Signal()
        m.d.comb += [self.res.ready.eq(~sending & (fill < nbeats) & ~fill_last),
                     tx_wr.addr.eq(fill), tx_wr.data.eq(self.res.payload.data),
                     tx_wr.en.eq(self.res.valid & self.res.ready)]
        with m.If(self.res.valid & self.res.ready):
            m.d.sync += [fill.eq(fill + 1), fill_last.eq(self.res.payload.last)]
        res_frame_ready = (fill == nbeats) | fill_last

        dev_seq = Signal(8)
        tx_crc = Signal(16)
        tx_type = Signal(8)
        tx_seq = Signal(8)
        tx_len = Signal(16)
        is_ctl = Signal()
        pay = Signal(self._bus_bits)          # payload bytes of the current beat, LSB first
        pay_left = Signal(range(4 * wpb + 1))  # bytes of ``pay`` still to send
        sent = Signal(range(MAX_PAYLOAD + 1))   # payload bytes sent
        rd_beat = Signal(range(nbeats + 1))

        out = self.tx_byte
        took = out.valid & out.ready

        tx_crc_next = crc16_update(m, tx_crc, out.payload)

        def send(m, value, crc_it=True):
            m.d.comb += [out.valid.eq(1), out.payload.eq(value)]
            if crc_it:
                with m.If(took):
                    m.d.sync += tx_crc.eq(tx_crc_next)

        with m.FSM(name="tx"):
            with m.State("IDLE"):
                with m.If(ctl_pend):
                    m.d.comb += ctl_take.eq(1)
                    m.d.sync += [is_ctl.eq(1), tx_type.eq(ctl_type), tx_seq.eq(ctl_seq),
                                 tx_len.eq(Mux(ctl_type == NAK, 1, 0)), pay.eq(ctl_reason),
                                 pay_left.eq(1)]
                    m.next = "SOF"
                with m.Elif(res_frame_ready):
                    m.d.sync += [is_ctl.eq(0), sending.eq(1),
                                 tx_type.eq(Mux(fill_last, DEV_DATA_LAST, DEV_DATA)),
                                 tx_seq.eq(dev_seq), tx_len.eq(fill * (4 * wpb)),
                                 rd_beat.eq(0), pay_left.eq(0)]
                    m.next = "SOF"
                m.d.sync += [tx_crc.eq(0xFFFF), sent.eq(0)]
            with m.State("SOF"):
                send(m, SOF, crc_it=False)
                with m.If(took):
                    m.next = "TYPE"
            with m.State("TYPE"):
                send(m, tx_type)
                with m.If(took):
                    m.next = "SEQ"
            with m.State("SEQ"):
                send(m, tx_seq)
                with m.If(took):
                    m.next = "LEN0"
            with m.State("LEN0"):
                send(m, tx_len[:8])
                with m.If(took):
                    m.next = "LEN1"
            with m.State("LEN1"):
                send(m, tx_len[8:])
                with m.If(took):
                    with m.If(tx_len == 0):
                        m.next = "CRC0"
                    with m.Elif(is_ctl):
                        m.next = "PAYLOAD"
                    with m.Else():
                        m.next = "FETCH"
            with m.State("FETCH"):
                m.d.comb += tx_rd.addr.eq(rd_beat)
                m.next = "LOAD"
            with m.State("LOAD"):
                m.d.sync += [pay.eq(tx_rd.data), pay_left.eq(4 * wpb),
                             rd_beat.eq(rd_beat + 1)]
                m.next = "PAYLOAD"
            with m.State("PAYLOAD"):
                send(m, pay[:8])
                with m.If(took):
                    m.d.sync += [pay.eq(pay >> 8), pay_left.eq(pay_left - 1),
                                 sent.eq(sent + 1)]
                    with m.If(sent + 1 == tx_len):
                        m.next = "CRC0"
                    with m.Elif(pay_left == 1):
                        m.next = "FETCH"
            with m.State("CRC0"):
                send(m, tx_crc[:8], crc_it=False)
                with m.If(took):
                    m.next = "CRC1"
            with m.State("CRC1"):
                send(m, tx_crc[8:], crc_it=False)
                with m.If(took):
                    with m.If(~is_ctl):
                        m.d.sync += [dev_seq.eq(dev_seq + 1), fill.eq(0), fill_last.eq(0),
                                     sending.eq(0)]
                    m.next = "IDLE"
        return m
