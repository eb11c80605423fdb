"""Per-request sampling: greedy, temperature, top-k, top-p, seeded.

Sampling runs where the logits are (the last stage), so only token ids travel back. The random
numbers for a request's n-th token come from a generator seeded by (request seed, n) alone, so a
seeded request gives the same tokens whatever else is in its batch, and a request replayed after a
stage failure draws exactly what it would have drawn. Logits are processed in the order
transformers uses: temperature, top-k, top-p.
"""

from __future__ import annotations

import torch

from .microbatch import Sampling


def token_generator(seed: int, step: int) -> torch.Generator:
    """The generator for the `step`-th sampled token of a request with this seed."""
    g = torch.Generator()
    g.manual_seed((seed * 6364136223846793005 + step * 1442695040888963407 + 1) % 2**63)
    return g


def sample(logits: torch.Tensor, params: list[Sampling]) -> tuple[list[int], list[float]]:
    """Pick one token per row of `logits` (B, V), row b as params[b] says. Returns the tokens and
    their model log-probabilities (under the raw distribution, before temperature and truncation,
    as scoring would report them)."""
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
        tokens.append(int(torch.multinomial(probs, 1, generator=token_generator(p.seed, p.step))))
    chosen = logprobs[torch.arange(len(tokens), device=logprobs.device), torch.tensor(tokens, device=logprobs.device)].tolist()
    return tokens, chosen
