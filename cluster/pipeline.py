"""A Jamba pipeline on Ray: one actor per stage, in one placement group, driven by the scheduler.

    pipe = await Pipeline.start(PipelineConfig(model_dir, num_stages=2))
    async for event in pipe.generate(prompt_ids, SamplingParams(max_new_tokens=32)):
        ...
    await pipe.close()

Placement: one bundle per stage ({"CPU": threads} or {"GPU": 1, "CPU": 1}); strategy PACK by
default, STRICT_SPREAD to put every stage on its own node. Ray places the stage actors, restarts
them when they die and carries the few control calls (load, stats, data-plane setup); the
microbatches themselves go over the data plane (cluster/dataplane.py): the scheduler sends each
one to stage 0, every stage hands its activations straight to the next, and the last stage sends
the small answer (token ids, log-probs) back.

Each stage actor holds a worker (stages/worker.py:StageWorker unless `worker_cls` names another
class, such as bench/synthetic.py:GpuLikeStage, which stands in for GPU compute).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from stages.config import JambaConfig, check_quant_mode
from stages.paging import BlockManager, blocks_for
from stages.sequence import GenerationResult, SamplingParams
from stages.tokenizer import Tokenizer

from .dataplane import DataPlane, resolve_transport
from .scheduler import FinishEvent, Scheduler, TokenEvent

log = logging.getLogger(__name__)

# torch and numba each keep an OpenMP thread pool, and by default idle OpenMP threads spin. A stage
# runs both back to back on one or two cores, so one pool's spinning threads starve the other:
# measured here, a 4-layer decode step took 177 ms with spinning and 28 ms without.
STAGE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


DEFAULT_WORKER = "stages.worker:StageWorker"


@dataclass
class PipelineConfig:
    model_dir: str
    num_stages: int = 1
    layer_split: str | list[tuple[int, int]] | None = None  # "9,9,..." counts or boundaries; default: balanced
    num_slots: int = 32
    # Paged KV cache (stages/cache.py) and prefix cache (stages/paging.py). The default pool holds
    # num_slots x min(context, 4096) tokens (what contiguous slots of 4096 took); a sequence may
    # use any share of it, up to max_seq_len (default: the model's context, capped by the pool).
    max_seq_len: int | None = None
    block_size: int = 64  # tokens per KV block, and the prefix cache's granularity
    num_blocks: int | None = None  # KV blocks per attention layer on each stage
    prefix_cache: bool = True
    num_snapshots: int | None = None  # Mamba-state snapshots per stage for the prefix cache (default 2 x slots)
    max_batch_tokens: int = 512
    max_queue: int = 1024
    threads_per_stage: int = 1
    gpus_per_stage: float = 0  # 1 on GPU nodes: each stage pinned to its own GPU
    cpus_per_stage: float | None = None  # Ray CPU resource per stage bundle (default: threads_per_stage)
    placement_strategy: str = "PACK"
    dtype: str | None = None
    quantize: str | None = None  # None, "int8-experts", "int8" or "int8-with-mamba" (see stages/quant.py)
    depth: int | None = None  # microbatches in flight (default: num_stages)
    placement_timeout_s: float | None = 120.0  # None: wait for resources as long as it takes
    max_restarts: int = 3  # a dead stage actor is restarted by Ray (reloading its layers) this often
    recover_timeout_s: float = 120.0
    # Inside a Ray Serve replica that was given placement_group_bundles, the replica sits in
    # bundle 0 of its own placement group and the stages take bundles 1..P of that group.
    use_current_placement_group: bool = False
    actor_options: dict = field(default_factory=dict)
    # How activations travel between stages: "auto" (nccl with a GPU per stage, else inline),
    # "inline", "gloo" or "nccl"; see cluster/dataplane.py.
    transport: str = "auto"
    # The class each stage actor runs, as "module:Class" (or "module.Class"), built as
    # cls(model_dir, start, end, num_slots, max_seq_len, threads, dtype, device, **worker_kwargs),
    # plus quantize=... when set.
    worker_cls: str = DEFAULT_WORKER
    worker_kwargs: dict = field(default_factory=dict)


def resolve_paging(cfg: PipelineConfig, config: JambaConfig) -> dict:
    """max_seq_len, block_size, num_blocks and num_snapshots, defaults filled in and checked."""
    bs = cfg.block_size
    if bs < 1:
        raise ValueError(f"block_size must be positive, got {bs}")
    context = config.max_position_embeddings
    num_blocks = cfg.num_blocks or cfg.num_slots * blocks_for(min(context, 4096), bs)
    max_seq_len = cfg.max_seq_len or min(context, num_blocks * bs)
    if max_seq_len > num_blocks * bs:
        raise ValueError(f"max_seq_len {max_seq_len} does not fit in the KV cache: {num_blocks} blocks of {bs} tokens "
                         f"hold {num_blocks * bs} tokens (raise the number of blocks or lower max_seq_len)")
    num_snapshots = (2 * cfg.num_slots if cfg.num_snapshots is None else cfg.num_snapshots) if cfg.prefix_cache else 0
    return {"max_seq_len": max_seq_len, "block_size": bs, "num_blocks": num_blocks, "num_snapshots": num_snapshots}


def _memory_note(info: dict) -> str:
    if "peak_load_bytes" not in info:  # a synthetic worker
        return ""
    mode = f", {info['quantize']}" if info.get("quantize") else ""
    return (f"; {info['weight_bytes'] / 1e6:.1f} MB of weights{mode}, at most {info['peak_load_bytes'] / 1e6:.1f} MB held "
            f"while loading; cache {info['cache_bytes'] / 1e6:.1f} MB ({info['num_blocks']} KV blocks of "
            f"{info['block_size']} tokens, {info['num_snapshots']} Mamba snapshots)")


def import_class(path: str):
    """"package.module:Class" or "package.module.Class" -> the class."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import worker class {path!r}: {e}") from None


