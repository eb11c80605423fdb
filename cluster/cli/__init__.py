"""The command line (`jamba`): the flags, what they become (args.py: one PipelineConfig per run),
and one module per command, each calling the library rooms below it: the runtime
(cluster/runtime), the Serve application (cluster/serve) and batch jobs (cluster/batch). Nothing
below imports this room.
"""
