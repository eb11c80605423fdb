"""The pipeline planner: cost model against the real modules, exact partitioning, parsing, `jamba plan`."""

from __future__ import annotations

import argparse
import itertools
import json
import re

import pytest
import torch

from cluster.cli.plan import add_plan_parser
from cluster.runtime.plan import PRESETS, StagePlan, format_plan, load_config, make_plan, parse_bytes, parse_layer_split, partition
from stages.cache import HybridCache
from stages.config import JambaConfig
from stages.costs import (block_bytes, count_params, layer_flops, snapshot_bytes, stage_cache_bytes, stage_flops,
                          stage_params)
from stages.model import JambaStage

GiB = 2**30


def small_config(**overrides) -> JambaConfig:
    """10 layers with every kind of layer: attention at 1, 5, 9; MoE at odd layers."""
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=10, num_attention_heads=4,
              num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=1,
              mamba_d_state=8, mamba_dt_rank=8)
    kw.update(overrides)
    return JambaConfig(**kw)


def meta_params(config: JambaConfig, start: int, end: int) -> int:
    with torch.device("meta"):
        stage = JambaStage(config, start, end)
    return sum(p.numel() for p in stage.parameters())


def all_splits(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield list(zip(bounds, bounds[1:]))


# ---- cost model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, total_b, active_b", [("jamba-large-1.6", 398, 94), ("jamba-mini-1.6", 52, 12)])
def test_presets_total_and_active_params(name, total_b, active_b):
    total, active = count_params(load_config(name))
    assert total / 1e9 == pytest.approx(total_b, rel=0.02)
    assert active / 1e9 == pytest.approx(active_b, rel=0.02)


def test_large_preset_matches_meta_model():
    c = load_config("jamba-large-1.6")
    assert c.mamba_dt_rank == 512 and c.head_dim == 128
    assert count_params(c)[0] == meta_params(c, 0, c.num_hidden_layers)


@pytest.mark.parametrize("overrides", [
    {},
    {"mamba_proj_bias": True, "mamba_conv_bias": False},
    {"num_experts": 1, "num_experts_per_tok": 1},  # no MoE layers at all
    {"architectures": ["JambaForSequenceClassification"], "num_labels": 3},  # `score` head
    {"head_dim": 24, "tie_word_embeddings": True},  # the stage keeps a separate lm_head even when tied
])
@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_weight_bytes_match_meta_parameter_count(overrides, dtype_bytes):
    c = small_config(**overrides)
    n = c.num_hidden_layers
    ranges = [(0, n), (0, 1), (0, 3), (3, 7), (7, n), (n - 1, n)] + [(i, i + 1) for i in range(n)]
    for start, end in ranges:
        expected = meta_params(c, start, end) * dtype_bytes
        assert stage_params(c, start, end) * dtype_bytes == expected, (start, end)
    for p in make_plan(c, 3, dtype_bytes=dtype_bytes):
        assert p.weight_bytes == meta_params(c, p.start, p.end) * dtype_bytes


def test_cache_bytes_match_an_allocated_cache():
    c = small_config()
    for start, end in [(0, 3), (3, 10), (1, 2)]:
        cache = HybridCache(c, range(start, end), num_slots=1, max_seq_len=128, dtype=torch.bfloat16)
        allocated = sum(t.nbytes for d in (cache.k, cache.v, cache.conv, cache.ssm) for t in d.values())
        # the one sequence, plus the scratch slot and block that pad rows of decode steps use
        scratch = snapshot_bytes(c, range(start, end), 2) + block_bytes(c, range(start, end), cache.block_size, 2)
        assert stage_cache_bytes(c, start, end, 128, dtype_bytes=2) + scratch == allocated


def test_flops_are_twice_the_active_params_plus_attention():
    c = load_config("jamba-large-1.6")
    n = c.num_hidden_layers
    total_params, active = count_params(c)
    embedding = c.vocab_size * c.hidden_size  # a lookup, no FLOPs
    assert stage_flops(c, 0, n, ctx=1) == pytest.approx(2 * (active - embedding), rel=0.01)
    # Only attention layers grow with the context: 2 * 2 * n_heads * head_dim per token per extra position.
    attn = sum(c.is_attention(i) for i in range(n))
    grow = stage_flops(c, 0, n, ctx=4097) - stage_flops(c, 0, n, ctx=4096)
    assert grow == attn * 4 * c.num_attention_heads * c.head_dim
    moe, dense = c.attn_layer_offset + 1, c.attn_layer_offset + 2  # two Mamba layers, MoE then dense
    assert c.is_moe(moe) and not c.is_moe(dense)
    ff = 2 * 3 * c.hidden_size * c.intermediate_size
    assert layer_flops(c, moe, 0) - layer_flops(c, dense, 0) == ff + 2 * c.num_experts * c.hidden_size  # top-2 vs 1 MLP


# ---- partitioning ----------------------------------------------------------------------------------
def test_partition_covers_large_for_1_to_8_stages():
    c = load_config("jamba-large-1.6")
    for p in range(1, 9):
        split = partition(c, p)
        assert len(split) == p
        assert split[0][0] == 0 and split[-1][1] == c.num_hidden_layers
        assert all(a < b for a, b in split)
        assert all(split[i][1] == split[i + 1][0] for i in range(p - 1))


def test_large_8_stage_plan_is_balanced():
    c = load_config("jamba-large-1.6")
    plans = make_plan(c, 8)
    flops = [p.flops_per_token for p in plans]
    mean = sum(flops) / len(flops)
    assert max(flops) <= 1.15 * mean  # measured: +6.8% (the 4 stages with 5 MoE layers)


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_partition_is_optimal_against_brute_force(num_stages):
    c = small_config()
    n, ctx = c.num_hidden_layers, 64
    splits = list(all_splits(n, num_stages))
    max_flops = lambda s: max(stage_flops(c, a, b, ctx) for a, b in s)  # noqa: E731
    max_params = lambda s: max(stage_params(c, a, b) for a, b in s)  # noqa: E731
    best = min(max_flops(s) for s in splits)
    best_tie = min(max_params(s) for s in splits if max_flops(s) == best)
    mine = partition(c, num_stages, ctx=ctx)
    assert mine in splits
    assert max_flops(mine) == best
    assert max_params(mine) == best_tie  # ties broken on weight bytes


def test_partition_with_a_memory_budget_is_optimal_among_fitting_splits():
    c = small_config(vocab_size=4096)  # a heavy embedding: stage 0 has weights but ~no compute
    n, ctx, k = c.num_hidden_layers, 64, 3
    need = lambda a, b: stage_params(c, a, b) * 2 + stage_cache_bytes(c, a, b, ctx, 2)  # noqa: E731
    splits = list(all_splits(n, k))
    smallest = min(max(need(a, b) for a, b in s) for s in splits)
    unconstrained = partition(c, k, ctx=ctx)
    budgets = sorted({max(need(a, b) for a, b in s) for s in splits})
    assert budgets[0] == smallest
    for budget in budgets[:8]:
        fitting = [s for s in splits if all(need(a, b) <= budget for a, b in s)]
        best = min(max(stage_flops(c, a, b, ctx) for a, b in s) for s in fitting)
        mine = partition(c, k, ctx=ctx, memory_per_stage=budget)
        assert mine in fitting
        assert max(stage_flops(c, a, b, ctx) for a, b in mine) == best
    assert budgets[0] < max(need(a, b) for a, b in unconstrained)  # the budget does change the answer
    with pytest.raises(ValueError, match="no split of 10 layers into 3 stages fits"):
        partition(c, k, ctx=ctx, memory_per_stage=smallest - 1)


def test_partition_rejects_bad_stage_counts():
    c = small_config()
    with pytest.raises(ValueError, match="cannot split 10 layers into 11 stages"):
        partition(c, 11)
    with pytest.raises(ValueError, match="at least 1 stage"):
        partition(c, 0)
    assert partition(c, 10) == [(i, i + 1) for i in range(10)]


# ---- plans -----------------------------------------------------------------------------------------
def test_make_plan_counts_and_memory():
    c = load_config("jamba-large-1.6")
    plans = make_plan(c, 16, gpu_memory=80 * GiB)
    assert sum(p.n_attention + p.n_mamba for p in plans) == 72
    assert sum(p.n_attention for p in plans) == 9 and sum(p.n_moe for p in plans) == 36
    assert sum(p.num_params for p in plans) == count_params(c)[0]
    assert all(p.max_sequences(80 * GiB) >= 1 for p in plans)  # 16 x 80 GiB holds Large in bf16
    eight = make_plan(c, 8, gpu_memory=80 * GiB)  # 742 GiB of weights cannot fit in 8 x 80 GiB
    assert [(p.start, p.end) for p in eight] == partition(c, 8)
    assert all(p.max_sequences(80 * GiB) == 0 for p in eight)


def test_make_plan_layer_split_and_context_checks():
    c = small_config()
    plans = make_plan(c, None, "3,3,4")
    assert [(p.start, p.end) for p in plans] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError, match="has 3 stages but 2 were asked for"):
        make_plan(c, 2, "3,3,4")
    with pytest.raises(ValueError, match="number of stages or a layer split"):
        make_plan(c, None)
    with pytest.raises(ValueError, match="context"):
        make_plan(c, 2, ctx=c.max_position_embeddings + 1)


