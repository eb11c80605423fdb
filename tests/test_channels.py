"""The data plane's sockets against strangers (cluster/runtime/channels.py and the scheduler's
answer socket in dataplane.py), at the socket level, without Ray: a connection that has not
proven the key can neither stall the receiving loop nor make it hold much, there are never many
of them, each is counted when closed; and the messages of trusted senders come out intact
whether they arrive back to back, in pieces, or stalled half-way."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
import tracemalloc

import msgpack
import pytest

from cluster.runtime import channels
from cluster.runtime.channels import MAX_UNTRUSTED, PREFIX, Inbox, connect, frame, greeting, parse_address, send_all
from cluster.runtime.dataplane import DataPlane

KEY = bytes(range(16))
DEADLINE_S = 0.5  # UNTRUSTED_DEADLINE_S in these tests, so that waiting it out is quick
PROMPTLY_S = 0.2  # how soon a trusted sender's message must come out, strangers or not


@pytest.fixture(autouse=True)
def short_deadline(monkeypatch):
    monkeypatch.setattr(channels, "UNTRUSTED_DEADLINE_S", DEADLINE_S)


@pytest.fixture
def inbox():
    box = Inbox("127.0.0.1", KEY)
    yield box
    box.close()


@pytest.fixture
def sockets():
    """Closes every socket a test appends to it."""
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def message(i: int, payload: bytes = b"") -> tuple[bytes, bytes, bytes]:
    return f"meta {i}".encode(), f"header {i}".encode(), payload


def wire(key: bytes, msg: tuple[bytes, bytes, bytes]) -> bytes:
    return b"".join(frame(key, *msg))


def stranger(address: str, sockets: list) -> socket.socket:
    sock = socket.create_connection(parse_address(address), timeout=10)
    sockets.append(sock)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def serve(inbox: Inbox, until, within: float, got: list | None = None) -> list[tuple[bytes, bytes, bytes]]:
    """Run the inbox as the stage loop does (recv with a short timeout, again and again) until
    `until()` holds, which must happen within `within` seconds; the messages received meanwhile
    (appended to `got`)."""
    got, end = [] if got is None else got, time.monotonic() + within
    while not until():
        assert time.monotonic() < end, f"not within {within}s"
        msg = inbox.recv(0.01)
        if msg is not None:
            got.append(tuple(bytes(part) for part in msg))
    return got


def receive(inbox: Inbox, n: int = 1, within: float = PROMPTLY_S) -> list[tuple[bytes, bytes, bytes]]:
    """The next n messages, which must all come out within `within` seconds."""
    got: list = []
    return serve(inbox, lambda: len(got) >= n, within, got)


def trusted(inbox: Inbox) -> int:
    return sum(p.trusted for p in inbox.peers.values())


# ---- the stage's inbox ---------------------------------------------------------------------------
def test_a_stranger_sending_one_byte_stalls_nothing(inbox, sockets):
    sender = connect(inbox.address, KEY)
    sockets.append(sender)
    one_byte = stranger(inbox.address, sockets)
    one_byte.sendall(b"x")
    t0 = time.monotonic()
    serve(inbox, lambda: len(inbox.peers) == 2 and trusted(inbox) == 1, within=PROMPTLY_S)
    send_all(sender, frame(KEY, *message(1)))
    assert receive(inbox) == [message(1)]
    serve(inbox, lambda: closed_by_peer(one_byte), within=DEADLINE_S + 1)
    assert time.monotonic() - t0 >= DEADLINE_S
    assert inbox.rejected == 1 and trusted(inbox) == len(inbox.peers) == 1
    send_all(sender, frame(KEY, *message(2)))
    assert receive(inbox) == [message(2)]


@pytest.mark.parametrize("prefix", [
    PREFIX.pack(b"not the key 16 b", (1 << 31) - 1, 0, 0),  # a wrong key, and 2 GiB to come
    PREFIX.pack(KEY, 1 << 31, 0, 0),  # the key, but a length no message of ours has
], ids=["wrong-key", "too-long"])
def test_a_bad_prefix_is_dropped_at_once_with_nothing_allocated(inbox, sockets, prefix):
    sock = stranger(inbox.address, sockets)
    tracemalloc.start()
    try:
        sock.sendall(prefix + bytes(4096))
        serve(inbox, lambda: inbox.rejected == 1, within=0.1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and not inbox.peers
    time.sleep(0.01)
    assert closed_by_peer(sock)


def test_idle_strangers_are_few_and_all_counted(inbox, sockets):
    sender = connect(inbox.address, KEY)
    sockets.append(sender)
    serve(inbox, lambda: trusted(inbox) == 1, within=PROMPTLY_S)
    flood = threading.Thread(target=lambda: [stranger(inbox.address, sockets) for _ in range(200)])
    most_open = 0

    def flooded():
        nonlocal most_open
        most_open = max(most_open, len(inbox.peers))
        return not flood.is_alive()

    flood.start()
    send_all(sender, frame(KEY, *message(1)))
    assert receive(inbox) == [message(1)]  # during the flood
    assert serve(inbox, flooded, within=20) == []
    serve(inbox, lambda: inbox.rejected >= 200 - MAX_UNTRUSTED, within=1)
    send_all(sender, frame(KEY, *message(2)))
    assert receive(inbox) == [message(2)]
    flooded()
    assert most_open <= MAX_UNTRUSTED + 1
    serve(inbox, lambda: inbox.rejected == 200, within=DEADLINE_S + 1)
    assert trusted(inbox) == len(inbox.peers) == 1


def test_a_sender_stalled_half_way_holds_nothing_up(inbox, sockets):
    stalled, other = connect(inbox.address, KEY), connect(inbox.address, KEY)
    sockets += [stalled, other]
    big = message(1, bytes(range(256)) * 400)
    data = wire(KEY, big)
    stalled.sendall(data[:len(data) // 2])
    send_all(other, frame(KEY, *message(2)))
    assert receive(inbox) == [message(2)]
    t0 = time.monotonic()
    assert inbox.recv(0.05) is None
    assert time.monotonic() - t0 < PROMPTLY_S
    stalled.sendall(data[len(data) // 2:])
    assert receive(inbox) == [big]
    assert inbox.rejected == 0 and trusted(inbox) == 2


def test_messages_back_to_back_in_one_send(inbox, sockets):
    sock = stranger(inbox.address, sockets)
    sent = [message(i, bytes([i]) * i) for i in range(3)]
    sock.sendall(greeting(KEY) + b"".join(wire(KEY, m) for m in sent))
    assert receive(inbox, 3) == sent


def test_messages_in_tiny_pieces(inbox, sockets):
    sock = connect(inbox.address, KEY)
    sockets.append(sock)
    sent = [message(i, random.Random(i).randbytes(300 * i)) for i in range(4)]
    data = b"".join(wire(KEY, m) for m in sent)

    def trickle():
        rng = random.Random(0)
        at = 0
        while at < len(data):
            n = rng.randint(1, 7)
            sock.sendall(data[at:at + n])
            at += n
            if rng.random() < 0.05:
                time.sleep(0.001)

    sender = threading.Thread(target=trickle)
    sender.start()
    assert receive(inbox, 4, within=10) == sent
    sender.join()


def test_a_message_larger_than_the_socket_buffers(inbox, sockets):
    sock = connect(inbox.address, KEY)
    sockets.append(sock)
    big = message(1, random.Random(1).randbytes(32 << 20))
    sender = threading.Thread(target=send_all, args=(sock, frame(KEY, *big)))
    sender.start()
    assert receive(inbox, within=10) == [big]
    sender.join()


def test_closing_counts_only_strangers(inbox, sockets):
    sender = connect(inbox.address, KEY)
    garbage = stranger(inbox.address, sockets)
    garbage.sendall(b"garbage")
    garbage.close()
    serve(inbox, lambda: inbox.rejected == 1 and trusted(inbox) == 1, within=PROMPTLY_S)
    sender.close()
    serve(inbox, lambda: not inbox.peers, within=PROMPTLY_S)
    assert inbox.rejected == 1


def test_a_numpy_payload_goes_out_whole_however_little_each_send_takes(inbox, sockets):
    """send_all: one sendmsg of the frame's buffers as they are (a numpy array among them, as the
    stage loop sends activations); whatever that call left is sent from where it stopped."""
    import numpy as np

    payload = np.arange(3000, dtype=np.float32).reshape(6, 500)
    sender = connect(inbox.address, KEY)
    sockets.append(sender)

    class Trickle:  # a socket whose every send takes at most 1000 bytes
        calls = 0

        def sendmsg(self, buffers):
            Trickle.calls += 1
            return sender.send(b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[:1000])

    send_all(Trickle(), frame(KEY, b"meta", b"header", payload))
    assert Trickle.calls == (PREFIX.size + 4 + 6 + payload.nbytes + 999) // 1000
    assert receive(inbox) == [(b"meta", b"header", payload.tobytes())]


def test_an_inbox_closed_under_a_waiting_recv_fails_it(inbox):
    """The endpoint closes an epoch's inbox from another thread; a loop still waiting in it gets
    an error at its next look (its epoch is over), not messages nor a busy wait."""
    failed: list[BaseException] = []

    def wait():
        try:
            while True:
                inbox.recv(0.05)
        except OSError as e:
            failed.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)
    inbox.close()
    waiter.join(2)
    assert not waiter.is_alive() and failed


# ---- the scheduler's answer socket ---------------------------------------------------------------
def answer_socket_test(body):
    """Run `await body(plane, last_stage)` with a DataPlane whose answer socket alone is open (no
    stages), and `last_stage` a greeted connection to it."""

    async def run():
        plane = DataPlane([], "inline", "127.0.0.1", restore_stages=None, silent_after=2.0)
        await plane.listen()
        plane.epoch, plane.key = 1, KEY
        last_stage = connect(plane.answer_address, KEY)
        try:
            await body(plane, last_stage)
        finally:
            last_stage.close()
            await plane.close()

    asyncio.run(run())


def answer(seq: int) -> bytes:
    return wire(KEY, (msgpack.packb([1, seq]), b"", b"answer %d" % seq))


def expect(plane: DataPlane, *seqs: int) -> list[asyncio.Future]:
    """The futures the answers to microbatches `seqs` will resolve (as `DataPlane.send` awaits them)."""
    futures = [asyncio.get_running_loop().create_future() for _ in seqs]
    plane.pending.update(zip(seqs, futures))
    return futures


async def arrived(futures: list[asyncio.Future], within: float = PROMPTLY_S) -> list[bytes]:
    return [bytes(a) for a in await asyncio.wait_for(asyncio.gather(*futures), within)]


async def wait_until(condition, within: float) -> None:
    end = time.monotonic() + within
    while not condition():
        assert time.monotonic() < end, f"not within {within}s"
        await asyncio.sleep(0.005)


def test_answers_arrive_past_a_one_byte_stranger(sockets):
    async def body(plane, last_stage):
        one_byte = stranger(plane.answer_address, sockets)
        one_byte.sendall(b"x")
        t0 = time.monotonic()
        await asyncio.sleep(0.05)
        futures = expect(plane, 1)
        last_stage.sendall(answer(1))
        assert await arrived(futures) == [b"answer 1"]
        await wait_until(lambda: plane.rejected == 1, within=DEADLINE_S + 1)
        assert time.monotonic() - t0 >= DEADLINE_S
        await asyncio.sleep(0.01)
        assert closed_by_peer(one_byte) and not plane.answers.strangers

    answer_socket_test(body)


@pytest.mark.parametrize("prefix", [
    PREFIX.pack(b"not the key 16 b", (1 << 31) - 1, 0, 0),
    PREFIX.pack(KEY, 1 << 31, 0, 0),
], ids=["wrong-key", "too-long"])
def test_the_answer_socket_drops_a_bad_prefix_at_once(sockets, prefix):
    async def body(plane, last_stage):
        sock = stranger(plane.answer_address, sockets)
        tracemalloc.start()
        try:
            sock.sendall(prefix + bytes(4096))
            await wait_until(lambda: plane.rejected == 1, within=0.1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20 and not plane.answers.strangers
        await asyncio.sleep(0.01)
        assert closed_by_peer(sock)

    answer_socket_test(body)


def test_the_answer_socket_keeps_few_idle_strangers():
    async def body(plane, last_stage):
        most_waiting, writers = 0, []
        for i in range(200):
            writers.append((await asyncio.open_connection(*parse_address(plane.answer_address)))[1])
            await asyncio.sleep(0)
            most_waiting = max(most_waiting, len(plane.answers.strangers))
            if i == 100:
                futures = expect(plane, 1)
                last_stage.sendall(answer(1))
                assert await arrived(futures) == [b"answer 1"]  # during the flood
        await wait_until(lambda: plane.rejected >= 200 - MAX_UNTRUSTED, within=1)
        assert most_waiting <= MAX_UNTRUSTED
        futures = expect(plane, 2)
        last_stage.sendall(answer(2))
        assert await arrived(futures) == [b"answer 2"]
        await wait_until(lambda: plane.rejected == 200, within=DEADLINE_S + 1)
        assert not plane.answers.strangers and len(plane.answers.tasks) == 1
        for writer in writers:
            writer.close()

    answer_socket_test(body)


def test_answers_back_to_back_and_in_pieces():
    async def body(plane, last_stage):
        futures = expect(plane, 1, 2)
        last_stage.sendall(answer(1) + answer(2))
        assert await arrived(futures) == [b"answer 1", b"answer 2"]
        futures, data = expect(plane, 3), answer(3)
        for k in range(len(data)):
            last_stage.sendall(data[k:k + 1])
            await asyncio.sleep(0.001)
        assert await arrived(futures) == [b"answer 3"]
        assert plane.rejected == 0

    answer_socket_test(body)


# ---- the scheduler's heartbeat socket ------------------------------------------------------------
def heartbeat(epoch: int, stage: int, key: bytes = KEY) -> bytes:
    return wire(key, (msgpack.packb([epoch, stage]), b"", b""))


def heartbeat_test(body):
    """Run `await body(plane)` with a DataPlane of one stage (no actor) whose epoch 1 is running."""

    async def run():
        plane = DataPlane([], "inline", "127.0.0.1", restore_stages=None, silent_after=2.0)
        await plane.listen()
        plane.epoch, plane.key, plane.broken, plane.heard = 1, KEY, None, [0.0]
        try:
            await body(plane)
        finally:
            await plane.close()

    asyncio.run(run())


def test_a_closed_heartbeat_connection_breaks_the_plane_at_once():
    """A stage whose process exits closes its connections: the data plane breaks now (Ray
    restarts the stage in place), without waiting for silence, and the stage is not lost."""
    async def body(plane):
        stage = connect(plane.beat_address, KEY)
        stage.sendall(heartbeat(1, 0))
        await wait_until(lambda: plane.heard[0] > 0, within=PROMPTLY_S)
        stage.close()
        await wait_until(lambda: plane.broken is not None, within=PROMPTLY_S)
        assert "heartbeat connection closed" in str(plane.broken) and not plane.lost

    heartbeat_test(body)


def test_heartbeats_of_an_older_epoch_are_refused():
    """A stage of epoch 1 still beating once epoch 2 began (a lost stage that came back): its
    beats count for nothing, its connection is closed and counted stale, and its closing breaks
    nothing."""
    async def body(plane):
        stage = connect(plane.beat_address, KEY)
        stage.sendall(heartbeat(1, 0))
        await wait_until(lambda: plane.heard[0] > 0, within=PROMPTLY_S)
        plane.epoch, plane.key, plane.heard = 2, bytes(16), [0.0]
        stage.sendall(heartbeat(1, 0))
        await wait_until(lambda: plane.beats.stale == 1, within=PROMPTLY_S)
        await asyncio.sleep(0.01)
        assert closed_by_peer(stage) and plane.heard == [0.0] and plane.broken is None
        stage.close()

    heartbeat_test(body)
