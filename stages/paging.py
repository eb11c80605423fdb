"""Paged attention blocks, Mamba snapshots and the prefix cache: the bookkeeping half.

The stages hold the memory (stages/cache.py): per attention layer a pool of KV blocks of
`block_size` tokens, and per Mamba layer, beside the sequence slots, a pool of *snapshots* of
the conv and SSM state. Every stage's pools have the same sizes, so one block id or snapshot id
names the same entry on all of them. This module decides which ids each sequence uses; it runs
where the batching happens (the scheduler, cluster/runtime/scheduler.py) and the stages just
follow the ids they are sent. Sizes in bytes are counted in stages/costs.py.

Paging: a sequence's KV lives in the blocks of its block table, taken as its tokens arrive and
given back when it finishes, so no slot reserves `max_seq_len` tokens.

Prefix caching. Jamba mixes two kinds of layer, and only one of them has per-token state:

    attention layers  KV blocks can simply be shared: block j of two prompts that agree on
                      tokens [0, (j+1)*block_size) holds the same keys and values.
    Mamba layers      hold one recurrent state per sequence, not per token. The only thing to
                      reuse is that state *at the end of the shared prefix*.

So when a prompt's prefill passes the end of full block j, the stages also copy the Mamba
states at that token into a snapshot (the scan kernels write it mid-chunk: no chunk has to end
there), and the cache entry for block j is (KV block, snapshot). A later prompt whose first
j+1 blocks hash the same takes those KV blocks into its table (reference counted) and starts
its Mamba states from the snapshot: it is fed only its remaining tokens.

The hash of block j chains over the hash of block j-1 and the block's token ids, salted with
the model and its quantization mode, so equal hashes mean equal prefixes. Only full blocks are
cached, and a hit always stops short of the prompt's last token (its logits are needed), so a
sequence writes only into blocks it owns alone: a shared block is full and never written
again, and no copy-on-write is ever needed. The cost of the scheme is the snapshot, which is
much larger than a KV block (Jamba-Large: ~4 MB of Mamba state per stage against 256 KB of KV
per 64-token block), so snapshots have their own pool and budget: the block size stays small
(default 64 tokens) and a hit is possible for any prompt longer than one block.

Both pools evict least-recently-used entries that no running sequence holds. Requests whose
next block is being computed by another request right now wait for it instead of computing
it again ("claims"), so N requests arriving together with one long system prompt prefill it once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

DEFAULT_BLOCK_SIZE = 64  # tokens per KV block: the paging and prefix-cache granularity


class NoBlocksError(RuntimeError):
    """The block pool is exhausted (every block is held by a running sequence)."""


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(eq=False)
class SeqPages:
    """One sequence's share of the pools."""

    hashes: list[bytes]  # chained hash of each full block of the prompt
    prompt_len: int
    blocks: list[int] = field(default_factory=list)  # the block table
    cached_tokens: int = 0  # tokens taken from the prefix cache when admitted
    claimed: list[bytes] = field(default_factory=list)  # hashes this sequence will compute first
    committed: int = 0  # full prompt blocks already in the index (hit or registered)
    snapshots: dict[int, int] = field(default_factory=dict)  # block index -> snapshot id being written


