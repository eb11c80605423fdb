"""The scheduler: continuous batching over P stages with microbatches in flight. It is the one
scheduler: a Ray pipeline of P stages and the single process (one stage, depth 1) both run on it.

It owns the slot numbering for every stage (stage caches are identical pools, so one slot id
names a sequence's state on all of them), admits requests into free slots, and keeps up to
`depth` microbatches in flight (depth >= P keeps every stage busy: while stage 2 runs microbatch
k, stage 1 runs microbatch k+1). A request is in at most one in-flight microbatch, since its next
token depends on the last one.

Each microbatch mixes decode rows (one token each) and prompt chunks under a token budget.
Decode rows are split evenly over the in-flight microbatches so each stage gets equal work.
Slot allocations and frees ride in the next microbatch's header, so they cost no extra calls.

The scheduler knows nothing of Ray, gRPC or the transport: it is given `send(microbatch,
token_ids) -> awaitable answers`, which runs one microbatch through every stage, over the data
plane (cluster/runtime/dataplane.py) or in this process (local.py). The microbatch header is
typed (stages/microbatch.py); what encodes it is the transport's business. Requests arrive
checked, from the intake (intake.py), and are trusted here.

It also owns the stages' KV blocks and Mamba snapshots (stages/paging.py:BlockManager): a
request is admitted when a slot is free and the blocks its prompt needs are available, takes
its cached prefix from the prefix cache on admission, and gets blocks as its tokens arrive.
When a running request needs a block and none is left, the most recently admitted request not
in flight is *preempted*: its slot and blocks are given back and it waits to be replayed.

Replay (after a preemption, and for every live request after a recovery) prefills the prompt
plus the tokens produced so far again (through the prefix cache, so usually only a few blocks).
Sampling is a pure function of (seed, token index), so the continuation is exactly what an
undisturbed run would have produced; streams only see a pause.

Recovery: when a microbatch fails because a stage died, the scheduler stops issuing work, lets
the other in-flight microbatches settle, awaits `recover()` (the pipeline brings its stages
back), forgets the prefix cache (a restarted stage's pools are empty) and replays every live
request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncIterator, Awaitable, Callable

from stages.grammar import Masks
from stages.microbatch import Answer, BlockTableUpdate, Microbatch, Restore, Row, TakeSnapshot, Want
from stages.paging import BlockManager, SeqPages
from stages.sequence import GenerationResult, SequenceState

from .intake import ClassifyRequest, GenerateRequest, ScoreRequest

log = logging.getLogger(__name__)

Send = Callable[[Microbatch, array], Awaitable[list[Answer]]]  # (header, token ids as int64) -> one answer a row


class QueueFullError(RuntimeError):
    """Every slot is taken and the waiting queue is at its bound. `retry_after` (seconds) is the
    scheduler's estimate of when a retry could be admitted."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerClosedError(RuntimeError):
    pass


class DeadlineExceededError(TimeoutError):
    """The request's deadline passed before it finished; its slots were freed."""


@dataclass
class TokenEvent:
    """A sampled token, streamed as soon as the last stage returns it."""

    token_id: int
    text: str  # newly final text (may be "" while a multi-byte character or a possible stop string is held back)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # params.top_logprobs alternatives, most likely first


class Task(Enum):
    GENERATE = "generate"
    SCORE = "score"
    CLASSIFY = "classify"


@dataclass(eq=False)
class _Request:
    """A request while the scheduler has it."""

    task: Task
    prompt: list[int]
    state: SequenceState | None = None  # generate only
    slot: int = -1
    fed: int = 0
    in_flight: bool = False
    done: bool = False
    cancelled: bool = False
    events: asyncio.Queue | None = None  # a stream (generate_chunks): TokenEvent/GenerationResult/Exception
    future: asyncio.Future | None = None  # score, classify, and generate through complete()
    scores: list = field(default_factory=list)
    pool: int = 0  # classify: position whose logits are pooled
    deadline: float | None = None  # time.time() after which the request is dropped
    decoder: object | None = None  # streaming detokenizer
    text: str = ""  # text the decoder has released
    emitted: int = 0  # characters of it streamed so far
    pages: SeqPages | None = None  # its blocks and prefix hashes
    sent_blocks: int = 0  # block table entries the stages have been sent
    cached_tokens: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.state.tokens if self.state else self.prompt

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.fed


