"""Byte-link framing (docs/protocol.md): CRC, encoder, incremental parser, serial transport."""

import time

import pytest

from skipconv.sw import framing
from skipconv.sw.driver.pty import PtyPair
from skipconv.sw.driver.transport import CorruptResult, LinkTimeout, SerialTransport
from skipconv.sw.framing import (ACK, DATA, DATA_LAST, DEV_DATA_LAST, NAK, NAK_CRC, NAK_LENGTH,
                                 NAK_TIMEOUT, Frame, FrameError, FrameParser, FramedPeer,
                                 FramingError, crc16, encode_frame, message_frames)


def test_crc16_ccitt_false_check_value():
    assert crc16(b"123456789") == 0x29B1
    assert crc16(b"") == 0xFFFF
    assert crc16(b"6789", crc16(b"12345")) == 0x29B1


def test_encode_layout():
    raw = encode_frame(DATA_LAST, 7, b"\x01\x02\x03\x04")
    assert raw[:5] == bytes((0xA5, 0x11, 7, 4, 0))
    assert raw[5:9] == b"\x01\x02\x03\x04"
    crc = crc16(raw[1:9])
    assert raw[9:] == bytes((crc & 0xFF, crc >> 8))


@pytest.mark.parametrize("args, word", [
    ((0x55, 0, b""), "type"),
    ((DATA, 256, b""), "seq"),
    ((DATA, 0, b"abc"), "multiple of 4"),
    ((DATA, 0, bytes(1028)), "1028"),
    ((NAK, 0, b""), "NAK"),
    ((ACK, 0, b"x"), "ACK"),
])
def test_encode_refuses_bad_fields(args, word):
    with pytest.raises(FramingError, match=word):
        encode_frame(*args)


def test_message_frames_split_and_last():
    msg = bytes(range(256)) * 9          # 2304 bytes: 1024 + 1024 + 256
    frames = message_frames(msg)
    assert [t for t, _ in frames] == [DATA, DATA, DATA_LAST]
    assert b"".join(p for _, p in frames) == msg
    assert message_frames(b"abcd", from_host=False) == [(DEV_DATA_LAST, b"abcd")]
    with pytest.raises(FramingError, match="whole 32-bit words"):
        message_frames(b"abcde")


def test_parser_byte_by_byte_and_noise():
    a = encode_frame(DATA, 1, bytes(range(256)) * 4)   # payload full of SOF bytes
    b = encode_frame(ACK, 9)
    p = FrameParser(byte_timeout=None)
    events = []
    for byte in b"\x00\x13" + a + b"\xff" + b:
        events += p.feed(bytes((byte,)))
    assert events == [Frame(DATA, 1, bytes(range(256)) * 4), Frame(ACK, 9)]
    assert p.dropped_bytes == 3


def test_parser_crc_error_skips_the_frame_then_recovers():
    bad = bytearray(encode_frame(DATA, 3, bytes(range(256)) * 4))
    bad[100] ^= 0x01
    good = encode_frame(DATA_LAST, 4, b"wxyz")
    events = FrameParser().feed(bytes(bad) + good)
    assert len(events) == 2
    assert isinstance(events[0], FrameError) and events[0].reason == NAK_CRC
    assert events[0].seq == 3 and events[0].type == DATA
    assert events[1] == Frame(DATA_LAST, 4, b"wxyz")


def test_parser_length_error():
    raw = bytes((0xA5, DATA, 5, 3, 0))      # data frame of 3 bytes: not whole words
    events = FrameParser().feed(raw + encode_frame(ACK, 1))
    assert isinstance(events[0], FrameError) and events[0].reason == NAK_LENGTH
    assert events[-1] == Frame(ACK, 1)


def test_parser_byte_timeout_drops_stalled_frame():
    raw = encode_frame(DATA, 2, b"abcdefgh")
    p = FrameParser(byte_timeout=0.1)
    assert p.feed(raw[:6], now=0.0) == []
    events = p.feed(raw, now=0.5)          # the rest never came; a new frame starts
    assert isinstance(events[0], FrameError) and events[0].reason == NAK_TIMEOUT
    assert events[-1] == Frame(DATA, 2, b"abcdefgh")


