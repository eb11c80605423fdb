"""The pipeline's data plane: each microbatch goes from the scheduler to stage 0, from every stage
straight to the next, and from the last stage back to the scheduler, with no Ray call on the way.

    scheduler ──[header, token ids]──► stage 0 ──[header, activations]──► stage 1 ─ ... ─► stage P-1
        ▲                                                                                     │
        └──────────────────────────────[answer: token ids, log-probs]─────────────────────────┘

Why not Ray calls: with one actor call per stage per microbatch, every hop went through the
driver and the object store (1.8-3 ms a hop here) and the driver made P calls per microbatch, P^2
per round of the pipeline; 16 stages were busy 6-23% of the time. Ray Compiled Graphs busy-poll
their channels (which steals the cores the stages need on a CPU box) and tear the graph down when
an actor dies. So, as vLLM's newer Ray executor does, Ray keeps what it is good at (placement,
process lifecycle, restarts) and the microbatches take channels of their own:

- Control: TCP connections (cluster/channels.py). Each stage listens on an inbox bound on the
  address of the node Ray placed it on; its upstream (the scheduler for stage 0) connects to it.
  The scheduler listens for the last stage's answers. The kernel's socket buffers hold the next
  microbatch while a stage works on the current one, and only the receiving thread wakes for it.
- A message carries the epoch's key (a connection without it is closed: the sockets listen on the
  node's address, and Ray's authenticated calls are how the key reaches the stages; channels.py
  says how a connection that has not proven it is kept from stalling or filling a stage), meta
  (msgpack [epoch, seq]: which incarnation of the data plane, which microbatch), the microbatch
  header (stages/microbatch.py, encoded once here and forwarded unchanged), and a payload: the
  token ids into stage 0, the activations with the "inline" transport, the answers from the last
  stage.
- Activations between stages, by `transport`:
    "inline" in the message itself (CPU stages);
    "nccl"   torch.distributed point-to-point, device to device (stages with a GPU each; "auto"
             picks it then; stages sharing a GPU use "inline", since NCCL needs one device a rank);
    "gloo"   the same torch.distributed code path on CPU, so that path (process-group rendezvous,
             eager sends, rebuilding after a failure) runs in CI without GPUs.
  The control message goes first, so the next stage posts its receive (NCCL creates a pair's
  communicator on the first transfer, with both sides in it); then the stage posts its send and
  goes on with the next microbatch, waiting for a send only when more than a few are outstanding.

Failures. A stage that dies is noticed at once: the kernel closes its sockets, and its heartbeat
connection (below) closing breaks the data plane; Ray restarts the stage in place. The
scheduler's side also pings every stage twice a second (a short actor call; Ray fails it once
the stage's process is gone, and a stage whose loop died says why). A stage that goes *silent* is noticed by the data plane itself: a
hung host, a stopped process or a network partition sends no RST and exits nothing, so Ray's
call just hangs, and Ray declares the node dead only after its own health checks give up (73 s
with the defaults, measured). So every stage also sends a heartbeat, a message of some 35 bytes, every
`silent_after / 10` seconds on a connection of its own to the scheduler's side, and a stage not
heard from for `silent_after` seconds (`PipelineConfig.heartbeat_timeout_s`, 2 s by default) is
declared lost.

Why heartbeats, and not deadlines on the hops or TCP keepalive: a hop's legitimate time has no
useful bound (a 16K-token prefill chunk takes seconds here, a first compile longer), so a
deadline scaled to the work in flight would either fire on a long step or wait as long as the
longest one; TCP keepalive and TCP_USER_TIMEOUT only notice a peer that has unacknowledged data
or an idle connection, on the kernel's schedule, and an idle pipeline would look the same as a
stuck one. A heartbeat comes from a thread of its own in the stage's process, not the compute
thread: the stage's kernels release the GIL (torch ops, the numba kernels are nogil), so a stage
busy with one long step still beats every `silent_after / 10` seconds, and a step of any length
never looks like silence (tests/test_partition.py runs a 16K-token prefill). What it tells is
exactly what recovery needs: the stage's process runs and its node reaches the scheduler's. (A
stage whose compute hangs while its process runs keeps beating; that is not a partition, and is
left to the requests' deadlines.) The watcher also checks that its own event loop was not held
up: after a stall of the scheduler's process, the beats waiting in its sockets are read before
any stage is judged.

A lost stage is handed to `restore_stages(lost)` (pipeline.py), which kills its actor for good
and starts a replacement on another node, without waiting for Ray to declare anything. Then, as
for a dead stage, the scheduler replays every request in flight: `rebuild()` waits until every
stage answers (Ray restarts a dead one in place), stops the survivors' loops and builds a new
epoch: new sockets, a new key, a new process group. Answers of an older epoch are dropped, and
a connection that sends an older epoch's key is closed (counted in `stale`): a lost stage that
comes back (the partition heals before its node is declared dead) can neither feed the new
epoch nor answer for it, and Ray kills it as soon as its node hears of the kill. (The loop is
not itself a long actor call: a process that exits with calls of its own still running is
aborted by Ray's core worker before it can clean up, which leaked a batch job's placement
groups.)

`DataPlane` (here) is the scheduler's side and drives the stage actors; `StageEndpoint`
(stage_endpoint.py) is the stage's side, which knows nothing of Ray (the actor calls it).
They live apart so that the scheduler's process, a Serve replica, never imports torch.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import secrets
import socket
import time

import msgpack

from stages.microbatch import Answer, Microbatch, decode_answers

from . import channels

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "inline", "gloo", "nccl")
WATCH_S = 0.5  # how often the scheduler's side pings the stages
BEATS_PER_TIMEOUT = 10  # heartbeats a stage sends per heartbeat timeout (PipelineConfig.heartbeat_timeout_s)
GROUP_TIMEOUT = datetime.timedelta(seconds=60)  # process-group rendezvous and a single transfer


def resolve_transport(transport: str, gpus_per_stage: float) -> str:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}: expected one of {', '.join(TRANSPORTS)}")
    if transport == "auto":
        return "nccl" if gpus_per_stage >= 1 else "inline"
    if transport == "nccl" and gpus_per_stage < 1:
        raise ValueError("the nccl transport needs GPU stages with a GPU each (gpus_per_stage >= 1): "
                         "NCCL cannot connect two ranks on one device")
    return transport


class DataPlaneError(RuntimeError):
    """The data plane broke (a stage died or its loop failed); `cause` is what Ray reported."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class StageLostError(DataPlaneError):
    """A stage went silent (no heartbeat for the timeout): its host hung or was cut off."""

    def __init__(self, message: str, stages: set[int]) -> None:
        super().__init__(message)
        self.stages = stages


