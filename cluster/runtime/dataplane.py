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

Failures: the scheduler's side pings every stage twice a second (a short actor call; Ray fails
it once the stage's process is gone, and a stage whose loop died says why), and on a failure
fails every microbatch in flight (the scheduler replays their requests). `rebuild()` waits until
Ray has restarted the stage, stops the survivors' loops and builds a new epoch: new sockets, a new
process group. Answers of an older epoch are dropped. (The loop is not itself a long actor call:
a process that exits with calls of its own still running is aborted by Ray's core worker before
it can clean up, which leaked a batch job's placement groups.)

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


class DataPlane:
    """Drives the stage actors' endpoints (through the actor methods `open_dataplane`,
    `connect_dataplane`, `start_dataplane`, `ping_dataplane`, `stop_dataplane`) and gives the scheduler
    `send(header, ids) -> answer`. Lives on the event loop of the scheduler's process."""

    def __init__(self, actors: list, transport: str, host: str, wait_for_stages) -> None:
        self.actors, self.transport, self.host = actors, transport, host
        self.wait_for_stages = wait_for_stages  # async (): returns once every stage answers again
        self.answers: asyncio.AbstractServer | None = None  # where the last stage's answers arrive
        self.answer_address = ""
        self.to_first: asyncio.StreamWriter | None = None
        self.store = None  # the process groups' rendezvous, hosted here for the pipeline's lifetime
        self.epoch, self.key = 0, b""
        self.seq = itertools.count()
        self.pending: dict[int, asyncio.Future] = {}
        self.broken: DataPlaneError | None = DataPlaneError("the data plane is not started")
        self.inboxes: list[str] = []
        self.rejected = 0  # connections to the answer socket closed before they proved the key
        self._answer_tasks: set[asyncio.Task] = set()
        self._strangers: list[asyncio.Task] = []  # the answer connections yet to prove the key, oldest first
        self._watcher: asyncio.Task | None = None

    async def listen(self) -> None:
        """Open the socket the last stage's answers arrive on, once: it serves every epoch."""
        if self.answers is None:
            self.answers = await asyncio.start_server(self._read_answers, self.host, 0)
            self.answer_address = f"tcp://{self.host}:{self.answers.sockets[0].getsockname()[1]}"

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
        await asyncio.gather(*[a.connect_dataplane.remote(epoch, nexts[k], self.transport, store)
                               for k, a in enumerate(self.actors)])
        if self.to_first is not None:
            self.to_first.close()
        _, self.to_first = await asyncio.open_connection(*channels.parse_address(inboxes[0]))
        self.to_first.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.to_first.write(channels.greeting(self.key))
        await asyncio.gather(*[a.start_dataplane.remote(epoch) for a in self.actors])
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

    async def _read_answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection to the answer socket: the last stage's answers until it closes. The rules
        for strangers are the inboxes' (channels.py): a connection has UNTRUSTED_DEADLINE_S to send
        a prefix with this epoch's key (the last stage greets at once), at most MAX_UNTRUSTED wait
        to (one more closes the oldest), and those closed before they proved the key are counted in
        `rejected`. Until then the stream reads ahead at most 128 KiB (twice asyncio's limit) of
        what one sends. A connection with an older epoch's key (an old epoch's last stage) is
        closed uncounted."""
        task = asyncio.current_task()
        self._answer_tasks.add(task)
        self._strangers.append(task)
        if len(self._strangers) > channels.MAX_UNTRUSTED:
            self.rejected += 1
            self._strangers.pop(0).cancel()
        trusted = False
        try:
            prefix = await asyncio.wait_for(reader.readexactly(channels.PREFIX.size), channels.UNTRUSTED_DEADLINE_S)
            while True:
                lengths = channels.read_prefix(prefix, self.key)
                if not trusted:
                    trusted = True
                    self._strangers.remove(task)
                if sum(lengths):  # else a greeting
                    meta, _, answers = channels.split(await reader.readexactly(sum(lengths)), lengths)
                    epoch, seq = msgpack.unpackb(meta)
                    fut = self.pending.pop(seq, None) if epoch == self.epoch else None
                    if fut is not None and not fut.done():
                        fut.set_result(answers)
                prefix = await reader.readexactly(channels.PREFIX.size)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, TimeoutError):  # closed, or not ours
            self.rejected += not trusted
        except asyncio.CancelledError:
            # `close` cancels this connection's task, and so does a newer stranger pushing this one
            # out. End it quietly: asyncio's stream server asks a finished handler task for its
            # exception, and a cancelled one would raise there.
            pass
        finally:
            if task in self._strangers:
                self._strangers.remove(task)
            writer.close()
            self._answer_tasks.discard(task)

    async def _watch(self, epoch: int) -> None:
        """Ping every stage until this epoch ends; break the data plane when one is gone (Ray
        fails the call) or its loop stopped."""
        while epoch == self.epoch and self.broken is None:
            await asyncio.sleep(WATCH_S)
            try:
                failures = await asyncio.gather(*[a.ping_dataplane.remote(epoch) for a in self.actors])
            except Exception as e:  # a Ray actor error: the stage died or is restarting
                cause = e
            else:
                bad = [(k, f) for k, f in enumerate(failures) if f]
                if not bad:
                    continue
                cause = DataPlaneError(f"stage {bad[0][0]} of the data plane failed: {bad[0][1]}")
            if epoch != self.epoch or self.broken is not None:
                return
            log.warning("the data plane broke (%s): %s", type(cause).__name__,
                        str(cause).splitlines()[0] if str(cause) else "")
            self._break(cause)
            return

    def _break(self, cause: BaseException) -> None:
        # The scheduler sees the cause itself (a Ray actor error when a stage died), as it would
        # from a failed actor call, and starts its recovery.
        self.broken = cause if isinstance(cause, Exception) else DataPlaneError(str(cause), cause)
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self.broken)

    async def rebuild(self) -> None:
        """After a failure: wait for every stage (Ray restarts a dead one, which reloads its
        layers), stop the survivors' loops, and start a new epoch of channels."""
        if self.broken is None:
            self._break(DataPlaneError("rebuilding the data plane"))
        await self.wait_for_stages()
        await self._stop_loops()
        await self.start()

    async def _stop_loops(self) -> None:
        epoch = self.epoch
        self.epoch += 1  # answers still on their way belong to the old epoch now
        await asyncio.gather(*[a.stop_dataplane.remote(epoch) for a in self.actors], return_exceptions=True)
        if self._watcher is not None:
            self._watcher.cancel()

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
        if self.answers is not None:
            self.answers.close()
        for task in list(self._answer_tasks):
            task.cancel()
        await asyncio.gather(*self._answer_tasks, return_exceptions=True)

