"""The stage's side of the data plane (dataplane.py has the design): the loop that receives a
microbatch, runs the worker's step and sends the result on, and the process group that carries
activations for the gloo and nccl transports, and the heartbeat that tells the scheduler's side
the stage lives. Runs in the stage actor's process."""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import msgpack
import torch

from stages.microbatch import Microbatch, encode_answers

from . import channels
from .dataplane import BEATS_PER_TIMEOUT, GROUP_TIMEOUT

log = logging.getLogger(__name__)

MAX_PENDING_SENDS = 4  # torch.distributed sends a stage may have outstanding before it waits for one
POLL_MS = 50  # how often an idle stage loop looks at its stop flag


# ---- the stage's side ---------------------------------------------------------------------------
@dataclass
class _Channels:
    """One epoch's channels of a stage: its inbox, its connection to the next hop, the key, the
    process group (gloo, nccl) and the sends posted on it. A loop holds on to its own epoch's, so
    a loop that leaves late (stuck in a transfer to a lost stage) never touches the next epoch's."""

    epoch: int
    key: bytes
    inbox: channels.Inbox
    out: socket.socket | None = None
    group: object | None = None
    transport: str = "inline"
    sends: collections.deque = field(default_factory=collections.deque)  # (work, tensor) of posted sends
    left: threading.Event = field(default_factory=threading.Event)  # set once no loop runs on them

    def __post_init__(self) -> None:
        self.left.set()

    def close(self) -> None:
        self.inbox.close()
        if self.out is not None:
            self.out.close()
        self.sends.clear()
        if self.transport == "nccl" and self.group is not None:
            # NCCL transfers from a dead peer never end by themselves (its watchdog would kill this
            # process at the timeout): abort the old communicators before the new epoch's.
            try:
                self.group.abort()
            except Exception as e:  # an older torch without abort(): the watchdog remains
                log.warning("could not abort the previous NCCL group: %s", e)
        self.group = None  # a broken gloo group's transfers fail on their own; nothing waits for them

    def interrupt(self) -> None:
        """Wake a loop blocked in a send to the next hop (a peer that stopped reading): its send
        fails, and the loop leaves."""
        if self.out is not None:
            with contextlib.suppress(OSError):
                self.out.shutdown(socket.SHUT_RDWR)


