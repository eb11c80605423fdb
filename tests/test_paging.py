"""The bookkeeping of paged blocks, snapshots and the prefix cache (stages/paging.py), and the
paged cache's block tables (stages/cache.py), without a model."""

from __future__ import annotations

import pytest
import torch

from stages.cache import CacheFullError, HybridCache
from stages.paging import BlockManager, NoBlocksError
from tests.test_plan import small_config

BS = 4


def _computed(m: BlockManager, prompt: list[int], limit: int | None = None):
    """Admit a sequence and feed its whole prompt in one chunk, the way the scheduler does."""
    seq = m.new_sequence(prompt)
    snap = m.admit(seq, len(prompt) - 1 if limit is None else limit)
    start = seq.cached_tokens
    m.grow(seq, len(prompt))
    taken = m.snapshots_for(seq, start, len(prompt) - start)
    m.commit(seq, len(prompt))
    return seq, snap, taken


def test_hits_need_full_blocks_and_stop_before_the_last_token():
    m = BlockManager(num_blocks=16, block_size=BS, num_snapshots=8)
    a, snap, taken = _computed(m, list(range(10)))  # blocks [0,4) [4,8) full, [8,10) partial
    assert snap is None and a.cached_tokens == 0
    assert [off for off, _ in taken] == [3, 7]  # the last token of each full block
    m.release(a)
    # same first 9 tokens: both full blocks cached; the hit covers 8 < len - 1 = 9 tokens
    b, snap, _ = _computed(m, list(range(9)) + [99])
    assert b.cached_tokens == 8 and snap == taken[1][1]
    # exactly two blocks long: the last token must be fed, so only the first block is a hit
    c, snap, _ = _computed(m, list(range(8)))
    assert c.cached_tokens == 4 and snap == taken[0][1]
    # a different first token: nothing in common (hashes chain over the whole prefix)
    d, snap, _ = _computed(m, [7] + list(range(1, 10)))
    assert d.cached_tokens == 0 and snap is None
    # shorter than one block: never a hit
    e, _, _ = _computed(m, [0, 1, 2])
    assert e.cached_tokens == 0
    assert m.info()["hits"] == 2 and m.info()["cached_tokens"] == 12


def test_shared_blocks_are_reference_counted_and_evicted_lru():
    m = BlockManager(num_blocks=4, block_size=BS, num_snapshots=4)
    a, _, _ = _computed(m, list(range(9)))  # 3 blocks, 2 cached
    b, _, _ = _computed(m, list(range(8)) + [50, 51])  # hits 2, owns 1 more
    assert b.blocks[:2] == a.blocks[:2] and m.refs[a.blocks[0]] == 2
    assert m.available_blocks == 0
    with pytest.raises(NoBlocksError):
        m.grow(b, 13)
    m.release(a)
    assert m.available_blocks == 1  # a's own third block; the shared two are still held by b
    m.release(b)
    assert m.available_blocks == 4 and len(m.index) == 2  # cached blocks stay, evictable
    # taking every block evicts the cached ones, the prefix's tail first, and their snapshots
    c = m.new_sequence([9] * 16)
    m.admit(c, 15)
    m.grow(c, 16)
    assert len(m.index) == 0 and len(m.snap_of) == 0 and m.info()["evicted_blocks"] == 2


def test_hits_end_on_the_last_block_with_a_snapshot():
    m = BlockManager(num_blocks=32, block_size=BS, num_snapshots=2)
    a, _, taken = _computed(m, list(range(13)))  # 3 full blocks, 2 snapshots: the third block goes without
    assert len(taken) == 2 and len(m.index) == 3
    m.release(a)
    b, snap, taken_b = _computed(m, list(range(13)))
    assert b.cached_tokens == 8 and snap == taken[1][1]
    assert len(taken_b) == 1 and m.info()["evicted_snapshots"] == 1  # b's third-block snapshot evicted the oldest
    m.release(b)
    c, snap, _ = _computed(m, list(range(13)))
    assert c.cached_tokens == 12 and snap == taken_b[0][1]


