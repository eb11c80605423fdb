"""Single-process generate / score / classify on one full-model stage.

This is the reference every distributed path (Ray pipeline, gRPC service, batch jobs) must match.
It already batches like the pipeline does: each step packs the decode rows of running sequences
and chunks of waiting prompts under a token budget into one forward call.

`SequenceState` (stages/sequence.py: one request's progress and its stop rules) is shared with the
pipeline scheduler.
"""

from __future__ import annotations

import torch

from .cache import DEFAULT_BLOCK_SIZE, HybridCache
from .model import JambaStage
from .paging import BlockManager, SeqPages, blocks_for
from .sampling import sample, token_generator
from .sequence import GenerationResult, SamplingParams, SequenceState, pooling_position  # noqa: F401  (re-exported)


class _CallCache:
    """One call's paged cache and its bookkeeping: blocks enough for every sequence at its full
    length (so nothing ever waits for blocks) and a snapshot for every full prompt block, so
    prompts of one call that share a prefix prefill it once (stages/paging.py)."""

    def __init__(self, stage: JambaStage, prompts: list[list[int]], extra: list[int], num_slots: int,
                 prefix_cache: bool, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        num_blocks = sum(blocks_for(len(p) + e, block_size) for p, e in zip(prompts, extra))
        snaps = sum(len(p) // block_size for p in prompts) if prefix_cache else 0
        max_len = max(len(p) + e for p, e in zip(prompts, extra))
        self.cache: HybridCache = stage.make_cache(min(num_slots, len(prompts)), max_len, block_size=block_size,
                                                   num_blocks=num_blocks, num_snapshots=snaps, manage_blocks=False)
        self.pages = BlockManager(num_blocks, block_size, snaps, prefix_cache=prefix_cache)
        self.seqs: dict[int, SeqPages] = {}  # slot -> its pages

    def admit(self, prompt: list[int], limit: int) -> tuple[int, int] | None:
        """(slot, tokens already cached), or None: wait for a prefix another sequence is computing."""
        seq = self.pages.new_sequence(prompt)
        if self.pages.waits_for_claim(seq, limit):
            return None
        snap = self.pages.admit(seq, limit)
        slot = self.cache.allocate()
        self.seqs[slot] = seq
        if snap is not None:
            self.cache.set_blocks(slot, 0, seq.blocks)
            self.cache.restore(slot, snap, seq.cached_tokens)
        return slot, seq.cached_tokens

    def feed(self, slot: int, start: int, n: int) -> list[tuple[int, int]]:
        """Blocks for tokens [start, start+n) of the slot; returns the snapshots to take."""
        seq = self.seqs[slot]
        have = len(seq.blocks)
        self.cache.set_blocks(slot, have, self.pages.grow(seq, start + n))
        return self.pages.snapshots_for(seq, start, n)

    def commit(self, slot: int, fed: int) -> None:
        self.pages.commit(self.seqs[slot], fed)

    def free(self, slot: int) -> None:
        self.pages.release(self.seqs.pop(slot))
        self.cache.free(slot)


class LocalRunner:
    """Runs requests through one `JambaStage` holding the whole model, in this process.

    prefix_cache: prompts of one call that share a prefix of full blocks prefill it once (the
    answers are the same either way; tests/test_prefix_cache.py checks it)."""

    def __init__(self, stage: JambaStage, tokenizer=None, num_slots: int = 16, max_batch_tokens: int = 2048,
                 prefix_cache: bool = True, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if not (stage.is_first and stage.is_last):
            raise ValueError("LocalRunner needs a stage that holds the whole model")
        self.stage, self.tokenizer = stage, tokenizer
        self.config = stage.config
        self.num_slots, self.max_batch_tokens = num_slots, max_batch_tokens
        self.prefix_cache, self.block_size = prefix_cache, block_size
        self.max_seq_len = stage.config.max_position_embeddings

    # ---- validation -----------------------------------------------------------------------
    def check_tokens(self, ids: list[int], what: str = "input_ids") -> None:
        if not ids:
            raise ValueError(f"{what} is empty")
        V = self.config.vocab_size
        bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < V]
        if bad:
            raise ValueError(f"{what} has token ids out of range [0, {V}): {bad[:5]}")

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        for ids, p in zip(prompts, params):
            self.check_tokens(ids)
            p.validate(self.config.vocab_size)
        eos = self.config.eos_token_ids
        waiting = [SequenceState(list(ids), p, eos, self.tokenizer) for ids, p in zip(prompts, params)]
        calls = _CallCache(self.stage, prompts, [p.max_new_tokens for p in params], self.num_slots, self.prefix_cache,
                           self.block_size)
        cache, cached = calls.cache, {}
        queue, running = list(waiting), []
        while queue or running:
            held = []
            while queue and cache.free_slots:
                s = queue.pop(0)
                got = calls.admit(s.prompt, len(s.prompt) - 1)
                if got is None:
                    held.append(s)
                    continue
                s.slot, s.fed = got
                cached[id(s)] = s.fed
                running.append(s)
            queue[:0] = held
            # Decode rows first (one token each), then prompt chunks up to the token budget.
            rows, budget = [], self.max_batch_tokens
            for s in sorted(running, key=lambda s: len(s.pending) > 1):
                n = min(len(s.pending), budget)
                if n == 0:
                    break
                rows.append((s, n))
                budget -= n
            ids = torch.tensor([t for s, n in rows for t in s.pending[:n]], dtype=torch.long)
            snaps = [calls.feed(s.slot, s.fed, n) for s, n in rows]
            logits = self.stage(ids, cache, [s.slot for s, _ in rows], [n for _, n in rows], snapshots=snaps)
            # Only rows that reached the end of their pending tokens sample a new token.
            ready = [(i, s) for i, (s, n) in enumerate(rows) if n == len(s.pending)]
            for s, n in rows:
                s.fed += n
                calls.commit(s.slot, s.fed)
            if ready:
                idx = torch.tensor([i for i, _ in ready])
                toks, lps = sample(logits[idx], [s.params for _, s in ready], [token_generator(s.seed, len(s.output_ids)) for _, s in ready])
                for (_, s), t, lp in zip(ready, toks, lps):
                    if s.add_token(t, lp):
                        calls.free(s.slot)
                        running.remove(s)
        results = [s.result() for s in waiting]
        for s, r in zip(waiting, results):
            r.cached_tokens = cached[id(s)]
        return results

    # ---- scoring and classification -------------------------------------------------------
    def _prefill(self, prompts: list[list[int]], want, limit) -> list[list[torch.Tensor]]:
        """Feed whole prompts through in chunks; `want(i, start, n)` gives the positions of
        prompt i's chunk [start, start+n) whose head outputs to keep. Returns them per prompt.
        `limit(i)`: how many of prompt i's tokens a cached prefix may cover."""
        for ids in prompts:
            self.check_tokens(ids)
        calls = _CallCache(self.stage, prompts, [0] * len(prompts), self.num_slots, self.prefix_cache, self.block_size)
        cache = calls.cache
        outputs: list[list[torch.Tensor]] = [[] for _ in prompts]
        todo = list(range(len(prompts)))
        fed = [0] * len(prompts)
        active: dict[int, int] = {}  # prompt -> slot
        while todo or active:
            held = []
            while todo and cache.free_slots:
                i = todo.pop(0)
                got = calls.admit(prompts[i], limit(i))
                if got is None:
                    held.append(i)
                    continue
                active[i], fed[i] = got
            todo[:0] = held
            rows, budget = [], self.max_batch_tokens
            for i in active:
                n = min(len(prompts[i]) - fed[i], budget)
                if n == 0:
                    break
                rows.append((i, n))
                budget -= n
            ids = torch.tensor([t for i, n in rows for t in prompts[i][fed[i] : fed[i] + n]], dtype=torch.long)
            index, owners, base = [], [], 0
            for i, n in rows:
                keep = want(i, fed[i], n)
                index += [base + k for k in keep]
                owners += [i] * len(keep)
                base += n
            snaps = [calls.feed(active[i], fed[i], n) for i, n in rows]
            out = self.stage(ids, cache, [active[i] for i, _ in rows], [n for _, n in rows],
                             output_index=torch.tensor(index, dtype=torch.long), snapshots=snaps)
            for o, i in zip(out, owners):
                outputs[i].append(o)
            for i, n in rows:
                fed[i] += n
                calls.commit(active[i], fed[i])
                if fed[i] == len(prompts[i]):
                    calls.free(active.pop(i))
        return outputs

    def score(self, prompts: list[list[int]]) -> list[list[float | None]]:
        """token_logprobs[i] = log p(token i | tokens < i); None for the first token."""
        outs = self._prefill(prompts, lambda i, start, n: list(range(n)), lambda i: 0)  # needs every position
        result = []
        for ids, logits in zip(prompts, outs):
            lp = torch.log_softmax(torch.stack(logits).float(), dim=-1).cpu()  # (L, V)
            nxt = torch.tensor(ids[1:], dtype=torch.long)
            result.append([None] + lp[:-1].gather(-1, nxt[:, None])[:, 0].tolist())
        return result

    def classify(self, prompts: list[list[int]]) -> list[list[float]]:
        """Logits pooled at the last non-pad token, as JambaForSequenceClassification does."""
        if self.stage.head != "classification":
            raise ValueError("this checkpoint has no sequence-classification head")
        pool = [pooling_position(ids, self.config.pad_token_id) for ids in prompts]
        outs = self._prefill(prompts, lambda i, start, n: [pool[i] - start] if start <= pool[i] < start + n else [],
                             lambda i: pool[i])
        return [o[0].float().tolist() for o in outs]
