"""Request state and the output types handed back to users. Plain data: no tensors, no policy.

Life of a `Request` (one sequence; a prompt with `n` samples becomes `n` requests sharing a `group_id`):

    WAITING --schedule--> RUNNING --stop / length--> FINISHED
       ^                    |
       +----preempt---------+      (cache freed, `num_computed_tokens` reset: recomputed from its tokens later)
    any state --abort--> FINISHED (finish_reason "abort")

The one counter that drives everything is `num_computed_tokens`: how many of `prompt + output` tokens have K/V in
the cache. Each step the scheduler hands the runner the next slice `[num_computed_tokens, num_computed_tokens + n)`;
when the slice reaches the end of the known tokens, the last position's logits are sampled and the new token is
appended. A decode is a slice of one token, a (chunked) prefill a longer one, a recompute after preemption simply a
prefill over prompt + output. This is vLLM v1's unified view; it keeps the scheduler free of "phase" flags.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .sampling import Logprob, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str                          # unique per sequence
    prompt_token_ids: list[int]
    params: SamplingParams
    group_id: str = ""                       # the user's request id (n > 1 shares it)
    index: int = 0                           # sample index within the group
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0             # tokens whose K/V is in the cache
    block_ids: list[int] = field(default_factory=list)   # global-attention blocks, in position order
    ring_id: int | None = None               # sliding-window ring
    num_preemptions: int = 0
    finish_reason: str | None = None         # "stop" | "length" | "abort"
    stop_reason: int | str | None = None     # the stop token id or stop string that ended it
    # output side, filled by the engine
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    # speculative decoding (engine/speculative.py): drafts proposed for the next step, fed after the known tokens
    # at positions num_tokens.. and never part of `output_token_ids` until verified
    num_speculative_tokens: int = 0          # this request's most drafts per step (0 = off)
    draft_token_ids: list[int] = field(default_factory=list)
    num_verify_steps: int = 0                # steps that verified at least one draft
    num_accepted_tokens: int = 0             # drafts accepted over those steps
    accepted_per_position: list[int] = field(default_factory=list)   # [j]: steps whose draft j+1 was accepted
    drafted_per_position: list[int] = field(default_factory=list)    # [j]: steps that proposed a draft j+1

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: empty prompt")
        self.group_id = self.group_id or self.request_id
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Known tokens not yet in the cache (1 while decoding, the rest of the prompt while prefilling)."""
        return self.num_tokens - self.num_computed_tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end); positions from num_tokens on are the pending drafts."""
        n = self.num_tokens
        if end > n:
            extra = self.draft_token_ids[max(0, start - n):end - n]
            return (self.token_slice(start, n) if start < n else []) + extra
        P = len(self.prompt_token_ids)
        if end <= P:
            return self.prompt_token_ids[start:end]
        if start >= P:
            return self.output_token_ids[start - P:end - P]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - P]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token: float | None        # seconds from arrival to the first sampled token
    decode_tokens_per_s: float | None        # (generated - 1) / (finish - first token)
    total_time: float | None = None
    num_preemptions: int = 0
    # speculative decoding (zero / empty when it is off)
    verify_steps: int = 0                    # steps that verified drafts
    accepted_tokens: int = 0                 # drafts accepted in them
    acceptance_per_position: list[float] = field(default_factory=list)   # [j]: P(draft j+1 accepted | proposed)

    @property
    def tokens_per_verify_step(self) -> float | None:
        """Tokens produced per verify step (accepted drafts + the one the main model adds), None without any."""
        return 1 + self.accepted_tokens / self.verify_steps if self.verify_steps else None


@dataclass
class RequestOutput:
    """vLLM-shaped result for one prompt: `outputs[i]` is sample i. In streaming mode `outputs[i].text` and
    `.token_ids` hold only the new part (the delta) and `finished` says whether the whole group is done."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None


def group_metrics(reqs: list[Request]) -> RequestMetrics:
    """Metrics of a group: sums of tokens, earliest first token, decode rate over the whole group."""
    first = [r.first_token_time for r in reqs if r.first_token_time is not None]
    ends = [r.finish_time for r in reqs if r.finish_time is not None]
    gen = sum(len(r.output_token_ids) for r in reqs)
    arrival = min(r.arrival_time for r in reqs)
    ttft = (min(first) - arrival) if first else None
    rate = None
    if first and ends and len(ends) == len(reqs):
        span = max(ends) - min(first)
        rate = (gen - len(reqs)) / span if span > 0 and gen > len(reqs) else None
    depth = max((len(r.drafted_per_position) for r in reqs), default=0)
    drafted = [sum(r.drafted_per_position[j] for r in reqs if j < len(r.drafted_per_position)) for j in range(depth)]
    accepted = [sum(r.accepted_per_position[j] for r in reqs if j < len(r.accepted_per_position)) for j in range(depth)]
    return RequestMetrics(prompt_tokens=reqs[0].num_prompt_tokens, generated_tokens=gen, time_to_first_token=ttft,
                          decode_tokens_per_s=rate, total_time=(max(ends) - arrival) if ends else None,
                          num_preemptions=sum(r.num_preemptions for r in reqs),
                          verify_steps=sum(r.num_verify_steps for r in reqs),
                          accepted_tokens=sum(r.num_accepted_tokens for r in reqs),
                          acceptance_per_position=[a / d if d else 0.0 for a, d in zip(accepted, drafted)])
