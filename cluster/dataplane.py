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

- Control: ZeroMQ PUSH/PULL sockets. Each stage binds one inbox (PULL) on the address of the node
  Ray placed it on; its upstream (the scheduler for stage 0) connects to it. The scheduler binds
  one answer socket, which the last stage connects to. ZeroMQ queues messages in its own I/O
  thread, so the next microbatch is already waiting when a stage finishes the current one.
- A message is [meta, header, payload]: meta is msgpack [epoch, seq] (which incarnation of the
  data plane, which microbatch), header is the scheduler's msgpack header, forwarded unchanged,
  and payload is the token ids into stage 0 or, with the "zmq" transport, the activations. The
  last stage answers [meta, answer].
- Activations between stages, by `transport`:
    "zmq"   inline in the message (CPU stages: zero-copy on send, one copy on receive);
    "nccl"  torch.distributed point-to-point, device to device (GPU stages; chosen by "auto");
    "gloo"  the same torch.distributed code path on CPU, so that path (process-group rendezvous,
            eager sends, rebuilding after a failure) runs in CI without GPUs.
  A stage posts its send and goes on with the next microbatch; it waits for a send only when
  more than a few are outstanding.

Failures: every stage's loop runs inside one long actor call (`run`), so the scheduler's side
learns that a stage died as soon as Ray fails that call, and fails every microbatch in flight
(the scheduler replays their requests). `rebuild()` waits until Ray has restarted the stage, stops
the survivors' loops and builds a new epoch: new sockets, a new process group. Answers of an
older epoch are dropped.

`StageEndpoint` is the stage's side (it knows nothing of Ray: the actor calls it);
`DataPlane` is the scheduler's side and drives the stage actors.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import itertools
import logging
import threading
import time

import msgpack
import torch
import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "zmq", "gloo", "nccl")
MAX_PENDING_SENDS = 4  # torch.distributed sends a stage may have outstanding before it waits for one
POLL_MS = 50  # how often an idle stage loop looks at its stop flag
GROUP_TIMEOUT = datetime.timedelta(seconds=60)  # process-group rendezvous and a single transfer
# Below this many bytes a payload is copied into the message: pyzmq's zero-copy send hands each
# buffer back through a garbage-collector thread, a thread wake-up that costs more than the copy.
ZERO_COPY_BYTES = 1 << 20


