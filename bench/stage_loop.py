"""The CPU a stage's data-plane loop spends per microbatch outside the worker's step.

    .venv/bin/python bench/stage_loop.py [--microbatches N] [--rows R] [--role middle|last] [--profile]

One StageEndpoint (cluster/runtime/stage_endpoint.py) in this process, without Ray: its loop runs
in a thread of this harness, around a worker whose step costs nothing (it returns a tensor made
once, or fixed answers as the last stage). A feeder thread sends it decode microbatches of `rows`
one-token rows (the header as the scheduler builds it, with sampling parameters; activations of
the bench config's hidden size, fp32) one at a time, over its inbox, and waits for each output at
a sink, so that every microbatch wakes the loop as it does in a pipeline. At P=16 with 32
requests the scheduler's microbatches have 2 rows.

Reported per microbatch: the loop thread's CPU (its CPU clock, user and kernel time together),
its user and kernel time (/proc, in clock ticks, so over many microbatches), and the wall time of
a round trip. --profile adds a cProfile of the loop thread (the profiler's own cost inflates the
total; the shares are what it is for).
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import os
import pstats
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cluster.runtime import channels  # noqa: E402
from cluster.runtime.stage_endpoint import StageEndpoint  # noqa: E402
from stages.microbatch import Microbatch, Row, Sampling, Want  # noqa: E402

HIDDEN = 512  # the bench config's (bench/model_vs_hf.py)
KEY = bytes(16)
EPOCH = 1


class NullStage:
    """A worker whose step costs nothing: the activations it returns were made once."""

    def __init__(self, is_last: bool, max_tokens: int) -> None:
        self.is_last, self.hidden_size, self.dtype, self.device = is_last, HIDDEN, torch.float32, torch.device("cpu")
        self.out = torch.zeros((max_tokens, HIDDEN))

    def step(self, mb: Microbatch, x: torch.Tensor):
        if self.is_last:
            return [(7, 0.0)] * len(mb.rows)
        return self.out[:len(x)]


def decode_microbatch(rows: int, step: int) -> Microbatch:
    return Microbatch([Row(slot, 1, Want.TOKEN, Sampling(0.0, 0, 1.0, 1234 + slot, step)) for slot in range(rows)])


def cpu_times(stat: str) -> tuple[float, float]:
    """(user, kernel) CPU seconds from a /proc stat file: /proc/PID/stat for a process,
    /proc/PID/task/TID/stat for a thread (in clock ticks, 10 ms here)."""
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def feed(control, inbox: str, sink: channels.Inbox, rows: int, microbatches: int) -> None:
    """The previous stage and the next: send a microbatch, wait for the loop's output, again.
    Tells `control` once warmed up, waits for its go, and sends it the wall time of the run."""
    out = channels.connect(inbox, KEY)
    payload = torch.zeros((rows, HIDDEN)).view(-1).view(torch.uint8).numpy()
    headers = [decode_microbatch(rows, step).encode() for step in range(64)]
    meta = bytes(8)

    def round_trips(n: int) -> None:
        for k in range(n):
            channels.send_all(out, channels.frame(KEY, meta, headers[k % len(headers)], payload))
            while sink.recv(5.0) is None:
                pass

    round_trips(200)
    control.send("warm")
    control.recv()
    t0 = time.perf_counter()
    round_trips(microbatches)
    control.send(time.perf_counter() - t0)
    out.close()


def measure(rows: int, microbatches: int, role: str, profile: bool) -> dict:
    endpoint = StageEndpoint(NullStage(role == "last", rows), rank=1, num_stages=3)
    inbox = endpoint.open(EPOCH, KEY, "127.0.0.1")
    sink = channels.Inbox("127.0.0.1", KEY)
    endpoint.connect(EPOCH, sink.address, "", 0.2, "inline", None, "127.0.0.1")  # no heartbeat: start() is not called
    profiler = cProfile.Profile() if profile else None
    tid: list[int] = []

    def loop() -> None:
        tid.append(threading.get_native_id())
        if profiler is not None:
            profiler.enable()
        endpoint.run(EPOCH, endpoint.channels)
        if profiler is not None:
            profiler.disable()

    # The feeder in a process of its own, as the previous stage is: it shares no GIL with the loop.
    control, child = multiprocessing.get_context("fork").Pipe()
    feeder = multiprocessing.get_context("fork").Process(target=feed, args=(child, inbox, sink, rows, microbatches))
    feeder.start()
    thread = threading.Thread(target=loop, name="stage-loop")
    thread.start()
    control.recv()  # warmed up
    clock = time.pthread_getcpuclockid(thread.ident)
    stat = f"/proc/self/task/{tid[0]}/stat"
    cpu0, split0 = time.clock_gettime(clock), cpu_times(stat)
    control.send("go")
    wall = control.recv()
    cpu1, split1 = time.clock_gettime(clock), cpu_times(stat)
    feeder.join()
    endpoint.stop(EPOCH)
    thread.join()
    sink.close()
    endpoint.close()
    per = lambda seconds: seconds / microbatches * 1e6  # noqa: E731  (us per microbatch)
    result = {"cpu_us": per(cpu1 - cpu0), "user_us": per(split1[0] - split0[0]),
              "kernel_us": per(split1[1] - split0[1]), "round_trip_us": per(wall)}
    if profiler is not None:
        result["profile"] = profiler
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--microbatches", type=int, default=20000)
    ap.add_argument("--rows", type=int, default=2, help="one-token rows per microbatch (default %(default)s)")
    ap.add_argument("--role", default="middle", choices=["middle", "last"],
                    help="a middle stage (activations on) or the last (answers)")
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of the loop thread")
    args = ap.parse_args()
    r = measure(args.rows, args.microbatches, args.role, args.profile)
    print(f"stage loop ({args.role}, {args.rows} rows, {args.microbatches} microbatches, load {os.getloadavg()[0]:.2f}): "
          f"{r['cpu_us']:.1f} us CPU per microbatch (user {r['user_us']:.0f}, kernel {r['kernel_us']:.0f}), "
          f"round trip {r['round_trip_us']:.0f} us")
    if args.profile:
        pstats.Stats(r["profile"]).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