def test_claims_make_followers_wait_for_the_prefix_being_computed():
    m = BlockManager(num_blocks=32, block_size=BS, num_snapshots=8)
    prompt = list(range(12))
    a = m.new_sequence(prompt)
    m.admit(a, 11)
    b = m.new_sequence(prompt[:8] + [77, 78, 79, 80, 81])
    assert m.waits_for_claim(b, 12)  # a is computing block 0
    m.grow(a, 8)
    m.snapshots_for(a, 0, 8)
    m.commit(a, 8)
    assert not m.waits_for_claim(b, 12)  # b diverges at block 2; a's blocks 0, 1 are cached now
    m.admit(b, 12)
    assert b.cached_tokens == 8
    other = m.new_sequence(prompt + [5])
    assert m.waits_for_claim(other, 12)  # a still computes block 2
    assert not m.waits_for_claim(other, 11)  # ... which a hit within 11 tokens could not use
    m.release(a)  # a gives up: its claims go, nobody waits for them
    assert not m.waits_for_claim(other, 12)


def test_disabled_prefix_cache_never_hits():
    m = BlockManager(num_blocks=16, block_size=BS, num_snapshots=8, prefix_cache=False)
    a, _, taken = _computed(m, list(range(10)))
    assert taken == [] and a.hashes == []
    m.release(a)
    b, snap, _ = _computed(m, list(range(10)))
    assert snap is None and b.cached_tokens == 0


def test_paged_cache_block_tables_and_snapshot_restore():
    c = small_config()
    cache = HybridCache(c, range(0, 4), num_slots=2, max_seq_len=16, block_size=BS, num_blocks=5,
                        num_snapshots=2, manage_blocks=False)
    attn = next(i for i in range(4) if c.is_attention(i))
    mamba = next(i for i in range(4) if not c.is_attention(i))
    # One scratch block and one scratch Mamba entry (index 2, between the slots and the snapshots)
    # for the pad rows of fixed-shape decode steps.
    assert cache.k[attn].shape[:2] == (5 + 1, BS) and cache.ssm[mamba].shape[0] == 2 + 1 + 2
    assert cache.pad_slot == 2 and cache.block_tables[cache.pad_slot].tolist() == [5] * 4
    cache.allocate(0)
    with pytest.raises(CacheFullError, match="blocks for 0 tokens"):
        cache.begin([0], [3])
    cache.set_blocks(0, 0, [3, 1])
    b = cache.begin([0], [6], snapshots=[[(3, 1)]])
    assert b.token_block.tolist() == [3, 3, 3, 3, 1, 1] and b.token_offset.tolist() == [0, 1, 2, 3, 0, 1]
    assert b.snap_tok.tolist() == [3] and b.snap_dst.tolist() == [2 + 1 + 1]  # snapshot 1 after the scratch entry
    with pytest.raises(ValueError, match="gap"):
        cache.set_blocks(0, 3, [0])
    with pytest.raises(ValueError, match="out of range"):
        cache.set_blocks(0, 2, [5])
    cache.ssm[mamba][4] = 7.0  # snapshot 1
    cache.allocate(1)
    cache.set_blocks(1, 0, [3])
    cache.restore(1, 1, 4)
    assert cache.lengths[1] == 4 and bool((cache.ssm[mamba][1] == 7.0).all())
    with pytest.raises(ValueError, match="no blocks"):
        cache.restore(1, 1, 8)


def test_managed_cache_takes_and_returns_blocks():
    cache = HybridCache(small_config(), range(0, 4), num_slots=2, max_seq_len=16, block_size=BS, num_blocks=3)
    cache.allocate(0)
    cache.begin([0], [9])  # 3 blocks
    cache.allocate(1)
    with pytest.raises(CacheFullError, match="more KV blocks"):
        cache.begin([1], [1])
    cache.free(0)
    assert cache.begin([1], [9]).block_tables.shape == (1, 3)
    assert torch.equal(cache.block_tables[1, :3].sort().values, torch.arange(3))
