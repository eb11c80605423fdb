"""The data plane's control channels: length-prefixed messages over plain TCP sockets, read and
written by the stage loop's own thread (dataplane.py).

Why not a messaging library: a ZeroMQ message wakes three threads per hop (the sender's I/O
thread, the receiver's I/O thread, then the receiving loop), and on a small VM a thread wake-up
costs 30-40 us of CPU; with 16 stages that came to about a core. Here the sender's thread writes
the message itself and only the receiving loop wakes.

A message is a fixed prefix and three parts:

    prefix   16-byte key, then the lengths of meta, header and payload (little-endian uint32)
    meta     msgpack [epoch, seq]
    header   the microbatch header (stages/microbatch.py), bytes as the scheduler encoded it
    payload  token ids, activations, or the last stage's answer (may be empty)

A connection whose first message lacks the key, or that sends something malformed, is closed and
counted; nothing it sent reaches the stage.
"""

from __future__ import annotations

import hmac
import select
import socket
import struct

PREFIX = struct.Struct("<16sIII")
MAX_PART = 1 << 31  # a length past this is not a message of ours
READ_TIMEOUT_S = 30.0  # the rest of a message, once its first bytes are in


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def read_prefix(prefix: bytes, key: bytes) -> tuple[int, int, int]:
    """The lengths of meta, header and payload from a message's prefix; ValueError if the key is
    not this epoch's or a length is past what a message of ours can be."""
    got, *lengths = PREFIX.unpack(prefix)
    if not hmac.compare_digest(got, key) or max(lengths) >= MAX_PART:
        raise ValueError("not a message of this data plane")
    return tuple(lengths)


def split(body, lengths: tuple[int, int, int]) -> tuple[bytes, bytes, memoryview]:
    """(meta, header, payload) of a message's body."""
    n_meta, n_header, _ = lengths
    view = memoryview(body)
    return bytes(view[:n_meta]), bytes(view[n_meta:n_meta + n_header]), view[n_meta + n_header:]


def frame(key: bytes, meta: bytes, header: bytes, payload=b"") -> list:
    """The buffers of one message, for `send_all` or an asyncio writer's `writelines`."""
    n = memoryview(payload).nbytes
    return [PREFIX.pack(key, len(meta), len(header), n), meta, header, payload]


def send_all(sock: socket.socket, buffers: list) -> None:
    """Write every buffer (one system call for a message that fits the socket's buffer)."""
    views = [memoryview(b).cast("B") for b in buffers if memoryview(b).nbytes]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def connect(address: str, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(parse_address(address), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)  # blocking writes: the kernel's buffer absorbs a microbatch or several
    return sock


class Inbox:
    """A listening socket and the connections made to it; `recv` returns the next message from any
    of them whose key is right."""

    def __init__(self, host: str, key: bytes) -> None:
        self.key = key
        self.listener = socket.create_server((host, 0))
        self.address = f"tcp://{host}:{self.listener.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.trusted: set[socket.socket] = set()  # connections that sent the key once
        self.rejected = 0  # connections closed for a wrong key or a malformed message

    def recv(self, timeout: float) -> tuple[bytes, bytes, memoryview] | None:
        """(meta, header, payload) of the next message, or None when nothing came within `timeout`
        seconds (or what came was refused)."""
        ready, _, _ = select.select([self.listener, *self.conns], [], [], timeout)
        for s in ready:
            if s is self.listener:
                conn, _ = self.listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(READ_TIMEOUT_S)
                self.conns.append(conn)
                continue
            message = self._read(s)
            if message is not None:
                return message
        return None

    def _read(self, conn: socket.socket):
        try:
            lengths = read_prefix(_recv_exact(conn, PREFIX.size), self.key)
            body = _recv_exact(conn, sum(lengths))
        except (OSError, ValueError, EOFError):
            self._drop(conn, counted=conn not in self.trusted)
            return None
        self.trusted.add(conn)
        return split(body, lengths)

    def _drop(self, conn: socket.socket, counted: bool) -> None:
        self.rejected += counted
        self.conns.remove(conn)
        self.trusted.discard(conn)
        conn.close()

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()
        self.listener.close()


def _recv_exact(conn: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise EOFError("the connection closed mid-message")
        got += k
    return buf
