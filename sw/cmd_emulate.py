"""``skipconv emulate``: a board on a pseudo-terminal, for trying the serial backend without one.

Opens a pseudo-terminal and answers on it exactly as a board's UART bridge and engine would:
the byte-link framing of docs/protocol.md (:class:`skipconv.sw.framing.FramedPeer`) around the
protocol's software engine (:class:`skipconv.sw.protocol.GoldenResponder`). It prints the port
name; in another shell, ``skipconv run ... --device serial:PORT`` drives it.
"""

from __future__ import annotations

HELP = "emulate a board on a pseudo-terminal (UART framing + the software engine) for " \
       "--device serial:PORT"


def add_arguments(parser):
    parser.add_argument("--config", metavar="JSON",
                        help="engine config (EngineConfig JSON); default: the default preset")
    parser.add_argument("--seconds", type=float, default=None,
                        help="stop after this many seconds (default: until Ctrl-C)")


def run(args) -> int:
    import time
    from pathlib import Path

    from .config import PRESETS, EngineConfig
    from .driver.device import responder_engine
    from .driver.pty import PtyPair
    from .framing import FramedPeer

    config = (EngineConfig.from_json(Path(args.config).read_text()) if args.config
              else PRESETS["default"])
    with PtyPair() as pair:
        peer = FramedPeer(pair.device, responder_engine(config)).start()
        print(f"emulated board on {pair.port_name} (engine {config.key}); run e.g.\n"
              f"  skipconv run DIR --device serial:{pair.port_name} --compare", flush=True)
        t0 = time.monotonic()
        try:
            while args.seconds is None or time.monotonic() - t0 < args.seconds:
                time.sleep(0.2)
                if peer.error is not None:
                    raise peer.error
        finally:
            peer.stop()
        print(f"served; {peer.naks} NAK(s), {peer.retransmissions} retransmission(s)")
    return 0
