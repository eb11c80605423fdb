"""Batch jobs: offline score / classify / generate over large inputs, on Ray Data.

    jamba batch score    --model DIR --input PATH --output DIR [--stages P] [--pipelines N] [--address ADDR]
    jamba batch classify --model DIR --input 'rows/*.parquet' --output out/
    ray job submit --working-dir . -- python -m cluster.cli batch score --model /models/jamba --input ... --output ...

The room: job.py (the job: BatchConfig, the CPU rule, run_job), inputs.py (files, globs, reading),
rows.py (the JSON Lines rows on an engine), openai_batch.py (OpenAI Batch API files: requests in,
OpenAI's output and error files out), worker.py (the pool actor), commit.py (exactly once),
outputs.py (the Parquet tables), progress.py (the progress line). It uses the runtime
(cluster/runtime: the engine and its pipeline) and Ray Data; it knows nothing of Serve, gRPC or
HTTP, and the command line (cluster/cli/batch.py) calls it.

Input: JSON Lines or Parquet (by extension, or --format), given as a file, a directory (read
recursively; names starting with '.' or '_' are skipped) or a glob (`*`, `?`, `[...]`, `**`), on
the local disk or any filesystem pyarrow opens by URI (s3://, gs://, hdfs://, ...). --input may be
repeated. Rows follow the JSON Lines contracts of `jamba score|classify|generate` (rows.py):
one of prompt/text/input_ids/messages, optional sampling fields for generate, and an optional `id`.
JSON Lines of OpenAI batch requests (`custom_id`, `method`, `url`, `body`) are recognised by their
keys, or named with --format openai, and answered as OpenAI's Batch API does (openai_batch.py).

Output directory:

    OUT/data/part-<key>.parquet     result rows (id, source_file, source_row, the inputs, the result fields)
    OUT/errors/part-<key>.parquet   bad rows: id, source_file, source_row, error (the reason), input (the raw row)
    OUT/_SUMMARY.json               written last, only when the job completed: counts, time, throughput
    OUT/output.jsonl, errors.jsonl  OpenAI batch requests' output and error files, when the job completed
    OUT/_RUN                        the id of the run that owns the directory now (a fence, see below)

`id` is the row's own `id` (as a string) when it has one; otherwise `FILE:ROW`. Every row also
carries `source_file` and `source_row` (1-based; for JSON Lines the line number, blank lines
counted, as `jamba score` reports errors): that pair is the row's stable identity, and what
resume and exactly-once are keyed on, so rows need no `id` and duplicate ids do no harm.
Parquet columns have one type per task in every part (`messages` and fields outside the contract
are kept as JSON text, the latter in one `extra` column), so `pyarrow.parquet.read_table(OUT/data)`
and `ray.data.read_parquet(OUT/data)` read the whole result.

How it runs: Ray Data reads the input (a file-based datasource that tags each row with its file
and row number and drops rows already committed) and fans batches out with `map_batches` over an
actor pool of --pipelines actors. Each pool actor asks for no CPU itself and drives one pipeline
(cluster/runtime/pipeline.py): --stages stage actors in their own placement group, which hold the CPUs.
The pool actor runs each batch (rows.py's `run_chunk`, the same parsing and validation as
`jamba score`) and commits it itself; only a one-row summary per batch goes back to the driver
(and to a 0-CPU progress actor, from which the driver logs rows/s, tokens/s and the ETA every
--progress-interval seconds). If the pipeline refuses a request that the row checks let through,
the batch is rerun row by row and only that row goes to errors/; if the pipeline itself fails, the
job fails, and a rerun resumes it.

Exactly once, and resume:
- A batch's result is committed as one part file per directory, named by a hash of the
  (source_file, source_row) pairs it covers: the errors part (if any) first, then the data part,
  which is written even when empty and is the commit point. Each file is written under a hidden
  temporary name ('.' prefix, which every Parquet reader skips) and renamed into place (on object
  stores, where an object appears only once its upload completes, it is written in place).
  So a reader never sees a partial file, and a batch that Ray Data retries rewrites the same names.
- On start, the job deletes temporary files and any errors part without its data part (a commit
  cut short), removes the old _SUMMARY.json, writes a new run id to _RUN, then reads the
  (source_file, source_row) pairs of the committed parts and filters those rows out of the input.
  A rerun with the same arguments therefore runs only the rows not yet committed.
- Pool actors check _RUN before each commit, so the actors of a killed run that have not yet
  been reaped do not commit into a rerun. As a last guard, the job checks at the end that no row
  is committed twice (rewriting a part without such rows if one ever is) and that every input row
  is committed, then writes _SUMMARY.json.
- Rows are made durable by the rename (and an fsync on local disks); killing the job at any point
  loses at most the batches in flight.
- One job at a time per output directory. On a cluster of several nodes the output directory
  (and the model directory) must be shared storage: every pool actor writes its own parts.

CPUs: stage actors take `--cpus-per-stage` CPUs each; the job leaves `--reserve-cpus` CPUs (default
0.5 on clusters of up to 4 CPUs, 1 above) to Ray Data's read tasks, and tells Ray Data to stay
within them, so reading never waits on the pipelines and the job cannot starve itself. The rule:
    pipelines * stages * cpus_per_stage <= cluster CPUs - reserve
with cpus_per_stage defaulting to min(threads_per_stage, (cluster CPUs - reserve) / (pipelines * stages)).
The job refuses to start when the rule cannot hold.

A job with bad rows completes (exit status 0); the count is in the log and in _SUMMARY.json.
"""
