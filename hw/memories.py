"""Block RAM whose reads never meet a write to the same address in the same cycle.

Every engine memory is written at load time (by the loader) or during compute (by the writer)
and read at RUN or once its writer is done; the UART framer's buffers are filled and drained
in separate phases. So a read and a write of one address never happen in the same cycle.
Declared so (``no_rw_check``), yosys maps each memory to block RAM with nothing around it;
otherwise it emulates read-before-write on collisions with an address compare, a data
register and a mux on every read port: about 40 LUT4 and 48 FF per 18-bit DP16KD on ECP5,
and a mux right behind the block RAM's output.

yosys honours ``no_rw_check`` where it merges a read register into the memory, so a
synchronous read is written as an asynchronous read port plus a register
(:func:`registered_read`); the behaviour is that of a synchronous, non-transparent read port.
"""

from __future__ import annotations

from amaranth import Signal
from amaranth.lib.memory import Memory

__all__ = ["no_collision_memory", "registered_read", "RegisteredRead"]


def no_collision_memory(*, shape, depth: int) -> Memory:
    """A memory without read-during-write checks: the caller guarantees there are none."""
    return Memory(shape=shape, depth=depth, init=[], attrs={"no_rw_check": 1})


class RegisteredRead:
    """A synchronous read: ``data`` is the word at ``addr`` of the previous cycle."""

    def __init__(self, addr, data):
        self.addr = addr
        self.data = data


def registered_read(m, memory: Memory, name: str) -> RegisteredRead:
    """Add an asynchronous read port of ``memory`` and register its data."""
    port = memory.read_port(domain="comb")
    data = Signal(memory.shape, name=f"{name}_data")
    m.d.sync += data.eq(port.data)
    return RegisteredRead(port.addr, data)
