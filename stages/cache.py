"""The hybrid cache of one stage: a fixed pool of sequence slots.

Every sequence being served owns one slot. For each layer the stage holds:

    attention layer:  k, v        (S, max_seq_len, n_kv_heads, head_dim)   model dtype
    Mamba layer:      conv        (S, d_inner, d_conv - 1)                 model dtype
                      ssm         (S, d_inner, d_state)                    float32

S is the number of slots. A Mamba layer's state has a fixed size whatever the context length,
which is why Jamba's cache is small: only one layer in `attn_layer_period` grows with context.

The cache lives outside the layers, so a forward call can mix rows from any slots, and a
stage in a pipeline owns exactly the cache of its own layers. `lengths[slot]` is the number
of tokens the slot has seen; it is the position of the slot's next token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import JambaConfig


class CacheFullError(RuntimeError):
    """No free slot, or a sequence would outgrow `max_seq_len`."""


@dataclass
class ForwardBatch:
    """Where each row of a packed forward call reads and writes the cache.

    Rows are packed: row b owns tokens cu_seqlens[b]:cu_seqlens[b+1] of the (T, ...) inputs.
    """

    slots: torch.Tensor  # (B,) int64 slot of each row
    seq_lens: torch.Tensor  # (B,) int64 new tokens of each row
    start_pos: torch.Tensor  # (B,) int64 tokens already cached for each row
    cu_seqlens: torch.Tensor  # (B+1,) int64
    token_slot: torch.Tensor  # (T,) slot of each packed token
    token_pos: torch.Tensor  # (T,) absolute position of each packed token
    # Python copies, so layers can loop over rows without device syncs.
    slots_list: list[int]
    seq_lens_list: list[int]
    start_pos_list: list[int]

    @property
    def all_decode(self) -> bool:
        return all(n == 1 for n in self.seq_lens_list)


class HybridCache:
    def __init__(
        self,
        config: JambaConfig,
        layers: range,
        num_slots: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError("num_slots and max_seq_len must be positive")
        self.config, self.layers = config, layers
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self.dtype, self.device = dtype, torch.device(device)
        c = config
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        for i in layers:
            if c.is_attention(i):
                # Zeroed, not empty: a batched decode reads (masked) keys past a row's length,
                # and uninitialised memory may hold NaN, which survives a zero attention weight.
                shape = (num_slots, max_seq_len, c.num_key_value_heads, c.head_dim)
                self.k[i] = torch.zeros(shape, dtype=dtype, device=self.device)
                self.v[i] = torch.zeros(shape, dtype=dtype, device=self.device)
            else:
                self.conv[i] = torch.zeros(num_slots, c.mamba_d_inner, c.mamba_d_conv - 1, dtype=dtype, device=self.device)
                self.ssm[i] = torch.zeros(num_slots, c.mamba_d_inner, c.mamba_d_state, dtype=torch.float32, device=self.device)
        self.lengths = [0] * num_slots
        self._free = set(range(num_slots))

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

    def reset(self, slot: int) -> None:
        """Forget a slot's sequence (the Mamba states must restart from zero; KV is overwritten)."""
        for t in self.conv.values():
            t[slot].zero_()
        for t in self.ssm.values():
            t[slot].zero_()
        self.lengths[slot] = 0

    # ---- forward bookkeeping --------------------------------------------------------------
    def begin(self, slots: list[int], seq_lens: list[int]) -> ForwardBatch:
        """Describe a forward call; checks the rows against the slots' state before any write."""
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
            start.append(self.lengths[s])
        dev = self.device
        slots_t = torch.tensor(slots, dtype=torch.long, device=dev)
        lens_t = torch.tensor(seq_lens, dtype=torch.long, device=dev)
        start_t = torch.tensor(start, dtype=torch.long, device=dev)
        cu = torch.zeros(len(slots) + 1, dtype=torch.long, device=dev)
        torch.cumsum(lens_t, 0, out=cu[1:])
        token_slot = torch.repeat_interleave(slots_t, lens_t)
        # position of token j of row b = start[b] + j
        offsets = torch.arange(int(cu[-1]), device=dev) - torch.repeat_interleave(cu[:-1], lens_t)
        token_pos = torch.repeat_interleave(start_t, lens_t) + offsets
        return ForwardBatch(slots_t, lens_t, start_t, cu, token_slot, token_pos, list(slots), list(seq_lens), start)

    def commit(self, batch: ForwardBatch) -> None:
        for s, n in zip(batch.slots_list, batch.seq_lens_list):
            self.lengths[s] += n

    # ---- sizing (used by the planner) -----------------------------------------------------
    @staticmethod
    def bytes_per_slot(config: JambaConfig, layers: range, max_seq_len: int, dtype_bytes: int = 2) -> int:
        c, total = config, 0
        for i in layers:
            if c.is_attention(i):
                total += 2 * max_seq_len * c.num_key_value_heads * c.head_dim * dtype_bytes
            else:
                total += c.mamba_d_inner * (c.mamba_d_conv - 1) * dtype_bytes + c.mamba_d_inner * c.mamba_d_state * 4
        return total