def test_max_sequences():
    p = StagePlan(0, 0, 1, 0, 1, 0, num_params=0, weight_bytes=50, cache_bytes_per_seq=10, flops_per_token=1)
    assert p.max_sequences(100, reserve_fraction=0.1) == 4  # (90 - 50) // 10
    assert p.max_sequences(100, reserve_fraction=0.0) == 5
    assert p.max_sequences(55, reserve_fraction=0.1) == 0  # weights alone exceed 49.5 usable bytes


# ---- parsing ---------------------------------------------------------------------------------------
def test_parse_layer_split_both_spellings():
    expected = [(i * 9, i * 9 + 9) for i in range(8)]
    assert parse_layer_split("9,9,9,9,9,9,9,9", 72) == expected
    assert parse_layer_split("0,9,18,27,36,45,54,63,72", 72) == expected
    assert parse_layer_split(" 10, 20 ,42 ", 72) == [(0, 10), (10, 30), (30, 72)]
    assert parse_layer_split("72", 72) == [(0, 72)]
    assert parse_layer_split("0,72", 72) == [(0, 72)]


@pytest.mark.parametrize("spec, message", [
    ("9,9,9,9,9,9,9,7", "layer counts '9,9,9,9,9,9,9,7' add up to 70, the model has 72 layers"),
    ("0,9,18,70", "end at 70, the model has 72 layers"),
    ("0,9,9,72", "strictly increasing"),
    ("72,0", "at least one layer"),
    ("9,x,63", "'x' is not an integer"),
    ("9,,63", "comma-separated integers"),
    ("", "comma-separated integers"),
    ("80,-8", "negative"),
])
def test_parse_layer_split_errors(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_layer_split(spec, 72)


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB
    assert parse_bytes("80 GB") == 80 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("512mb") == 512 * 10**6
    assert parse_bytes("1.5GiB") == 3 * 2**29
    assert parse_bytes("123456") == 123456
    for bad in ["", "80 GiBs", "eighty GiB", "-1GB", "80 Gi B"]:
        with pytest.raises(ValueError, match="cannot read"):
            parse_bytes(bad)


def test_load_config_presets_and_checkpoints(tmp_path):
    assert load_config("jamba-mini-1.6").num_hidden_layers == 32
    assert load_config("ai21labs/AI21-Jamba-Large-1.6").num_hidden_layers == 72
    (tmp_path / "config.json").write_text(json.dumps(small_config().to_dict()))
    assert load_config(str(tmp_path)).num_hidden_layers == 10
    with pytest.raises(ValueError, match="jamba-mini-1.6, jamba-large-1.6"):
        load_config(str(tmp_path / "missing"))
    assert set(PRESETS) == {"jamba-mini-1.6", "jamba-large-1.6"}


# ---- jamba plan ------------------------------------------------------------------------------------
def run_plan_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="jamba")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


