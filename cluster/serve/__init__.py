"""The Ray Serve application: one engine per replica, served over gRPC and over the
OpenAI-compatible HTTP API.

    app.py               build_app (a Serve config's import_path), and watching replicas start
    deployment.py        JambaService, the Serve deployment: the shell Serve needs
    replica.py           the replica's engine and start-up: the small interface the APIs use
    grpc_api.py          protos/jamba.proto's RPCs on a replica
    openai_api.py        the OpenAI-compatible routes on a replica
    openai_protocol.py   OpenAI's wire format (no Ray, no engine)
    routing.py           Serve's request router: ready replicas first

It imports the runtime (cluster/runtime) and the generated protos; the APIs reach the engine only
through replica.py. No torch in a replica: the stages compute.
"""