class DataPlane:
    """Drives the stage actors' endpoints (through the actor methods `open_dataplane`,
    `connect_dataplane`, `start_dataplane`, `ping_dataplane`, `stop_dataplane`) and gives the scheduler
    `send(header, ids) -> answer`. Lives on the event loop of the scheduler's process.
    `restore_stages(lost)` (async) replaces the stages of the set `lost` and returns once every
    stage answers again; `silent_after` is how long a stage may go unheard before it is lost."""

    def __init__(self, actors: list, transport: str, host: str, restore_stages, silent_after: float) -> None:
        self.actors, self.transport, self.host = actors, transport, host
        self.restore_stages, self.silent_after = restore_stages, silent_after
        self.answers = _Listener(self._on_answer, lambda: self.key)  # the last stage's answers, every epoch
        self.beats = _Listener(self._on_beat, lambda: self.key, self._on_beats_closed)  # every stage's heartbeats
        self.to_first: asyncio.StreamWriter | None = None
        self.store = None  # the process groups' rendezvous, hosted here for the pipeline's lifetime
        self.epoch, self.key = 0, b""
        self.seq = itertools.count()
        self.pending: dict[int, asyncio.Future] = {}
        self.broken: BaseException | None = DataPlaneError("the data plane is not started")
        self.inboxes: list[str] = []
        self.heard: list[float] = []  # per stage, when its last heartbeat of this epoch arrived (monotonic)
        self.lost: set[int] = set()  # stages declared lost since the last rebuild
        self._watcher: asyncio.Task | None = None

    @property
    def answer_address(self) -> str:
        return self.answers.address

    @property
    def beat_address(self) -> str:
        return self.beats.address

    @property
    def rejected(self) -> int:
        """Connections to the scheduler's sockets closed before they proved the key."""
        return self.answers.rejected + self.beats.rejected

    @property
    def stale(self) -> int:
        """Connections of an older epoch (a lost stage that came back) closed when they spoke."""
        return self.answers.stale + self.beats.stale

    async def listen(self) -> None:
        """Open the sockets the answers and heartbeats arrive on, once: they serve every epoch."""
        await self.answers.open(self.host)
        await self.beats.open(self.host)

    async def start(self) -> None:
        t0 = time.perf_counter()
        await self.listen()
        self.epoch += 1
        self.key = secrets.token_bytes(16)
        epoch, P = self.epoch, len(self.actors)
        inboxes = await asyncio.gather(*[a.open_dataplane.remote(epoch, self.key) for a in self.actors])
        store = None
        if self.transport in ("gloo", "nccl") and P > 1:
            if self.store is None:
                import torch.distributed as dist

                self.store = dist.TCPStore(self.host, 0, None, True, GROUP_TIMEOUT, wait_for_workers=False)
            store = (self.host, self.store.port)
        self.inboxes = list(inboxes)
        nexts = self.inboxes[1:] + [self.answer_address]
        beat_every = self.silent_after / BEATS_PER_TIMEOUT
        await asyncio.gather(*[a.connect_dataplane.remote(epoch, nexts[k], self.beat_address, beat_every,
                                                          self.transport, store)
                               for k, a in enumerate(self.actors)])
        if self.to_first is not None:
            self.to_first.close()
        _, self.to_first = await asyncio.open_connection(*channels.parse_address(inboxes[0]))
        self.to_first.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.to_first.write(channels.greeting(self.key))
        await asyncio.gather(*[a.start_dataplane.remote(epoch) for a in self.actors])
        self.heard = [time.monotonic()] * P
        self.broken = None
        self._watcher = asyncio.get_running_loop().create_task(self._watch(epoch))
        log.info("data plane epoch %d up in %.2fs: %d stage(s), activations over %s", epoch,
                 time.perf_counter() - t0, P, self.transport if P > 1 else "(single stage)")

    async def send(self, mb: Microbatch, ids) -> list[Answer]:
        """Run one microbatch through every stage; returns the last stage's answers."""
        if self.broken is not None:
            raise self.broken
        seq = next(self.seq)
        fut = asyncio.get_running_loop().create_future()
        self.pending[seq] = fut
        meta = msgpack.packb([self.epoch, seq])
        self.to_first.writelines(channels.frame(self.key, meta, mb.encode(), ids))
        return decode_answers(await fut)

    def _on_answer(self, meta: bytes, header: bytes, answers: memoryview) -> None:
        epoch, seq = msgpack.unpackb(meta)
        fut = self.pending.pop(seq, None) if epoch == self.epoch else None
        if fut is not None and not fut.done():
            fut.set_result(answers)

    def _on_beat(self, meta: bytes, header: bytes, payload: memoryview) -> int | None:
        """Note a heartbeat; returns the stage it came from, if of this epoch."""
        epoch, stage = msgpack.unpackb(meta)
        if epoch == self.epoch and 0 <= stage < len(self.heard):
            self.heard[stage] = time.monotonic()
            return stage
        return None

    async def _watch(self, epoch: int) -> None:
        """Until this epoch ends: every WATCH_S / 2, judge the heartbeats, and about every WATCH_S
        ping every stage through Ray (one round at a time: a silent stage's ping hangs, and the
        beats judge it).
        Break the data plane when a stage is silent, gone (Ray fails the ping) or its loop
        stopped."""
        pings: asyncio.Task | None = None
        last_tick = time.monotonic()
        try:
            while epoch == self.epoch and self.broken is None:
                await asyncio.sleep(WATCH_S / 2)
                now = time.monotonic()
                gap, last_tick = now - last_tick, now
                if gap > self.silent_after / 2:  # this loop did not run: read the beats waiting in the sockets first
                    log.warning("the scheduler's event loop was held up for %.1fs; judging the stages' "
                                "heartbeats from now on", gap)
                    self.heard = [max(h, now) for h in self.heard]
                    continue
                silent = {k: now - h for k, h in enumerate(self.heard) if now - h > self.silent_after}
                if silent:
                    for k, quiet in silent.items():
                        log.warning("stage %d silent for %.1fs: declaring it lost", k, quiet)
                    self.lost |= set(silent)
                    self._break(StageLostError(f"stage(s) {', '.join(map(str, sorted(silent)))} went silent "
                                               f"(no heartbeat for {self.silent_after:g}s)", set(silent)))
                    return
                if pings is None:
                    pings = asyncio.get_running_loop().create_task(self._ping(epoch))
                    continue
                if not pings.done():
                    continue
                cause, pings = pings.result(), None
                if cause is None:
                    continue
                if epoch != self.epoch or self.broken is not None:
                    return
                self._fail(cause)
                return
        finally:
            if pings is not None:
                pings.cancel()

    async def _ping(self, epoch: int) -> BaseException | None:
        """Ping every stage through Ray: None if each answered that its loop runs, else why not
        (a Ray actor error: the stage died or is restarting)."""
        try:
            failures = await asyncio.gather(*[a.ping_dataplane.remote(epoch) for a in self.actors])
        except Exception as e:
            return e
        bad = [(k, f) for k, f in enumerate(failures) if f]
        return DataPlaneError(f"stage {bad[0][0]} of the data plane failed: {bad[0][1]}") if bad else None

    def _on_beats_closed(self, stage: int) -> None:
        """A stage's heartbeat connection of this epoch closed: its process is gone (the kernel
        closed its sockets) or its epoch's loop ended. Ray restarts a dead stage in place, so it
        is not lost, and there is no need to wait for silence or for Ray's own failure report."""
        if self.broken is None:
            self._fail(DataPlaneError(f"stage {stage}'s heartbeat connection closed: its process exited, or its "
                                      "heartbeats stopped"))

    def _fail(self, cause: BaseException) -> None:
        log.warning("the data plane broke (%s): %s", type(cause).__name__,
                    str(cause).splitlines()[0] if str(cause) else "")
        self._break(cause)

    def _break(self, cause: BaseException) -> None:
        # The scheduler sees the cause itself (a Ray actor error when a stage died), as it would
        # from a failed actor call, and starts its recovery.
        self.broken = cause if isinstance(cause, Exception) else DataPlaneError(str(cause), cause)
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self.broken)

    async def rebuild(self) -> None:
        """After a failure: replace the lost stages and wait for every stage (Ray restarts a dead
        one, which reloads its layers), stop the survivors' loops, and start a new epoch of
        channels."""
        if self.broken is None:
            self._break(DataPlaneError("rebuilding the data plane"))
        lost, self.lost = self.lost, set()
        await self.restore_stages(lost)
        await self._stop_loops()
        await self.start()

    async def _stop_loops(self) -> None:
        epoch = self.epoch
        self.epoch += 1  # answers still on their way belong to the old epoch now
        if self._watcher is not None:
            self._watcher.cancel()
        await asyncio.gather(*[a.stop_dataplane.remote(epoch) for a in self.actors], return_exceptions=True)

    async def close(self) -> None:
        """Local only (no call to the stages, which the pipeline kills next): this also runs where
        Ray is tearing the process down, as when Ray Data drops a batch job's pool actor."""
        self.epoch += 1
        if self.broken is None:
            self._break(DataPlaneError("the pipeline was shut down"))
        if self._watcher is not None:
            self._watcher.cancel()
        if self.to_first is not None:
            self.to_first.close()
        await self.answers.close()
        await self.beats.close()


