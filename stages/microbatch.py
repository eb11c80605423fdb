"""The microbatch header: what the scheduler tells every stage about one microbatch, and what the
last stage answers. Built by the scheduler (cluster/runtime/scheduler.py), read by the stage
worker (stages/worker.py), carried as bytes by the data plane (cluster/runtime/dataplane.py and
stage_endpoint.py), which forwards it unchanged from stage to stage. Encoding and decoding live
here and nowhere else. No torch: the scheduler's process (a Serve replica) imports this.

Before the forward, every stage applies the cache operations in this order: free slots, allocate
slots, extend block tables, restore Mamba states from snapshots. Then it runs the rows, packed:
row b owns the next `rows[b].num_tokens` tokens of the microbatch's input, and writes them to
cache slot `rows[b].slot`. What the last stage returns for a row is the row's `want`:

    Want.NOTHING   None                  a prompt chunk that is not the prompt's last
    Want.TOKEN     (token id, logprob)   one token sampled at the row's last position with
                   or (id, lp, top)      `sampling` (stages/sampling.py); `top`, [(id, logprob)]
                                         most likely first, when sampling.top_logprobs > 0
    Want.SCORES    [logprob or None]     log p(targets[j] | tokens up to j) at each position j
                                         (None where the target is None)
    Want.LOGITS    [logit, ...]          the head's output at `position` (classification)

Logits never leave the last stage; only these small answers travel back. stages/paging.py
explains blocks, restores and snapshots (the paged KV cache and the prefix cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple, Union

import msgpack


class Want(IntEnum):
    """What the last stage returns for a row."""

    NOTHING = 0
    TOKEN = 1
    SCORES = 2
    LOGITS = 3


class Sampling(NamedTuple):
    """How to draw one token: the request's sampling parameters, and (seed, step), which pick the
    random numbers (stages/sampling.py: the n-th token of a request always draws the same ones).
    The fields after `step` are the logits processors, None when off; what depends on the row's
    tokens (the grammar's mask, the penalties' token counts) the scheduler works out for this
    step, so the last stage keeps no state per request."""

    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float  # 1 = off
    seed: int
    step: int  # index of the token being drawn among the request's outputs
    top_logprobs: int = 0  # also answer the this-many most likely tokens
    mask: bytes | None = None  # the grammar's allowed tokens: bit t % 32 of little-endian int32 word t // 32
    logit_bias: list[tuple[int, float]] | None = None
    banned: list[int] | None = None  # ids that may not be drawn yet (EOS and stop ids before min_tokens)
    penalties: tuple[float, float, float] | None = None  # (repetition, frequency, presence)
    seen: list[int] | None = None  # repetition penalty: the distinct ids of prompt and output
    counts: list[tuple[int, int]] | None = None  # frequency/presence penalties: (id, count) over the output


class Row(NamedTuple):
    slot: int
    num_tokens: int
    want: Want = Want.NOTHING
    sampling: Sampling | None = None  # Want.TOKEN
    targets: list[int | None] | None = None  # Want.SCORES: one per position
    position: int | None = None  # Want.LOGITS: a position in the row


class BlockTableUpdate(NamedTuple):
    """Entries index, index+1, ... of a slot's block table."""

    slot: int
    index: int
    blocks: list[int]


class Restore(NamedTuple):
    """Start a slot's Mamba states from a snapshot taken after `num_tokens` tokens (a cached prefix
    whose KV blocks are already in the slot's block table)."""

    slot: int
    snapshot: int
    num_tokens: int


class TakeSnapshot(NamedTuple):
    """Copy row `row`'s Mamba states after its token `offset` into snapshot `snapshot`."""

    row: int
    offset: int
    snapshot: int


@dataclass
class Microbatch:
    rows: list[Row] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    alloc: list[int] = field(default_factory=list)
    blocks: list[BlockTableUpdate] = field(default_factory=list)
    restore: list[Restore] = field(default_factory=list)
    snapshots: list[TakeSnapshot] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    def snapshots_by_row(self) -> list[list[tuple[int, int]]] | None:
        """(offset, snapshot) pairs for each row, as stages/model.py takes them; None if there are none."""
        if not self.snapshots:
            return None
        out: list[list[tuple[int, int]]] = [[] for _ in self.rows]
        for s in self.snapshots:
            out[s.row].append((s.offset, s.snapshot))
        return out

    # ---- the wire format: msgpack arrays in field order (NamedTuples pack as arrays) ----------
    def encode(self) -> bytes:
        return msgpack.packb([self.rows, self.free, self.alloc, self.blocks, self.restore, self.snapshots])

    @classmethod
    def decode(cls, data: bytes) -> "Microbatch":
        rows, free, alloc, blocks, restore, snapshots = msgpack.unpackb(data)
        # Every stage decodes every header: a comprehension, Want by index, and the rows and their
        # sampling made with tuple.__new__ (a NamedTuple's own __new__ is a Python call with
        # defaults to fill, and `encode` always writes every field) keep it to ~0.6 us a row
        # (32 rows: 18 us, against 27 us with Row(...) and Sampling(*sampling)).
        rows = [_tuple(Row, (slot, n, _WANTS[want], None if sampling is None else _tuple(Sampling, sampling), targets,
                             position))
                for slot, n, want, sampling, targets, position in rows]
        return cls(rows, free, alloc, [BlockTableUpdate(*b) for b in blocks], [Restore(*r) for r in restore],
                   [TakeSnapshot(*s) for s in snapshots])


_WANTS = tuple(Want)  # Want(i) is _WANTS[i], without the enum's call
_tuple = tuple.__new__  # _tuple(Row, fields) is Row(*fields), without the call to Row.__new__


# What the last stage returns for each row, in row order (see the module docstring).
Answer = Union[None, tuple[int, float], list]


def encode_answers(answers: list[Answer]) -> bytes:
    return msgpack.packb(answers)


def decode_answers(data: bytes) -> list[Answer]:
    return msgpack.unpackb(data)
