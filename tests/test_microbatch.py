"""The microbatch header (stages/microbatch.py): what the scheduler writes is what every stage
reads, field by field, and a stage worker answers each row as its `want` says."""

from __future__ import annotations

import pytest
import torch

from stages.demo import make_demo_model
from stages.loading import load_stage
from stages.microbatch import (BlockTableUpdate, Microbatch, Restore, Row, Sampling, TakeSnapshot, Want, decode_answers,
                               encode_answers)
from stages.sampling import sample
from stages.worker import StageWorker


def test_the_header_round_trips_with_its_types():
    mb = Microbatch(
        rows=[Row(3, 1, Want.TOKEN, Sampling(0.7, 40, 0.9, 2**63 - 1, 12)), Row(0, 5),
              Row(1, 4, Want.SCORES, targets=[7, 8, 9, None]), Row(2, 6, Want.LOGITS, position=5)],
        free=[4, 5], alloc=[0], blocks=[BlockTableUpdate(0, 0, [11, 12]), BlockTableUpdate(1, 2, [])],
        restore=[Restore(0, 3, 64)], snapshots=[TakeSnapshot(1, 2, 7)])
    back = Microbatch.decode(mb.encode())
    assert back == mb and back.num_tokens == 16
    assert type(back.rows[0].want) is Want and type(back.rows[0].sampling) is Sampling
    # Rows and sampling are made without their NamedTuple's __new__: every field is there, by name.
    assert all(type(r) is Row and len(r) == len(Row._fields) for r in back.rows)
    assert len(back.rows[0].sampling) == len(Sampling._fields) and back.rows[0].sampling.counts is None
    assert back.rows[1].want is Want.NOTHING and back.rows[1].sampling is None and back.rows[3].position == 5
    assert back.rows[0].sampling.seed == 2**63 - 1 and back.rows[2].targets[-1] is None
    assert back.snapshots_by_row() == [[], [(2, 7)], [], []] and Microbatch().snapshots_by_row() is None
    answers = [(5, -0.25), None, [None, -1.5], [0.5, 0.25]]
    assert decode_answers(encode_answers(answers)) == [[5, -0.25], None, [None, -1.5], [0.5, 0.25]]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    stage, _ = load_stage(make_demo_model(tmp_path_factory.mktemp("m") / "lm"))
    return StageWorker(stage, num_slots=4, max_seq_len=64, paging={"block_size": 16, "num_blocks": 16})


def test_the_last_stage_answers_what_each_row_wants(worker):
    """One microbatch with a row of each kind against the same rows run alone through the stage."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (12,), generator=g)
    spec = Sampling(0.0, 0, 1.0, 1, 0)
    mb = Microbatch(rows=[Row(0, 3, Want.TOKEN, spec), Row(1, 4, Want.SCORES, targets=[7, 8, 9, None]),
                          Row(2, 5, Want.LOGITS, position=2)],
                    alloc=[0, 1, 2], blocks=[BlockTableUpdate(s, 0, [s]) for s in range(3)])
    got = worker.step(mb, ids)
    cache = worker.stage.make_cache(3, 64)  # the same rows, each alone, on a cache of its own
    slots = [cache.allocate() for _ in range(3)]
    out = worker.stage(ids, cache, slots, [3, 4, 5], output_index=torch.arange(12))
    token, lp, _ = sample(out[2:3], [spec])
    assert got[0] == (token[0], pytest.approx(lp[0], abs=1e-6))
    want = torch.log_softmax(out[3:7].float(), -1)
    assert got[1][:3] == pytest.approx([want[0, 7].item(), want[1, 8].item(), want[2, 9].item()], abs=1e-6)
    assert got[1][3] is None
    assert got[2] == pytest.approx(out[7 + 2].tolist(), abs=1e-6)
    worker.step(Microbatch(free=[0, 1, 2]), torch.empty(0, dtype=torch.long))
    assert worker.cache.used_slots == 0