class _Listener:
    """A socket of the scheduler's side that stages connect to (the answers, the heartbeats), and
    its connections. Each message with the current key goes to `on_message(meta, header,
    payload)`. The rules for strangers are the inboxes' (channels.py): a connection has
    UNTRUSTED_DEADLINE_S to send a prefix with this epoch's key (stages greet at once), at most
    MAX_UNTRUSTED wait to (one more closes the oldest), and those closed before they proved the
    key are counted in `rejected`. Until then the stream reads ahead at most 128 KiB (twice
    asyncio's limit) of what one sends. A connection that proved an older epoch's key (a stage
    of an older epoch, perhaps one declared lost that came back) is closed when it next speaks,
    and counted in `stale`. If `on_message` names who sent a message (it returns not None) and
    the connection is later closed by the other side while its key is current,
    `on_closed(who)` hears of it."""

    def __init__(self, on_message, current_key, on_closed=None) -> None:
        self.on_message, self.current_key, self.on_closed = on_message, current_key, on_closed
        self.server: asyncio.AbstractServer | None = None
        self.address = ""
        self.rejected = self.stale = 0
        self.tasks: set[asyncio.Task] = set()
        self.strangers: list[asyncio.Task] = []  # connections yet to prove the key, oldest first

    async def open(self, host: str) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._serve, host, 0)
            self.address = f"tcp://{host}:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.tasks.add(task)
        self.strangers.append(task)
        if len(self.strangers) > channels.MAX_UNTRUSTED:
            self.rejected += 1
            self.strangers.pop(0).cancel()
        trusted_key = sender = None
        try:
            prefix = await asyncio.wait_for(reader.readexactly(channels.PREFIX.size), channels.UNTRUSTED_DEADLINE_S)
            while True:
                key = self.current_key()
                if trusted_key is not None and trusted_key != key:
                    self.stale += 1  # its epoch is over
                    return
                lengths = channels.read_prefix(prefix, key)
                if trusted_key is None:
                    trusted_key = key
                    self.strangers.remove(task)
                if sum(lengths):  # else a greeting
                    who = self.on_message(*channels.split(await reader.readexactly(sum(lengths)), lengths))
                    sender = sender if who is None else who
                prefix = await reader.readexactly(channels.PREFIX.size)
        except (asyncio.IncompleteReadError, ConnectionError):  # closed
            self.rejected += trusted_key is None
            if sender is not None and trusted_key == self.current_key() and self.on_closed is not None:
                self.on_closed(sender)
        except (ValueError, TimeoutError):  # not ours
            self.rejected += trusted_key is None
        except asyncio.CancelledError:
            # `close` cancels this connection's task, and so does a newer stranger pushing this one
            # out. End it quietly: asyncio's stream server asks a finished handler task for its
            # exception, and a cancelled one would raise there.
            pass
        finally:
            if task in self.strangers:
                self.strangers.remove(task)
            writer.close()
            self.tasks.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