STAGE_ROW = re.compile(r"^\s*(\d+)\s+\[(\d+), (\d+)\)", re.M)


def test_plan_cli_table(capsys):
    out = run_plan_cli(["--model", "jamba-large-1.6", "--stages", "8", "--gpu-memory", "80GiB"], capsys)
    rows = STAGE_ROW.findall(out)
    expected = partition(load_config("jamba-large-1.6"), 8)
    assert [(int(a), int(b)) for _, a, b in rows] == expected
    assert [int(i) for i, _, _ in rows] == list(range(8))
    assert out.count("DOES NOT FIT") == 8  # bf16 Large needs ~742 GiB; 8 x 72 GiB usable is not enough
    assert "398.6B parameters" in out


def test_plan_cli_fits_on_16_stages(capsys):
    out = run_plan_cli(["--model", "jamba-large-1.6", "--stages", "16", "--gpu-memory", "80GiB"], capsys)
    assert len(STAGE_ROW.findall(out)) == 16
    assert "DOES NOT FIT" not in out and "every stage fits" in out


def test_plan_cli_json_and_layer_split(capsys):
    out = run_plan_cli(["--model", "jamba-mini-1.6", "--layer-split", "0,16,32", "--max-context", "8192",
                        "--dtype", "float32", "--gpu-memory", "80GB", "--json"], capsys)
    plan = json.loads(out)
    assert [(s["start"], s["end"]) for s in plan["stages"]] == [(0, 16), (16, 32)]
    assert plan["max_context"] == 8192 and plan["gpu_memory"] == 80 * 10**9
    assert sum(s["compute_share"] for s in plan["stages"]) == pytest.approx(1.0)
    assert all("max_sequences" in s for s in plan["stages"])
    assert plan["stages"][0]["weight_bytes"] == 4 * stage_params(load_config("jamba-mini-1.6"), 0, 16)


