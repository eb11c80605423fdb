"""The engine: requests in, tokens, scores and logits out.

    intake.py          prompts to token ids, and every check a request gets, once
    scheduler.py       the one scheduler: continuous batching, the paged cache's bookkeeping,
                       preemption and replay; it is given a `send` and knows no transport
    engine.py          intake + scheduler: the Engine every front end holds, and SyncEngine
    local.py           the engine on a stage in this process (send calls the stage worker)
    pipeline.py        the engine on Ray: stage actors in a placement group, recovery
    dataplane.py       how microbatches travel between the stages (channels.py: the sockets;
    stage_endpoint.py  the stage's end, in the stage's process)
    config.py          PipelineConfig, the one configuration object, and the checks before start
    plan.py            which stage runs which layers (the cost model is stages/costs.py)
    resources.py       what a pipeline asks of Ray, and a local cluster sized for it

It imports stages/ (the model room), Ray and torch.distributed; never Serve, gRPC or HTTP. The
scheduler's process (a Serve replica) imports no torch: config.py, intake.py, scheduler.py,
engine.py, pipeline.py and dataplane.py stay torch-free; the stages' processes load the rest.
"""