def test_parser_buffered_bytes_continue_a_frame_whatever_the_reader_s_delay():
    raw = encode_frame(DATA, 2, b"abcdefgh")
    p = FrameParser(byte_timeout=0.1)
    assert p.feed(raw[:6], now=0.0, buffered=True) == []
    # Read 5 s later from a buffer: the bytes may have been waiting there all along.
    assert p.feed(raw[6:], now=5.0, buffered=True) == [Frame(DATA, 2, b"abcdefgh")]
    # A quiet read past the byte timeout still drops a stalled frame.
    assert p.feed(raw[:6], now=6.0, buffered=True) == []
    events = p.feed(b"", now=6.5, buffered=True)
    assert len(events) == 1 and events[0].reason == NAK_TIMEOUT


def test_serial_host_that_stalls_mid_frame_still_gets_the_result():
    """The host thread descheduled longer than the byte timeout while a result frame's bytes
    wait in the port's buffer (a loaded machine): the frame is whole, not 'incomplete'."""
    raw = encode_frame(DEV_DATA_LAST, 0, bytes(range(64)))
    with PtyPair() as pair:
        host = SerialTransport(pair.port_name, timeout=0.3, byte_timeout=0.1)
        try:
            pair.device.write(raw[:20])
            with pytest.raises(LinkTimeout):
                host.recv(timeout=0.05)         # the host has the first 20 bytes
            pair.device.write(raw[20:])         # the rest arrives at once...
            time.sleep(0.3)                     # ...while the host is not reading
            assert host.recv(timeout=1.0) == bytes(range(64))
        finally:
            host.close()


def _echo_engine(message):
    """Reply with two messages: the command reversed word-wise, then one fixed word."""
    words = [message[i:i + 4] for i in range(0, len(message), 4)]
    return [b"".join(reversed(words)), b"\x01\x02\x03\x04"]


@pytest.fixture
def link():
    with PtyPair() as pair:
        peer = FramedPeer(pair.device, _echo_engine).start()
        host = SerialTransport(pair.port_name, timeout=0.3, attempts=3)
        try:
            yield host, peer
        finally:
            peer.stop()
            host.close()
        assert peer.error is None


def test_serial_roundtrip_multi_frame(link):
    host, peer = link
    msg = bytes(range(256)) * 10
    host.send(msg)
    words = [msg[i:i + 4] for i in range(0, len(msg), 4)]
    assert host.recv() == b"".join(reversed(words))
    assert host.recv() == b"\x01\x02\x03\x04"
    assert host.retransmissions == 0


def test_serial_corrupted_host_frame_is_retransmitted(link):
    host, peer = link
    peer.corrupt_rx = {1030}               # a payload byte of the second frame
    msg = bytes(range(256)) * 6
    host.send(msg)
    assert peer.naks == 1 and host.naks == 1 and host.retransmissions == 1
    assert len(host.recv()) == len(msg)
    assert host.recv() == b"\x01\x02\x03\x04"


def test_serial_corrupted_result_frame_reported_next_ok(link):
    host, peer = link
    peer.corrupt_tx = {0}
    host.send(b"abcdefgh")
    with pytest.raises(CorruptResult, match="CRC"):
        host.recv()
    host.send(b"ijklmnop")                  # the next command is answered correctly
    assert host.recv() == b"mnopijkl"
    assert host.recv() == b"\x01\x02\x03\x04"


def test_serial_silent_device_times_out():
    with PtyPair() as pair:
        peer = FramedPeer(pair.device, _echo_engine)
        peer.silent = True
        peer.start()
        host = SerialTransport(pair.port_name, timeout=0.2, attempts=2)
        t0 = time.monotonic()
        with pytest.raises(LinkTimeout, match="not accepted after 2 attempts"):
            host.send(b"abcd")
        with pytest.raises(LinkTimeout, match="no result"):
            host.recv(timeout=0.2)
        assert time.monotonic() - t0 < 3
        peer.stop()
        host.close()


def test_serial_bad_port_name():
    from skipconv.sw.driver.transport import TransportError
    with pytest.raises(TransportError, match="/nonexistent/tty"):
        SerialTransport("/nonexistent/tty")