class StageEndpoint:
    """Stage `rank`'s end of the data plane, around a worker with `step(header, x)`, `is_last`,
    `hidden_size`, `dtype` and `device` (stages/worker.py). Per epoch: `open` binds the inbox,
    `connect` connects to the next hop (and joins the process group), `start` runs the loop and
    the heartbeat, `stop` ends them."""

    def __init__(self, worker, rank: int, num_stages: int) -> None:
        self.worker, self.rank, self.num_stages = worker, rank, num_stages
        self.epoch = -1  # the epoch whose loop may run; anything else stops it
        self.step_lock = threading.Lock()  # a loop of an old epoch never steps after the new one began
        self.channels: _Channels | None = None
        self.beat_address, self.beat_every = "", 0.2
        self.thread: threading.Thread | None = None
        self.failed: str | None = None
        self.rejected = 0  # connections of past epochs closed for a wrong key
        # Where the loop's time goes (seconds): waiting for input, receiving and parsing it, the
        # worker's step, sending the output. `stats()` reports them, the longest single step, and
        # the CPU the loop's thread used (its own clock, kernel time included: the wake-ups).
        self.times = dict.fromkeys(("idle", "receive", "step", "send"), 0.0)
        self.longest_step = 0.0
        self.loop_cpu = 0.0
        self.microbatches = 0

    def open(self, epoch: int, key: bytes, host: str) -> str:
        """Close the previous epoch's channels and bind a new inbox on `host`; returns its address."""
        if self.channels is not None:
            self.stop(self.channels.epoch)
        self._close_channels()
        self.epoch = epoch
        self.channels = _Channels(epoch, key, channels.Inbox(host, key))
        return self.channels.inbox.address

    def connect(self, epoch: int, next_address: str, beat_address: str, beat_every: float, transport: str,
                store: tuple[str, int] | None, host: str) -> None:
        """Connect to the next hop's inbox (the scheduler's answer socket on the last stage) and,
        for a torch.distributed transport, join this epoch's process group (every stage calls this
        at the same time: the group's rendezvous waits for all of them). The heartbeat goes to
        `beat_address` every `beat_every` seconds once the epoch starts."""
        assert epoch == self.epoch, "connect of an epoch that was not opened"
        ch = self.channels
        ch.out = channels.connect(next_address, ch.key)
        ch.transport = transport
        self.beat_address, self.beat_every = beat_address, beat_every
        if transport in ("gloo", "nccl") and self.num_stages > 1:
            ch.group = _process_group(transport, store, epoch, self.rank, self.num_stages, host)
            self._exchange_with_neighbours(ch.group)

    def _exchange_with_neighbours(self, group) -> None:
        """One small transfer along the chain before any microbatch, so a broken group fails here,
        at setup, and NCCL's pair communicators exist before the first microbatch. Receiving from
        the previous stage before sending to the next makes the chain resolve in order."""
        w = self.worker
        if self.rank > 0:
            group.recv([torch.empty(1, dtype=w.dtype, device=w.device)], self.rank - 1, 0).wait()
        if self.rank < self.num_stages - 1:
            group.send([torch.zeros(1, dtype=w.dtype, device=w.device)], self.rank + 1, 0).wait()

    def start(self, epoch: int) -> None:
        """Run `epoch`'s loop in a thread of its own, and its heartbeat in another; `failure` says
        if the loop ended."""
        assert epoch == self.epoch, "start of an epoch that was not opened"
        self.failed = None
        ch = self.channels
        ch.left.clear()
        self.thread = threading.Thread(target=self._run, args=(epoch, ch), name=f"dataplane-{epoch}", daemon=True)
        self.thread.start()
        threading.Thread(target=self._beat, args=(epoch, ch.key, self.beat_address, self.beat_every),
                         name=f"heartbeat-{epoch}", daemon=True).start()

    def _beat(self, epoch: int, key: bytes, address: str, every: float) -> None:
        """Tell the scheduler's side that this stage lives, every `every` seconds while `epoch`
        runs. A thread of its own, so a long step never delays a beat (the stage's kernels release
        the GIL); the scheduler's side declares the stage lost after ten missed beats
        (dataplane.py). A beat that cannot be written within that time ends the thread: the
        scheduler's side has stopped reading, or cannot be reached, and will not hear it anyway."""
        meta = msgpack.packb([epoch, self.rank])
        try:
            sock = channels.connect(address, key, timeout=every * BEATS_PER_TIMEOUT)
        except OSError as e:
            log.warning("stage %d: no heartbeat connection for epoch %d: %s", self.rank, epoch, e)
            return
        sock.settimeout(every * BEATS_PER_TIMEOUT)
        with sock:
            while self.epoch == epoch:
                try:
                    channels.send_all(sock, channels.frame(key, meta, b""))
                except OSError as e:
                    if self.epoch == epoch:
                        log.warning("stage %d: heartbeats of epoch %d stopped: %s", self.rank, epoch, e)
                    return
                time.sleep(every)

    def _run(self, epoch: int, ch: _Channels) -> None:
        # torch's thread count is per thread (OpenMP's): a new thread starts with the process's
        # default, not what the worker set when it loaded (threads_per_stage).
        threads = getattr(self.worker, "load_info", {}).get("threads")
        if threads:
            torch.set_num_threads(threads)
        try:
            self.run(epoch, ch)
        except Exception as e:
            if epoch != self.epoch:  # a loop that left late, its channels closed under it: its epoch is over
                return
            self.failed = f"{type(e).__name__}: {e}"
            log.exception("stage %d: the data-plane loop of epoch %d failed", self.rank, epoch)

    def failure(self, epoch: int) -> str | None:
        """None while `epoch`'s loop runs; else why not."""
        if self.failed:
            return self.failed
        if epoch != self.epoch or not self.thread.is_alive():
            return f"its loop of epoch {epoch} is not running"
        return None

    def stop(self, epoch: int, wait_s: float = 3.0, grace_s: float = 1.0) -> None:
        """End `epoch`'s loop; returns once it has left (or after `wait_s`). A loop still inside
        after `grace_s` is in a long step or blocked sending to a peer that stopped reading (a
        lost stage): its outgoing socket is shut down, which fails that send (the epoch is over,
        its answers would be dropped anyway). A loop that is late to leave holds only its own
        epoch's channels and never steps again (`step_lock`, and the epoch check under it)."""
        if epoch == self.epoch:
            self.epoch = -1
        ch = self.channels
        if ch is None or ch.epoch != epoch or ch.left.wait(min(grace_s, wait_s)):
            return
        ch.interrupt()
        if not ch.left.wait(max(0.0, wait_s - grace_s)):
            log.warning("stage %d: the loop of epoch %d has not left after %gs (a transfer from a lost "
                        "stage?); it will not step again", self.rank, epoch, wait_s)

    def run(self, epoch: int, ch: _Channels) -> None:
        """The stage loop on channels `ch`: receive, forward, send, until `stop`. Raises if a
        transfer fails."""
        times, clock, cpu_clock = self.times, time.perf_counter, time.thread_time
        try:
            t0, cpu0 = clock(), cpu_clock()
            while self.epoch == epoch:
                message = ch.inbox.recv(POLL_MS / 1000)
                if message is None:  # nothing yet (or something refused): look at the stop flag
                    continue
                t1 = clock()
                meta, header, payload = message
                mb = Microbatch.decode(header)
                x = self._input(ch, payload, mb.num_tokens)
                t2 = clock()
                with self.step_lock:
                    if self.epoch != epoch:
                        break
                    out = self.worker.step(mb, x)
                t3 = clock()
                self._output(ch, meta, header, out)
                t4 = clock()
                times["idle"] += t1 - t0
                times["receive"] += t2 - t1
                times["step"] += t3 - t2
                times["send"] += t4 - t3
                self.longest_step = max(self.longest_step, t3 - t2)
                self.microbatches += 1
                t0 = t4
                cpu1 = cpu_clock()
                self.loop_cpu += cpu1 - cpu0
                cpu0 = cpu1
        finally:
            ch.left.set()

    def stats(self) -> dict:
        rejected = self.rejected + (self.channels.inbox.rejected if self.channels is not None else 0)
        return {"microbatches": self.microbatches, "rejected": rejected, "longest_step_seconds": self.longest_step,
                "loop_cpu_seconds": self.loop_cpu,
                **{f"{k}_seconds": v for k, v in self.times.items()}}

    def _input(self, ch: _Channels, payload: memoryview, n_tokens: int) -> torch.Tensor:
        w = self.worker
        if self.rank == 0:  # token ids from the scheduler
            if n_tokens == 0:
                return torch.empty(0, dtype=torch.long, device=w.device)
            return torch.frombuffer(payload, dtype=torch.long).to(w.device, copy=True)
        if n_tokens and ch.group is None:
            # One copy out of the message into aligned memory: CPU kernels round differently on
            # unaligned inputs (see stages/loading.py), and the stages must match one process.
            return torch.frombuffer(payload, dtype=w.dtype).view(n_tokens, w.hidden_size).to(w.device, copy=True)
        x = torch.empty((n_tokens, w.hidden_size), dtype=w.dtype, device=w.device)
        if n_tokens:
            ch.group.recv([x], self.rank - 1, 0).wait()
        return x

    def _output(self, ch: _Channels, meta: bytes, header: bytes, out) -> None:
        if self.worker.is_last:  # the answers
            channels.send_all(ch.out, channels.frame(ch.key, meta, b"", encode_answers(out)))
            return
        if ch.group is None:
            payload = out.detach().contiguous().view(torch.uint8).cpu().numpy() if out.numel() else b""
            channels.send_all(ch.out, channels.frame(ch.key, meta, header, payload))
            return
        channels.send_all(ch.out, channels.frame(ch.key, meta, header))  # first: see the module's docstring
        if out.numel():
            out = out.contiguous()
            ch.sends.append((ch.group.send([out], self.rank + 1, 0), out))
            while len(ch.sends) > MAX_PENDING_SENDS:
                ch.sends.popleft()[0].wait()

    def _close_channels(self) -> None:
        if self.channels is not None:
            self.rejected += self.channels.inbox.rejected
            self.channels.close()
        self.channels = None

    def close(self) -> None:
        if self.channels is not None:
            self.stop(self.channels.epoch, wait_s=1.0)
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
