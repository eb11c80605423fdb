"""Per-request sampling: the logits processors, then greedy, temperature, top-k, top-p, seeded.

Sampling runs where the logits are (the last stage), so only token ids travel back. The random
numbers for a request's n-th token come from a generator seeded by (request seed, n) alone, so a
seeded request gives the same tokens whatever else is in its batch, and a request replayed after a
stage failure draws exactly what it would have drawn.

A row's logits go through its processors first, in vLLM's order (each off unless asked for):

    grammar mask        tokens the row's grammar does not allow next become -inf (stages/grammar.py)
    logit_bias          added to the listed tokens' logits
    banned              -inf for EOS and stop ids while the row has fewer than min_tokens tokens
    repetition penalty  transformers': logits of tokens seen in prompt or output divided by the
                        penalty where positive, multiplied where negative
    frequency/presence  OpenAI's: logit -= count * frequency_penalty + (count > 0) * presence_penalty,
                        counts over the row's output

then greedy takes the largest processed logit, and sampling applies temperature, top-k and
top-p in the order transformers uses. Everything a processor needs comes in the row's header
(`Sampling`), worked out by the scheduler from the row's own tokens: replays draw the same.
The log-probabilities returned (the chosen token's and the top alternatives) are the model's, under
the raw distribution, as scoring would report them (vLLM's default, "raw_logprobs").
"""

from __future__ import annotations

import numpy as np
import torch

from .microbatch import Sampling


def token_generator(seed: int, step: int) -> torch.Generator:
    """The generator for the `step`-th sampled token of a request with this seed."""
    g = torch.Generator()
    g.manual_seed((seed * 6364136223846793005 + step * 1442695040888963407 + 1) % 2**63)
    return g


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One id from the distribution `probs` (V,), by inverting its CDF at one uniform number: exact,
    and ~20x faster than torch.multinomial at a 65,536-token vocabulary on CPU (which costs
    ~1.4 ms a row here). Ids of probability 0 are never drawn."""
    cdf = probs.double().cumsum(0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[0] - 1)


def _has_processors(p: Sampling) -> bool:
    return p.mask is not None or bool(p.logit_bias) or bool(p.banned) or p.penalties is not None


def allowed_tokens(mask: bytes, vocab_size: int) -> torch.Tensor:
    """A grammar bitmask as a bool tensor over the vocabulary (ids past the mask are not allowed).
    One numpy call unpacks it: torch's bit ops would be several passes, each waking OpenMP threads."""
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")[:vocab_size]
    if bits.size < vocab_size:
        bits = np.concatenate([bits, np.zeros(vocab_size - bits.size, dtype=np.uint8)])
    return torch.from_numpy(bits.view(np.bool_))


def process_logits(x: torch.Tensor, p: Sampling) -> torch.Tensor:
    """Row logits `x` (V,) float32 through the row's processors, in place; returns `x`."""
    neg_inf = float("-inf")
    if p.mask is not None:
        x.masked_fill_(~allowed_tokens(p.mask, x.shape[-1]).to(x.device), neg_inf)
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias)
        x.index_add_(0, torch.tensor(ids, device=x.device), torch.tensor(bias, dtype=x.dtype, device=x.device))
    if p.banned:
        x[torch.tensor(p.banned, device=x.device)] = neg_inf
    if p.penalties is not None:
        repetition, frequency, presence = p.penalties
        if repetition != 1 and p.seen:
            seen = torch.tensor(p.seen, device=x.device)
            v = x[seen]
            x[seen] = torch.where(v > 0, v / repetition, v * repetition)
        if p.counts and (frequency or presence):
            ids, counts = zip(*p.counts)
            c = torch.tensor(counts, dtype=x.dtype, device=x.device)
            x.index_add_(0, torch.tensor(ids, device=x.device), -(c * frequency + (c > 0).to(x.dtype) * presence))
    return x


Drawn = tuple[list[int], list[float], list[list[tuple[int, float]] | None]]


def sample(logits: torch.Tensor, params: list[Sampling]) -> Drawn:
    """Pick one token per row of `logits` (B, V), row b as params[b] says. Returns the tokens,
    their model log-probabilities, and per row its top_logprobs alternatives (None when not asked)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    processing = [b for b, p in enumerate(params) if _has_processors(p)]
    if processing:
        logits = logits.clone()
        for b in processing:
            process_logits(logits[b], params[b])
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
        tokens.append(draw(torch.softmax(x, dim=-1), token_generator(p.seed, p.step)))
    rows = torch.arange(len(tokens), device=logprobs.device)
    chosen = logprobs[rows, torch.tensor(tokens, device=logprobs.device)].tolist()
    tops: list[list[tuple[int, float]] | None] = [None] * len(params)
    n = max((p.top_logprobs for p in params), default=0)
    if n:
        values, ids = torch.topk(logprobs, min(n, logprobs.shape[-1]), dim=-1)
        values, ids = values.tolist(), ids.tolist()
        for b, p in enumerate(params):
            if p.top_logprobs:
                tops[b] = list(zip(ids[b][: p.top_logprobs], values[b][: p.top_logprobs]))
    return tokens, chosen, tops
