"""Sampling parameters and the sampler: per-request logits processing and seeded token choice.

`SamplingParams` follows vLLM's names and defaults (temperature 1.0, max_tokens 16, top_k off, ...) so that code
written for vLLM runs unchanged. Every field is checked in `__post_init__`, and an unknown keyword raises
`ValueError` naming it rather than the dataclass' `TypeError`: a typo such as `top_P=0.9` must not be ignored.

Order of logits processing for one row (R rows, V vocabulary), the same as transformers' warper order:
  1. penalties on raw logits: repetition (prompt + output tokens; divide positive logits, multiply negative ones,
     the CTRL rule), then frequency (x count in the output) and presence (once if in the output), as in vLLM;
  2. temperature == 0 -> greedy argmax, done;
  3. logits / temperature -> top_k -> top_p (smallest set with mass >= top_p, at least one token) -> min_p
     (drop tokens with prob < min_p * max prob);
  4. sample from softmax of what is left.
Log-probabilities returned to the user are those of the *raw* model distribution (log_softmax of the logits before
any processing), vLLM's default: they describe the model, not the sampling knobs.

Randomness: a request with a `seed` owns a `torch.Generator`, and its row draws its noise from that generator only,
so the same seed gives the same tokens whether the request runs alone or in a busy batch. Sampling uses the
exponential race (argmax of p_i / E_i with E_i ~ Exp(1) is a draw from p; gpt-fast `multinomial_sample_one_no_sync`),
which needs one noise vector per row and no host sync. Requests without a seed share the engine's generator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .. import kernels


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1                                   # independent samples per prompt
    temperature: float = 1.0                     # 0 = greedy
    top_k: int = 0                               # 0 or -1 = off
    top_p: float = 1.0                           # in (0, 1]; 1 = off
    min_p: float = 0.0                           # in [0, 1]; 0 = off
    repetition_penalty: float = 1.0              # > 0; 1 = off
    presence_penalty: float = 0.0                # in [-2, 2]
    frequency_penalty: float = 0.0               # in [-2, 2]
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)           # stop strings, matched on detokenized text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None                  # None = off; N = chosen token + top-N alternatives
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"SamplingParams.{name}: {msg}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        need(is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        need(is_num(self.temperature) and self.temperature >= 0, "temperature", "must be a number >= 0")
        need(is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 or -1 = off)")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        need(is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        need(is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
             "must be in [-2, 2]")
        need(is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
             "must be in [-2, 2]")
        need(self.seed is None or is_int(self.seed), "seed", "must be an integer or None")
        need(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be non-negative token ids")
        need(self.logprobs is None or (is_int(self.logprobs) and self.logprobs >= 0), "logprobs",
             "must be None or an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        return cls(**d)

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_dataclass_init = SamplingParams.__init__


def _checked_init(self, *args, **kwargs):
    """Unknown keywords -> ValueError naming them (the dataclass would raise a TypeError)."""
    if args:
        raise ValueError("SamplingParams takes keyword arguments only, e.g. SamplingParams(temperature=0.7)")
    unknown = sorted(set(kwargs) - _FIELDS)
    if unknown:
        raise ValueError(f"SamplingParams: unknown field(s) {unknown}; known fields: {sorted(_FIELDS)}")
    _dataclass_init(self, **kwargs)


SamplingParams.__init__ = _checked_init


@dataclass
class Logprob:
    logprob: float
    rank: int                      # 1 = most likely token under the raw model distribution
    decoded_token: str | None = None


@dataclass
class SampleRow:
    """What the sampler needs to know about one row of logits."""
    params: SamplingParams
    generator: torch.Generator | None        # None = the shared generator passed to `sample`
    prompt_token_ids: Sequence[int] = ()     # only read when repetition_penalty != 1
    output_token_ids: Sequence[int] = ()     # only read when a penalty is active


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: None, or (logprob of chosen, rank of chosen, [(token id, logprob), ...] top-N)
    logprobs: list[tuple[float, int, list[tuple[int, float]]] | None]


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(int(seed))


def apply_penalties(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """logits (R, V) fp32, modified in place for rows with penalties. Counts come from the request's token lists."""
    R, V = logits.shape
    for i, row in enumerate(rows):
        p = row.params
        if not p.needs_penalties:
            continue
        out = torch.tensor(list(row.output_token_ids), dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1:
            seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
            seen[out] = True
            seen[torch.tensor(list(row.prompt_token_ids), dtype=torch.long, device=logits.device)] = True
            lg = logits[i]
            logits[i] = torch.where(seen, torch.where(lg > 0, lg / p.repetition_penalty, lg * p.repetition_penalty), lg)
        if p.frequency_penalty or p.presence_penalty:
            counts = torch.bincount(out, minlength=V).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled logits (R, V); per-row top_k (0 = off), top_p, min_p (R,) -> logits with -inf outside.

    Vectorized over rows. Sorting V entries is the expensive part, so it runs only when top_k or top_p is active."""
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_lg, sorted_idx = logits.sort(dim=-1, descending=True)                  # (R, V)
        V = logits.shape[-1]
        rank = torch.arange(V, device=logits.device)
        drop = (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None])            # top-k by rank
        sorted_lg = sorted_lg.masked_fill(drop, neg_inf)
        probs = sorted_lg.softmax(dim=-1)
        # Keep token j if the mass strictly before it is < top_p: the smallest prefix reaching top_p.
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)   # top_p = 1: keep float-rounding tails
        drop[:, 0] = False
        logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_lg.masked_fill(drop, neg_inf))
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), neg_inf)
    return logits


def distributions(logits: torch.Tensor, rows: Sequence[SampleRow]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """The distributions `sample` draws from: logits (R, V) -> (greedy (R,) = argmax of the penalised logits,
    probs (r, V) = softmax of the processed logits of the r sampled (temperature > 0) rows, their row indices).
    Speculative verification reads the same distributions, so that what it accepts is distributed as this."""
    logits = logits.float()
    if any(r.params.needs_penalties for r in rows):
        logits = apply_penalties(logits.clone(), rows)
    greedy = kernels.argmax_rows(logits)                                    # (R,) greedy default; = argmax(-1)
    rand = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not rand:
        return greedy, None, rand
    sub = logits[rand] / torch.tensor([rows[i].params.temperature for i in rand], device=logits.device)[:, None]
    p = [rows[i].params for i in rand]
    if any(q.top_k > 0 or q.top_p < 1 or q.min_p > 0 for q in p):   # else filter_logits changes nothing
        sub = filter_logits(sub, torch.tensor([q.top_k for q in p], device=logits.device),
                            torch.tensor([q.top_p for q in p], device=logits.device, dtype=torch.float32),
                            torch.tensor([q.min_p for q in p], device=logits.device, dtype=torch.float32))
    return greedy, sub.softmax(dim=-1), rand


def logprob_entry(raw_logprobs: torch.Tensor, token: int, n: int) -> tuple[float, int, list[tuple[int, float]]]:
    """One row's (logprob of `token`, its rank, top-n (token id, logprob)) under the raw distribution."""
    chosen = float(raw_logprobs[token])
    rank = int((raw_logprobs > chosen).sum()) + 1
    top = []
    if n:
        vals, idx = raw_logprobs.topk(min(n, raw_logprobs.shape[-1]))
        top = list(zip(idx.tolist(), vals.tolist()))
    return chosen, rank, top


def sample(logits: torch.Tensor, rows: Sequence[SampleRow], shared_generator: torch.Generator | None = None
           ) -> SampleResult:
    """logits (R, V) -> one token per row (plus logprobs where asked). Rows are independent of each other."""
    logits = logits.float()
    R, V = logits.shape
    if len(rows) != R:
        raise ValueError(f"{len(rows)} sampling rows for {R} logit rows")
    want_lp = [r.params.logprobs is not None for r in rows]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
    tokens, probs, rand = distributions(logits, rows)
    if rand:
        noise = torch.empty_like(probs)
        for j, i in enumerate(rand):
            noise[j].exponential_(generator=rows[i].generator or shared_generator)
        tokens[rand] = kernels.argmax_rows(probs / noise)
    token_list = tokens.tolist()
    lps: list = [None] * R
    for i, r in enumerate(rows):
        if want_lp[i]:
            lps[i] = logprob_entry(raw_logprobs[i], token_list[i], r.params.logprobs)
    return SampleResult(token_list, lps)
