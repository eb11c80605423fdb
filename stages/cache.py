"""The hybrid cache of one stage: sequence slots for the Mamba state, KV blocks for attention.

For each layer the stage holds:

    attention layer:  k, v        (num_blocks + 1, block_size, n_kv_heads, head_dim)   model dtype
    Mamba layer:      conv        (S + 1 + P, d_inner, d_conv - 1)                     model dtype
                      ssm         (S + 1 + P, d_inner, d_state)                        float32

S is the number of sequence slots: every sequence being served owns one, and its Mamba states
live there (a fixed size whatever the context length, which is why Jamba's cache is small).
Attention KV is *paged*: a sequence's keys and values sit in the blocks listed in its row of
`block_tables` (token p in block `block_tables[slot, p // block_size]`, at `p % block_size`),
so memory is taken as tokens arrive and a slot reserves nothing for tokens it never sees.
The P entries after the slots and a scratch entry are Mamba-state snapshots for the prefix cache
(stages/paging.py says which block and snapshot ids a sequence uses; the scan kernels write
snapshots mid-chunk).

Scratch: one more Mamba-state entry (index S, `pad_slot`), one more row of the block table
(row S) and one more KV block (`num_blocks`, the last). A fixed-shape decode step
(stages/decode.py) pads its batch to a size it was compiled for with rows that read and write only
these, so padding never touches a sequence's state.

Blocks are either given by the caller (`set_blocks`; the scheduler decides, so that every
stage of a pipeline agrees) or, with `manage_blocks=True`, taken as a forward needs them from a
BlockManager of the cache's own (stages/paging.py, the one allocator) and returned by `free`:
what direct calls of a stage (tests, warm-up, parity checks) use.

The cache lives outside the layers, so a forward call can mix rows from any slots, and a
stage in a pipeline owns exactly the cache of its own layers. `lengths[slot]` is the number
of tokens the slot has seen; it is the position of the slot's next token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .config import JambaConfig
from .paging import DEFAULT_BLOCK_SIZE, BlockManager, NoBlocksError, SeqPages, blocks_for


class CacheFullError(RuntimeError):
    """No free slot or block, or a sequence would outgrow `max_seq_len`."""


@dataclass
class ForwardBatch:
    """Where each row of a packed forward call reads and writes the cache.

    Rows are packed: row b owns tokens cu_seqlens[b]:cu_seqlens[b+1] of the (T, ...) inputs.
    """

    slots: torch.Tensor  # (B,) int64 slot of each row
    seq_lens: torch.Tensor  # (B,) int64 new tokens of each row
    start_pos: torch.Tensor  # (B,) int64 tokens already cached for each row
    cu_seqlens: torch.Tensor  # (B+1,) int64
    token_pos: torch.Tensor  # (T,) absolute position of each packed token
    token_block: torch.Tensor  # (T,) KV block each packed token is written to
    token_offset: torch.Tensor  # (T,) its place in that block
    block_tables: torch.Tensor  # (B, max blocks of a row in this call) the rows' block tables
    # Mamba snapshots to take (prefix cache): after packed token snap_tok[k], into pool entry snap_dst[k].
    snap_tok: torch.Tensor | None
    snap_dst: torch.Tensor | None
    # Python copies, so layers can loop over rows without device syncs.
    slots_list: list[int]
    seq_lens_list: list[int]
    start_pos_list: list[int]

    @property
    def all_decode(self) -> bool:
        return all(n == 1 for n in self.seq_lens_list)


class DecodeBatch(NamedTuple):
    """Where each row of a fixed-shape decode step (one token per row) reads and writes the cache;
    built inside the compiled step by `HybridCache.decode_batch`."""

    slots: torch.Tensor  # (B,) int64
    positions: torch.Tensor  # (B,) int64 position of each row's token
    block_tables: torch.Tensor  # (B, max_blocks) int64
    token_block: torch.Tensor  # (B,) KV block each token is written to
    token_offset: torch.Tensor  # (B,) its place in that block


class HybridCache:
    def __init__(
        self,
        config: JambaConfig,
        layers: range,
        num_slots: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_blocks: int | None = None,
        num_snapshots: int = 0,
        manage_blocks: bool = True,
    ) -> None:
        if num_slots < 1 or max_seq_len < 1 or block_size < 1 or num_snapshots < 0:
            raise ValueError("num_slots, max_seq_len and block_size must be positive, num_snapshots >= 0")
        self.config, self.layers = config, layers
        self.num_slots, self.max_seq_len, self.block_size = num_slots, max_seq_len, block_size
        self.max_blocks = blocks_for(max_seq_len, block_size)  # block table width
        # Default: as many blocks as contiguous slots of max_seq_len would take (no saving, no waiting).
        self.num_blocks = num_slots * self.max_blocks if num_blocks is None else num_blocks
        if self.num_blocks < 1:
            raise ValueError("num_blocks must be positive")
        self.num_snapshots = num_snapshots
        self.dtype, self.device = dtype, torch.device(device)
        c, pool = config, num_slots + 1 + num_snapshots
        self.pad_slot = num_slots  # scratch (see the module's docstring)
        self.snapshot_base = num_slots + 1  # snapshot n's Mamba states are at this + n
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        for i in layers:
            if c.is_attention(i):
                # Zeroed, not empty: a batched decode reads (masked) keys past a row's length,
                # and uninitialised memory may hold NaN, which survives a zero attention weight.
                shape = (self.num_blocks + 1, block_size, c.num_key_value_heads, c.head_dim)
                self.k[i] = torch.zeros(shape, dtype=dtype, device=self.device)
                self.v[i] = torch.zeros(shape, dtype=dtype, device=self.device)
            else:
                self.conv[i] = torch.zeros(pool, c.mamba_d_inner, c.mamba_d_conv - 1, dtype=dtype, device=self.device)
                self.ssm[i] = torch.zeros(pool, c.mamba_d_inner, c.mamba_d_state, dtype=torch.float32, device=self.device)
        # Unset entries point at block 0: reads past a row's length are masked, writes never go there.
        # The scratch row points at the scratch block only.
        self.block_tables = torch.zeros(num_slots + 1, self.max_blocks, dtype=torch.long, device=self.device)
        self.block_tables[self.pad_slot] = self.num_blocks
        self.table_lens = [0] * num_slots  # block table entries set per slot
        # manage_blocks: the blocks of each slot's sequence, taken from a pool of the cache's own
        self._pages = BlockManager(self.num_blocks, block_size, 0, prefix_cache=False) if manage_blocks else None
        self._seqs: dict[int, SeqPages] = {}
        self.lengths = [0] * num_slots
        self._free = set(range(num_slots))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for d in (self.k, self.v, self.conv, self.ssm) for t in d.values())

    # ---- slot management ------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self, slot: int | None = None) -> int:
        """Take a free slot (a given one, so pipeline stages can agree on numbering) and reset it."""
        if slot is None:
            if not self._free:
                raise CacheFullError(f"all {self.num_slots} cache slots are in use")
            slot = min(self._free)
        elif slot not in self._free:
            raise CacheFullError(f"slot {slot} is not free (or out of range 0..{self.num_slots - 1})")
        self._free.remove(slot)
        self.reset(slot)
        return slot

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range 0..{self.num_slots - 1}")
        self._free.add(slot)
        self.lengths[slot] = 0
        if self._pages is not None and slot in self._seqs:
            self._pages.release(self._seqs.pop(slot))
        self.table_lens[slot] = 0

    def reset(self, slot: int) -> None:
        """Forget a slot's sequence (the Mamba states must restart from zero; KV is overwritten)."""
        for t in self.conv.values():
            t[slot].zero_()
        for t in self.ssm.values():
            t[slot].zero_()
        self.lengths[slot] = 0

    # ---- blocks and snapshots ---------------------------------------------------------------
    def set_blocks(self, slot: int, index: int, blocks: list[int]) -> None:
        """Entries index.. of the slot's block table (the caller manages blocks)."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        if not 0 <= index <= self.table_lens[slot] or index + len(blocks) > self.max_blocks:
            raise ValueError(f"slot {slot}: block table entries {index}..{index + len(blocks)} leave a gap or "
                             f"exceed {self.max_blocks} blocks (max_seq_len {self.max_seq_len})")
        if any(not 0 <= b < self.num_blocks for b in blocks):
            raise ValueError(f"block id out of range 0..{self.num_blocks - 1}: {blocks}")
        if blocks:
            self.block_tables[slot, index:index + len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        self.table_lens[slot] = max(self.table_lens[slot], index + len(blocks))

    def restore(self, slot: int, snapshot: int, length: int) -> None:
        """Start the slot's Mamba states from a snapshot taken after `length` tokens (a cached
        prefix whose KV blocks are already in the slot's block table)."""
        if not 0 <= snapshot < self.num_snapshots:
            raise ValueError(f"snapshot {snapshot} out of range 0..{self.num_snapshots - 1}")
        if slot in self._free or length > self.table_lens[slot] * self.block_size:
            raise ValueError(f"slot {slot} is not allocated or has no blocks for its {length} cached tokens")
        src = self.snapshot_base + snapshot
        for t in list(self.conv.values()) + list(self.ssm.values()):
            t[slot] = t[src]
        self.lengths[slot] = length

    def _grow(self, slot: int, tokens: int) -> None:
        seq = self._seqs.setdefault(slot, SeqPages([], 0))
        have = len(seq.blocks)
        try:
            self.set_blocks(slot, have, self._pages.grow(seq, tokens))
        except NoBlocksError as e:
            raise CacheFullError(f"slot {slot}: {e}") from None

    # ---- forward bookkeeping --------------------------------------------------------------
    def _check_rows(self, slots: list[int], seq_lens: list[int]) -> list[int]:
        """Check a call's rows against the slots' state (taking blocks when the cache manages them);
        returns each row's start position."""
        if len(slots) != len(seq_lens) or not slots:
            raise ValueError("slots and seq_lens must be non-empty and of equal length")
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one forward call: {slots}")
        start = []
        for s, n in zip(slots, seq_lens):
            if not 0 <= s < self.num_slots or s in self._free:
                raise ValueError(f"slot {s} is not allocated")
            if n < 1:
                raise ValueError(f"row for slot {s} has {n} new tokens; need at least 1")
            if self.lengths[s] + n > self.max_seq_len:
                raise CacheFullError(
                    f"slot {s}: {self.lengths[s]} cached + {n} new tokens exceeds max_seq_len {self.max_seq_len}"
                )
            if self._pages is not None:
                self._grow(s, self.lengths[s] + n)
            elif self.lengths[s] + n > self.table_lens[s] * self.block_size:
                raise CacheFullError(f"slot {s}: blocks for {self.table_lens[s] * self.block_size} tokens, "
                                     f"needs {self.lengths[s] + n}")
            start.append(self.lengths[s])
        return start

    def begin(self, slots: list[int], seq_lens: list[int],
              snapshots: list[list[tuple[int, int]]] | None = None) -> ForwardBatch:
        """Describe a forward call; checks the rows against the slots' state before any write.
        snapshots[b]: (offset of a token in row b, snapshot id) to copy the Mamba states into."""
        start = self._check_rows(slots, seq_lens)
        dev = self.device
        slots_t = torch.tensor(slots, dtype=torch.long, device=dev)
        lens_t = torch.tensor(seq_lens, dtype=torch.long, device=dev)
        start_t = torch.tensor(start, dtype=torch.long, device=dev)
        cu = torch.zeros(len(slots) + 1, dtype=torch.long, device=dev)
        torch.cumsum(lens_t, 0, out=cu[1:])
        # position of token j of row b = start[b] + j
        offsets = torch.arange(int(cu[-1]), device=dev) - torch.repeat_interleave(cu[:-1], lens_t)
        token_pos = torch.repeat_interleave(start_t, lens_t) + offsets
        nb = blocks_for(max(s + n for s, n in zip(start, seq_lens)), self.block_size)
        tables = self.block_tables[slots_t, :nb]  # (B, nb)
        token_row = torch.repeat_interleave(torch.arange(len(slots), device=dev), lens_t)
        token_block = tables[token_row, token_pos // self.block_size]
        snap_tok = snap_dst = None
        if snapshots and any(snapshots):
            tok, dst, cu_host = [], [], [0]
            for n in seq_lens:
                cu_host.append(cu_host[-1] + n)
            for b, snaps in enumerate(snapshots):
                for off, snap in sorted(snaps or []):
                    if not 0 <= off < seq_lens[b] or not 0 <= snap < self.num_snapshots:
                        raise ValueError(f"row {b}: snapshot ({off}, {snap}) out of range")
                    tok.append(cu_host[b] + off)
                    dst.append(self.snapshot_base + snap)
            if len(set(dst)) != len(dst):
                raise ValueError("a snapshot is written twice in one forward call")
            snap_tok = torch.tensor(tok, dtype=torch.long, device=dev)
            snap_dst = torch.tensor(dst, dtype=torch.long, device=dev)
        return ForwardBatch(slots_t, lens_t, start_t, cu, token_pos, token_block, token_pos % self.block_size,
                            tables, snap_tok, snap_dst, list(slots), list(seq_lens), start)

    def commit(self, batch: ForwardBatch) -> None:
        for s, n in zip(batch.slots_list, batch.seq_lens_list):
            self.lengths[s] += n

    # ---- the fixed-shape decode step (stages/decode.py) ---------------------------------------
    def begin_decode(self, slots: list[int]) -> list[int]:
        """Check a decode step (one new token per row) as `begin` would; returns the positions."""
        return self._check_rows(slots, [1] * len(slots))

    def decode_batch(self, slots: torch.Tensor, positions: torch.Tensor) -> "DecodeBatch":
        """Where each row of a decode step reads and writes, from tensors only (no host sync):
        slots (B,) int64 (pad rows: `pad_slot`), positions (B,) int64 (pad rows: 0)."""
        tables = self.block_tables[slots]  # (B, max_blocks)
        token_block = tables.gather(1, (positions // self.block_size)[:, None])[:, 0]
        return DecodeBatch(slots, positions, tables, token_block, positions % self.block_size)

    def commit_decode(self, slots: list[int]) -> None:
        for s in slots:
            self.lengths[s] += 1