@ray.remote
class StageActor:
    """One stage: its worker and its end of the data plane. A threaded actor, so that stats, pings
    and setup calls are answered while the data-plane loop (a thread of the endpoint's) runs."""

    def __init__(self, worker_cls: str, args: tuple, kwargs: dict, rank: int, num_stages: int) -> None:
        from .stage_endpoint import StageEndpoint  # torch: the stage's process only

        self.worker = import_class(worker_cls)(*args, **kwargs)
        self.endpoint = StageEndpoint(self.worker, rank, num_stages)

    def info(self) -> dict:
        return dict(self.worker.info(), dataplane=self.endpoint.stats())

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "gpu_ids": ray.get_gpu_ids()}

    def open_dataplane(self, epoch: int, key: bytes) -> str:
        return self.endpoint.open(epoch, key, ray.util.get_node_ip_address())

    def connect_dataplane(self, epoch: int, next_address: str, transport: str, store) -> None:
        self.endpoint.connect(epoch, next_address, transport, store, ray.util.get_node_ip_address())

    def start_dataplane(self, epoch: int) -> None:
        self.endpoint.start(epoch)

    def ping_dataplane(self, epoch: int) -> str | None:
        return self.endpoint.failure(epoch)

    def stop_dataplane(self, epoch: int) -> None:
        self.endpoint.stop(epoch)


class NotReadyError(Exception):
    """A service's pipeline does not serve yet (its stages are being placed or loaded), or it
    failed to start: UNAVAILABLE over gRPC, 503 with Retry-After over HTTP."""

    retry_after = 5.0  # seconds


@dataclass
class PipelinePlan:
    """What a pipeline will ask for, worked out from the checkpoint's config alone (no Ray):
    the checks that can fail at once, before anything is placed."""

    config: JambaConfig
    splits: list[tuple[int, int]]
    paging: dict  # max_seq_len, block_size, num_blocks, num_snapshots
    transport: str
    cpus: float  # per stage bundle
    bundle: dict


def plan_pipeline(cfg: PipelineConfig) -> PipelinePlan:
    config = JambaConfig.from_file(cfg.model_dir)
    L = config.num_hidden_layers
    if isinstance(cfg.layer_split, str):
        from .plan import parse_layer_split

        splits = parse_layer_split(cfg.layer_split, L)
    elif cfg.layer_split:
        splits = list(cfg.layer_split)
    else:
        from .plan import partition

        splits = partition(config, cfg.num_stages)
    if len(splits) != cfg.num_stages:
        raise ValueError(f"layer split has {len(splits)} stages, but num_stages is {cfg.num_stages}")
    transport = resolve_transport(cfg.transport, cfg.gpus_per_stage)
    if cfg.worker_cls != DEFAULT_WORKER:  # (importing the default would load torch here for nothing)
        import_class(cfg.worker_cls)  # a bad path fails here, before anything is placed
    check_quant_mode(cfg.quantize)  # so does an unknown quantization
    cpus = cfg.threads_per_stage if cfg.cpus_per_stage is None else cfg.cpus_per_stage
    bundle = {"CPU": cpus, **({"GPU": cfg.gpus_per_stage} if cfg.gpus_per_stage else {})}
    return PipelinePlan(config, splits, resolve_paging(cfg, config), transport, cpus, bundle)