class Scheduler:
    """`depth`: microbatches in flight (the number of stages keeps every stage busy). `pages`: the
    stages' KV blocks and snapshots. `recover`, if given, brings the stages back after a failed
    microbatch (else a failure fails every request)."""

    def __init__(
        self,
        send: Send,
        *,
        num_slots: int,
        max_seq_len: int,
        pages: BlockManager,
        eos_ids: list[int],
        tokenizer=None,
        max_batch_tokens: int,
        max_queue: int,
        depth: int,
        recover: Callable[[], Awaitable[None]] | None = None,
        recover_timeout: float = 120.0,
    ) -> None:
        self.send = send
        self.recover, self.recover_timeout = recover, recover_timeout
        self.recovering = False
        self.recoveries: list[dict] = []
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self.eos_ids, self.tokenizer = eos_ids, tokenizer
        self.max_batch_tokens, self.max_queue = max_batch_tokens, max_queue
        self.depth = depth
        self.pages = pages
        if self.pages.num_blocks * self.pages.block_size < max_seq_len:  # else a lone request could starve
            raise ValueError(f"the KV cache holds {self.pages.num_blocks * self.pages.block_size} tokens, less than "
                             f"max_seq_len {max_seq_len}")
        self.preemptions = 0
        self.prefill_tokens = 0  # prompt (and replayed) tokens the stages computed
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.waiting: deque[_Request] = deque()
        self.active: list[_Request] = []
        self.to_alloc: list[int] = []  # cache operations for the next microbatch's header
        self.to_free: list[int] = []
        self.to_blocks: list[BlockTableUpdate] = []
        self.to_restore: list[Restore] = []
        self.in_flight = 0
        self.wakeup = asyncio.Event()
        self.closed = False
        self.error: BaseException | None = None
        self.microbatches = 0
        self.finished_at: deque[float] = deque(maxlen=64)  # when recent requests finished: the drain rate
        self.masks = Masks()  # constrained rows' grammar masks (stages/grammar.py)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    # ---- public API: requests come checked from the intake (intake.py) -----------------------
    async def generate(self, request: GenerateRequest,
                       deadline: float | None = None) -> AsyncIterator[TokenEvent | GenerationResult]:
        """Stream a generation. Closing the iterator early aborts it and frees its slot, and so
        does reaching `deadline` (a time.time() value), which raises DeadlineExceededError."""
        chunks = self.generate_chunks(request, deadline)
        try:
            async for chunk in chunks:
                for ev in chunk:
                    yield ev
        finally:
            await chunks.aclose()  # an abandoned stream aborts its request now, not at garbage collection

    async def generate_chunks(self, request: GenerateRequest,
                              deadline: float | None = None) -> AsyncIterator[list[TokenEvent | GenerationResult]]:
        """`generate`, but every event that is ready is yielded at once, as one list: a consumer
        that falls behind (a stream through a proxy under load) catches up in one step instead of
        one step per token. A GenerationResult is always the last event of its list."""
        self._check_open()
        prompt = list(request.prompt)
        state = self._state(request)
        req = _Request(Task.GENERATE, prompt, state=state, events=asyncio.Queue(), deadline=deadline)
        if self.tokenizer is not None:
            req.decoder = self.tokenizer.incremental_decoder()
        self._enqueue(req)
        try:
            while True:
                chunk = [await req.events.get()]
                while not req.events.empty() and not isinstance(chunk[-1], (BaseException, GenerationResult)):
                    chunk.append(req.events.get_nowait())
                if isinstance(chunk[-1], BaseException):
                    if len(chunk) > 1:
                        yield chunk[:-1]
                    raise chunk[-1]
                yield chunk
                if isinstance(chunk[-1], GenerationResult):
                    return
        finally:
            if not req.done:
                self.abort(req)

    async def complete(self, request: GenerateRequest, deadline: float | None = None) -> GenerationResult:
        """A whole generation: its result, with no event per token (what unary calls, the command
        line's rows and batch jobs want: a stream's events cost a task wake-up per token)."""
        self._check_open()
        state = self._state(request)
        req = _Request(Task.GENERATE, list(request.prompt), state=state,
                       future=asyncio.get_running_loop().create_future(), deadline=deadline)
        return await self._wait(req)

    def _state(self, request: GenerateRequest) -> SequenceState:
        grammar = request.grammar.deep_copy() if request.grammar is not None else None  # a request may run twice
        return SequenceState(list(request.prompt), request.params, self.eos_ids, self.tokenizer, grammar,
                             request.closers)

    async def score(self, request: ScoreRequest, deadline: float | None = None) -> list[float | None]:
        """log p(token i | tokens < i) for every token of the prompt; None for the first."""
        self._check_open()
        req = _Request(Task.SCORE, list(request.prompt), future=asyncio.get_running_loop().create_future(),
                       deadline=deadline)
        return await self._wait(req)

    async def classify(self, request: ClassifyRequest, deadline: float | None = None) -> list[float]:
        """The head's logits at the prompt's pooled position."""
        self._check_open()
        req = _Request(Task.CLASSIFY, list(request.prompt), future=asyncio.get_running_loop().create_future(),
                       deadline=deadline, pool=request.pool)
        return await self._wait(req)

    def abort(self, req: _Request) -> None:
        """Drop a request; its slot is freed now, or when its in-flight microbatch returns."""
        if req.done:
            return
        req.cancelled = req.done = True
        if req in self.waiting:
            self.waiting.remove(req)
        elif not req.in_flight:
            self._release(req)
        self.wakeup.set()

    def stats(self) -> dict:
        return {"waiting": len(self.waiting), "active": len(self.active), "slots_in_use": self.num_slots - len(self.free_slots),
                "num_slots": self.num_slots, "in_flight": self.in_flight, "microbatches": self.microbatches,
                "recoveries": len(self.recoveries), "recovering": self.recovering, "preemptions": self.preemptions,
                "prefill_tokens": self.prefill_tokens,
                "cache": self.pages.info()}

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting work, let in-flight microbatches return, fail whatever is left."""
        self.closed = True
        self.wakeup.set()
        await asyncio.gather(self._task, return_exceptions=True)
        deadline = asyncio.get_running_loop().time() + drain_timeout
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        self._fail_all(SchedulerClosedError("the pipeline was shut down"))

    # ---- admission --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed or self.error:
            raise SchedulerClosedError(f"the pipeline is not running ({self.error or 'closed'})")

    def _enqueue(self, req: _Request) -> None:
        # Waiting requests that free slots will take at once do not count against the bound.
        if len(self.waiting) >= self.max_queue + len(self.free_slots):
            wait = self.retry_after()
            raise QueueFullError(f"all {self.num_slots} slots are busy and {len(self.waiting)} requests are waiting "
                                 f"(queue bound {self.max_queue}); retry after {round(wait * 1000)} ms", wait)
        self.waiting.append(req)
        self.wakeup.set()

    def retry_after(self) -> float:
        """Seconds until one place in the queue frees up, at the rate requests have been finishing
        lately (1 s when too few have finished to tell), within [0.1, 60]."""
        now, done = time.time(), self.finished_at
        if len(done) < 2 or now - done[0] <= 0:
            return 1.0
        rate = len(done) / (now - done[0])  # requests finished per second
        return min(60.0, max(0.1, 1.0 / rate))

    async def _wait(self, req: _Request):
        self._enqueue(req)
        try:
            return await asyncio.shield(req.future)
        except asyncio.CancelledError:
            self.abort(req)
            raise

    def _expire(self) -> None:
        now = time.time()
        for r in [r for r in list(self.waiting) + self.active if r.deadline is not None and r.deadline < now and not r.done]:
            err = DeadlineExceededError("the request's deadline passed before it finished")
            if r.events is not None:
                r.events.put_nowait(err)
            elif r.future is not None and not r.future.done():
                r.future.set_exception(err)
            self.abort(r)

    def _hit_limit(self, req: _Request) -> int:
        """Tokens a cached prefix may cover: all but the last one fed (its output is needed);
        for classify, up to the pooled position; none for score (it needs every position)."""
        if req.task is Task.GENERATE:
            return len(req.tokens) - 1
        return req.pool if req.task is Task.CLASSIFY else 0

    def _admit(self) -> None:
        """Admit waiting requests in order while there are slots and blocks. A request whose
        next prompt block another request is computing waits for it (it will be cached)."""
        held = []
        watermark = 1 + self.pages.num_blocks // 100  # kept free for running requests' next tokens
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            if req.pages is None:
                req.pages = self.pages.new_sequence(req.prompt)
            limit = self._hit_limit(req)
            if self.pages.waits_for_claim(req.pages, limit):
                held.append(req)
                continue
            snap = self.pages.admit(req.pages, limit)
            if not self.pages.can_grow(req.pages, len(req.tokens) + watermark * self.pages.block_size) and self.active:
                self.pages.release(req.pages)  # not now: wait for running requests to give blocks back
                held.append(req)
                break
            req.slot = self.free_slots.pop()
            req.fed = req.cached_tokens = req.pages.cached_tokens
            req.sent_blocks = 0
            self.to_alloc.append(req.slot)
            if snap is not None:
                self._send_blocks(req)
                self.to_restore.append(Restore(req.slot, snap, req.fed))
            self.active.append(req)
        self.waiting.extendleft(reversed(held))

    def _send_blocks(self, req: _Request) -> None:
        new = req.pages.blocks[req.sent_blocks:]
        if new:
            self.to_blocks.append(BlockTableUpdate(req.slot, req.sent_blocks, list(new)))
            req.sent_blocks = len(req.pages.blocks)

    def _grow(self, req: _Request, tokens: int) -> bool:
        """Blocks for `tokens` tokens of `req`, preempting the youngest idle requests if needed."""
        while not self.pages.can_grow(req.pages, tokens):
            victim = next((v for v in reversed(self.active)
                           if v is not req and not v.in_flight and not v.done and v.pages.blocks), None)
            if victim is None:
                return False
            self._preempt(victim)
        self.pages.grow(req.pages, tokens)
        self._send_blocks(req)
        return True

    def _preempt(self, req: _Request) -> None:
        """Give back `req`'s slot and blocks; it waits at the head of the queue to be replayed."""
        log.info("preempting a %s request (%d tokens) to free KV blocks", req.task.value, len(req.tokens))
        self.preemptions += 1
        self._reset(req)
        self.active.remove(req)
        self.waiting.appendleft(req)

    def _reset(self, req: _Request) -> None:
        """Forget `req`'s place in the caches; it will be replayed from its first token."""
        self._give_back(req)
        req.fed, req.in_flight, req.scores, req.sent_blocks = 0, False, [], 0

    def _release(self, req: _Request) -> None:
        if req in self.active:
            self.active.remove(req)
            self.finished_at.append(time.time())
        self._give_back(req)

    def _give_back(self, req: _Request) -> None:
        """Return `req`'s blocks and slot (the stages free the slot with the next microbatch)."""
        if req.pages is not None:
            self.pages.release(req.pages)
        if req.slot >= 0:
            self.to_free.append(req.slot)
            self.free_slots.append(req.slot)
            req.slot = -1

    # ---- the loop -----------------------------------------------------------------------------
    async def _loop(self) -> None:
        try:
            while not self.closed:
                self._admit()
                launched = False
                while self.in_flight < self.depth:
                    mb = self._build()
                    if mb is None:
                        break
                    self.in_flight += 1
                    asyncio.get_running_loop().create_task(self._run(*mb))
                    launched = True
                if not launched:
                    self.wakeup.clear()
                    try:  # wake up now and then to drop requests past their deadline
                        await asyncio.wait_for(self.wakeup.wait(), timeout=0.25)
                    except asyncio.TimeoutError:
                        pass
                self._expire()
        except Exception as e:  # a bug here must not hang every caller
            log.exception("scheduler loop failed")
            self.error = e
            self._fail_all(e)

    async def _recover(self, cause: Exception, detected_at: float) -> None:
        t0 = time.perf_counter()
        while self.in_flight:  # let the other in-flight microbatches succeed or fail
            await asyncio.sleep(0.005)
        try:
            await asyncio.wait_for(self.recover(), timeout=self.recover_timeout)
        except Exception as e:
            why = (f"it was not back within {self.recover_timeout:g}s (no resources to restart it?)"
                   if isinstance(e, asyncio.TimeoutError) else str(e))
            self.error = SchedulerClosedError(f"a pipeline stage failed ({type(cause).__name__}) and could not be "
                                              f"brought back: {why}")
            log.error("%s", self.error)
            self._fail_all(self.error)
            return
        t1 = time.perf_counter()
        # Every stage restarts these sequences from scratch: their slots are freed (harmless on
        # a restarted stage), the prefix cache is forgotten (the restarted stage's blocks and
        # snapshots are empty), and they are admitted again to replay prompt + output so far.
        live = [r for r in self.active if not r.done]
        for r in [r for r in self.active if r.done]:  # aborted while their microbatch was failing
            self._release(r)
        for r in live:
            self._reset(r)
        self.active = []
        self.waiting.extendleft(reversed(live))
        self.pages.clear()
        self.to_free = sorted(set(self.to_free))
        self.to_alloc, self.to_blocks, self.to_restore = [], [], []
        self.recoveries.append({"cause": type(cause).__name__, "reload_seconds": t1 - t0,
                                "replayed_requests": len(live), "replayed_tokens": sum(len(r.tokens) for r in live),
                                "detected_at": detected_at, "recovered_at": time.time()})
        log.warning("pipeline recovered in %.1fs; replaying %d request(s)", t1 - t0, len(live))
        self.recovering = False
        self.wakeup.set()

    def _build(self):
        if self.recovering:
            return None
        ready = [r for r in self.active if not r.in_flight and not r.done]
        if not ready and not self.to_free:
            return None
        # Split decode work evenly over the microbatches that will be in flight together.
        decode = [r for r in ready if r.pending == 1 and r.fed >= len(r.prompt)]
        prefill = [r for r in ready if not (r.pending == 1 and r.fed >= len(r.prompt))]
        max_rows = max(1, math.ceil(sum(1 for r in self.active if not r.done) / self.depth))
        rows, ids, budget, snaps = [], [], self.max_batch_tokens, []
        for r in decode[:max_rows]:
            if r.slot >= 0 and self._grow(r, r.fed + 1):
                rows.append(self._row(r, 1, ids, snaps, len(rows)))
                budget -= 1
        for r in prefill:
            if budget <= 0:
                break
            if r.done or r.slot < 0:  # preempted above, to make room for a decode row
                continue
            n = min(r.pending, budget)
            if not self._grow(r, r.fed + n):
                n = len(r.pages.blocks) * self.pages.block_size - r.fed + self.pages.available_blocks * self.pages.block_size
                if n <= 0 or not self._grow(r, r.fed + n):
                    continue
            rows.append(self._row(r, n, ids, snaps, len(rows)))
            budget -= n
            self.prefill_tokens += n
        if not rows and not self.to_free:
            return None
        self._fill_masks(rows)
        mb = Microbatch([row for _, row in rows], self.to_free, self.to_alloc, self.to_blocks, self.to_restore, snaps)
        self.to_free, self.to_alloc, self.to_blocks, self.to_restore = [], [], [], []
        self.microbatches += 1
        return [r for r, _ in rows], mb, array("q", ids)

    def _row(self, r: _Request, n: int, ids: list[int], snaps: list[TakeSnapshot], index: int):
        """Row `index` of the next microbatch: `n` of `r`'s tokens, and what the last stage returns."""
        start = r.fed
        snaps.extend(TakeSnapshot(index, offset, snap) for offset, snap in self.pages.snapshots_for(r.pages, start, n))
        ids.extend(r.tokens[start : start + n])
        end = start + n
        if r.task is Task.GENERATE and end == len(r.tokens):  # its last token goes in: draw the next one
            row = Row(r.slot, n, Want.TOKEN, r.state.sampling())
        elif r.task is Task.SCORE:
            targets = r.prompt[start + 1 : end + 1]
            row = Row(r.slot, n, Want.SCORES, targets=targets + [None] * (n - len(targets)))
        elif r.task is Task.CLASSIFY and start <= r.pool < end:
            row = Row(r.slot, n, Want.LOGITS, position=r.pool - start)
        else:
            row = Row(r.slot, n)
        r.in_flight = True
        return (r, n), row

    def _fill_masks(self, rows: list) -> None:
        """The grammar masks of the microbatch's constrained rows, all at once (in parallel)."""
        held = [k for k, ((r, _), row) in enumerate(rows) if row.want == Want.TOKEN and r.state.grammar is not None]
        for k, mask in zip(held, self.masks([rows[k][0][0].state.grammar for k in held]) if held else []):
            rows[k] = (rows[k][0], rows[k][1]._replace(sampling=rows[k][0][0].state.masked(rows[k][1].sampling, mask)))

    async def _run(self, rows: list[tuple[_Request, int]], mb: Microbatch, ids: array) -> None:
        try:
            answers = await self.send(mb, ids)
        except Exception as e:
            self.in_flight -= 1
            for r, _ in rows:
                r.in_flight = False
            if self.recover is None or self.closed:
                log.error("microbatch failed: %s", e)
                self.error = e
                self._fail_all(e)
            elif not self.recovering:
                log.warning("microbatch failed (%s); recovering the pipeline", type(e).__name__)
                self.recovering = True
                asyncio.get_running_loop().create_task(self._recover(e, time.time()))
            return
        self.in_flight -= 1
        for (r, n), res in zip(rows, answers):
            r.in_flight = False
            r.fed += n
            self.pages.commit(r.pages, r.fed)
            if r.cancelled:
                self._release(r)
                continue
            if r.task is Task.GENERATE:
                if res is not None:
                    self._on_token(r, res[0], res[1], res[2] if len(res) > 2 else None)
            elif r.task is Task.SCORE:
                r.scores.extend(res)
                if r.fed == len(r.prompt):
                    self._finish(r, [None] + r.scores[:-1])
            elif r.fed > r.pool and res is not None:
                self._finish(r, res)
        self.wakeup.set()

    def _on_token(self, r: _Request, token: int, logprob: float, top: list | None) -> None:
        s = r.state
        finished = s.add_token(token, logprob, top)
        if r.events is None:  # complete(): only the result
            if finished:
                self._finish(r, self._result(r))
            return
        lp = logprob if s.params.logprobs else None
        top = s.top_logprobs[-1] if s.params.top_logprobs else None
        text = ""
        if r.decoder is not None:
            # The decoder releases text once its characters are complete; on top of that, hold
            # back the last (longest stop string - 1) characters, which could begin a stop string.
            r.text += r.decoder.push(token)
            hold = max((len(x) for x in s.params.stop), default=1) - 1
            upto = len(r.text) - hold
            if upto > r.emitted:
                text = r.text[r.emitted : upto]
                r.emitted = upto
        if not finished:
            r.events.put_nowait(TokenEvent(token, text, lp, top))
            return
        res = self._result(r)  # its text is cut before a stop string; what was streamed is a prefix of it
        tail = res.text[r.emitted :] if res.text is not None else ""
        r.events.put_nowait(TokenEvent(token, text + tail, lp, top))
        r.events.put_nowait(res)
        r.done = True
        self._release(r)

    @staticmethod
    def _result(r: _Request) -> GenerationResult:
        res = r.state.result()
        res.cached_tokens = min(r.cached_tokens, len(r.prompt))
        return res

    def _finish(self, r: _Request, value) -> None:
        r.done = True
        self._release(r)
        if not r.future.done():
            r.future.set_result(value)

    def _fail_all(self, e: BaseException) -> None:
        for r in list(self.active) + list(self.waiting):
            r.done = True
            if r.events is not None:
                r.events.put_nowait(e)
            elif r.future is not None and not r.future.done():
                r.future.set_exception(e)
        self.active.clear()
        self.waiting.clear()