@dataclass
class PrefixStats:
    lookups: int = 0  # sequences that looked for a cached prefix
    hits: int = 0  # ... and found one
    prompt_tokens: int = 0  # prompt tokens of those sequences
    cached_tokens: int = 0  # ... taken from the cache
    evicted_blocks: int = 0
    evicted_snapshots: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_snapshots: int, prefix_cache: bool = True,
                 salt: str = "") -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size, self.num_snapshots = num_blocks, block_size, num_snapshots
        self.prefix_cache = prefix_cache and num_snapshots > 0
        self.salt = hashlib.blake2b(salt.encode(), digest_size=16).digest()
        self.stats = PrefixStats()
        self.clear()

    def clear(self) -> None:
        """Forget everything (a restarted stage has empty pools). Sequences must be released first."""
        self.free_blocks: deque[int] = deque(range(self.num_blocks))
        self.refs = [0] * self.num_blocks
        self.block_hash: dict[int, bytes] = {}  # cached block -> its hash
        self.index: dict[bytes, int] = {}  # hash -> cached block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, LRU first
        self.free_snaps: deque[int] = deque(range(self.num_snapshots))
        self.snap_of: OrderedDict[bytes, int] = OrderedDict()  # hash -> snapshot at the block's end, LRU first
        self.claims: dict[bytes, SeqPages] = {}

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def available_blocks(self) -> int:
        """Blocks a sequence could take now: free ones plus cached ones nobody holds."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.available_blocks

    def info(self) -> dict:
        s = self.stats
        return {"block_size": self.block_size, "num_blocks": self.num_blocks, "used_blocks": self.used_blocks,
                "cached_blocks": len(self.index), "num_snapshots": self.num_snapshots,
                "cached_snapshots": len(self.snap_of), "prefix_cache": self.prefix_cache,
                "lookups": s.lookups, "hits": s.hits, "prompt_tokens": s.prompt_tokens,
                "cached_tokens": s.cached_tokens, "evicted_blocks": s.evicted_blocks,
                "evicted_snapshots": s.evicted_snapshots}

    # ---- sequences ----------------------------------------------------------------------------
    def new_sequence(self, prompt: list[int]) -> SeqPages:
        hashes, h, bs = [], self.salt, self.block_size
        if self.prefix_cache:
            for j in range(len(prompt) // bs):
                block = b"".join(t.to_bytes(4, "little") for t in prompt[j * bs:(j + 1) * bs])
                h = hashlib.blake2b(h + block, digest_size=16).digest()
                hashes.append(h)
        return SeqPages(hashes, len(prompt))

    def _cached_prefix(self, seq: SeqPages, limit: int) -> tuple[int, int | None]:
        """(blocks, snapshot): the longest run of cached blocks from the start, ending on a block
        with a snapshot, covering at most `limit` tokens."""
        n = 0
        while n < len(seq.hashes) and (n + 1) * self.block_size <= limit and seq.hashes[n] in self.index:
            n += 1
        while n and seq.hashes[n - 1] not in self.snap_of:
            n -= 1
        return n, (self.snap_of[seq.hashes[n - 1]] if n else None)

    def waits_for_claim(self, seq: SeqPages, limit: int) -> bool:
        """True if another sequence is computing the block right after this one's cached prefix
        (within `limit` tokens): admitting it after that block is cached saves recomputing it."""
        if not self.prefix_cache:
            return False
        n, _ = self._cached_prefix(seq, limit)
        while n < len(seq.hashes) and seq.hashes[n] in self.index:
            n += 1  # cached but past the last snapshot: the claim that matters is further on
        if n >= len(seq.hashes) or (n + 1) * self.block_size > limit:
            return False
        owner = self.claims.get(seq.hashes[n])
        return owner is not None and owner is not seq

    def admit(self, seq: SeqPages, limit: int) -> int | None:
        """Take the longest cached prefix of at most `limit` tokens into `seq`'s block table and
        claim the prompt blocks it will compute. Returns the snapshot to start the Mamba states
        from (None: start from zero); `seq.cached_tokens` says how many tokens it covers."""
        snap = None
        if self.prefix_cache:
            n, snap = self._cached_prefix(seq, limit)
            if limit > 0:
                self.stats.lookups += 1
                self.stats.prompt_tokens += seq.prompt_len
            for h in seq.hashes[:n]:
                b = self.index[h]
                self._ref(b)
                seq.blocks.append(b)
                if h in self.snap_of:
                    self.snap_of.move_to_end(h)
            seq.cached_tokens = n * self.block_size
            seq.committed = n
            if n:
                self.stats.hits += 1
                self.stats.cached_tokens += seq.cached_tokens
            for h in seq.hashes[n:]:
                if h not in self.index and h not in self.claims:
                    self.claims[h] = seq
                    seq.claimed.append(h)
        return snap

    def _ref(self, b: int) -> None:
        if self.refs[b] == 0:
            self.evictable.pop(b, None)
        self.refs[b] += 1

    def can_grow(self, seq: SeqPages, tokens: int) -> bool:
        return blocks_for(tokens, self.block_size) - len(seq.blocks) <= self.available_blocks

    def grow(self, seq: SeqPages, tokens: int) -> list[int]:
        """Give `seq` blocks for `tokens` tokens in all; returns the new block ids (in order)."""
        need = blocks_for(tokens, self.block_size) - len(seq.blocks)
        if need > self.available_blocks:
            raise NoBlocksError(f"need {need} more KV blocks, {self.available_blocks} available")
        new = [self._take_block() for _ in range(max(0, need))]
        seq.blocks.extend(new)
        return new

    def _take_block(self) -> int:
        if self.free_blocks:
            b = self.free_blocks.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)
            self._uncache(b)
            self.stats.evicted_blocks += 1
        self.refs[b] = 1
        return b

    def _uncache(self, b: int) -> None:
        h = self.block_hash.pop(b)
        del self.index[h]
        snap = self.snap_of.pop(h, None)
        if snap is not None:
            self.free_snaps.append(snap)

    def snapshots_for(self, seq: SeqPages, start: int, n: int) -> list[tuple[int, int]]:
        """Snapshots to take while feeding tokens [start, start+n): (offset in the chunk of the
        block's last token, snapshot id), one for each full prompt block that ends in the chunk
        and is not cached yet."""
        if not self.prefix_cache or not self.num_snapshots:
            return []
        out, bs = [], self.block_size
        for j in range(start // bs, min((start + n) // bs, len(seq.hashes))):
            if seq.hashes[j] in self.snap_of or j in seq.snapshots:
                continue
            snap = self._take_snapshot()
            if snap is None:  # every snapshot is being written right now: this block goes without
                break
            seq.snapshots[j] = snap
            out.append(((j + 1) * bs - 1 - start, snap))
        return out

    def _take_snapshot(self) -> int | None:
        if self.free_snaps:
            return self.free_snaps.popleft()
        if not self.snap_of:
            return None
        h, snap = self.snap_of.popitem(last=False)
        self.stats.evicted_snapshots += 1
        return snap

    def commit(self, seq: SeqPages, fed: int) -> None:
        """`seq`'s first `fed` tokens are in the stages' caches now: its full prompt blocks among
        them (with their snapshots) become cache entries."""
        if not self.prefix_cache:
            return
        done = min(fed // self.block_size, len(seq.hashes))
        for j in range(seq.committed, done):
            h, snap = seq.hashes[j], seq.snapshots.pop(j, None)
            if h not in self.index:
                b = seq.blocks[j]
                self.index[h], self.block_hash[b] = b, h
            # else someone else cached this block meanwhile: keep theirs (ours stays private)
            if snap is not None:
                if h in self.snap_of:
                    self.free_snaps.append(snap)
                else:
                    self.snap_of[h] = snap
            if self.claims.get(h) is seq:
                del self.claims[h]
        seq.committed = max(seq.committed, done)

    def release(self, seq: SeqPages) -> None:
        """The sequence is done (or will be replayed): its blocks go back, the cached ones as
        evictable, latest block first in line (a prefix's tail goes before its head)."""
        for h in seq.claimed:
            if self.claims.get(h) is seq:
                del self.claims[h]
        seq.claimed = []
        for snap in seq.snapshots.values():  # never written completely
            self.free_snaps.append(snap)
        seq.snapshots = {}
        for b in reversed(seq.blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.block_hash:
                    self.evictable[b] = None
                else:
                    self.free_blocks.append(b)
        seq.blocks = []
        seq.cached_tokens = seq.committed = 0
