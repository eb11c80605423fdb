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
  node's address, and Ray's authenticated calls are how the key reaches the stages), meta
  (msgpack [epoch, seq]: which incarnation of the data plane, which microbatch), the scheduler's
  msgpack header, forwarded unchanged, and a payload: the token ids into stage 0, the activations
  with the "inline" transport, the answer from the last stage.
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

`StageEndpoint` is the stage's side (it knows nothing of Ray: the actor calls it);
`DataPlane` is the scheduler's side and drives the stage actors.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import hmac
import itertools
import logging
import secrets
import socket
import threading
import time

import msgpack
import torch

from . import channels

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "inline", "gloo", "nccl")
MAX_PENDING_SENDS = 4  # torch.distributed sends a stage may have outstanding before it waits for one
POLL_MS = 50  # how often an idle stage loop looks at its stop flag
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


def _tokens(header: dict) -> int:
    return sum(row[1] for row in header["rows"])


# ---- the stage's side ---------------------------------------------------------------------------
class StageEndpoint:
    """Stage `rank`'s end of the data plane, around a worker with `step(header, x)`, `is_last`,
    `hidden_size`, `dtype` and `device` (stages/worker.py). Per epoch: `open` binds the inbox,
    `connect` connects to the next hop (and joins the process group), `run` is the loop, `stop`
    ends it."""

    def __init__(self, worker, rank: int, num_stages: int) -> None:
        self.worker, self.rank, self.num_stages = worker, rank, num_stages
        self.epoch = -1  # the epoch whose loop may run; anything else stops it
        self.step_lock = threading.Lock()  # a loop of an old epoch never steps after the new one began
        self.stopped = threading.Event()
        self.stopped.set()
        self.inbox = self.out = self.group = None
        self.thread: threading.Thread | None = None
        self.failed: str | None = None
        self.transport, self.key = "inline", b""
        self.rejected = 0  # connections of past epochs closed for a wrong key
        self.sends: collections.deque = collections.deque()  # (work, tensor) of posted sends
        # Where the loop's time goes (seconds): waiting for input, receiving and parsing it, the
        # worker's step, sending the output. `stats()` reports them.
        self.times = dict.fromkeys(("idle", "receive", "step", "send"), 0.0)
        self.microbatches = 0

    def open(self, epoch: int, key: bytes, host: str) -> str:
        """Close the previous epoch's channels and bind a new inbox on `host`; returns its address."""
        self.stop(self.epoch)
        self._close_channels()
        self.epoch, self.key = epoch, key
        self.inbox = channels.Inbox(host, key)
        return self.inbox.address

    def connect(self, epoch: int, next_address: str, transport: str, store: tuple[str, int] | None,
                host: str) -> None:
        """Connect to the next hop's inbox (the scheduler's answer socket on the last stage) and,
        for a torch.distributed transport, join this epoch's process group (every stage calls this
        at the same time: the group's rendezvous waits for all of them)."""
        assert epoch == self.epoch, "connect of an epoch that was not opened"
        self.out = channels.connect(next_address)
        self.transport = transport
        if transport in ("gloo", "nccl") and self.num_stages > 1:
            self.group = _process_group(transport, store, epoch, self.rank, self.num_stages, host)
            self._exchange_with_neighbours()

    def _exchange_with_neighbours(self) -> None:
        """One small transfer along the chain before any microbatch, so a broken group fails here,
        at setup, and NCCL's pair communicators exist before the first microbatch. Receiving from
        the previous stage before sending to the next makes the chain resolve in order."""
        w = self.worker
        if self.rank > 0:
            self.group.recv([torch.empty(1, dtype=w.dtype, device=w.device)], self.rank - 1, 0).wait()
        if self.rank < self.num_stages - 1:
            self.group.send([torch.zeros(1, dtype=w.dtype, device=w.device)], self.rank + 1, 0).wait()

    def start(self, epoch: int) -> None:
        """Run `epoch`'s loop in a thread of its own; `failure` says if it ended."""
        assert epoch == self.epoch, "start of an epoch that was not opened"
        self.failed = None
        self.stopped.clear()
        self.thread = threading.Thread(target=self._run, args=(epoch,), name=f"dataplane-{epoch}", daemon=True)
        self.thread.start()

    def _run(self, epoch: int) -> None:
        try:
            self.run(epoch)
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"
            log.exception("stage %d: the data-plane loop of epoch %d failed", self.rank, epoch)

    def failure(self, epoch: int) -> str | None:
        """None while `epoch`'s loop runs; else why not."""
        if self.failed:
            return self.failed
        if epoch != self.epoch or not self.thread.is_alive():
            return f"its loop of epoch {epoch} is not running"
        return None

    def stop(self, epoch: int, wait_s: float = 10.0) -> None:
        """End `epoch`'s loop; returns once it has left (or after `wait_s`: a loop stuck in a
        transfer from a dead stage leaves when that transfer fails, and never steps again)."""
        if epoch == self.epoch:
            self.epoch = -1
        self.stopped.wait(wait_s)

    def run(self, epoch: int) -> None:
        """The stage loop: receive, forward, send, until `stop`. Raises if a transfer fails."""
        self.stopped.clear()
        times, clock = self.times, time.perf_counter
        try:
            t0 = clock()
            while self.epoch == epoch:
                message = self.inbox.recv(POLL_MS / 1000)
                if message is None:  # nothing yet (or something refused): look at the stop flag
                    continue
                t1 = clock()
                meta, header_bytes, payload = message
                header = msgpack.unpackb(header_bytes)
                x = self._input(payload, _tokens(header))
                t2 = clock()
                with self.step_lock:
                    if self.epoch != epoch:
                        break
                    out = self.worker.step(header, x)
                t3 = clock()
                self._output(meta, header_bytes, out)
                t4 = clock()
                times["idle"] += t1 - t0
                times["receive"] += t2 - t1
                times["step"] += t3 - t2
                times["send"] += t4 - t3
                self.microbatches += 1
                t0 = t4
        finally:
            self.stopped.set()

    def stats(self) -> dict:
        rejected = self.rejected + (self.inbox.rejected if self.inbox is not None else 0)
        return {"microbatches": self.microbatches, "rejected": rejected,
                **{f"{k}_seconds": v for k, v in self.times.items()}}

    def _input(self, payload: memoryview, n_tokens: int) -> torch.Tensor:
        w = self.worker
        if self.rank == 0:  # token ids from the scheduler
            if n_tokens == 0:
                return torch.empty(0, dtype=torch.long, device=w.device)
            return torch.frombuffer(payload, dtype=torch.long).to(w.device, copy=True)
        x = torch.empty((n_tokens, w.hidden_size), dtype=w.dtype, device=w.device)
        if n_tokens == 0:
            return x
        if self.group is None:
            # One copy out of the message into aligned memory: CPU kernels round differently on
            # unaligned inputs (see stages/loading.py), and the stages must match one process.
            x.view(-1).view(torch.uint8).copy_(torch.frombuffer(payload, dtype=torch.uint8))
        else:
            self.group.recv([x], self.rank - 1, 0).wait()
        return x

    def _output(self, meta: bytes, header: bytes, out) -> None:
        if self.worker.is_last:  # the answer, msgpack bytes
            channels.send_all(self.out, channels.frame(self.key, meta, b"", out))
            return
        if self.group is None:
            payload = out.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy() if out.numel() else b""
            channels.send_all(self.out, channels.frame(self.key, meta, header, payload))
            return
        channels.send_all(self.out, channels.frame(self.key, meta, header))  # first: see the module's docstring
        if out.numel():
            out = out.contiguous()
            self.sends.append((self.group.send([out], self.rank + 1, 0), out))
            while len(self.sends) > MAX_PENDING_SENDS:
                self.sends.popleft()[0].wait()

    def _close_channels(self) -> None:
        if self.inbox is not None:
            self.rejected += self.inbox.rejected
            self.inbox.close()
        if self.out is not None:
            self.out.close()
        self.inbox = self.out = None
        self.sends.clear()
        if self.transport == "nccl" and self.group is not None:
            # NCCL transfers from a dead peer never end by themselves (its watchdog would kill this
            # process at the timeout): abort the old communicators before the new epoch's.
            try:
                self.group.abort()
            except Exception as e:  # an older torch without abort(): the watchdog remains
                log.warning("could not abort the previous NCCL group: %s", e)
        self.group = None  # a broken gloo group's transfers fail on their own; nothing waits for them

    def close(self) -> None:
        self.stop(self.epoch, wait_s=1.0)
        self._close_channels()


