"""The stage's side of the data plane (dataplane.py has the design): the loop that receives a
microbatch, runs the worker's step and sends the result on, and the process group that carries
activations for the gloo and nccl transports. Runs in the stage actor's process."""

from __future__ import annotations

import collections
import logging
import threading
import time

import torch

from stages.microbatch import Microbatch, encode_answers

from . import channels
from .dataplane import GROUP_TIMEOUT

log = logging.getLogger(__name__)

MAX_PENDING_SENDS = 4  # torch.distributed sends a stage may have outstanding before it waits for one
POLL_MS = 50  # how often an idle stage loop looks at its stop flag


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
        self.out = channels.connect(next_address, self.key)
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
        # torch's thread count is per thread (OpenMP's): a new thread starts with the process's
        # default, not what the worker set when it loaded (threads_per_stage).
        threads = getattr(self.worker, "load_info", {}).get("threads")
        if threads:
            torch.set_num_threads(threads)
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
                meta, header, payload = message
                mb = Microbatch.decode(header)
                x = self._input(payload, mb.num_tokens)
                t2 = clock()
                with self.step_lock:
                    if self.epoch != epoch:
                        break
                    out = self.worker.step(mb, x)
                t3 = clock()
                self._output(meta, header, out)
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
        if self.worker.is_last:  # the answers
            channels.send_all(self.out, channels.frame(self.key, meta, b"", encode_answers(out)))
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