async def _gather_counting(refs: list, on_done) -> list:
    """The results of `refs` in order, calling on_done(k) as the k-th one arrives."""
    async def one(ref):
        result = await ref
        nonlocal done
        done += 1
        on_done(done)
        return result

    done = 0
    return await asyncio.gather(*[one(r) for r in refs])


class Pipeline:
    def __init__(self, cfg: PipelineConfig, config: JambaConfig, splits, pg, actors, dataplane, scheduler, tokenizer,
                 infos) -> None:
        self.cfg, self.config, self.splits, self.pg = cfg, config, splits, pg
        self.actors, self.dataplane, self.scheduler = actors, dataplane, scheduler
        self.tokenizer, self.stage_info = tokenizer, infos

    @classmethod
    async def start(cls, cfg: PipelineConfig, progress=None, plan: "PipelinePlan | None" = None) -> "Pipeline":
        """Place the stages, load their layers and connect the data plane. `progress(phase, detail)`,
        if given, hears each phase as it begins ("placing", "loading", "connecting"), and the
        loading phase again as each stage is up; a service reports it while it is not ready."""
        plan = plan or plan_pipeline(cfg)
        config, splits, paging = plan.config, plan.splits, dict(plan.paging)
        max_seq_len = paging.pop("max_seq_len")
        device = "cuda" if cfg.gpus_per_stage else "cpu"
        cpus, bundle = plan.cpus, plan.bundle
        say = progress or (lambda phase, detail: None)
        t0 = time.perf_counter()
        owned, offset = True, 0
        if cfg.use_current_placement_group:
            pg = ray.util.get_current_placement_group()
            if pg is None or len(pg.bundle_specs) < len(splits) + 1:
                raise RuntimeError(f"a {len(splits)}-stage pipeline needs a placement group of {len(splits) + 1} bundles "
                                   "(the replica's, then one per stage)")
            owned, offset = False, 1
        else:
            say("placing", f"waiting for resources: {len(splits)} stage bundle(s) of "
                           + ", ".join(f"{v:g} {k}" for k, v in bundle.items()) + f", {cfg.placement_strategy}")
            pg = placement_group([dict(bundle) for _ in splits], strategy=cfg.placement_strategy)
            try:
                await asyncio.wait_for(pg.ready(), timeout=cfg.placement_timeout_s)
            except asyncio.TimeoutError:
                remove_placement_group(pg)
                raise RuntimeError(f"could not place {len(splits)} stages of {bundle} with strategy "
                                   f"{cfg.placement_strategy}: not enough resources in the cluster") from None
            except BaseException:  # cancelled: the reservation goes too
                remove_placement_group(pg)
                raise
        actors, dataplane = [], None
        try:
            for i, (s, e) in enumerate(splits):
                # max_concurrency: the data-plane loop, plus stats, setup and stop calls beside it.
                opts = dict(num_cpus=cpus, num_gpus=cfg.gpus_per_stage, max_concurrency=8,
                            max_restarts=cfg.max_restarts, max_task_retries=0,
                            runtime_env={"env_vars": dict(STAGE_ENV)},
                            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i + offset),
                            **cfg.actor_options)
                args = (cfg.model_dir, s, e, cfg.num_slots, max_seq_len, cfg.threads_per_stage, cfg.dtype, device)
                kwargs = dict(cfg.worker_kwargs, paging=paging, **({"quantize": cfg.quantize} if cfg.quantize else {}))
                actors.append(StageActor.options(**opts).remote(cfg.worker_cls, args, kwargs, i, len(splits)))
            say("loading", f"loading layers: 0 of {len(splits)} stage(s) up")
            infos = await _gather_counting([a.info.remote() for a in actors],
                                           lambda k: say("loading", f"loading layers: {k} of {len(splits)} stage(s) up"))
            wheres = await asyncio.gather(*[a.where.remote() for a in actors])
            for i, (info, where) in enumerate(zip(infos, wheres)):
                info.update(where)
                log.info("stage %d: layers [%d, %d) loaded %.1f MB from %d file(s) in %.2fs on node %s (%s)%s", i,
                         *info["layers"], info["bytes"] / 1e6, info["files"], info["seconds"], info["node_id"][:8],
                         info["node_ip"], _memory_note(info))
            say("connecting", f"connecting the data plane ({plan.transport})")
            dataplane = DataPlane(actors, plan.transport, ray.util.get_node_ip_address(), lambda: _wait_for_stages(actors))
            await dataplane.start()
        except BaseException:
            if dataplane is not None:
                await dataplane.close()
            for a in actors:
                ray.kill(a)
            if owned:
                remove_placement_group(pg)
            raise
        try:
            tokenizer = Tokenizer.from_dir(cfg.model_dir)
        except FileNotFoundError:
            tokenizer = None
        pages = BlockManager(paging["num_blocks"], paging["block_size"], paging["num_snapshots"],
                             prefix_cache=cfg.prefix_cache, salt=f"{cfg.model_dir}|{cfg.dtype}|{cfg.quantize}")
        scheduler = Scheduler(
            dataplane.send, len(actors), cfg.num_slots, max_seq_len, config.vocab_size, config.eos_token_ids,
            config.pad_token_id, tokenizer, cfg.max_batch_tokens, cfg.max_queue, cfg.depth,
            recover=dataplane.rebuild, recover_timeout=cfg.recover_timeout_s, pages=pages,
        )
        log.info("pipeline of %d stage(s) ready in %.1fs", len(actors), time.perf_counter() - t0)
        return cls(cfg, config, splits, pg if owned else None, actors, dataplane, scheduler, tokenizer, infos)

    # ---- requests ---------------------------------------------------------------------------
    def generate(self, prompt: list[int], params: SamplingParams, deadline: float | None = None):
        return self.scheduler.generate(prompt, params, deadline)

    def generate_chunks(self, prompt: list[int], params: SamplingParams, deadline: float | None = None):
        return self.scheduler.generate_chunks(prompt, params, deadline)

    async def generate_full(self, prompt: list[int], params: SamplingParams) -> GenerationResult:
        async for ev in self.scheduler.generate(prompt, params):
            if isinstance(ev, FinishEvent):
                return GenerationResult(ev.output_ids, ev.finish_reason, ev.text, ev.logprobs, ev.prompt_tokens,
                                        ev.cached_tokens)
        raise RuntimeError("generation ended without a finish event")

    async def score(self, prompt: list[int], deadline: float | None = None) -> list[float | None]:
        return await self.scheduler.score(prompt, deadline)

    async def classify(self, prompt: list[int], deadline: float | None = None) -> list[float]:
        return await self.scheduler.classify(prompt, deadline)

    async def stage_stats(self) -> list[dict]:
        return await asyncio.gather(*[a.info.remote() for a in self.actors])

    async def close(self) -> None:
        try:
            await self.scheduler.close()
            await self.dataplane.close()
        finally:  # whatever happened above, the stages and their resources go
            for a in self.actors:
                ray.kill(a)
            if self.pg is not None:
                remove_placement_group(self.pg)


