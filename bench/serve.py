"""What the service adds to latency: time to first token and inter-token latency, p50 and p99,
at 1, 8 and 32 concurrent streams, through gRPC (Ray Serve's proxy and the client library),
through the OpenAI-compatible HTTP API (Serve's HTTP proxy, the official `openai` client, server-sent
events) and through the in-process pipeline, in the same run and on the same pipeline shape. Then
throughput under 64 concurrent streams of mixed lengths, all three ways, with the errors counted.

    .venv/bin/python bench/serve.py [--quick] [--stages 2] [--no-http]

HTTP streams ask for logprobs=0, so that each event says how many tokens it carries (an event
may carry several when a stream falls behind), as gRPC's messages do.

Model: the demo checkpoint (small, so the figures show the serving overhead rather than compute).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, torn down at exit
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.openmp import use_openmp_env  # noqa: E402

use_openmp_env()  # before torch loads OpenMP (stages/openmp.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from ray import serve  # noqa: E402

from client import AsyncJambaClient  # noqa: E402
from cluster.runtime.config import PipelineConfig  # noqa: E402
from cluster.runtime.pipeline import Pipeline  # noqa: E402
from cluster.serve.app import build_app, grpc_options, wait_until_serving  # noqa: E402
from stages.demo import ensure_demo_model  # noqa: E402
from stages.sequence import GenerationResult, SamplingParams  # noqa: E402

PROMPT = "The weather today is"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


async def in_process(pipe: Pipeline, n: int, new_tokens: int) -> tuple[list[float], list[float]]:
    ids = pipe.tokenizer.encode(PROMPT)

    async def one():
        t0 = last = time.perf_counter()
        ttft, itl = None, []
        async for ev in pipe.generate(ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)):
            now = time.perf_counter()
            if isinstance(ev, GenerationResult):
                break
            if ttft is None:
                ttft = now - t0
            else:
                itl.append(now - last)
            last = now
        return ttft, itl
    res = await asyncio.gather(*[one() for _ in range(n)])
    return [r[0] for r in res], [x for r in res for x in r[1]]


async def through_http(base_url: str, n: int, new_tokens: int) -> tuple[list[float], list[float]]:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300) as c:
        async def one():
            t0 = last = time.perf_counter()
            ttft, itl = None, []
            stream = await c.completions.create(model="lm", prompt=PROMPT, max_tokens=new_tokens, temperature=0,
                                                logprobs=0, stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                k = len(chunk.choices[0].logprobs.tokens) if chunk.choices and chunk.choices[0].logprobs else 0
                if not k:
                    continue
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    itl += [(now - last) / k] * k
                last = now
            return ttft, itl
        res = await asyncio.gather(*[one() for _ in range(n)])
    return [r[0] for r in res], [x for r in res for x in r[1]]


async def throughput_http(base_url: str, n: int) -> tuple[int, float, int]:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300) as c:
        async def one(k):
            stream = await c.completions.create(model="lm", prompt=PROMPT, max_tokens=k, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            return [chunk.usage.completion_tokens async for chunk in stream if chunk.usage][-1]
        t0 = time.perf_counter()
        res = await asyncio.gather(*[one(k) for k in _lengths(n)], return_exceptions=True)
        dt = time.perf_counter() - t0
    return sum(r for r in res if isinstance(r, int)), dt, sum(isinstance(r, BaseException) for r in res)


async def through_grpc(address: str, n: int, new_tokens: int) -> tuple[list[float], list[float]]:
    async with AsyncJambaClient(address, application="lm", timeout=300) as c:
        async def one():
            t0 = last = time.perf_counter()
            ttft, itl = None, []
            async for d in c.generate_stream(PROMPT, max_new_tokens=new_tokens, ignore_eos=True):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:  # a message may carry several tokens (a stream that fell behind): they share the wait
                    itl += [(now - last) / len(d.token_ids)] * len(d.token_ids)
                last = now
            return ttft, itl
        res = await asyncio.gather(*[one() for _ in range(n)])
    return [r[0] for r in res], [x for r in res for x in r[1]]


ROLES = (("ray::StageActor", "stages"), ("ray::ServeReplica", "Serve replica"), ("ray::ProxyActor", "Serve proxy"),
         ("ray::", "other Ray workers"))


def cpu_seconds_by_role() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process ("client / driver") and by Ray's
    worker processes, by role (Ray titles a worker `ray::<actor class>`)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(d.name) == os.getpid():
            role = "client / driver"
        else:
            role = next((r for prefix, r in ROLES if cmd.startswith(prefix.encode())), None)
        if role:
            out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _lengths(n: int) -> list[int]:
    return [8 + (i * 7) % 33 for i in range(n)]  # 8..40 tokens, mixed


async def throughput_in_process(pipe: Pipeline, n: int) -> tuple[int, float, int]:
    """(tokens, seconds, errors) for n concurrent streams of mixed lengths."""
    ids = pipe.tokenizer.encode(PROMPT)

    async def one(k):
        out = 0
        async for ev in pipe.generate(ids, SamplingParams(max_new_tokens=k, ignore_eos=True)):
            out += not isinstance(ev, GenerationResult)
        return out
    t0 = time.perf_counter()
    res = await asyncio.gather(*[one(k) for k in _lengths(n)], return_exceptions=True)
    dt = time.perf_counter() - t0
    return sum(r for r in res if isinstance(r, int)), dt, sum(isinstance(r, BaseException) for r in res)


async def throughput_grpc(address: str, n: int) -> tuple[int, float, int]:
    async with AsyncJambaClient(address, application="lm", timeout=300) as c:
        async def one(k):
            return sum([len(d.token_ids) async for d in c.generate_stream(PROMPT, max_new_tokens=k, ignore_eos=True)])
        t0 = time.perf_counter()
        res = await asyncio.gather(*[one(k) for k in _lengths(n)], return_exceptions=True)
        dt = time.perf_counter() - t0
    return sum(r for r in res if isinstance(r, int)), dt, sum(isinstance(r, BaseException) for r in res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--stream-interval-ms", type=float, default=0.0, help="the service's stream_interval_ms")
    ap.add_argument("--direct-ingress", action="store_true",
                    help="Serve's experimental direct ingress: the client calls the replica's own gRPC server, "
                         "with no proxy in between")
    ap.add_argument("--no-http", dest="http", action="store_false", help="skip the OpenAI HTTP API runs")
    args = ap.parse_args()
    new_tokens = 16 if args.quick else 32
    model = str(ensure_demo_model("lm"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Logical CPUs: the idle Serve pipeline and the in-process one exist side by side; only one runs at a time.
    if args.direct_ingress:  # read by Serve's processes, which inherit this environment
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            direct_port = s.getsockname()[1]
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] = str(direct_port)  # the one replica gets it
        os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"] = str(direct_port + 10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    rows = []
    try:
        cfg = dict(stages=args.stages, cpus_per_stage=0.5, num_slots=64, max_batch_tokens=512)
        serve.start(grpc_options=grpc_options(port), http_options={"host": "127.0.0.1", "port": http_port},
                    logging_config={"log_level": "WARNING"})
        serve.run(build_app({"model": model, "name": "lm", "stream_interval_ms": args.stream_interval_ms, **cfg}),
                  name="lm", route_prefix="/")
        wait_until_serving("lm")
        address = f"127.0.0.1:{direct_port if args.direct_ingress else port}"
        base_url = f"http://127.0.0.1:{http_port}/v1"

        async def local_runs():
            pipe = await Pipeline.start(PipelineConfig(model, num_stages=args.stages, cpus_per_stage=0.5, num_slots=64,
                                                       max_batch_tokens=512))
            try:
                await in_process(pipe, 4, 4)  # warm-up
                lat = {n: await in_process(pipe, n, new_tokens) for n in (1, 8, 32)}
                cpu0 = cpu_seconds_by_role()
                tp = await throughput_in_process(pipe, 64)
                return lat, (*tp, _delta(cpu_seconds_by_role(), cpu0))
            finally:
                await pipe.close()

        async def grpc_runs():
            await through_grpc(address, 4, 4)
            lat = {n: await through_grpc(address, n, new_tokens) for n in (1, 8, 32)}
            cpu0 = cpu_seconds_by_role()
            tp = await throughput_grpc(address, 64)
            return lat, (*tp, _delta(cpu_seconds_by_role(), cpu0))

        async def http_runs():
            await through_http(base_url, 4, 4)
            lat = {n: await through_http(base_url, n, new_tokens) for n in (1, 8, 32)}
            cpu0 = cpu_seconds_by_role()
            tp = await throughput_http(base_url, 64)
            return lat, (*tp, _delta(cpu_seconds_by_role(), cpu0))

        # One after the other, in the same run, on the same machine state as far as possible.
        local, local_tp = asyncio.run(local_runs())
        remote, remote_tp = asyncio.run(grpc_runs())
        http, http_tp = asyncio.run(http_runs()) if args.http else (None, None)
        for n in (1, 8, 32):
            (lt, li), (rt, ri) = local[n], remote[n]
            rows.append((n, lt, li, rt, ri))
            print(f"  n={n}: TTFT p50 local {statistics.median(lt) * 1e3:.1f} ms, grpc {statistics.median(rt) * 1e3:.1f} ms; "
                  f"ITL p50 local {statistics.median(li) * 1e3:.2f} ms, grpc {statistics.median(ri) * 1e3:.2f} ms", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()

    ms = lambda x: f"{x * 1e3:.1f}"  # noqa: E731
    print(f"\nStreaming latency, demo model, {args.stages}-stage pipeline, {new_tokens} tokens per stream, "
          f"stream_interval_ms {args.stream_interval_ms:g}{', direct ingress' if args.direct_ingress else ''}\n")
    print("| streams | TTFT p50 in-process | TTFT p50 gRPC | added | TTFT p99 in-process | TTFT p99 gRPC | "
          "ITL p50 in-process | ITL p50 gRPC | added | ITL p99 in-process | ITL p99 gRPC |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    worst_ttft = worst_itl = 0.0
    for n, lt, li, rt, ri in rows:
        add_t = statistics.median(rt) - statistics.median(lt)
        add_i = statistics.median(ri) - statistics.median(li)
        worst_ttft, worst_itl = max(worst_ttft, add_t), max(worst_itl, add_i)
        print(f"| {n} | {ms(statistics.median(lt))} | {ms(statistics.median(rt))} | **{ms(add_t)}** | {ms(pct(lt, 99))} | "
              f"{ms(pct(rt, 99))} | {ms(statistics.median(li))} | {ms(statistics.median(ri))} | **{ms(add_i)}** | "
              f"{ms(pct(li, 99))} | {ms(pct(ri, 99))} |")
    print(f"\n- target: service adds <= 15 ms to TTFT p50: worst {worst_ttft * 1e3:.1f} ms: "
          f"{'met' if worst_ttft <= 0.015 else 'NOT met'}")
    print(f"- target: service adds <= 2 ms to ITL p50: worst {worst_itl * 1e3:.2f} ms: {'met' if worst_itl <= 0.002 else 'NOT met'}")
    if http is not None:
        print("\nThe OpenAI HTTP API (Serve's HTTP proxy, the openai client, server-sent events) against gRPC and "
              "in-process, same run\n")
        print("| streams | TTFT p50 in-process | TTFT p50 gRPC | TTFT p50 HTTP | HTTP added | HTTP - gRPC | "
              "TTFT p99 HTTP | ITL p50 in-process | ITL p50 gRPC | ITL p50 HTTP | HTTP added | HTTP - gRPC | "
              "ITL p99 HTTP |")
        print("|---:|" + "---:|" * 12)
        for n, lt, li, rt, ri in rows:
            ht, hi = http[n]
            m = statistics.median
            print(f"| {n} | {ms(m(lt))} | {ms(m(rt))} | {ms(m(ht))} | **{ms(m(ht) - m(lt))}** | {ms(m(ht) - m(rt))} | "
                  f"{ms(pct(ht, 99))} | {ms(m(li))} | {ms(m(ri))} | {ms(m(hi))} | **{ms(m(hi) - m(li))}** | "
                  f"{ms(m(hi) - m(ri))} | {ms(pct(hi, 99))} |")
    paths = (("in-process", local_tp), ("gRPC", remote_tp)) + ((("HTTP (OpenAI API)", http_tp),) if http_tp else ())
    print("\nThroughput under 64 concurrent streams of 8-40 tokens (mixed), same pipeline\n")
    print("| path | tokens | seconds | tokens/s | errors |")
    print("|---|---:|---:|---:|---:|")
    for name, (tok, dt, err, _) in paths:
        print(f"| {name} | {tok} | {dt:.2f} | {tok / dt:.0f} | {err} |")
    print(f"\n- gRPC / in-process throughput: {remote_tp[0] / remote_tp[1] / (local_tp[0] / local_tp[1]):.2f}x")
    if http_tp:
        print(f"- HTTP / in-process throughput: {http_tp[0] / http_tp[1] / (local_tp[0] / local_tp[1]):.2f}x")
    roles = ["stages", "client / driver", "Serve proxy", "Serve replica", "other Ray workers"]
    print("\nCPU seconds used during the 64-stream runs, by process role (2 cores: at most 2 s per second)\n")
    print("| path | " + " | ".join(roles) + " | total |")
    print("|---|" + "---:|" * (len(roles) + 1))
    for name, tp in paths:
        cpu = tp[3]
        print(f"| {name} | " + " | ".join(f"{cpu.get(r, 0.0):.2f}" for r in roles) + f" | {sum(cpu.values()):.2f} |")


if __name__ == "__main__":
    main()