def test_plan_cli_errors(capsys):
    parser = argparse.ArgumentParser(prog="jamba")
    add_plan_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["plan", "--model", "jamba-large-1.6", "--stages", "8", "--gpu-memory", "lots"])
    assert "cannot read 'lots' as a size" in capsys.readouterr().err
    args = parser.parse_args(["plan", "--model", "jamba-large-1.6", "--stages", "80"])
    with pytest.raises(ValueError, match="cannot split 72 layers into 80 stages"):
        args.func(args)


def test_format_plan_without_gpu_memory():
    c = small_config()
    text = format_plan(make_plan(c, 3, ctx=64), c, ctx=64)
    assert len(STAGE_ROW.findall(text)) == 3
    assert "sequences" not in text and "pipeline efficiency" in text


# ---- int8 weights (--quantize) ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int8-experts", "int8", "int8-with-mamba"])
@pytest.mark.parametrize("config", [small_config(), small_config(mamba_proj_bias=True, num_experts=1, num_experts_per_tok=1),
                                    load_config("jamba-mini-1.6")], ids=["small", "dense-bias", "mini"])
def test_quantized_weight_bytes_match_the_quantized_model(config, mode):
    """Plan bytes = the bytes of a quantized stage's tensors (int8, fp32 scales, the rest in bf16)."""
    from stages.costs import stage_weight_bytes
    from stages.quant import quantize_modules

    n = config.num_hidden_layers
    for start, end in [(0, n), (0, 3), (3, n)]:
        with torch.device("meta"):
            stage = quantize_modules(JambaStage(config, start, end), mode)
        # int8 weights 1 byte, their scales float32, everything else bf16
        want = sum(t.numel() * (1 if t.dtype == torch.int8 else 4 if name.endswith("_scale") else 2)
                   for name, t in stage.state_dict().items())
        assert stage_weight_bytes(config, start, end, 2, mode) == want, (start, end)
        assert stage_weight_bytes(config, start, end, 2) == 2 * stage_params(config, start, end)


def test_large_fits_eight_gpus_with_int8_experts():
    """Jamba-Large-1.6 in bf16 needs 16 x 80 GiB; with int8 experts 8 x 80 GiB hold it, with room
    for hundreds of 4K-token sequences and a dozen 256K-token ones."""
    c = load_config("jamba-large-1.6")
    plans = make_plan(c, 8, gpu_memory=80 * GiB, quantize="int8-experts")
    assert all(p.max_sequences(80 * GiB) > 0 for p in plans)
    assert min(p.max_sequences(80 * GiB) for p in plans) >= 256
    out = format_plan(plans, c, 4096, 80 * GiB, quantize="int8-experts", also_contexts=(262144,))
    assert "weights int8 in the experts" in out
    m = re.search(r"the same split at 262144 tokens: (\d+) sequences", out)
    assert m and int(m.group(1)) >= 8
