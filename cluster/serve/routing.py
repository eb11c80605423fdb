"""How Serve picks a replica for each call: ready pipelines first.

A replica starts its pipeline in the background (replica.py), so it is up, in Serve's
eyes, seconds after it is placed, while its stages may take minutes to be placed and loaded. Serve's
default router would send it a share of the calls meanwhile, which it can only refuse. This
router keeps Serve's power of two choices (and its preference for a replica on the caller's
node), but among the replicas whose pipeline serves, as each reports in its routing stats
(`record_routing_stats`, polled by Serve's controller). Only while no replica is ready do calls
go to the starting ones, which answer UNAVAILABLE at once, saying what they are waiting for;
Serve's proxy would otherwise hold a call until some replica came up, or for ever.

Kept apart from the service so that Serve's proxies, which run the router, import only this.
"""

from __future__ import annotations

import random

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, LocalityMixin, PendingRequest, RequestRouter, RunningReplica

STATS_PERIOD_S = 1.0  # how often Serve asks each replica whether its pipeline is ready


def is_ready(replica: RunningReplica) -> bool:
    return replica.routing_stats.get("pipeline") == "ready"


class ReadyFirstRouter(FIFOMixin, LocalityMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ready = [r for r in candidate_replicas if is_ready(r)]
        if ready:
            near = self.apply_locality_routing(pending_request)
            pool = [r for r in ready if r.replica_id in near] or ready
        else:
            pool = candidate_replicas
        # Two at random; Serve asks both for their queue length and sends to the shorter.
        return [random.sample(pool, min(2, len(pool)))] if pool else []


def router_config() -> RequestRouterConfig:
    return RequestRouterConfig(request_router_class=ReadyFirstRouter, request_routing_stats_period_s=STATS_PERIOD_S,
                               request_routing_stats_timeout_s=5.0)
