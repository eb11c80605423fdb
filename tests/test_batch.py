"""`jamba batch` on Ray Data: the same rows as the single-process path, bad rows to errors/, every
row exactly once across a kill and a rerun, any input layout."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.batch.inputs import filesystem, resolve_inputs, rows_table
from cluster.batch.job import BatchConfig, plan_cpus, run_job
from cluster.batch.rows import run_chunk
from cluster.batch.worker import BatchWorker
from cluster.cli.batch import add_batch_parser, config_from_args
from cluster.runtime.config import PipelineConfig
from cluster.runtime.local import LocalRunner
from stages.loading import load_stage
from stages.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data copies its context
ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a warm mat while rain fell over quiet hills and far rivers".split()




@pytest.fixture(scope="module")
def reference(models):
    lm, cls = models
    tok = Tokenizer.from_dir(lm)
    return LocalRunner(load_stage(lm)[0], tok), LocalRunner(load_stage(cls)[0], tok)


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def _write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _expected(runner, task: str, path: Path) -> dict[int, dict]:
    """The single-process results (cluster.batch.rows.run_chunk on LocalRunner), by line number."""
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    results, _ = run_chunk(runner, task, lines)
    return {i: r for (i, _), r in zip(lines, results)}


def _job(task, model, inputs, out, **kw) -> dict:
    kw.setdefault("progress_interval", 0.5)
    stages = kw.pop("stages", 1)  # the rest of the engine's fields by their own names
    engine = {k: kw.pop(k) for k in list(kw) if k in PipelineConfig.__dataclass_fields__}
    return run_job(BatchConfig(task, [str(p) for p in inputs], str(out), PipelineConfig(str(model), num_stages=stages,
                                                                                         **engine), **kw))


def _data(out: Path) -> list[dict]:
    return pq.read_table(out / "data").to_pylist()


def _errors(out: Path) -> list[dict]:
    return pq.read_table(out / "errors").to_pylist() if any((out / "errors").glob("part-*")) else []


def _assert_once(out: Path, n: int) -> None:
    keys = [(r["source_file"], r["source_row"]) for r in _data(out) + _errors(out)]
    assert len(keys) == len(set(keys)) == n


# ---- pure functions ------------------------------------------------------------------------------
def test_cpu_rule_leaves_cpus_to_ray_data():
    assert plan_cpus(2, 2, 1) == (0.75, 0.5)  # 2 pipelines x 1 stage on 2 CPUs: 1.5 to stages, 0.5 to reads
    assert plan_cpus(2, 1, 2) == (0.75, 0.5)
    assert plan_cpus(16, 2, 2, threads_per_stage=4) == (3.75, 1.0)
    assert plan_cpus(64, 2, 2, threads_per_stage=4) == (4, 1.0)  # never more than its threads
    with pytest.raises(ValueError, match="kept for Ray Data"):
        plan_cpus(4, 2, 2, cpus_per_stage=1)
    with pytest.raises(ValueError, match="reserve"):
        plan_cpus(4, 1, 1, reserve_cpus=0)


def test_inputs_files_directories_and_globs(tmp_path):
    for name in ["a.jsonl", "b.parquet", "sub/c.ndjson", "sub/deep/d.jsonl", "_skip.jsonl", ".hidden/e.jsonl", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    d = str(tmp_path)
    _, g = resolve_inputs([d])
    assert g == {"jsonl": [f"{d}/a.jsonl", f"{d}/sub/c.ndjson", f"{d}/sub/deep/d.jsonl"], "parquet": [f"{d}/b.parquet"]}
    assert resolve_inputs([f"{d}/*.jsonl"])[1] == {"jsonl": [f"{d}/a.jsonl"]}  # * stays in its directory
    assert resolve_inputs([f"{d}/**/*.jsonl"])[1] == {"jsonl": [f"{d}/a.jsonl", f"{d}/sub/deep/d.jsonl"]}
    assert resolve_inputs([f"{d}/sub/c.ndjson", f"{d}/b.parquet"])[1] == {"jsonl": [f"{d}/sub/c.ndjson"],
                                                                           "parquet": [f"{d}/b.parquet"]}
    with pytest.raises(ValueError, match="--format"):
        resolve_inputs([f"{d}/notes.txt"])
    assert resolve_inputs([f"{d}/notes.txt"], "jsonl")[1] == {"jsonl": [f"{d}/notes.txt"]}
    with pytest.raises(FileNotFoundError):
        resolve_inputs([f"{d}/*.csv"])
    with pytest.raises(FileNotFoundError):
        resolve_inputs([f"{d}/missing.jsonl"])


def test_batch_parser_plugs_into_the_cli():
    p = argparse.ArgumentParser()
    add_batch_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["batch", "score", "--model", "m", "--input", "a.jsonl", "--input", "b/", "--output", "o",
                         "--stages", "2", "--pipelines", "3", "--address", "127.0.0.1:6379"])
    cfg = config_from_args(args)
    assert (cfg.task, cfg.inputs, cfg.engine.num_stages, cfg.pipelines) == ("score", ["a.jsonl", "b/"], 2, 3)
    assert args.address == "127.0.0.1:6379" and callable(args.func)


class _Refusing:
    """A runner whose pipeline refuses one request that the row checks let through."""

    def __init__(self, real):
        self.real, self.config, self.intake = real, real.config, real.intake
        self.engine = SimpleNamespace(scheduler=SimpleNamespace(error=None, closed=False, recoveries=[]))

    def run(self, requests):
        if any(r.prompt[-1] == 77 for r in requests):
            raise ValueError("refused by the pipeline")
        return self.real.run(requests)


def test_worker_isolates_a_refused_row_and_respects_the_fence(reference, tmp_path):
    out = tmp_path / "out"
    for d in ("data", "errors"):
        (out / d).mkdir(parents=True)
    (out / "_RUN").write_text("run-1")
    w = BatchWorker.__new__(BatchWorker)  # no pipeline: a stand-in runner
    w.task, w.run_id, w.lock, w.ready_at, w.sink, w.recoveries_reported = "score", "run-1", threading.Lock(), 0.0, None, 0
    w.fs, w.root = filesystem(str(out))
    w.pipe = _Refusing(reference[0])
    lines = [json.dumps({"input_ids": [1, 5, 6]}), json.dumps({"id": "bad", "input_ids": [1, 77]}), json.dumps({"prompt": "ok"})]
    summary = w(rows_table("f.jsonl", [1, 2, 3], [x.encode() for x in lines])).to_pylist()[0]
    assert summary["committed"] and (summary["rows"], summary["failed"]) == (3, 1)
    assert [r["source_row"] for r in _data(out)] == [1, 3]
    assert [(e["id"], e["error"]) for e in _errors(out)] == [("bad", "ValueError: refused by the pipeline")]
    assert _data(out)[0]["token_logprobs"][1:] == pytest.approx(reference[0].score([[1, 5, 6]])[0][1:], abs=1e-6)
    (out / "_RUN").write_text("run-2")  # a newer run owns the directory: commit nothing
    summary = w(rows_table("f.jsonl", [4], [lines[0].encode()])).to_pylist()[0]
    assert not summary["committed"] and summary["rows"] == 0 and len(list((out / "data").glob("part-*"))) == 1


# ---- jobs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def score_job(ray_cluster, models, reference, tmp_path_factory):
    """Score rows, some longer than the microbatch budget (16 tokens), plus every kind of bad row."""
    lm, _ = models
    tmp = tmp_path_factory.mktemp("score")
    good = [{"id": f"r{i}", "prompt": _text(i, 2 + (i * 7) % 20)} for i in range(16)]
    good += [{"input_ids": [1] + list(range(5, 5 + 30)), "note": {"k": 1}}, {"text": "scored as text", "id": 7}]
    bad = [
        '{"prompt": "unterminated',  # malformed JSON
        {"id": "nofield", "max_new_tokens": 3},  # no input field
        {"id": "toolong", "input_ids": [1] * 300},  # past --max-seq-len 256
        {"id": "range", "input_ids": [1, 2, 4096]},  # the demo vocabulary is 4096
    ]
    lines = good[:8] + bad[:2] + good[8:] + bad[2:]
    path = _write_jsonl(tmp / "in.jsonl", lines[:14] + [""] + lines[14:])  # a blank line keeps its number
    out = tmp / "out"
    summary = _job("score", lm, [path], out, pipelines=2, max_batch_tokens=16, max_seq_len=256, batch_size=5)
    return path, out, summary, _expected(reference[0], "score", path)


def test_score_matches_single_process_and_chunks_long_rows(score_job):
    path, out, summary, want = score_job
    rows = _data(out)
    good = {n: w for n, w in want.items() if "error" not in w and w.get("id") != "toolong"}  # the reference's limit is 4096
    assert sorted(r["source_row"] for r in rows) == sorted(good)
    assert any(len(w["token_logprobs"]) > 16 for w in good.values())  # longer than one microbatch
    for r in rows:
        w = good[r["source_row"]]
        assert r["source_file"] == str(path)
        assert r["id"] == (str(w["id"]) if "id" in w else f"{path}:{r['source_row']}")
        assert r["token_logprobs"][0] is None and w["token_logprobs"][0] is None
        assert r["token_logprobs"][1:] == pytest.approx(w["token_logprobs"][1:], abs=1e-4)
        assert r["sum_logprob"] == pytest.approx(w["sum_logprob"], abs=1e-3)
        for f in ("prompt", "text", "input_ids"):
            assert r[f] == w.get(f)
    assert [json.loads(r["extra"]) for r in rows if r["extra"]] == [{"note": {"k": 1}}]
    assert summary["complete"] and summary["rows"] == len(want) and summary["rows_failed"] == 4
    assert json.loads((out / "_SUMMARY.json").read_text())["rows_ok"] == len(good)


def test_bad_rows_go_to_the_errors_file(score_job):
    path, out, summary, want = score_job
    errs = {e["id"]: e for e in _errors(out)}
    bad_line = next(n for n, w in want.items() if "error" in w)
    assert set(errs) == {f"{path}:{bad_line}", "nofield", "toolong", "range"}
    assert "malformed JSON" in errs[f"{path}:{bad_line}"]["error"]
    assert errs[f"{path}:{bad_line}"]["input"] == '{"prompt": "unterminated'
    assert "exactly one of" in errs["nofield"]["error"]
    assert "more than the context of 256" in errs["toolong"]["error"]
    assert "out of range" in errs["range"]["error"]
    for e in errs.values():
        assert e["id"] == "toolong" or want[e["source_row"]]["error"] == e["error"]  # the reference's limit is 4096
    assert summary["this_run"]["failed"] == 4


def test_classify_parquet_input(ray_cluster, models, reference, tmp_path):
    _, cls = models
    n = 9
    table = pa.table({
        "id": [f"c{i}" for i in range(n)],
        "prompt": [_text(i, 2 + 2 * i) if i % 3 else None for i in range(n)],
        "input_ids": [None if i % 3 else [1] + [7 + i] * (4 + 3 * i) for i in range(n)],
    })
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=4)
    rows = [{k: v for k, v in r.items() if v is not None} for r in table.to_pylist()]
    assert max(len(r.get("input_ids", [])) for r in rows) > 8  # longer than a microbatch (max_batch_tokens=8)
    want, _ = run_chunk(reference[1], "classify", [(i, json.dumps(r)) for i, r in enumerate(rows, 1)])
    out = tmp_path / "out"
    _job("classify", cls, [tmp_path / "in.parquet"], out, stages=2, max_batch_tokens=8, batch_size=4)
    got = {r["id"]: r for r in _data(out)}
    assert len(got) == n and not _errors(out)
    for w in want:
        g = got[w["id"]]
        assert g["logits"] == pytest.approx(w["logits"], abs=1e-4)
        assert g["probs"] == pytest.approx(w["probs"], abs=1e-4)
        assert g["label"] == w["label"] and g["label"] in ("computers", "people", "politics", "science", "songs-poems")
        assert g["source_row"] == int(w["id"][1:]) + 1
    _assert_once(out, n)


def test_generate_directory_of_jsonl_and_parquet(ray_cluster, models, reference, tmp_path):
    lm, _ = models
    src = tmp_path / "in"
    a = _write_jsonl(src / "a.jsonl", [{"prompt": _text(i, 4 + i), "max_new_tokens": 3 + i % 4} for i in range(6)])
    c = _write_jsonl(src / "sub" / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi there"}], "max_new_tokens": 5},
                                               {"input_ids": [1, 40, 41], "stop_token_ids": [2], "logprobs": True}])
    _write_jsonl(src / "_ignored.jsonl", ["not even json"])
    (src / "README.txt").write_text("not an input")
    prows = [{"prompt": _text(10 + i, 5), "max_new_tokens": 4, "temperature": 0.8, "seed": 10 + i} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(prows), src / "b.parquet")
    z = _write_jsonl(tmp_path / "z.jsonl", [{"prompt": "compressed", "max_new_tokens": 2}])
    (src / "z.jsonl.gz").write_bytes(gzip.compress(z.read_bytes()))
    out = src / "out"  # inside the input directory: not read as input, on this run or the next
    summary = _job("generate", lm, [src], out, pipelines=2, batch_size=3)
    got = {(r["source_file"], r["source_row"]): r for r in _data(out)}
    assert summary["rows"] == len(got) == 12 and not _errors(out)
    want = {(str(a), n): w for n, w in _expected(reference[0], "generate", a).items()}
    want |= {(str(c), n): w for n, w in _expected(reference[0], "generate", c).items()}
    ref, _ = run_chunk(reference[0], "generate", [(i, json.dumps(r)) for i, r in enumerate(prows, 1)])
    want |= {(str(src / "b.parquet"), i): w for i, w in enumerate(ref, 1)}
    want |= {(str(src / "z.jsonl.gz"), n): w for n, w in _expected(reference[0], "generate", z).items()}
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert (g["output_ids"], g["text"], g["finish_reason"]) == (w["output_ids"], w["text"], w["finish_reason"]), k
        assert g["max_new_tokens"] == w.get("max_new_tokens")
    msg = got[(str(c), 1)]
    assert json.loads(msg["messages"]) == [{"role": "user", "content": "Hi there"}]
    lp = got[(str(c), 2)]
    assert lp["stop_token_ids"] == [2] and len(lp["logprobs"]) == len(lp["output_ids"])


def test_rerun_cleans_up_an_interrupted_commit(score_job, models, tmp_path):
    """What a kill can leave behind: a temporary file, an errors part whose data part never landed,
    a stale summary, and (should Ray ever run a batch twice under another key) a duplicated part."""
    path, done, _, want = score_job
    out = tmp_path / "out"
    shutil.copytree(done, out)
    (out / "data" / ".part-0123.parquet.abcd.tmp").write_bytes(b"PAR1 half written")
    orphan = pa.table({"id": ["x"], "source_file": [str(path)], "source_row": [1], "error": ["boom"], "input": ["{}"]})
    pq.write_table(orphan, out / "errors" / "part-0000orphan.parquet")
    first = sorted((out / "data").glob("part-*"))[0]
    dup_rows = pq.read_metadata(first).num_rows
    shutil.copy(first, out / "data" / "part-zzzz.parquet")
    (out / "_SUMMARY.json").write_text('{"stale": true}')
    summary = _job("score", models[0], [path], out, max_seq_len=256)
    assert summary["this_run"]["rows"] == 0  # nothing ran again
    assert summary["this_run"]["cleaned_up"] == {"temporary": 1, "orphan_errors": 1}
    assert summary["this_run"]["duplicates_removed"] == dup_rows
    assert not list(out.rglob("*.tmp")) and not (out / "errors" / "part-0000orphan.parquet").exists()
    _assert_once(out, len(want))
    assert json.loads((out / "_SUMMARY.json").read_text())["rows"] == len(want)


def _batch_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", "batch", *map(str, args)]


def test_killed_job_resumes_exactly_once_on_a_separate_cluster(ray_cluster, models, reference, tmp_path):
    """The job as its own process, joining this module's cluster with --address; SIGKILL it once some
    parts are committed, rerun it, and every row is there exactly once, equal to the reference."""
    lm, _ = models
    src = tmp_path / "in"
    files = [_write_jsonl(src / f"part{k}.jsonl", [{"prompt": _text(k * 100 + i, 3 + i % 9)} for i in range(60)])
             for k in range(2)]
    _write_jsonl(src / "other.ndjson", [{"prompt": "not matched by the glob"}])
    out = tmp_path / "out"
    cmd = _batch_cmd("score", "--model", lm, "--input", f"{src}/*.jsonl", "--output", out, "--address", ray_cluster,
                     "--stages", "2", "--batch-size", "3", "--calls-per-actor", "1", "--progress-interval", "1")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    log1 = open(tmp_path / "run1.log", "w")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 150
        while not list((out / "data").glob("part-*")) and time.time() < deadline and p.poll() is None:
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait()
        log1.close()
    assert p.returncode == -signal.SIGKILL, (tmp_path / "run1.log").read_text()[-3000:]
    assert not (out / "_SUMMARY.json").exists()
    time.sleep(2)  # the killed driver's actors are reaped; a straggler's commit is fenced off anyway
    first = len(_data(out))
    assert 0 < first < 120

    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "_SUMMARY.json").read_text())
    assert summary["complete"] and summary["rows"] == 120 and summary["rows_failed"] == 0
    assert summary["this_run"]["skipped_committed"] >= first and summary["this_run"]["rows"] > 0
    assert summary["this_run"]["skipped_committed"] + summary["this_run"]["rows"] == 120
    assert "resuming" in r.stderr and "rows/s" in r.stderr
    # The output is the project's own lines; Ray's (its Python loggers, the core worker's C++
    # lines such as "core_worker.cc ... max_restarts > 0") go to a log file, named at the end.
    from cluster.cli.ray_log import RAY_LINE

    assert "core_worker.cc" not in r.stderr and not [x for x in r.stderr.splitlines() if RAY_LINE.match(x.encode())]
    assert "Ray's messages are in " in r.stderr
    _assert_once(out, 120)
    got = {(r["source_file"], r["source_row"]): r for r in _data(out)}
    for f in files:
        for n, w in _expected(reference[0], "score", f).items():
            assert got[(str(f), n)]["token_logprobs"][1:] == pytest.approx(w["token_logprobs"][1:], abs=1e-4)


def _stage_pids() -> set[int]:
    """Processes running a pipeline stage (Ray titles an actor's process `ray::<class>[.<method>]`)."""
    pids = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes().startswith(b"ray::StageActor"):
                pids.add(int(d.name))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def test_job_survives_a_stage_failure(ray_cluster, models, reference, tmp_path):
    """A stage process of the job's pipeline is SIGKILLed mid-run: Ray restarts it, the pipeline
    replays its live requests, and the job completes with every row once, equal to the reference."""
    lm, _ = models
    path = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": _text(i, 3 + i % 5), "max_new_tokens": 12} for i in range(40)])
    out = tmp_path / "out"
    before = _stage_pids()
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(_job("generate", lm, [path], out, stages=2, batch_size=4,
                                                              calls_per_actor=1)))
    job.start()
    try:
        deadline = time.time() + 150
        while not list((out / "data").glob("part-*")) and time.time() < deadline:
            time.sleep(0.02)
        stages = _stage_pids() - before
        assert len(stages) == 2 and not result, "the job should be running, on one pipeline of two stages"
        victim = max(stages)
        os.kill(victim, signal.SIGKILL)
    finally:
        job.join(timeout=300)
    assert result["complete"] and result["rows"] == 40 and result["rows_failed"] == 0
    assert result["this_run"]["stage_recoveries"] == 1
    _assert_once(out, 40)
    got = {r["source_row"]: r for r in _data(out)}
    for n, w in _expected(reference[0], "generate", path).items():
        assert got[n]["output_ids"] == w["output_ids"], n