async def _wait_for_stages(actors, gone_after: float = 5.0) -> None:
    """Return once every stage answers again. Ray restarts a dead stage actor (it reloads its
    layers), and calls meanwhile fail with ActorUnavailableError. ActorDiedError means the actor
    will not come back (its restarts are used up, or it was killed for good); it is trusted once
    it has persisted for `gone_after` seconds, so the scheduler fails requests now rather than
    at its recover timeout. A stage whose node is gone and whose placement group cannot be
    placed again just stays unavailable: the scheduler's recover timeout ends that wait."""
    for i, a in enumerate(actors):
        died_since = None
        while True:
            try:
                info = await asyncio.wait_for(a.info.remote(), timeout=30)
                log.info("stage %d is up (pid %s, %d steps since start)", i, info["pid"], info["steps"])
                break
            except ray.exceptions.ActorDiedError as e:
                died_since = died_since or time.monotonic()
                if time.monotonic() - died_since >= gone_after:
                    raise RuntimeError(f"stage {i} is gone for good: {str(e).splitlines()[0]}") from None
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                died_since = None  # restarting
            await asyncio.sleep(0.2)


class SyncPipeline:
    """The pipeline behind the blocking, list-in list-out interface of `LocalRunner`, so the CLI's
    row processing runs unchanged on either. The event loop lives in a background thread."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pipeline-loop", daemon=True)
        self.thread.start()
        self.pipe: Pipeline = self._call(Pipeline.start(cfg))
        self.config, self.tokenizer = self.pipe.config, self.pipe.tokenizer
        self.max_seq_len = self.pipe.scheduler.max_seq_len

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _gather(self, coros):
        async def all_of():
            return await asyncio.gather(*coros)
        return self._call(all_of())

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        return self._gather([self.pipe.generate_full(p, sp) for p, sp in zip(prompts, params)])

    def score(self, prompts: list[list[int]]) -> list[list[float | None]]:
        return self._gather([self.pipe.score(p) for p in prompts])

    def classify(self, prompts: list[list[int]]) -> list[list[float]]:
        return self._gather([self.pipe.classify(p) for p in prompts])

    def close(self) -> None:
        try:
            self._call(self.pipe.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


__all__ = ["NotReadyError", "Pipeline", "PipelineConfig", "SyncPipeline", "TokenEvent", "FinishEvent"]
