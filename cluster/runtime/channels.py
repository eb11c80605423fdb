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

A sender opens its connection with a greeting, a prefix with the key and three zero lengths, so
that it proves the key at once even if its first message comes minutes later.

Strangers: the inboxes listen on the node's address, so anything that reaches the node can
connect. Until a connection has sent a prefix with this epoch's key it is a stranger, and a
stranger can neither stall the loop nor make it hold much:
- `Inbox` never waits on one connection. Its sockets are non-blocking, each connection's bytes go
  into a buffer of its own, and poll() says which have more; a message is returned once its
  whole body is in. So neither a stranger's single byte nor a trusted sender stalled mid-message
  holds up the others (before this, one byte held the loop in a blocking read for 30 s).
- A stranger's first 28 bytes are all that is read of it until they prove the key; a wrong key or
  a length past MAX_PART closes it at once, before anything is allocated for the body.
- At most MAX_UNTRUSTED strangers stay open (one more closes the oldest), each for at most
  UNTRUSTED_DEADLINE_S.
Every connection closed before it proved the key is counted in `rejected`, and nothing it sent
reaches the stage. The scheduler's answer socket (dataplane.py) follows the same rules.
"""

from __future__ import annotations

import hmac
import math
import select
import socket
import struct
import time

PREFIX = struct.Struct("<16sIII")
MAX_PART = 1 << 31  # a length past this is not a message of ours
MAX_UNTRUSTED = 16  # connections that have not proven the key, per listening socket
UNTRUSTED_DEADLINE_S = 2.0  # how long a connection has to prove the key (its greeting is immediate)


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


def greeting(key: bytes) -> bytes:
    """What a sender writes first on a new connection: the key, and no message (receivers skip it)."""
    return PREFIX.pack(key, 0, 0, 0)


def send_all(sock: socket.socket, buffers: list) -> None:
    """Write every buffer: one system call for a message that fits the socket's buffer (the usual
    case, which makes no views of the buffers); the rest as the socket drains."""
    sent = sock.sendmsg(buffers)
    if sent == sum(memoryview(b).nbytes for b in buffers):
        return
    views = [memoryview(b).cast("B") for b in buffers if memoryview(b).nbytes]
    while True:
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if not views:
            return
        views[0] = views[0][sent:]
        sent = sock.sendmsg(views)


def connect(address: str, key: bytes, timeout: float = 30.0) -> socket.socket:
    """A connection to an inbox, greeted with `key`."""
    sock = socket.create_connection(parse_address(address), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)  # blocking writes: the kernel's buffer absorbs a microbatch or several
    sock.sendall(greeting(key))
    return sock


class Inbox:
    """A listening socket and the connections made to it; `recv` returns the next message from any
    of them whose key is right."""

    def __init__(self, host: str, key: bytes) -> None:
        self.key = key
        self.listener = socket.create_server((host, 0))
        self.listener.setblocking(False)
        self.address = f"tcp://{host}:{self.listener.getsockname()[1]}"
        self.peers: dict[socket.socket, _Peer] = {}  # in the order they connected
        self.rejected = 0  # connections closed before they proved the key
        # The sockets are registered with a poll object as they come and go, not listed on every
        # call as select() takes them (the call cost 1.8 us here with three sockets, poll 0.9 us).
        self.poller = select.poll()
        self.poller.register(self.listener, select.POLLIN)
        self.by_fd: dict[int, _Peer] = {}
        self.next_expiry = math.inf  # no stranger's deadline is before this

    def recv(self, timeout: float) -> tuple[bytes, bytes, memoryview] | None:
        """(meta, header, payload) of the next message, or None when none was complete within
        `timeout` seconds."""
        end = time.monotonic() + timeout
        listener = self.listener.fileno()
        while True:
            now = time.monotonic()
            next_expiry = self._expire(now)
            ready = self.poller.poll(max(0.0, min(end, next_expiry) - now) * 1000)
            # The listener last: connections already open are read before new ones can push them out.
            accept = False
            for fd, events in ready:
                if fd == listener and not events & select.POLLNVAL:
                    accept = True
                    continue
                peer = self.by_fd.get(fd)
                if peer is None or events & select.POLLNVAL:  # closed under this call, by another thread
                    raise OSError("the inbox was closed")
                message = self._read(peer)
                if message is not None:
                    return message
            if accept:
                self._accept()
            if time.monotonic() >= end:
                return None

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:  # gone before we took it
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = _Peer(sock, time.monotonic() + UNTRUSTED_DEADLINE_S)
        self.peers[sock] = self.by_fd[sock.fileno()] = peer
        self.poller.register(sock, select.POLLIN)
        self.next_expiry = min(self.next_expiry, peer.deadline)
        strangers = self._strangers()
        if len(strangers) > MAX_UNTRUSTED:
            self._drop(strangers[0], counted=True)

    def _read(self, peer: _Peer) -> tuple[bytes, bytes, memoryview] | None:
        try:
            return peer.read(self.key)
        except (OSError, ValueError, EOFError):  # closed, or not a message of ours
            self._drop(peer, counted=not peer.trusted)
            return None

    def _expire(self, now: float) -> float:
        """Close the strangers past their deadline; returns when the next one is due. Looks at
        them only once one may be due (a stranger that proved the key since is a false alarm),
        not on every call."""
        if now < self.next_expiry:
            return self.next_expiry
        next_expiry = math.inf
        for peer in self._strangers():
            if peer.deadline <= now:
                self._drop(peer, counted=True)
            else:
                next_expiry = min(next_expiry, peer.deadline)
        self.next_expiry = next_expiry
        return next_expiry

    def _strangers(self) -> list[_Peer]:
        return [p for p in self.peers.values() if not p.trusted]

    def _drop(self, peer: _Peer, counted: bool) -> None:
        self.rejected += counted
        del self.peers[peer.sock], self.by_fd[peer.sock.fileno()]
        self.poller.unregister(peer.sock)  # before the close frees its number for another socket
        peer.sock.close()

    def close(self) -> None:
        for sock in self.peers:
            sock.close()
        self.peers.clear()
        self.by_fd.clear()
        self.listener.close()


class _Peer:
    """One connection to an inbox and how far its current message has come: first the prefix,
    then (once the prefix has proven the key) the body, each received straight into a buffer of
    its exact size. Reading no further than the current part leaves the next message's bytes in
    the kernel, where poll() sees them."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline
        self.trusted = False  # sent a prefix with the key
        self.lengths: tuple[int, int, int] | None = None  # of the message whose body is being read
        self.prefix = bytearray(PREFIX.size)  # every prefix is read into this one (a body gets a buffer of its own)
        self.prefix_view = memoryview(self.prefix)
        self._expect_prefix()

    def _expect_prefix(self) -> None:
        self.buffer, self.view, self.got = self.prefix, self.prefix_view, 0

    def _expect_body(self, n: int) -> None:
        self.buffer = bytearray(n)
        self.view, self.got = memoryview(self.buffer), 0

    def read(self, key: bytes) -> tuple[bytes, bytes, memoryview] | None:
        """Take what the socket holds of the current message, without waiting; the message once its
        body is complete. Raises ValueError for a prefix without the key, EOFError once closed."""
        while True:
            try:
                n = self.sock.recv_into(self.view[self.got:])
            except BlockingIOError:
                return None
            if n == 0:
                raise EOFError("the connection closed")
            self.got += n
            if self.got < len(self.buffer):
                return None  # the rest is not here yet
            if self.lengths is None:  # a prefix
                lengths = read_prefix(self.buffer, key)
                self.trusted, self.deadline = True, math.inf
                if sum(lengths):  # else a greeting: read the next prefix
                    self.lengths = lengths
                    self._expect_body(sum(lengths))
                else:
                    self.got = 0
                continue
            body, lengths = self.buffer, self.lengths
            self.lengths = None
            self._expect_prefix()
            return split(body, lengths)
