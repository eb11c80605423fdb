"""Our model against transformers' JambaForCausalLM / JambaForSequenceClassification, fp32."""

from __future__ import annotations

import pytest
import torch

from cluster.runtime.local import LocalRunner
from stages.loading import load_stage
from stages.sequence import SamplingParams
from tests.hf_reference import CONFIGS, make_hf_model, save_hf_model

torch.set_num_threads(2)


@pytest.fixture(scope="module", params=list(CONFIGS))
def lm(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    stage, _ = load_stage(path)
    return hf, stage, path


def prompts(vocab: int, lengths=(1, 7, 23, 40), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), -1)


def test_logprobs_match_transformers(lm):
    hf, stage, _ = lm
    runner = LocalRunner(stage, max_batch_tokens=64)
    ps = prompts(stage.config.vocab_size)
    ours = runner.score(ps)
    for ids, got in zip(ps, ours):
        ref = hf_logprobs(hf, ids)
        assert got[0] is None
        want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert len(got) == len(ids)
        assert torch.allclose(torch.tensor(got[1:]), torch.tensor(want), atol=1e-4, rtol=0), (ids, got, want)


def test_full_logits_match_transformers(lm):
    hf, stage, _ = lm
    ids = prompts(stage.config.vocab_size, lengths=(30,))[0]
    cache = stage.make_cache(1, 64)
    slot = cache.allocate()
    ours = stage(torch.tensor(ids), cache, [slot], [len(ids)], output_index=torch.arange(len(ids)))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_greedy_generation_token_identical(lm):
    hf, stage, _ = lm
    runner = LocalRunner(stage)
    ps = prompts(stage.config.vocab_size, lengths=(3, 11, 25))
    ours = runner.generate(ps, [SamplingParams(max_new_tokens=12, ignore_eos=True) for _ in ps])
    for ids, res in zip(ps, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert res.output_ids == out[0, len(ids):].tolist()
        assert res.finish_reason == "length"


def test_left_padded_batch_matches_unpadded_rows(lm):
    """transformers on a left-padded batch gives, at real tokens, what we give for each row alone."""
    hf, stage, _ = lm
    if stage.config.mamba_proj_bias:
        # HF zeroes padded hidden states *before* in_proj, so in_proj's bias leaks into the conv
        # window of the first real tokens: HF itself is not padding-invariant here (real Jamba
        # checkpoints have no proj bias). Unpadded parity for this config is covered above.
        pytest.skip("transformers' left padding is not exact with mamba_proj_bias")
    ps = prompts(stage.config.vocab_size, lengths=(5, 17, 12))
    L = max(map(len, ps))
    pad = stage.config.pad_token_id
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps])
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids, attention_mask=mask).logits.float(), -1)
    ours = LocalRunner(stage).score(ps)
    for b, p in enumerate(ps):
        off = L - len(p)
        want = [ref[b, off + i - 1, p[i]].item() for i in range(1, len(p))]
        assert torch.allclose(torch.tensor(ours[b][1:]), torch.tensor(want), atol=1e-4, rtol=0)


def _logits_all(stage, ids, chunks):
    cache = stage.make_cache(2, 128)
    slot = cache.allocate()
    out, pos = [], 0
    for n in chunks:
        x = torch.tensor(ids[pos : pos + n])
        out.append(stage(x, cache, [slot], [n], output_index=torch.arange(n)))
        pos += n
    return torch.cat(out), cache, slot


def test_decode_steps_equal_full_forward(lm):
    _, stage, _ = lm
    ids = prompts(stage.config.vocab_size, lengths=(24,))[0]
    full, _, _ = _logits_all(stage, ids, [24])
    stepped, _, _ = _logits_all(stage, ids, [10] + [1] * 14)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_one_pass(lm):
    _, stage, _ = lm
    ids = prompts(stage.config.vocab_size, lengths=(40,))[0]
    one, c1, s1 = _logits_all(stage, ids, [40])
    chunked, c2, s2 = _logits_all(stage, ids, [5, 1, 2, 13, 19])
    torch.testing.assert_close(chunked, one, atol=1e-5, rtol=1e-5)
    for layer in c1.ssm:  # the carried Mamba states agree too
        torch.testing.assert_close(c2.ssm[layer][s2], c1.ssm[layer][s1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c2.conv[layer][s2], c1.conv[layer][s1], atol=1e-5, rtol=1e-5)


def test_mixed_prefill_and_decode_rows_in_one_call(lm):
    """Rows of different lengths and phases, packed together, equal each row run alone."""
    _, stage, _ = lm
    a, b, c = prompts(stage.config.vocab_size, lengths=(9, 15, 4), seed=7)
    cache = stage.make_cache(4, 64)
    sa, sb, sc = cache.allocate(), cache.allocate(), cache.allocate()
    stage(torch.tensor(a[:8]), cache, [sa], [8])  # a is mid-sequence: its next call is a decode step
    stage(torch.tensor(b[:6]), cache, [sb], [6])  # b continues with a prefill chunk
    x = torch.tensor(a[8:] + b[6:] + c)
    out = stage(x, cache, [sa, sb, sc], [1, 9, 4], output_index=torch.tensor([0, 9, 13]))
    for ids, row in ((a, 0), (b, 1), (c, 2)):
        alone, _, _ = _logits_all(stage, ids, [len(ids)])
        torch.testing.assert_close(out[row], alone[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bounds", [[0, 1, 6], [0, 3, 4, 6], [0, 2, 3, 5, 6]])
def test_any_stage_split_equals_unsplit(lm, bounds):
    _, full, path = lm
    L = full.config.num_hidden_layers
    bounds = [min(b, L) for b in bounds[:-1]] + [L]
    stages = [load_stage(path, s, e)[0] for s, e in zip(bounds, bounds[1:])]
    ids = prompts(full.config.vocab_size, lengths=(19,))[0]
    caches = [s.make_cache(1, 64) for s in stages]
    slots = [c.allocate() for c in caches]
    h = torch.tensor(ids)
    for s, c, slot in zip(stages, caches, slots):
        h = s(h, c, [slot], [len(ids)], output_index=torch.arange(len(ids)) if s.is_last else None)
    ref, _, _ = _logits_all(full, ids, [len(ids)])
    torch.testing.assert_close(h, ref, atol=1e-6, rtol=1e-6)


def test_classification_matches_transformers(tmp_path):
    hf = make_hf_model("mqa-top1", classification=True, num_labels=3)
    path = save_hf_model(hf, tmp_path / "cls")
    stage, _ = load_stage(path)
    assert stage.head == "classification"
    ps = prompts(stage.config.vocab_size, lengths=(6, 13, 1))
    ps.append([5, 9, 11, 0, 0])  # trailing pad ids: HF pools at the last non-pad token
    runner = LocalRunner(stage, max_batch_tokens=8)  # forces chunked prefill
    ours = runner.classify(ps)
    for ids, got in zip(ps, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert torch.allclose(torch.tensor(got), ref, atol=1e-4), (got, ref)
    # A right-padded batch in HF gives the same pooled logits.
    L = 13
    batch = torch.tensor([p + [0] * (L - len(p)) for p in ps[:2]])
    with torch.no_grad():
        ref = hf(batch, attention_mask=(batch != 0).long()).logits
    assert torch.allclose(torch.tensor(ours[:2]), ref, atol=1e-4)
