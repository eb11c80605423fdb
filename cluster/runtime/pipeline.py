"""The engine on Ray: one actor per stage, in one placement group, driven by the scheduler.

    pipe = await Pipeline.start(PipelineConfig(model_dir, num_stages=2))
    async for event in pipe.generate(prompt_ids, SamplingParams(max_new_tokens=32)):
        ...
    await pipe.close()

Placement: one bundle per stage ({"CPU": threads} or {"GPU": 1, "CPU": 1}); strategy PACK by
default, STRICT_SPREAD to put every stage on its own node. Ray places the stage actors, restarts
them when they die and carries the few control calls (load, stats, data-plane setup); the
microbatches themselves go over the data plane (dataplane.py): the scheduler sends each one to
stage 0, every stage hands its activations straight to the next, and the last stage sends the
small answer (token ids, log-probs) back.

Each stage actor holds a worker (stages/worker.py:StageWorker unless `worker_cls` names another
class, such as bench/synthetic.py:GpuLikeStage, which stands in for GPU compute).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeLabelSchedulingStrategy, NotIn, PlacementGroupSchedulingStrategy

from stages.config import JambaConfig
from stages.openmp import use_openmp_env
from stages.tokenizer import Tokenizer

from .config import PipelineConfig, PipelinePlan, import_class, plan_pipeline
from .dataplane import DataPlane
from .engine import Engine, SyncEngine, new_scheduler

log = logging.getLogger(__name__)

# How the stage processes' OpenMP threads wait (stages/openmp.py), and the driver's choice of decode
# path (stages/decode.py), so that every node's stages follow the command that started them.
PASSED_TO_STAGES = ("JAMBA_DECODE", "JAMBA_KERNELS")


def stage_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_TO_STAGES if k in os.environ}
    use_openmp_env(env)
    return env


def _memory_note(info: dict) -> str:
    if "peak_load_bytes" not in info:  # a synthetic worker
        return ""
    mode = f", {info['quantize']}" if info.get("quantize") else ""
    return (f"; {info['weight_bytes'] / 1e6:.1f} MB of weights{mode}, at most {info['peak_load_bytes'] / 1e6:.1f} MB held "
            f"while loading; cache {info['cache_bytes'] / 1e6:.1f} MB ({info['num_blocks']} KV blocks of "
            f"{info['block_size']} tokens, {info['num_snapshots']} Mamba snapshots)")


@ray.remote
class StageActor:
    """One stage: its worker and its end of the data plane. A threaded actor, so that stats, pings
    and setup calls are answered while the data-plane loop (a thread of the endpoint's) runs."""

    def __init__(self, worker_cls: str, args: tuple, kwargs: dict, rank: int, num_stages: int) -> None:
        self.started_at = time.time()  # the process is up and this class imported; torch is not yet
        from .stage_endpoint import StageEndpoint  # torch: the stage's process only

        if ray.get_runtime_context().was_current_actor_reconstructed:  # Ray restarted it: streams are waiting
            kwargs = dict(kwargs, replacing=True)
        self.worker = import_class(worker_cls).load(*args, **kwargs)
        self.endpoint = StageEndpoint(self.worker, rank, num_stages)

    def info(self) -> dict:
        return dict(self.worker.info(), dataplane=self.endpoint.stats(), started_at=self.started_at)

    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "gpu_ids": ray.get_gpu_ids()}

    def open_dataplane(self, epoch: int, key: bytes) -> str:
        return self.endpoint.open(epoch, key, ray.util.get_node_ip_address())

    def connect_dataplane(self, epoch: int, next_address: str, beat_address: str, beat_every: float, transport: str,
                          store) -> None:
        self.endpoint.connect(epoch, next_address, beat_address, beat_every, transport, store,
                              ray.util.get_node_ip_address())

    def start_dataplane(self, epoch: int) -> None:
        self.endpoint.start(epoch)

    def ping_dataplane(self, epoch: int) -> str | None:
        return self.endpoint.failure(epoch)

    def stop_dataplane(self, epoch: int) -> None:
        self.endpoint.stop(epoch)


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


def _log_loaded(i: int, info: dict) -> None:
    log.info("stage %d: layers [%d, %d) loaded %.1f MB from %d file(s) in %.2fs on node %s (%s)%s", i,
             *info["layers"], info["bytes"] / 1e6, info["files"], info["seconds"], info["node_id"][:8],
             info["node_ip"], _memory_note(info))


