"""Per-request sampling: greedy, temperature, top-k, top-p, seeded.

Sampling runs where the logits are (the last stage), so only token ids travel back. The random
numbers for a request's n-th token come from a generator seeded by (request seed, n) alone, so a
seeded request gives the same tokens whatever else is in its batch, and a request replayed after a
stage failure draws exactly what it would have drawn. Logits are processed in the order
transformers uses: temperature, top-k, top-p.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (output text is cut before them)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False  # return log p(token) of each sampled token
    ignore_eos: bool = False

    MAX_STOP = 64
    MAX_STOP_LEN = 512

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the offending field."""

        def bad(name: str, why: str, value: object) -> None:
            raise ValueError(f"{name} {why} (got {value!r})")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be a positive integer", self.max_new_tokens)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or math.isinf(t) or t < 0:
            bad("temperature", "must be a finite number >= 0", t)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0", self.top_k)
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not 0 < p <= 1:
            bad("top_p", "must be in (0, 1]", p)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            bad("seed", "must be an integer in [0, 2**63)", self.seed)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a list of non-empty strings", self.stop)
        if len(self.stop) > self.MAX_STOP or any(len(s) > self.MAX_STOP_LEN for s in self.stop):
            bad("stop", f"allows at most {self.MAX_STOP} strings of at most {self.MAX_STOP_LEN} characters", f"{len(self.stop)} strings")
        ids = self.stop_token_ids
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            bad("stop_token_ids", "must be a list of integers", ids)
        if len(ids) > 1024:
            bad("stop_token_ids", "allows at most 1024 ids", f"{len(ids)} ids")
        if any(not 0 <= i < vocab_size for i in ids):
            bad("stop_token_ids", f"must be token ids in [0, {vocab_size})", [i for i in ids if not 0 <= i < vocab_size][:5])

    def resolved_seed(self) -> int:
        """The request's seed: the given one, or a fresh random one for an unseeded request."""
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1


def token_generator(seed: int, step: int) -> torch.Generator:
    """The generator for the `step`-th sampled token of a request with this seed."""
    g = torch.Generator()
    g.manual_seed((seed * 6364136223846793005 + step * 1442695040888963407 + 1) % 2**63)
    return g


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> tuple[list[int], list[float]]:
    """Pick one token per row of `logits` (B, V). Returns the tokens and their model log-probabilities
    (under the raw distribution, before temperature and truncation, as scoring would report them)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, p in enumerate(params):
        if p.temperature == 0:
            tokens.append(greedy[row])
            continue
        x = logits[row].cpu() / p.temperature  # the generators are CPU generators (reproducible anywhere)
        if 0 < p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=False)
            cum = sorted_x.softmax(-1).cumsum(-1)
            # Drop the low tail whose mass is <= 1 - top_p; always keep the most likely token.
            drop = cum <= 1 - p.top_p
            drop[-1] = False
            x = x.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(x, dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=generators[row])))
    chosen = logprobs[torch.arange(len(tokens), device=logprobs.device), torch.tensor(tokens, device=logprobs.device)].tolist()
    return tokens, chosen
