"""The Serve deployment: a replica (replica.py) whose engine is served over gRPC (grpc_api.py, the
methods of protos/jamba.proto, through Serve's gRPC proxy) and over the OpenAI-compatible HTTP
API (openai_api.py, through Serve's HTTP proxy). Each replica places its stages in a placement
group of its own, so R replicas are R independent pipelines (data parallel) that Serve
load-balances and can autoscale. app.py builds the application.

This class is only the shell Serve needs: the RPC methods by their proto names, the ASGI app, the
health check and the routing stats; the work is in the modules named above.
"""

from __future__ import annotations

from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from cluster.runtime.config import PipelineConfig
from protos import jamba_pb2 as pb

from .grpc_api import GrpcApi
from .openai_api import build_app as build_openai_app
from .replica import Replica, ReplicaOptions

REPLICA_CPUS = 0.1  # a replica's own Ray CPUs: it only schedules and streams, the stages compute


@serve.deployment(name="JambaService", max_ongoing_requests=4096, ray_actor_options={"num_cpus": REPLICA_CPUS})
@serve.ingress()  # HTTP: the app __serve_build_asgi_app__ builds
class JambaService:
    async def __init__(self, engine: PipelineConfig, options: ReplicaOptions) -> None:
        self.replica = Replica(engine, options)
        self.grpc = GrpcApi(self.replica)
        if options.start_in_background:
            # The replica answers at once (UNAVAILABLE, with the phase, while its stages are placed
            # and loaded; routing.py sends calls elsewhere when another replica is ready). Its
            # stages get a placement group of their own, which Ray removes with the replica.
            self.replica.start_in_background()
        else:
            # Serve placed the stages' bundles with the replica, and the replica counts as up only
            # once its pipeline serves (what KubeRay waits for before it moves traffic to a new cluster).
            await self.replica.start(reraise=True)

    # ---- gRPC: protos/jamba.proto's methods -----------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        return await self.grpc.generate(request, grpc_context)

    async def GenerateStream(self, request: pb.GenerateStreamRequest, grpc_context: RayServegRPCContext):
        async for message in self.grpc.generate_stream(request, grpc_context):
            yield message

    async def Classify(self, request: pb.ClassifyRequest, grpc_context: RayServegRPCContext) -> pb.ClassifyResponse:
        return await self.grpc.classify(request, grpc_context)

    async def Score(self, request: pb.ScoreRequest, grpc_context: RayServegRPCContext) -> pb.ScoreResponse:
        return await self.grpc.score(request, grpc_context)

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context: RayServegRPCContext) -> pb.ModelInfoResponse:
        return await self.grpc.model_info(request, grpc_context)

    # ---- HTTP ---------------------------------------------------------------------------------------
    def __serve_build_asgi_app__(self):
        """The OpenAI-compatible HTTP API on this replica (openai_api.py)."""
        return build_openai_app(self.replica)

    # ---- Serve's calls, and calls through a handle (not part of the gRPC API) ----------------------
    async def check_health(self) -> None:
        """Raising marks the replica unhealthy, and Serve replaces it."""
        await self.replica.check_health()

    def record_routing_stats(self) -> dict:
        """Serve polls this; routing.py sends calls to replicas whose pipeline is ready."""
        return {"pipeline": "ready" if self.replica.ready else self.replica.startup.phase}

    def startup_state(self) -> dict:
        """This replica's start, for `jamba serve` and wait_until_serving (app.py)."""
        return dict(self.replica.startup.state(), replica=serve.get_replica_context().replica_id.unique_id)

    async def stats(self) -> dict:
        """Scheduler and stage counters."""
        return await self.replica.stats()