class Stages:
    """The pipeline's stage actors (`actors`, the list the data plane drives), what each was
    loaded with and where it runs (`infos`), how one is made, and bringing them back after a
    failure (`restore`, the data plane's `restore_stages`)."""

    def __init__(self, cfg: PipelineConfig, plan: PipelinePlan, pg, offset: int) -> None:
        self.cfg, self.plan, self.pg, self.offset = cfg, plan, pg, offset
        self.actors: list = []
        self.infos: list[dict] = []

    def spawn(self, i: int, scheduling_strategy, replacing: bool = False):
        """A new actor for stage i, placed by `scheduling_strategy`; it loads its layers at once
        (`replacing` a lost one: it reports ready before its decode steps are compiled)."""
        cfg, plan = self.cfg, self.plan
        s, e = plan.splits[i]
        # max_concurrency: the data-plane loop, plus stats, setup and stop calls beside it.
        opts = dict(num_cpus=plan.cpus, num_gpus=cfg.gpus_per_stage, max_concurrency=8,
                    max_restarts=cfg.max_restarts, max_task_retries=0, runtime_env={"env_vars": stage_env()},
                    scheduling_strategy=scheduling_strategy, **cfg.actor_options)
        args = (cfg.model_dir, s, e, cfg.num_slots, plan.paging["max_seq_len"], cfg.threads_per_stage, cfg.dtype,
                "cuda" if cfg.gpus_per_stage else "cpu")
        pools = {k: plan.paging[k] for k in ("block_size", "num_blocks", "num_snapshots")}  # every stage's cache
        kwargs = dict(cfg.worker_kwargs, paging=pools, **({"quantize": cfg.quantize} if cfg.quantize else {}),
                      **({"enforce_eager": True} if cfg.enforce_eager else {}),
                      **({"replacing": True} if replacing else {}))
        return StageActor.options(**opts).remote(cfg.worker_cls, args, kwargs, i, len(plan.splits))

    async def restore(self, lost: set[int]) -> None:
        """Replace the stages in `lost` (declared lost by the data plane: silent, their host hung
        or cut off), then return once every stage answers again.

        A lost stage's actor is killed for good: Ray would restart it in its placement-group
        bundle, on the same node, and only once that node confirms the old process is gone,
        which a partitioned node never does before Ray declares it dead (over a minute with
        Ray's defaults). The replacement is a new actor, placed outside the placement group
        on another node when one has room for a stage (on the same node otherwise: a hung
        process on a live node, which Ray kills). If the old process comes back (the partition
        heals), the kill reaches it then; meanwhile it holds only an old epoch's key, which the
        new epoch's sockets refuse (dataplane.py). Its bundle stays reserved until the
        pipeline closes."""
        t0 = time.time()
        for i in sorted(lost):
            node = self.infos[i]["node_id"]
            ray.kill(self.actors[i], no_restart=True)
            self.actors[i] = self.spawn(i, NodeLabelSchedulingStrategy({}, soft={"ray.io/node-id": NotIn(node)}),
                                        replacing=True)
            log.warning("stage %d: its actor on node %s is killed for good; a replacement is loading on another node "
                        "where one has room", i, node[:8])
        await _wait_for_stages(self.actors)
        for i in sorted(lost):
            info, where = await asyncio.gather(self.actors[i].info.remote(), self.actors[i].where.remote())
            self.infos[i] = dict(info, **where)
            _log_loaded(i, self.infos[i])
            log.warning("stage %d: its replacement answers on node %s, %.1fs after the kill: its process was up "
                        "after %.1fs; %.1fs loading layers, %.1fs warming up kernels%s", i,
                        where["node_id"][:8], time.time() - t0, info["started_at"] - t0, info["seconds"],
                        info.get("warmup_seconds", 0),
                        "; its decode steps run eagerly until compiled" if info.get("decode_compiling") else "")


class Pipeline(Engine):
    def __init__(self, cfg: PipelineConfig, config: JambaConfig, splits, pg, actors, dataplane, scheduler, tokenizer,
                 infos) -> None:
        super().__init__(config, tokenizer, scheduler)
        self.cfg, self.splits, self.pg = cfg, splits, pg
        self.actors, self.dataplane = actors, dataplane
        self.stage_info = infos

    @classmethod
    async def start(cls, cfg: PipelineConfig, progress=None, plan: "PipelinePlan | None" = None) -> "Pipeline":
        """Place the stages, load their layers and connect the data plane. `progress(phase, detail)`,
        if given, hears each phase as it begins ("placing", "loading", "connecting"), and the
        loading phase again as each stage is up; a service reports it while it is not ready."""
        plan = plan or plan_pipeline(cfg)
        config, splits, paging = plan.config, plan.splits, plan.paging
        bundle = plan.bundle
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
        stages, dataplane = Stages(cfg, plan, pg, offset), None
        actors, infos = stages.actors, stages.infos
        try:
            for i in range(len(splits)):
                actors.append(stages.spawn(i, PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i + offset)))
            say("loading", f"loading layers: 0 of {len(splits)} stage(s) up")
            infos += await _gather_counting([a.info.remote() for a in actors],
                                            lambda k: say("loading", f"loading layers: {k} of {len(splits)} stage(s) up"))
            wheres = await asyncio.gather(*[a.where.remote() for a in actors])
            for i, (info, where) in enumerate(zip(infos, wheres)):
                info.update(where)
                _log_loaded(i, info)
            say("connecting", f"connecting the data plane ({plan.transport})")
            dataplane = DataPlane(actors, plan.transport, ray.util.get_node_ip_address(), stages.restore,
                                  cfg.heartbeat_timeout_s)
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
        scheduler = new_scheduler(dataplane.send, cfg, config, paging, tokenizer, depth=cfg.depth or len(actors),
                                  recover=dataplane.rebuild)
        log.info("pipeline of %d stage(s) ready in %.1fs", len(actors), time.perf_counter() - t0)
        return cls(cfg, config, splits, pg if owned else None, actors, dataplane, scheduler, tokenizer, infos)

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


class SyncPipeline(SyncEngine):
    """A pipeline behind blocking, list-in list-out calls (engine.py), as the command line's rows
    and batch jobs use it, its event loop in a background thread; `pipe` is the Pipeline itself."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pipeline-loop", daemon=True)
        self.thread.start()
        try:
            super().__init__(lambda: Pipeline.start(cfg))
        except BaseException:
            self._stop_loop()
            raise

    @property
    def pipe(self) -> Pipeline:
        return self.engine

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
