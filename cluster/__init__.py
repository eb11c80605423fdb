"""Everything above the model: four rooms, each importing only the ones below it.

    cli/       the `jamba` command line: flags, and one module per command
    serve/     the Ray Serve application: the gRPC API and the OpenAI-compatible HTTP API on a
               replica (no Ray Data; the runtime below)
    batch/     offline jobs on Ray Data, and the JSON Lines rows every offline command reads
    runtime/   the engine: the intake, the one scheduler, and what carries its microbatches (a
               stage in this process, or a Ray pipeline and its data plane); knows no Serve, gRPC
               or HTTP

Below them all, stages/ (the model, its cache, its kernels: no Ray) and client/ (the gRPC
client and the row contract: no torch, no Ray). A request takes one path whatever its front end:
the front end's wire format -> the intake (runtime/intake.py) -> the scheduler
(runtime/scheduler.py) -> microbatches to the stages -> the last stage's answers -> events back.
"""
