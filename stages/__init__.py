"""The model room: Jamba in plain PyTorch, sliceable into pipeline stages, and everything a stage
holds. It knows nothing of Ray, Serve, gRPC or the scheduler (cluster/ drives it).

    config.py       JambaConfig, read from a Hugging Face config.json
    model.py        JambaStage: the layers [start, end) of the model, with parity to transformers
    cache.py        the hybrid cache of one stage: paged KV for attention, slots for Mamba states
    paging.py       the KV blocks' and Mamba snapshots' bookkeeping, and the prefix cache
    costs.py        parameters, FLOPs and cache bytes from the config alone (no torch)
    loading.py      safetensors checkpoints: a stage loads only its own tensors
    quant.py        int8 weights
    kernels/        the Mamba and int8 kernels, one file per backend beside its reference
    warmup.py       compiling the kernels before a stage serves
    worker.py       a stage as a long-lived worker: one microbatch per step
    microbatch.py   the header the scheduler sends every stage (no torch)
    sampling.py     sampling on the last stage; sequence.py what a request is (no torch)
    tokenizer.py    text <-> ids and chat templates, with the `tokenizers` library
    demo.py         the demo checkpoints, random-weight checkpoints and the demo tokenizer
"""