def _process_group(backend: str, store: tuple[str, int], epoch: int, rank: int, size: int, host: str):
    """A process group of the pipeline's stages for one epoch, built directly (no global default
    group, so a new epoch's group simply replaces the old one). Gloo binds to the node address
    Ray reported; NCCL finds its own interfaces (NCCL_SOCKET_IFNAME to choose)."""
    import torch.distributed as dist

    tcp = dist.TCPStore(store[0], store[1], is_master=False, timeout=GROUP_TIMEOUT)
    prefixed = dist.PrefixStore(f"jamba/epoch{epoch}/", tcp)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = GROUP_TIMEOUT
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(prefixed, rank, size, opts)
    if not dist.is_nccl_available():
        raise RuntimeError("the nccl transport needs a CUDA build of torch")
    torch.cuda.set_device(torch.cuda.current_device())
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = GROUP_TIMEOUT
    return dist.ProcessGroupNCCL(prefixed, rank, size, opts)


# ---- the scheduler's side -----------------------------------------------------------------------
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
        self._answer_tasks: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        t0 = time.perf_counter()
        if self.answers is None:
            self.answers = await asyncio.start_server(self._read_answers, self.host, 0)
            self.answer_address = f"tcp://{self.host}:{self.answers.sockets[0].getsockname()[1]}"
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
        await asyncio.gather(*[a.start_dataplane.remote(epoch) for a in self.actors])
        self.broken = None
        self._watcher = asyncio.get_running_loop().create_task(self._watch(epoch))
        log.info("data plane epoch %d up in %.2fs: %d stage(s), activations over %s", epoch,
                 time.perf_counter() - t0, P, self.transport if P > 1 else "(single stage)")

    async def send(self, header: bytes, ids: torch.Tensor) -> bytes:
        """Run one microbatch through every stage; returns the last stage's answer."""
        if self.broken is not None:
            raise self.broken
        seq = next(self.seq)
        fut = asyncio.get_running_loop().create_future()
        self.pending[seq] = fut
        meta = msgpack.packb([self.epoch, seq])
        self.to_first.writelines(channels.frame(self.key, meta, header, ids.to(torch.long).contiguous().numpy()))
        return await fut

    async def _read_answers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One last stage's connection: answers until it closes. A connection without this epoch's
        key (an old epoch's last stage, or anything else) is closed."""
        self._answer_tasks.add(asyncio.current_task())
        try:
            while True:
                key, n_meta, n_header, n_payload = channels.PREFIX.unpack(await reader.readexactly(channels.PREFIX.size))
                if not hmac.compare_digest(key, self.key):
                    return
                body = await reader.readexactly(n_meta + n_header + n_payload)
                epoch, seq = msgpack.unpackb(body[:n_meta])
                fut = self.pending.pop(seq, None) if epoch == self.epoch else None
                if fut is not None and not fut.done():
                    fut.set_result(body[n_meta + n_header:])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # `close` cancels this connection's task. End it quietly: asyncio's stream server asks a
            # finished handler task for its exception, and a cancelled one would raise there.
            pass
        finally:
            writer.close()
            self._answer_tasks.discard(asyncio.current_task())

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

