# amaranth: UnusedElaboratable=no
"""UART and frame bridge gateware in the Amaranth simulator, checked against skipconv.sw.framing."""

import random

import pytest
from amaranth.sim import Simulator

from skipconv.boards.framer import FrameBridge
from skipconv.boards.uart import UARTRx, UARTTx, divisor_for
from skipconv.sw import framing


def test_divisor_checks():
    assert divisor_for(25e6, 115200) == 217
    with pytest.raises(ValueError, match=r"baud rate 3000000 is .* off"):
        divisor_for(25e6, 3_000_000)
    with pytest.raises(ValueError, match=r"divisor \(clocks per bit\) must be an integer >= 4, not 2"):
        UARTTx(2)


@pytest.mark.parametrize("divisor", [4, 7])
def test_uart_loopback(divisor):
    tx, rx = UARTTx(divisor), UARTRx(divisor)
    from amaranth.hdl import Module
    m = Module()
    m.submodules.tx, m.submodules.rx = tx, rx
    m.d.comb += rx.rx.eq(tx.tx)
    sent = [0x00, 0xFF, 0xA5, 0x5A, 0x01, 0x80] + [random.Random(divisor).randrange(256)
                                                   for _ in range(10)]
    got = []

    async def source(ctx):
        for b in sent:
            ctx.set(tx.i.payload, b)
            ctx.set(tx.i.valid, 1)
            await ctx.tick().until(tx.i.ready)
        ctx.set(tx.i.valid, 0)

    async def sink(ctx):
        ctx.set(rx.o.ready, 1)
        while len(got) < len(sent):
            _, _, payload, valid = await ctx.tick().sample(rx.o.payload, rx.o.valid)
            if valid:
                got.append(payload)

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run_until(1e-8 * (len(sent) + 2) * 10 * divisor * 2)
    assert got == sent
    assert rx.framing_errors.init == 0


def _run_bridge(frames_in, results, bus_bits=32, byte_timeout=64, gap_after=None,
                cmd_ready_every=1, tx_bytes=0):
    """Feed host bytes to a FrameBridge; return (cmd beats, parsed tx events)."""
    dut = FrameBridge(bus_bits, byte_timeout)
    beats, tx = [], bytearray()
    done = {"in": False}

    async def host(ctx):
        for i, raw in enumerate(frames_in):
            for b in raw:
                ctx.set(dut.rx_byte.payload, b)
                ctx.set(dut.rx_byte.valid, 1)
                await ctx.tick().until(dut.rx_byte.ready)
                ctx.set(dut.rx_byte.valid, 0)
                await ctx.tick().repeat(3)          # bytes come slowly over a UART
            if gap_after is not None and i == gap_after:
                await ctx.tick().repeat(byte_timeout * 2)
            await ctx.tick().repeat(200)
        done["in"] = True

    async def engine_in(ctx):
        n = 0
        while True:
            n += 1
            ctx.set(dut.cmd.ready, n % cmd_ready_every == 0)
            _, _, data, last, valid, ready = await ctx.tick().sample(
                dut.cmd.payload.data, dut.cmd.payload.last, dut.cmd.valid, dut.cmd.ready)
            if valid and ready:
                beats.append((data, last))

    async def engine_out(ctx):
        # Results start after the host's frames: one ACK/NAK is held at a time, as the host
        # waits for each before sending more.
        while not done["in"]:
            await ctx.tick()
        for data, last in results:
            ctx.set(dut.res.payload.data, data)
            ctx.set(dut.res.payload.last, last)
            ctx.set(dut.res.valid, 1)
            await ctx.tick().until(dut.res.ready)
        ctx.set(dut.res.valid, 0)

    async def uart_out(ctx):
        ctx.set(dut.tx_byte.ready, 1)
        while len(tx) < tx_bytes:
            _, _, payload, valid = await ctx.tick().sample(dut.tx_byte.payload, dut.tx_byte.valid)
            if valid:
                tx.append(payload)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(host)
    sim.add_testbench(engine_in, background=True)
    sim.add_testbench(engine_out)
    sim.add_testbench(uart_out)
    sim.run()
    events = framing.FrameParser(byte_timeout=None).feed(bytes(tx))
    return beats, events


def _words(data: bytes):
    return [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]


def test_bridge_forwards_good_frames_and_acks():
    msg = bytes(range(40))
    frames = [framing.encode_frame(t, i, p)
              for i, (t, p) in enumerate(framing.message_frames(msg, max_payload=16))]
    beats, events = _run_bridge(frames, [], tx_bytes=3 * 7)
    assert [w for w, _ in beats] == _words(msg)
    assert [last for _, last in beats] == [False] * 9 + [True]
    assert [(e.type, e.seq) for e in events] == [(framing.ACK, i) for i in range(3)]


def test_bridge_naks_bad_crc_and_drops_retransmission():
    good = framing.encode_frame(framing.DATA_LAST, 7, bytes(range(8)))
    bad = bytearray(good)
    bad[6] ^= 0x10
    beats, events = _run_bridge([bytes(bad), good, good], [], tx_bytes=8 + 7 + 7)
    # Only the good frame reaches the engine, once.
    assert [w for w, _ in beats] == _words(bytes(range(8)))
    assert [(e.type, e.seq, e.payload) for e in events] == [
        (framing.NAK, 7, bytes([framing.NAK_CRC])), (framing.ACK, 7, b""), (framing.ACK, 7, b"")]


def test_bridge_naks_bad_length_and_timeout():
    # A data frame whose length is not whole words, then a frame cut short.
    raw_len = bytes([framing.SOF, framing.DATA, 3, 6, 0])
    cut = framing.encode_frame(framing.DATA, 4, bytes(8))[:9]
    good = framing.encode_frame(framing.DATA_LAST, 5, bytes([1, 0, 0, 0]))
    beats, events = _run_bridge([raw_len, cut, good], [], gap_after=1, tx_bytes=8 + 8 + 7)
    assert [(e.type, e.seq, e.payload) for e in events] == [
        (framing.NAK, 3, bytes([framing.NAK_LENGTH])),
        (framing.NAK, 4, bytes([framing.NAK_TIMEOUT])),
        (framing.ACK, 5, b"")]
    assert beats == [(1, True)]


def test_bridge_frames_results_wide_bus():
    # 64-bit beats: two words per beat, packed across frames; results split at 1024 bytes.
    rng = random.Random(1)
    msg = bytes(rng.randrange(256) for _ in range(48))
    frames = [framing.encode_frame(t, i, p)
              for i, (t, p) in enumerate(framing.message_frames(msg, max_payload=20))]
    res_words = [random.Random(2).randrange(1 << 32) for _ in range(2 * 130)]
    results = [(res_words[2 * i] | (res_words[2 * i + 1] << 32), i == 129) for i in range(130)]
    beats, events = _run_bridge(frames, results, bus_bits=64, cmd_ready_every=3,
                                tx_bytes=3 * 7 + 130 * 8 + 2 * 7)
    w = _words(msg)
    assert beats == [(w[2 * i] | (w[2 * i + 1] << 32), i == 5) for i in range(6)]
    data = [e for e in events if e.type in (framing.DEV_DATA, framing.DEV_DATA_LAST)]
    assert [e.type for e in data] == [framing.DEV_DATA, framing.DEV_DATA_LAST]
    assert len(data[0].payload) == 1024
    assert _words(b"".join(e.payload for e in data)) == res_words
    assert all(isinstance(e, framing.Frame) for e in events)