def resolve_transport(transport: str, device: str) -> str:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}: expected one of {', '.join(TRANSPORTS)}")
    if transport == "auto":
        return "nccl" if device == "cuda" else "zmq"
    if transport == "nccl" and device != "cuda":
        raise ValueError("the nccl transport needs GPU stages (gpus_per_stage > 0)")
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
        self.ctx = zmq.Context()
        self.epoch = -1  # the epoch whose loop may run; anything else stops it
        self.step_lock = threading.Lock()  # a loop of an old epoch never steps after the new one began
        self.stopped = threading.Event()
        self.stopped.set()
        self.inbox = self.out = self.group = None
        self.transport = "zmq"
        self.sends: collections.deque = collections.deque()  # (work, tensor) of posted sends
        # Where the loop's time goes (seconds): waiting for input, receiving and parsing it, the
        # worker's step, sending the output. `stats()` reports them.
        self.times = dict.fromkeys(("idle", "receive", "step", "send"), 0.0)
        self.microbatches = 0

    def open(self, epoch: int, host: str) -> str:
        """Close the previous epoch's channels and bind a new inbox on `host`; returns its address."""
        self.stop(self.epoch)
        self._close_channels()
        self.epoch = epoch
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.RCVHWM, 0)  # the scheduler bounds what is in flight
        port = self.inbox.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"

    def connect(self, epoch: int, next_address: str, transport: str, store: tuple[str, int] | None,
                host: str) -> None:
        """Connect to the next hop's inbox (the scheduler's answer socket on the last stage) and,
        for a torch.distributed transport, join this epoch's process group (every stage calls this
        at the same time: the group's rendezvous waits for all of them)."""
        assert epoch == self.epoch, "connect of an epoch that was not opened"
        self.out = self.ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.SNDHWM, 0)
        self.out.setsockopt(zmq.LINGER, 0)
        self.out.connect(next_address)
        self.transport = transport
        if transport in ("gloo", "nccl") and self.num_stages > 1:
            self.group = _process_group(transport, store, epoch, self.rank, self.num_stages, host)

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
                if not self.inbox.poll(POLL_MS):
                    continue
                t1 = clock()
                frames = self.inbox.recv_multipart(copy=False)
                header_bytes = frames[1].bytes
                header = msgpack.unpackb(header_bytes)
                x = self._input(frames, _tokens(header))
                t2 = clock()
                with self.step_lock:
                    if self.epoch != epoch:
                        break
                    out = self.worker.step(header, x)
                t3 = clock()
                self._output(frames[0].bytes, header_bytes, out)
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
        return {"microbatches": self.microbatches, **{f"{k}_seconds": v for k, v in self.times.items()}}

    def _input(self, frames, n_tokens: int) -> torch.Tensor:
        w = self.worker
        if self.rank == 0:  # token ids from the scheduler
            if n_tokens == 0:
                return torch.empty(0, dtype=torch.long, device=w.device)
            return torch.frombuffer(bytearray(frames[2].buffer), dtype=torch.long).to(w.device)
        x = torch.empty((n_tokens, w.hidden_size), dtype=w.dtype, device=w.device)
        if n_tokens == 0:
            return x
        if self.group is None:  # inline: one copy out of the message, into memory we own
            x.view(-1).view(torch.uint8).copy_(torch.frombuffer(frames[2].buffer, dtype=torch.uint8))
        else:
            self.group.recv([x], self.rank - 1, 0).wait()
        return x

    def _output(self, meta: bytes, header: bytes, out) -> None:
        if self.worker.is_last:  # the answer, msgpack bytes
            self.out.send_multipart([meta, out])
            return
        if self.group is None:
            payload = out.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy() if out.numel() else b""
            # Zero-copy: zmq holds the array until it is sent.
            self.out.send_multipart([meta, header, payload], copy=len(payload) < ZERO_COPY_BYTES)
            return
        if out.numel():
            out = out.contiguous()
            self.sends.append((self.group.send([out], self.rank + 1, 0), out))
            while len(self.sends) > MAX_PENDING_SENDS:
                self.sends.popleft()[0].wait()
        self.out.send_multipart([meta, header])

    def _close_channels(self) -> None:
        for s in (self.inbox, self.out):
            if s is not None:
                s.close(linger=0)
        self.inbox = self.out = None
        self.sends.clear()
        self.group = None  # a broken group's transfers fail on their own; nothing waits for them

    def close(self) -> None:
        self.stop(self.epoch, wait_s=1.0)
        self._close_channels()
        self.ctx.destroy(linger=0)


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
    `connect_dataplane`, `run_dataplane`, `stop_dataplane`) and gives the scheduler
    `send(header, ids) -> answer`. Lives on the event loop of the scheduler's process."""

    def __init__(self, actors: list, transport: str, host: str, wait_for_stages) -> None:
        self.actors, self.transport, self.host = actors, transport, host
        self.wait_for_stages = wait_for_stages  # async (): returns once every stage answers again
        self.ctx = zmq.asyncio.Context()
        self.answers = self.ctx.socket(zmq.PULL)
        self.answers.setsockopt(zmq.RCVHWM, 0)
        self.answer_address = f"tcp://{host}:{self.answers.bind_to_random_port(f'tcp://{host}')}"
        self.to_first: zmq.asyncio.Socket | None = None
        self.store = None  # the process groups' rendezvous, hosted here for the pipeline's lifetime
        self.epoch = 0
        self.seq = itertools.count()
        self.pending: dict[int, asyncio.Future] = {}
        self.broken: DataPlaneError | None = DataPlaneError("the data plane is not started")
        self.runs: list = []
        self._reader = asyncio.get_running_loop().create_task(self._read_answers())
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        t0 = time.perf_counter()
        self.epoch += 1
        epoch, P = self.epoch, len(self.actors)
        inboxes = await asyncio.gather(*[a.open_dataplane.remote(epoch) for a in self.actors])
        store = None
        if self.transport in ("gloo", "nccl") and P > 1:
            if self.store is None:
                import torch.distributed as dist

                self.store = dist.TCPStore(self.host, 0, None, True, GROUP_TIMEOUT, wait_for_workers=False)
            store = (self.host, self.store.port)
        nexts = list(inboxes[1:]) + [self.answer_address]
        await asyncio.gather(*[a.connect_dataplane.remote(epoch, nexts[k], self.transport, store)
                               for k, a in enumerate(self.actors)])
        if self.to_first is not None:
            self.to_first.close(linger=0)
        self.to_first = self.ctx.socket(zmq.PUSH)
        self.to_first.setsockopt(zmq.SNDHWM, 0)
        self.to_first.setsockopt(zmq.LINGER, 0)
        self.to_first.connect(inboxes[0])
        self.runs = [a.run_dataplane.remote(epoch) for a in self.actors]
        self._watcher = asyncio.get_running_loop().create_task(self._watch(epoch, self.runs))
        self.broken = None
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
        await self.to_first.send_multipart([meta, header, ids.to(torch.long).contiguous().numpy()])
        return await fut

    async def _read_answers(self) -> None:
        while True:
            meta, answer = await self.answers.recv_multipart()
            epoch, seq = msgpack.unpackb(meta)
            fut = self.pending.pop(seq, None) if epoch == self.epoch else None
            if fut is not None and not fut.done():
                fut.set_result(answer)

    async def _watch(self, epoch: int, runs: list) -> None:
        """A stage loop only returns when it is told to stop: a run call that ends during its
        epoch means the stage died (Ray fails the call) or its loop failed."""
        futures = {asyncio.ensure_future(_awaitable(r)): k for k, r in enumerate(runs)}
        done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
        if epoch != self.epoch or self.broken is not None:
            return
        task = next(iter(done))
        k, err = futures[task], task.exception() if not task.cancelled() else None
        cause = err if err is not None else RuntimeError("its loop stopped")
        log.warning("stage %d of the data plane failed (%s): %s", k, type(cause).__name__,
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
        if self.broken is None:
            self._break(DataPlaneError("the pipeline was shut down"))
        try:
            await asyncio.wait_for(self._stop_loops(), timeout=15)
        except asyncio.TimeoutError:
            pass
        self._reader.cancel()
        self.ctx.destroy(linger=0)


async def _awaitable(ref):
    return await ref
