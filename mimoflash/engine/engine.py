"""LLMEngine: owns the scheduler, the KV cache, the runner and the per-request output state; one `step()` at a time.

    step():  batch = scheduler.schedule()           # who runs, how many tokens (pure Python)
             logits = runner.execute(batch)          # one ragged forward over every scheduled sequence
             tokens = sample(logits, rows)           # per-request params and seeded generators
             scheduler.postprocess(batch, tokens)    # append, token-level stops, free finished caches
             detokenize, stop strings, logprobs      # here: they need the tokenizer
             -> RequestOutput deltas for the groups that changed

Multi-step decoding (`num_scheduler_steps` > 1): where every running request decodes and none needs Python between
its steps, the scheduler reserves up to N steps and the runner runs them in one call (greedy rows: one C call), the
sampled tokens fed back inside it; the steps' tokens are then postprocessed in order as single steps would be, so
the outputs are the same (docs/ENGINE.md, "Multi-step decoding").

Text is produced incrementally (`IncrementalDetokenizer`), so a stop string is found as soon as its last character
is complete, never in the middle of a multibyte character. For streaming, the last `len(longest stop) - 1`
characters are held back until we know they do not start a stop string (vLLM does the same).
Without a tokenizer (a checkpoint without tokenizer files) everything works on token ids and `text` stays "".
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..model.mimo import MiMoForCausalLM
from .kv_cache import KVCache, KVCacheManager, plan_cache, resolve_memory
from .request import CompletionOutput, Request, RequestOutput, group_metrics
from .runner import ModelRunner
from .sampling import Logprob, SampleRow, SamplingParams, logprob_entry, make_generator, sample
from .scheduler import Scheduler, SchedulerConfig
from .speculative import MTPDrafter, SpeculativeConfig


@dataclass
class EngineConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512        # per-step token budget (chunked-prefill chunk size)
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None         # None = config.max_position_embeddings
    kv_cache_memory: int | float | None = None   # bytes, or fraction of RAM; None = enough for max_num_seqs
    #                                              sequences of max_model_len, capped at 30% of available memory
    block_size: int = 16
    max_draft: int = 0                       # speculative slack in the SWA rings
    include_mtp: bool = False                # give MTP blocks (SWA ids L+n) rings too
    attention_impl: str = "fast"             # "fast" | "reference"
    dtype: Any = None                        # compute (activation + KV cache) dtype; None = the weights' dtype
    kv_cache_dtype: Any = None               # KV cache storage dtype; None = the compute dtype
    weight_panels: bool = True               # CPU, bf16 weights: also pack dense linears in panels (cpu_layout)
    huge_pages: bool = False                 # CPU: weights and KV pools on 2 MB pages where the OS allows (hugepages)
    seed: int = 0                            # the shared generator of unseeded requests
    speculative: SpeculativeConfig | dict | None = None   # MTP speculative decoding (engine/speculative.py)
    num_scheduler_steps: int = 1             # most decode steps per step() call (multi-step decoding, see step())

    def __post_init__(self) -> None:
        n = self.num_scheduler_steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_scheduler_steps must be an integer >= 1, got {n!r}")


@dataclass
class _OutState:
    detok: Any | None
    emitted_text: int = 0          # chars of req.text already streamed
    emitted_tokens: int = 0
    emitted_logprobs: int = 0


@dataclass
class _Group:
    prompt: str | None
    prompt_token_ids: list[int]
    reqs: list[Request] = field(default_factory=list)


class LLMEngine:
    def __init__(self, model: MiMoForCausalLM, tokenizer=None, config: EngineConfig | None = None):
        self.config = cfg = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        mc = model.config
        spec = SpeculativeConfig.from_value(cfg.speculative)
        if spec is not None:
            if not mc.num_nextn_predict_layers:
                raise ValueError("speculative decoding with method 'mtp' needs a model with MTP layers "
                                 "(num_nextn_predict_layers >= 1); this model has none")
            cfg = self.config = replace(cfg, speculative=spec, include_mtp=True,
                                        max_draft=max(cfg.max_draft, spec.num_speculative_tokens))
        p = next(model.parameters())
        # The cache takes the compute dtype unless kv_cache_dtype says otherwise: by default the attention weights'
        # dtype (the router stays fp32 whatever the model dtype); fp32 when bf16 weights are computed in fp32
        # (engine/cpu_layout.py).
        self.device = p.device
        dtype = cfg.dtype or next((q.dtype for n, q in model.named_parameters() if n.endswith("q_proj.weight")),
                                  p.dtype)
        kv_dtype = cfg.kv_cache_dtype or dtype
        max_len = cfg.max_model_len or mc.max_position_embeddings
        if max_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={max_len} exceeds the model's max_position_embeddings="
                             f"{mc.max_position_embeddings}")
        probe = plan_cache(mc, 1 << 62, max_num_seqs=1, block_size=cfg.block_size, max_draft=cfg.max_draft,
                           include_mtp=cfg.include_mtp, dtype=kv_dtype)
        if cfg.kv_cache_memory is None:
            want = cfg.max_num_seqs * probe.bytes_per_sequence(max_len + cfg.max_draft + 1)
            memory = min(want, resolve_memory(0.3, self.device))
        else:
            memory = resolve_memory(cfg.kv_cache_memory, self.device)
        self.layout = plan_cache(mc, memory, max_num_seqs=cfg.max_num_seqs, block_size=cfg.block_size,
                                 max_draft=cfg.max_draft, include_mtp=cfg.include_mtp, dtype=kv_dtype)
        self.cache = KVCache(self.layout, self.device, huge_pages=cfg.huge_pages)
        self.kv = KVCacheManager(self.layout)
        # A budget that holds fewer rings than max_num_seqs limits concurrency through ring availability.
        self.scheduler = Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                                   cfg.enable_chunked_prefill, max_len), self.kv)
        self.runner = ModelRunner(model, self.cache, cfg.attention_impl, cfg.dtype, cfg.weight_panels, cfg.huge_pages)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.drafter = MTPDrafter(model, self.runner, spec, cfg.max_draft) if spec is not None else None
        eos = mc.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        if tokenizer is not None:
            eos_ids |= set(tokenizer.stop_token_ids)
        self.eos_token_ids = frozenset(eos_ids)
        self._groups: dict[str, _Group] = {}
        self._state: dict[str, _OutState] = {}
        self._generators: dict[str, torch.Generator | None] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None, num_speculative_tokens: int | None = None) -> str:
        """Queue one prompt (n samples). Raises ValueError for bad token ids or a prompt that cannot fit.
        num_speculative_tokens: this request's most drafts per step (None = the engine's speculative config, 0 = none;
        at most the configured number)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        top = self.drafter.config.num_speculative_tokens if self.drafter is not None else 0
        depth = top if num_speculative_tokens is None else num_speculative_tokens
        if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= top:
            raise ValueError(f"num_speculative_tokens must be an integer in [0, {top}] (the engine's speculative "
                             f"config), got {num_speculative_tokens!r}")
        ids = [int(t) for t in prompt_token_ids]
        V = self.model.config.vocab_size
        if not ids:
            raise ValueError("empty prompt: at least one token is needed")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {V})")
        gid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        if gid in self._groups:
            raise ValueError(f"request id {gid!r} is already in use")
        group = _Group(prompt, ids)
        for i in range(params.n):
            rid = gid if params.n == 1 else f"{gid}#{i}"
            req = Request(rid, ids, params, group_id=gid, index=i, eos_token_ids=self.eos_token_ids,
                          num_speculative_tokens=depth)
            self.scheduler.add(req)          # validates length; the first child raises before anything is kept
            group.reqs.append(req)
            seed = None if params.seed is None else (params.seed if i == 0 else (params.seed * 1_000_003 + i) % 2**63)
            self._generators[rid] = make_generator(seed, self.device)
            detok = None
            if self.tokenizer is not None:
                from ..tokenizer import IncrementalDetokenizer
                detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            self._state[rid] = _OutState(detok)
        self._groups[gid] = group
        return gid

    def abort_request(self, request_id: str) -> None:
        """Abort a group (or one child id); its cache is freed at once."""
        group = self._groups.get(request_id)
        for req in (group.reqs if group else []):
            self.scheduler.abort(req.request_id)
        if group is None:
            self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        """True while requests run or wait, or finished ones (e.g. just aborted) still have to be reported."""
        return self.scheduler.has_unfinished() or bool(self.scheduler.newly_finished)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """One scheduling step; -> delta outputs of every group that produced text/tokens or finished."""
        t0 = time.process_time()                # CPU time: adaptive depth's step costs (wall time on a busy machine
        batch = self.scheduler.schedule(self._steps_wanted())   # mostly measures the other jobs)
        changed: set[str] = set()
        if batch.num_steps > 1:
            got, ran = self._run_steps(batch)
            changed.update(req.group_id for req in got)
            if self.drafter is not None:                  # steps adaptive depth was sure not to draft in
                self.drafter.skipped(ran, time.process_time() - t0)
        elif batch.items and self.drafter is not None and self._spec_run(batch, t0):
            changed.add(batch.items[0].request.group_id)
        elif batch.items:
            logits = self.runner.execute(batch)
            sampled, lps = self._choose_tokens(batch, logits)

            def on_token(req: Request) -> None:
                self._process_token(req, lps[req.request_id].pop(0) if req.request_id in lps else None)

            for req in self.scheduler.postprocess(batch, sampled, on_token):
                changed.add(req.group_id)
            if self.drafter is not None:
                self._speculate(batch, sampled, t0)
        # Requests finished by the scheduler (stops, length, aborts, hopeless ones) must report even without a token.
        changed.update(r.group_id for r in self.scheduler.newly_finished if r.group_id in self._groups)
        if self.drafter is not None:
            for r in self.scheduler.newly_finished:
                self.drafter.forget(r.request_id)
        self.scheduler.newly_finished.clear()
        order = {gid: i for i, gid in enumerate(self._groups)}
        return [self._group_output(gid, delta=True) for gid in sorted(changed, key=order.__getitem__)]

    # ------------------------------------------------------------------ multi-step decoding
    def _steps_wanted(self) -> int:
        """How many decode steps the next step() may run (the scheduler grants fewer, or one, when the batch or the
        cache asks for it: Scheduler.reserve_steps). One unless every running request can take several steps without
        a result that differs from one-step decoding: no MTP drafting (its drafts need the scheduler every step: with
        MTP on, only the steps adaptive depth is sure not to draft in, `MTPDrafter.plain_steps`), no tensor-parallel
        ranks to keep in step (their runner is not a ModelRunner), nobody waiting (it would be admitted next step),
        and no stop strings on a request that samples from the shared generator (a stop string is found after the
        run, and the draws of that request's later steps would shift every other unseeded request's noise)."""
        n = self.config.num_scheduler_steps
        if (n == 1 or not isinstance(self.runner, ModelRunner) or self.scheduler.waiting
                or not self.scheduler.running):
            return 1
        if self.drafter is not None:
            n = min(n, self.drafter.plain_steps(len(self.scheduler.running)))
            if n <= 1:
                return 1
        for req in self.scheduler.running:
            p = req.params
            if p.stop and not p.greedy and p.seed is None:
                return 1
        return n

    def _run_steps(self, batch) -> list[Request]:
        """Up to batch.num_steps decode steps in one runner call: each step's tokens sampled exactly as a one-step
        batch samples them (`sample`, the same rows and generators), fed to the next step, the run ended after the
        first step in which a request meets eos or a stop token (later steps would compute tokens to throw away);
        then every step's tokens postprocessed in order (token stops, text, stop strings, logprobs), as one-step
        decoding would have, and the cache reserved for steps not run given back (Scheduler.finish_steps).
        -> (the requests that received a token, the steps run)."""
        reqs = [it.request for it in batch.items]
        # penalties read a row's output tokens: its own list, which the run's tokens join step by step
        outs = [list(r.output_token_ids) if r.params.needs_penalties else r.output_token_ids for r in reqs]
        rows = [SampleRow(r.params, self._generators[r.request_id], r.prompt_token_ids, out)
                for r, out in zip(reqs, outs)]
        stops = [frozenset(r.params.stop_token_ids).union(() if r.params.ignore_eos else r.eos_token_ids)
                 for r in reqs]
        steps: list[list[int]] = []
        lps: dict[str, list] = {r.request_id: [] for r in reqs if r.params.logprobs is not None}

        def choose(logits: torch.Tensor) -> tuple[list[int], bool]:
            result = sample(logits, rows, self.generator)
            toks = result.token_ids
            steps.append(toks)
            for r, out, t in zip(reqs, outs, toks):
                if r.params.needs_penalties:
                    out.append(t)
            for r, lp in zip(reqs, result.logprobs):
                if r.request_id in lps:
                    lps[r.request_id].append(lp)
            return toks, any(t in s for t, s in zip(toks, stops))

        greedy = all(r.params.greedy and r.params.logprobs is None and not r.params.needs_penalties for r in reqs)
        keep = self.drafter is not None         # the MTP blocks read the run's hidden states when drafting resumes
        run = self.runner.execute_greedy_steps(batch, stops, keep_hidden=keep) if greedy else None
        if run is not None:                     # the whole run in one C call (the same tokens: see the runner)
            steps = run
        else:
            self.runner.execute_steps(batch, choose, keep_hidden=keep)
        hidden = self.runner.run_hidden

        def on_token(req: Request) -> None:
            self._process_token(req, lps[req.request_id].pop(0) if req.request_id in lps else None)

        got = self.scheduler.finish_steps(batch, steps, on_token)
        if hidden is not None and len(steps):   # rows of request b: its positions it.start .. in step order
            n = len(steps)
            spans = [(it.request, it.start, b * n, n) for b, it in enumerate(batch.items)
                     if it.request.num_speculative_tokens and not it.request.is_finished]
            self.drafter.observe(spans, hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]))
        return got, len(steps)

    def _choose_tokens(self, batch, logits: torch.Tensor) -> tuple[list, dict]:
        """Tokens of every scheduled item from its logits rows (one row, or k + 1 for a verification) -> (per item:
        None, a token, or a verification's token list; request id -> logprob entries in token order)."""
        plain, spec, at = [], [], 0
        for it in batch.items:
            if it.num_draft:
                spec.append((it, at))
                at += it.num_draft + 1
            elif it.sample:
                plain.append((it, at))
                at += 1
        out: dict[int, Any] = {}
        lps: dict[str, list] = {}
        if plain:
            rows = [SampleRow(it.request.params, self._generators[it.request.request_id],
                              it.request.prompt_token_ids, it.request.output_token_ids) for it, _ in plain]
            sel = logits if not spec else logits[torch.tensor([j for _, j in plain])]
            result = sample(sel, rows, self.generator)
            for (it, _), tok, lp in zip(plain, result.token_ids, result.logprobs):
                out[id(it)] = tok
                lps[it.request.request_id] = [lp]
        for it, j in spec:
            req, k = it.request, it.num_draft
            rows = logits[j:j + k + 1]
            drafts = req.draft_token_ids[:k]                      # a copy (slicing)
            toks, a = self.drafter.verify(req, rows, drafts, self._generators[req.request_id], self.generator)
            out[id(it)] = toks
            self._count_verification(req, k, a)
            if req.params.logprobs is not None:
                raw = torch.log_softmax(rows[:len(toks)].float(), dim=-1)   # the rows that gave a token
                lps[req.request_id] = [logprob_entry(raw[i], t, req.params.logprobs) for i, t in enumerate(toks)]
        return [out.get(id(it)) for it in batch.items], lps

    def _count_verification(self, req: Request, k: int, a: int) -> None:
        """A verification of k drafts that accepted a: the request's metrics and adaptive depth's acceptance."""
        req.num_verify_steps += 1
        req.num_accepted_tokens += a
        while len(req.drafted_per_position) < k:
            req.drafted_per_position.append(0)
            req.accepted_per_position.append(0)
        for i in range(min(k, a + 1)):
            req.drafted_per_position[i] += 1
            req.accepted_per_position[i] += int(i < a)
        if self.drafter.adaptive is not None:
            self.drafter.adaptive.record_acceptance(k, a)

    def _spec_run(self, batch, t0: float) -> bool:
        """Speculative decoding's multi-step run: where one greedy request runs alone, verifies its full depth of
        drafts and nothing needs Python between its cycles, up to `num_scheduler_steps` cycles (verify, accept,
        draft) in one C call (MTPDrafter.cycles, kernels/speculate.c), the cache reserved for all of them; each
        cycle's tokens are then postprocessed in order as the engine's own verification steps would be, so the
        outputs are the same (docs/MTP.md, "Cycles in one call"). With adaptive depth, as many cycles as the depth
        it chose is sure to stay (`AdaptiveDepth.run_length`), reported with their cost (`AdaptiveDepth.ran`).
        -> False (nothing run: the ordinary step runs). t0: the step's start (process time)."""
        d, n = self.drafter, self.config.num_scheduler_steps
        it = batch.items[0]
        req, k = it.request, it.num_draft
        p = req.params
        if (n == 1 or len(batch.items) != 1 or batch.preempted or self.scheduler.waiting
                or len(self.scheduler.running) != 1 or not k or not it.sample or not p.greedy
                or p.logprobs is not None or p.needs_penalties
                or not isinstance(self.runner, ModelRunner) or not self.runner.spec_ready(d.head_weight)):
            return False
        cap = self._depth_cap(req)                 # the full depth: the run verifies it every cycle
        if k != (cap if d.adaptive is None else min(d.adaptive.depth or 0, cap)):
            return False
        if d.adaptive is not None:
            n = d.adaptive.run_length(n, [cap])
            if n < 1:
                return False
        while n > 1 and not self.kv.can_allocate(req, n * (k + 1)):
            n -= 1                                  # counted from num_computed_tokens: this cycle's rows included
        self.kv.allocate(req, n * (k + 1))
        stops = frozenset(p.stop_token_ids).union(() if p.ignore_eos else req.eos_token_ids)
        got = d.cycles(req, n, stops, p.max_tokens - len(req.output_token_ids),
                       self.scheduler.config.max_model_len - req.num_tokens)
        if got is None:                             # (the blocks reserved past this step's rows are kept till then)
            return False
        cycles, drafted = got
        for toks in cycles:
            self._count_verification(req, k, len(toks) - 1)
        self.scheduler.finish_cycles(it, cycles, lambda r: self._process_token(r, None))
        if d.adaptive is not None:                 # (a last cycle without drafts: its step is the choice below)
            d.adaptive.ran(len(cycles) - (not drafted and not req.is_finished), time.process_time() - t0)
        if not req.is_finished and not drafted:    # the drafts the run did not make: the drafter's own passes
            self._draft([req], t0, record=False)
        return True

    def _depth_cap(self, req: Request) -> int:
        """The most drafts `req` may have now: its num_speculative_tokens, less than the tokens it may still emit
        and the context length it may still take (a verification's last row is one more token)."""
        cap = self.scheduler.config.max_model_len
        return max(0, min(req.num_speculative_tokens, req.params.max_tokens - len(req.output_token_ids) - 1,
                          cap - req.num_tokens - 1))

    def _speculate(self, batch, sampled: list, t0: float) -> None:
        """After a step: keep the main model's final hidden states of the speculating requests, then draft for
        those now decoding (engine/speculative.py)."""
        d = self.drafter
        if d.adaptive is not None and d.adaptive.idle(len(self.scheduler.running), d.catch_up + 2):
            return                                          # settled on depth 0: plain decoding, nothing more
        hidden = self.runner.last_hidden
        lo, prefill = 0, False
        ready, spans = [], []
        for it, tok in zip(batch.items, sampled):
            req, n = it.request, it.num_tokens
            prefill |= n > it.num_draft + 1
            if req.num_speculative_tokens and not req.is_finished:
                keep = len(tok) if it.num_draft else n             # a verification keeps t and the accepted drafts
                spans.append((req, it.start, lo, keep))
                if req.num_pending_tokens == 1:
                    ready.append(req)
            lo += n
        d.observe(spans, hidden)
        if ready:
            self._draft(ready, t0, record=not prefill)

    def _draft(self, ready: list[Request], t0: float, record: bool) -> None:
        """Drafts for the requests now decoding: each one's cap, adaptive depth's choice, the drafter's passes;
        with `record`, the whole step's cost (its draft passes included) to adaptive depth."""
        d = self.drafter
        caps = [self._depth_cap(r) for r in ready]
        if d.adaptive is not None:
            caps = d.adaptive.choose(caps, len(self.scheduler.running) - len(ready))
        d.propose(ready, caps, self.generator, self._generators)
        if d.adaptive is not None and record:
            d.adaptive.record_step(time.process_time() - t0)

    def _process_token(self, req: Request, lp) -> None:
        tok = req.output_token_ids[-1]
        st = self._state[req.request_id]
        if lp is not None:
            chosen, rank, top = lp
            entry = {tok: Logprob(chosen, rank, self._decode1(tok))}
            for r, (tid, val) in enumerate(top, 1):
                entry.setdefault(tid, Logprob(val, r, self._decode1(tid)))
            req.logprobs.append(entry)
        if st.detok is None:
            return
        stopped_by_token = req.is_finished and req.finish_reason == "stop"
        if not stopped_by_token or req.params.include_stop_str_in_output:
            req.text += st.detok.push(tok)
        if req.is_finished and req.finish_reason != "stop":
            req.text += st.detok.flush()
        if req.params.stop and req.finish_reason in (None, "length"):
            self._check_stop_strings(req)

    def _check_stop_strings(self, req: Request) -> None:
        p = req.params
        longest = max(len(s) for s in p.stop)
        region = max(0, len(req.text) - (longest + 16))             # only the tail can hold a new match
        best = None
        for s in p.stop:
            at = req.text.find(s, region)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            at, s = best
            req.text = req.text[:at + (len(s) if p.include_stop_str_in_output else 0)]
            if req.is_finished:                  # the last allowed token completed a stop string
                req.finish_reason, req.stop_reason = "stop", s
            else:
                self.scheduler.finish(req, "stop", stop_reason=s)

    def _decode1(self, tid: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([tid])

    def _group_output(self, gid: str, delta: bool) -> RequestOutput:
        group = self._groups[gid]
        outs = []
        for req in group.reqs:
            st = self._state.get(req.request_id)
            if delta and st is not None:
                hold = 0 if req.is_finished or not req.params.stop else max(len(s) for s in req.params.stop) - 1
                end = max(st.emitted_text, len(req.text) - hold)
                text, st.emitted_text = req.text[st.emitted_text:end], end
                ids = req.output_token_ids[st.emitted_tokens:]
                st.emitted_tokens = len(req.output_token_ids)
                lps = None
                if req.logprobs is not None:
                    lps, st.emitted_logprobs = req.logprobs[st.emitted_logprobs:], len(req.logprobs)
                if req.is_finished:
                    del self._state[req.request_id]
                    self._generators.pop(req.request_id, None)
            else:
                text, ids, lps = req.text, list(req.output_token_ids), req.logprobs
            outs.append(CompletionOutput(req.index, text, ids, req.finish_reason, req.stop_reason, lps))
        finished = all(r.is_finished for r in group.reqs)
        out = RequestOutput(gid, group.prompt, group.prompt_token_ids, outs, finished,
                            group_metrics(group.reqs) if finished else None)
        if finished and all(r.request_id not in self._state for r in group.reqs):
            del self._groups[gid]
        return out
