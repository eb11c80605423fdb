"""A simulated multi-node cluster (several raylets, each with its own object store): stages placed
with STRICT_SPREAD land on different nodes, activations cross object stores, results are unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.runtime.config import PipelineConfig
from cluster.runtime.local import LocalRunner
from cluster.runtime.pipeline import SyncPipeline
from stages.demo import make_demo_model
from stages.loading import load_stage
from stages.sequence import SamplingParams
from stages.tokenizer import Tokenizer

from .harness import simulated_cluster


@pytest.fixture(scope="module")
def cluster():
    with simulated_cluster(3) as c:
        yield c


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_demo_model(tmp_path_factory.mktemp("m") / "lm")


def test_strict_spread_puts_each_stage_on_its_own_node(cluster, model):
    tok = Tokenizer.from_dir(model)
    prompts = [tok.encode(t) for t in ["Across the nodes", "Object stores talk", "x"]]
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True) for _ in prompts]
    pipe = SyncPipeline(PipelineConfig(str(model), num_stages=3, layer_split="2,3,3", placement_strategy="STRICT_SPREAD",
                                       cpus_per_stage=0.5, max_batch_tokens=4))
    try:
        nodes = [i["node_id"] for i in pipe.pipe.stage_info]
        assert len(set(nodes)) == 3
        assert cluster.head_node.node_id not in nodes  # the head has no CPUs to give
        got = pipe.generate(prompts, params)
        scores = pipe.score(prompts)
    finally:
        pipe.close()
    ref = LocalRunner(load_stage(model)[0], tok)
    assert [g.output_ids for g in got] == [r.output_ids for r in ref.generate(prompts, params)]
    for s, r in zip(scores, ref.score(prompts)):
        assert s[1:] == pytest.approx(r[1:], abs=1e-4)


def test_strict_spread_with_too_few_nodes_fails_clearly(cluster, model):
    with pytest.raises(RuntimeError, match="could not place 4 stages .* STRICT_SPREAD"):
        SyncPipeline(PipelineConfig(str(model), num_stages=4, placement_strategy="STRICT_SPREAD",
                                    cpus_per_stage=0.5, placement_timeout_s=5))


def test_cli_joins_a_running_cluster(cluster, model, tmp_path):
    """`jamba generate --stages 2 --address ...`, as its own process, uses a cluster started separately."""
    rows = [{"prompt": "Hello from the CLI", "max_new_tokens": 5}, {"input_ids": [1, 2, 3], "max_new_tokens": 3}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--model", str(model), "--input", str(tmp_path / "in.jsonl"),
         "--stages", "2", "--address", cluster.address],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, RAY_AUTH_MODE="disabled"),
    )
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    tok = Tokenizer.from_dir(model)
    ref = LocalRunner(load_stage(model)[0], tok)
    want = ref.generate([tok.encode(rows[0]["prompt"]), rows[1]["input_ids"]],
                        [SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=3)])
    assert [o["output_ids"] for o in out] == [w.output_ids for w in want]
