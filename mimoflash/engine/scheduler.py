"""Continuous-batching scheduler: who runs this step and with how many tokens. Pure Python, no tensors.

Every step (`schedule()`):
  1. Running requests, oldest first, each get their pending tokens (1 while decoding, the next prefill chunk
     otherwise) within the step's token budget `max_num_batched_tokens`. If the cache cannot hold a request's new
     tokens, the *youngest* running request is preempted (its cache is freed; it goes back to the front of the
     waiting queue and is recomputed from its tokens later, vLLM's "recompute" mode). Preempting the youngest
     keeps the oldest requests, which hold the most cache and are closest to finishing, making progress.
  2. If nothing was preempted, waiting requests are admitted in arrival order (FCFS, no skipping, so a long prompt
     cannot starve) while a sequence slot, budget and cache (one ring + the first chunk's blocks) are available.
With chunked prefill a long prompt is cut to the remaining budget and finished over several steps while decodes of
other requests run in the same step; without it a prompt is admitted only when it fits the budget whole.

`postprocess()` advances `num_computed_tokens`, appends sampled tokens and applies the token-level stop rules
(eos unless ignore_eos, stop_token_ids, max_tokens, max_model_len). Stop *strings* need text, so the engine checks
them and calls `finish()`. `abort()` frees the cache at once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .kv_cache import KVCacheManager
from .request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    enable_chunked_prefill: bool = True
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


@dataclass
class ScheduledRequest:
    request: Request
    start: int          # first position fed this step (= num_computed_tokens before the step)
    num_tokens: int     # tokens fed this step (the drafts included)
    sample: bool        # the slice reaches the last known token: sample from its logits
    num_draft: int = 0  # speculative drafts at the end of the slice: every row is sampled (verification)


@dataclass
class Batch:
    items: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_steps: int = 1  # decode steps to run before the next schedule (multi-step; the cache holds them all)

    @property
    def num_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items)

    def __len__(self) -> int:
        return len(self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []          # admission order: oldest first
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.newly_finished: list[Request] = []   # drained by the engine after each step (outputs to report)

    # ------------------------------------------------------------------ queue
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        cap = self.kv.layout.token_capacity
        if req.num_prompt_tokens + 1 > min(self.config.max_model_len, cap):
            raise ValueError(f"prompt of {req.num_prompt_tokens} tokens does not fit: max_model_len is "
                             f"{self.config.max_model_len}, the KV cache holds {cap} tokens per sequence, and "
                             "at least one token must be generated")
        if not self.config.enable_chunked_prefill and req.num_prompt_tokens > self.config.max_num_batched_tokens:
            raise ValueError(f"prompt of {req.num_prompt_tokens} tokens exceeds max_num_batched_tokens="
                             f"{self.config.max_num_batched_tokens} with chunked prefill off")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling
    def schedule(self, num_steps: int = 1) -> Batch:
        """The next step's batch. num_steps > 1 asks for a multi-step run (`reserve_steps`); the batch says how many
        steps it got."""
        batch = Batch()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_pending_tokens, budget)
            if n < req.num_pending_tokens and not chunked:
                i += 1
                continue
            drafts = 0
            if req.draft_token_ids:                # decoding with drafts: verify them in this step if they fit
                if req.num_pending_tokens == 1:
                    drafts = min(len(req.draft_token_ids), budget - 1)
                    while drafts and not self.kv.can_allocate(req, 1 + drafts):
                        drafts -= 1                # no room: fewer drafts rather than preempting someone
                del req.draft_token_ids[drafts:]
                n += drafts
            while not self.kv.can_allocate(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:      # it preempted itself
                break
            self.kv.allocate(req, n)
            batch.items.append(ScheduledRequest(req, req.num_computed_tokens, n, n == req.num_pending_tokens + drafts,
                                                drafts))
            budget -= n
            i += 1
        if batch.preempted:
            if not batch.items and not self.running:
                self._no_progress(batch)
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_pending_tokens, budget)
            if n < req.num_pending_tokens and not chunked:
                break
            if not self.kv.can_allocate(req, n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.kv.allocate(req, n)
            self.running.append(req)
            batch.items.append(ScheduledRequest(req, req.num_computed_tokens, n, n == req.num_pending_tokens))
            budget -= n
        if not batch.items and self.waiting and not self.running:
            self._no_progress(batch)
        if num_steps > 1:
            batch.num_steps = self.reserve_steps(batch, num_steps)
        return batch

    def reserve_steps(self, batch: Batch, want: int) -> int:
        """Multi-step decoding: when every running request decodes one token this step (no prefill chunk, no drafts
        to verify), nobody waits for admission and the cache holds n more tokens of each without preempting anyone,
        reserve those n tokens and return n (at most `want`); else 1. Between the steps of such a run nothing could
        change the schedule but a request finishing, and the run stops at that step (the engine ends it at the first
        eos / stop token, and `want` is cut here so that max_tokens and max_model_len end it on its last step at the
        latest); `finish_steps` then gives back what the steps not run reserved."""
        if batch.preempted or self.waiting or not batch.items or len(batch.items) != len(self.running):
            return 1
        n = want
        for it in batch.items:
            r = it.request
            if it.num_tokens != 1 or not it.sample or it.num_draft:
                return 1
            n = min(n, r.params.max_tokens - len(r.output_token_ids), self.config.max_model_len - r.num_tokens)
        reqs = [it.request for it in batch.items]
        while n > 1 and sum(self.kv.blocks_needed(r, n) for r in reqs) > self.kv.num_free_blocks:
            n -= 1                               # counted from num_computed_tokens: this step's token included
        if n <= 1:
            return 1
        for r in reqs:
            self.kv.allocate(r, n)
        return n

    def _no_progress(self, batch: Batch) -> None:
        """Nothing runs and the head of the queue does not fit an empty cache: it never will. Finish it with
        "length" (its tokens so far are kept) rather than loop forever."""
        req = self.waiting[0]
        self.finish(req, "length")

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.draft_token_ids = []
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ results
    def postprocess(self, batch: Batch, sampled: list, on_token=None) -> list[Request]:
        """Advance the scheduled requests; `sampled[j]` is the token for `batch.items[j]` (None if not sampled), or
        for a verification item (num_draft > 0) the list of tokens it produced: the accepted drafts then the main
        model's own token. The cache keeps the fed tokens that were accepted and forgets the rest (rollback).
        Tokens are appended one at a time, each checked against the stop rules; `on_token(req)` runs after each
        append (the engine's text and stop strings) and the rest of a list is dropped once the request finishes.
        Returns the requests that received a token."""
        got = []
        now = time.perf_counter()
        for item, tok in zip(batch.items, sampled, strict=True):
            req = item.request
            if req.is_finished:                      # aborted between schedule and postprocess
                continue
            req.num_computed_tokens += item.num_tokens
            if not item.sample:
                continue
            if tok is None:
                raise RuntimeError(f"{req.request_id}: sampled row without a token")
            toks = [tok] if isinstance(tok, int) else list(tok)
            if item.num_draft:
                if not 1 <= len(toks) <= item.num_draft + 1:
                    raise RuntimeError(f"{req.request_id}: {len(toks)} tokens from {item.num_draft} drafts")
                req.draft_token_ids = []
                self.kv.rollback(req, item.start + len(toks))     # fed: last token + drafts; kept: the accepted
            if req.first_token_time is None:
                req.first_token_time = now
            got.append(req)
            self._append(req, toks, on_token)
        return got

    def _append(self, req: Request, toks: list[int], on_token) -> None:
        """Append tokens one at a time, each checked against the stop rules, `on_token(req)` after each; the rest
        is dropped once the request finishes."""
        for t in toks:
            req.output_token_ids.append(t)
            self._check_token_stop(req, t)
            if on_token is not None:
                on_token(req)
            if req.is_finished:
                return

    def finish_steps(self, batch: Batch, steps: list[list[int]], on_token=None) -> list[Request]:
        """A multi-step run's results: `steps[i][j]` is the token step i sampled for `batch.items[j]`; the steps run
        may be fewer than reserved. Each step is postprocessed as a one-step batch would be (a request that finishes
        drops its later tokens: its cache is freed), then the cache reserved for the steps not run is given back,
        so the accounting is what one-step decoding leaves. -> the requests that received a token."""
        got: dict[int, Request] = {}
        for toks in steps:
            for req in self.postprocess(batch, toks, on_token):
                got[id(req)] = req
        for it in batch.items:
            if not it.request.is_finished:
                self.kv.rollback(it.request, it.request.num_computed_tokens)
        return list(got.values())

    def finish_cycles(self, item: ScheduledRequest, cycles: list[list[int]], on_token=None) -> list[Request]:
        """A speculative run's results (the engine's cycles in one call): `cycles[c]` = the tokens cycle c kept, its
        accepted drafts and the main model's token, for the verification `item` scheduled and the cycles after it,
        whose rows the cache held beforehand. Each token is appended and checked as `postprocess` does it for a
        verification (a request that finishes drops the rest); then the cache past the kept tokens is given back.
        -> the request, if it received a token."""
        req = item.request
        if req.is_finished or not cycles:
            return []
        for toks in cycles:
            req.num_computed_tokens += len(toks)           # the fed token and the accepted drafts stay cached
            self._append(req, toks, on_token)
            if req.is_finished:
                return [req]
        self.kv.rollback(req, req.num_computed_tokens)
        return [req]

    def _check_token_stop(self, req: Request, tok: int) -> None:
        p = req.params
        if not p.ignore_eos and tok in req.eos_token_ids:
            self.finish(req, "stop")
        elif tok in p.stop_token_ids:
            self.finish(req, "stop", stop_reason=tok)
        elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            self.finish(req, "length")

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        if req.is_finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.finish_time = time.perf_counter()
        del self.requests[req.request_id]
        self.newly_finished.append(req)

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.finish(req, "abort")
        return True
