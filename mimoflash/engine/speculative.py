"""MTP speculative decoding: the model's MTP blocks draft, the main model verifies, caches roll back (docs/MTP.md).

One cycle per request, all inside the ordinary engine step (scheduler -> runner -> sampler -> postprocess):

  draft    after a step that left the request decoding at position q (t_{q+1} sampled, not yet cached), MTP block n
           (n = 0, 1, ...) reads the main model's hidden state h_q and the token n + 1 ahead (t_{q+1}, then its own
           previous drafts) and proposes d_{n+1}; with fewer blocks than drafts the last block is reused.
  verify   the next step feeds [t_{q+1}, d_1 .. d_k] at positions q+1 .. q+k+1 as k+1 rows of one sequence (the same
           rows path as a one-token decode, fused C step included) and every row is sampled: row j gives the main
           model's distribution for the token after d_j.
  accept   greedy: the longest prefix of drafts equal to the main model's argmax, plus the main model's token after
           it. Sampling: draft j is kept with probability min(1, p_j(d_j) / q_j(d_j)); the first rejected one is
           replaced by a draw from the normalised residual max(p_j - q_j, 0); if all are kept, one more token is drawn
           from p_k. p_j is exactly what plain decoding would sample from (same penalties, counting the drafts before
           it as output; same temperature, top-k/top-p/min-p), so the emitted tokens are distributed as without
           speculation (Leviathan et al. 2023; docs/MTP.md has the argument).
  rollback the rejected drafts' K/V: `KVCacheManager.rollback` frees whole blocks past the new end; ring slots need
           nothing (their slack of `max_draft` slots, kv_cache.py). MTP rings: an entry written from a draft token is
           remembered as tentative and rewritten on the next draft pass unless the draft turned out right.

MTP caches. Block n's K/V at position i depends only on (h_i, t_{i+n+1}) (one attention layer), so a block's ring is
brought up to date lazily, when it drafts: the rows from its first not-yet-correct position (at most CATCH_UP
positions back) to q, read from a buffer of the main model's final hidden states (the newest few positions of every
speculating request, written with one copy per step). Older ring entries that were not brought up to date (after a
prefill or a stretch without drafts) are masked (`_State.key_from`), so resuming costs a bounded, small catch-up.
Where adaptive depth has settled on depth 0 the engine step does nothing on the MTP side (`AdaptiveDepth.idle`),
except over the few steps before a trial, which keep the hidden states the trial's catch-up reads.

Greedy drafting runs every pass of a step in one runner call (`_propose_chain` -> `ModelRunner.draft_chain`,
kernels/draft.c): a pass's rows depend only on its block's state, so all of them are known before any runs, and the
drafts they read are filled in by the C loop as the passes produce them (catch-ups too long for the rows path are
stored first). Sampled drafts (each one drawn in Python) and runners without the fused blocks run pass by pass, one
C call a pass where `FusedMTPLayer.draft` can make it.

Where one greedy request runs alone, a whole run of cycles (verify, accept, draft) is one C call instead
(`cycles` -> `ModelRunner.spec_cycles`, kernels/speculate.c, started by `LLMEngine._spec_run`): this drafter's state
goes to C and comes back after, the same verification, acceptance and passes as above, so the same tokens, drafts
and caches bit for bit (docs/MTP.md, "Cycles in one call").

Adaptive depth picks, per step, one depth for all drafting requests (each capped by its own `num_speculative_tokens`)
that maximises expected tokens per second: the running acceptance rate of each draft position against the measured
CPU time of whole steps at each depth, draft passes included (see `AdaptiveDepth`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np
import torch

from .. import kernels
from .request import Request
from .runner import ModelRunner, Slice
from .sampling import SampleRow, distributions


@dataclass
class SpeculativeConfig:
    """vLLM's shape: `LLM(model, speculative_config={"method": "mtp", "num_speculative_tokens": 3})`.

    draft_vocab: the draft head's vocabulary (token ids; None = all). On a small model the head is most of a draft's
        cost; with a reduced vocabulary the drafts only propose those tokens (still lossless: the main model verifies
        every draft over the full vocabulary). `draft_vocab_size` = N keeps the N most frequent tokens of
        `draft_vocab_counts` (token counts, e.g. from held-out text) or, without counts, the N lowest token ids (a
        BPE vocabulary's first merges are its most frequent pairs)."""
    method: str = "mtp"
    num_speculative_tokens: int = 1
    adaptive: bool = False
    draft_vocab_size: int | None = None
    draft_vocab: Sequence[int] | None = None
    draft_vocab_counts: Any = None

    def __post_init__(self) -> None:
        if self.method != "mtp":
            raise ValueError(f"speculative_config.method: only 'mtp' is supported, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config.adaptive must be true or false, got {self.adaptive!r}")
        n = self.draft_vocab_size
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"speculative_config.draft_vocab_size must be a positive integer, got {n!r}")

    @classmethod
    def from_value(cls, value) -> "SpeculativeConfig | None":
        """None, a SpeculativeConfig or a dict (unknown keys are an error, not ignored)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict or SpeculativeConfig, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**value)

    def vocab(self, vocab_size: int) -> torch.Tensor | None:
        """The draft vocabulary as sorted token ids, or None for the full one."""
        if self.draft_vocab is not None:
            ids = sorted({int(t) for t in self.draft_vocab})
            if not ids or ids[0] < 0 or ids[-1] >= vocab_size:
                raise ValueError(f"speculative_config.draft_vocab must be non-empty token ids in [0, {vocab_size})")
            return torch.tensor(ids, dtype=torch.long)
        n = self.draft_vocab_size
        if n is None or n >= vocab_size:
            return None
        if self.draft_vocab_counts is not None:
            counts = torch.as_tensor(self.draft_vocab_counts, dtype=torch.float64)
            if counts.shape != (vocab_size,):
                raise ValueError(f"speculative_config.draft_vocab_counts must have {vocab_size} entries")
            ids = counts.argsort(descending=True, stable=True)[:n]
        else:
            ids = torch.arange(n)
        return ids.sort().values


def token_counts(token_ids, vocab_size: int) -> torch.Tensor:
    """Counts of each token id in a sample of text (for `draft_vocab_counts`)."""
    return torch.bincount(torch.as_tensor(token_ids, dtype=torch.long).reshape(-1), minlength=vocab_size)[:vocab_size]


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to `weights` (V,) >= 0, by inverse CDF: the first index whose
    running sum exceeds u * total, u uniform in [0, 1), which never lands on a zero weight. The same distribution
    as torch.multinomial(weights, 1), at a fraction of its cost here (~0.15 ms a draw over 8192 weights)."""
    c = weights.cumsum(0)
    u = torch.rand((), generator=generator, dtype=c.dtype) * c[-1]
    i = int(torch.searchsorted(c, u, right=True))
    if i >= weights.numel():                       # u rounded up to the total: the last index with weight
        i = int(weights.nonzero()[-1])
    return i


@dataclass
class _State:
    """A request's MTP side: the main model's recent final hidden states and how far each block's ring is right."""
    preemptions: int
    num_layers: int
    h0: int = 0                                   # hidden states kept without a gap from position h0 ...
    end: int = -1                                 # ... to end - 1 (the newest `keep` of them in the drafter's buffer)
    done: list[int] = field(default_factory=list)            # block n's ring is right for positions < done[n]
    key_from: list[int] = field(default_factory=list)        # block n attends to no ring entry before key_from[n]
    tentative: list[dict[int, int]] = field(default_factory=list)   # block n: position -> draft token it used
    draft_probs: torch.Tensor | None = None       # (k, V) the distributions the drafts were drawn from (sampling)

    def __post_init__(self) -> None:
        self.done = [0] * self.num_layers
        self.key_from = [0] * self.num_layers
        self.tentative = [{} for _ in range(self.num_layers)]


class AdaptiveDepth:
    """Chooses the step's draft depth from measurements (no fixed thresholds on batch size or acceptance).

    Expected tokens of a verify step with depth k: E(k) = 1 + sum_{j<=k} prod_{i<=j} a_i, a_i the acceptance rate
    of draft i given draft i-1 was accepted, counted (with exponential forgetting, so it follows the text) from a
    prior of one half-accepted draft: a few verified drafts outweigh it. Its cost: the measured time of a whole
    engine step (forward, verification, bookkeeping and the draft passes at its end) in process CPU time (on a
    shared machine wall time mostly measures the other jobs), per depth and number of sequences, the lower median
    of the last 9. Only settled steps are recorded: not the first SETTLE steps at a depth and number of sequences
    (the MTP rings' catch-up after a change of depth, caches still holding the other depth's working set: on the
    shipped model a trial's steps cost ~15% more than the same depth's steady steps). Per depth, because a step's
    cost is not a function of its rows alone: the draft passes cost per drafting sequence and per depth. For an
    unmeasured number of sequences a depth is interpolated linearly between measured ones; outside them a depth > 0
    keeps its ratio to depth 0 at the nearest measured one (a line through two noisy, close batch sizes,
    extrapolated, can make a deep depth look cheaper than none), and no depth is estimated cheaper than the one
    below it.

    The decision, per number of sequences: depths 0, 1 and 0 again (the cheapest two; the first samples of depth 0
    come from an engine's first steps) are held in turn (HOLD steps, and with drafts until JUDGED verifications
    judged them); then the depth maximising sum_r E_r(k) / cost(k)
    is taken, but the current choice is left only for a predicted gain of MARGIN (a change of depth costs a catch-up
    the table does not see; in both directions, so two near-equal depths do not alternate). A neighbouring depth,
    deeper and shallower in turn, is tried now and then (held as above) so that the table follows the machine; a
    trial that does not change the choice multiplies the wait before the next (from 2 * explore steps) by 2, or by
    8 when the tried depth was predicted more than 1 - FAR slower (large batches, where each trial, its catch-up and
    the one-at-a-time steps before it cost ~5% of a 128-step run at 16 sequences and put the sequences out of step
    with each other), up to 256 * explore steps."""

    HOLD = 4                                          # steps a measured or tried depth is kept, at least ...
    JUDGED = 16                                       # ... until this many verifications judged its drafts
    SETTLE = 2                                        # the first steps at a depth are not recorded
    MARGIN = 0.02                                     # predicted gain needed to change the choice
    FAR = 0.85                                        # a trial predicted below this share of the best backs off 8x
    PRIOR = 1.0                                       # pseudo-count of the acceptance prior (one draft, a = 0.5)

    def __init__(self, max_depth: int, decay: float = 0.02, explore: int = 32, clock=None):
        self.max_depth, self.decay, self.explore = max_depth, decay, explore
        self.clock = clock                            # e.g. time.process_time: steps timed end to end (_elapsed)
        self._mark: tuple[float, int] | None = None   # (clock, steps) at the end of the last step seen
        self._runs: set[tuple[int, int]] = set()      # (depth, sequences) that ran several steps per call
        self.hits = [0.0] * max_depth                 # forgotten exponentially: a_i follows the recent text
        self.judged = [0.0] * max_depth
        self.step_time: dict[int, dict[int, float]] = {}   # depth -> sequences -> seconds (median of recent ones)
        self._recent: dict[tuple[int, int], list[float]] = {}
        self.steps = 0
        self.interval = 2 * explore
        self.next_trial = 2 * explore
        self.best: dict[int, int] = {}                # sequences -> the depth chosen (apart from trials)
        self.last_best: int | None = None             # the choice for this step's number of sequences
        self.depth: int | None = None                 # chosen this step
        self.run = 0                                  # consecutive steps at this depth and number of sequences
        self.sequences = 0                            # sequences in this step (drafting or not)
        self.hold = 0
        self.need = 0                                 # verifications still wanted before a held depth is judged
        self.up = False                               # the direction of the last trial
        self.cap = 0                                  # steps a held depth may still wait for its verifications
        self.checked = False                          # depth 0 measured again after depth 1
        self.trial: tuple[int, float] | None = None   # the depth tried and its predicted share of the best rate

    @property
    def accept(self) -> list[float]:
        """a_i, the conditional acceptance rate of draft i + 1."""
        return [(h + 0.5 * self.PRIOR) / (n + self.PRIOR) for h, n in zip(self.hits, self.judged)]

    def record_step(self, seconds: float) -> None:
        """The cost of the step whose depth `choose` just picked (counted only once the depth has settled)."""
        seconds = self._elapsed(seconds, 1)
        if self.depth is not None and self.run > self.SETTLE and (self.depth, self.sequences) not in self._runs:
            self._record(self.depth, seconds)

    def _elapsed(self, seconds: float | None, steps: int) -> float | None:
        """The cost of the last `steps` steps: with a clock, the time since the end of the step before them when
        that one was seen too (so that what the engine does once per call after a step, its outputs and
        detokenizing, counts: a run of several steps per call pays it once; without it depth 1 looked ~5% cheaper
        against multi-step plain decoding than it was), else `seconds` as the caller measured them."""
        if self.clock is None:
            return seconds
        now = self.clock()
        mark, self._mark = self._mark, (now, self.steps)
        return now - mark[0] if mark is not None and mark[1] == self.steps - steps else seconds

    def _record(self, depth: int, seconds: float) -> None:
        recent = self._recent.setdefault((depth, self.sequences), [])
        recent.append(seconds)
        del recent[:-9]
        # the lower median: of two samples the smaller (an engine's first steps at a batch size pay first touches)
        self.step_time.setdefault(depth, {})[self.sequences] = sorted(recent)[(len(recent) - 1) // 2]

    def record_acceptance(self, proposed: int, accepted: int) -> None:
        keep = 1.0 - self.decay
        self.need -= 1
        for j in range(min(proposed, accepted + 1)):        # draft j+1 was judged only if drafts 1..j were accepted
            self.hits[j] = keep * self.hits[j] + (1.0 if j < accepted else 0.0)
            self.judged[j] = keep * self.judged[j] + 1.0

    def expected_tokens(self, k: int) -> float:
        e, run = 1.0, 1.0
        for a in self.accept[:k]:
            run *= a
            e += run
        return e

    @staticmethod
    def _interp(table: dict[int, float], x: int) -> float:
        if x in table:
            return table[x]
        xs = sorted(table)
        lo = max([v for v in xs if v < x], default=None)
        hi = min([v for v in xs if v > x], default=None)
        if lo is None:
            lo, hi = xs[0], xs[1]
        elif hi is None:
            lo, hi = xs[-2], xs[-1]
        return table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)

    def cost(self, depth: int, sequences: int) -> float | None:
        """Estimated seconds of a settled step at `depth` with `sequences` sequences (None: depth never measured).
        Between two measured batch sizes: linear. Outside a deeper depth's measured range: its ratio to depth 0 at
        the nearest measured size carries over (a straight line through two noisy, close points, extrapolated, can
        make a deep depth look cheaper than no drafts at all). A step never costs less than one with fewer drafts."""
        t = self.step_time.get(depth)
        if not t:
            return None
        xs = sorted(t)
        if sequences in t or xs[0] < sequences < xs[-1] or (depth == 0 and len(t) >= 2):
            est = self._interp(t, sequences)
        else:
            m = xs[0] if sequences < xs[0] else xs[-1]       # the nearest measured batch size
            base = self.step_time.get(0, {})
            ref = self.cost(0, sequences) if depth and m in base and base[m] > 0 else None
            est = t[m] * ref / base[m] if ref is not None and ref > 0 else t[m] * sequences / m
        if depth:
            shallower = self.cost(depth - 1, sequences)
            if shallower is not None:
                est = max(est, shallower)
        return est

    def rates(self, caps: list[int], sequences: int) -> dict[int, float]:
        """Predicted tokens per second of each measured depth up to max(caps), for drafting requests with these
        caps in a step of `sequences` sequences."""
        out = {}
        for k in range(max(caps, default=0) + 1):
            cost = self.cost(k, sequences)
            if cost is not None and cost > 0:
                out[k] = sum(self.expected_tokens(min(k, c)) for c in caps) / cost
        return out

    def plain_steps(self, sequences: int, margin: int) -> int:
        """How many of the next steps are sure to draft nothing with this many sequences: where depth 0 is the
        settled choice, those before the next trial less `margin` (the steps that keep the hidden states its
        catch-up reads); while depth 0 is held for a measurement or a trial, the held steps. 0 otherwise. The engine
        runs such steps without the MTP side, several per call where it can (multi-step decoding: depth 0 then
        costs what plain decoding costs), and reports them with `skipped`."""
        if self.depth != 0 or sequences != self.sequences:
            return 0
        if self.hold:
            return self.hold
        if self.last_best != 0:
            return 0
        return max(0, self.next_trial - self.steps - margin) if self.explore else 1 << 30

    def skipped(self, steps: int, seconds: float | None = None) -> None:
        """`steps` steps run at depth 0 without the MTP side; with `seconds`, the CPU time of a run of several steps
        in one call, whose cost per step is from then on depth 0's cost at this many sequences (steady: recorded
        without SETTLE; single steps at depth 0 are no longer recorded there: plain decoding runs several per call)."""
        self.steps += steps
        self.run += steps
        self.hold = max(0, self.hold - steps)
        seconds = self._elapsed(seconds, steps)
        if seconds is not None and steps > 1:
            self._from_runs(0)
            self._record(0, seconds / steps)

    def _from_runs(self, depth: int) -> None:
        """From now on `depth` at this many sequences costs what its runs of several steps per call cost (its
        single steps' samples dropped, and no longer recorded)."""
        if (depth, self.sequences) not in self._runs:
            self._runs.add((depth, self.sequences))
            self._recent.pop((depth, self.sequences), None)

    def run_length(self, want: int, caps: list[int]) -> int:
        """How many of the next steps may run as speculative cycles in one call at the depth just chosen, each a
        step whose choice is sure to be that depth again, at most `want`: while the depth is held, until its hold
        and the verifications it waits for are done; otherwise while it stays the best rate for requests with
        these caps and no trial is due. 0 where a choice is due now (the engine's own step then makes it)."""
        if not self.depth:
            return 0
        if self.hold > 0 or (self.need > 0 and self.cap > 0):
            return max(1, min(want, max(self.hold, min(self.need, self.cap))))
        if self.trial is not None or (self.explore and self.steps >= self.next_trial):
            return 0
        rate = self.rates(caps, self.sequences)
        best = max(rate, key=rate.__getitem__) if rate else self.depth
        if self.depth not in rate or (best != self.depth and rate[best] >= (1 + self.MARGIN) * rate[self.depth]):
            return 0
        return min(want, self.next_trial - self.steps) if self.explore else want

    def ran(self, steps: int, seconds: float) -> None:
        """`steps` speculative cycles run in one call at the chosen depth, in `seconds` of CPU time (the whole engine
        step): counted as that many steps that chose the depth, and, after the depth settled, the cost per step of
        this depth from now on (its runs', as for depth 0's: `skipped`). Their verifications were recorded by
        `record_acceptance`."""
        self.steps += steps
        self.run += steps
        self.hold, self.cap = max(0, self.hold - steps), self.cap - steps
        seconds = self._elapsed(seconds, steps)
        if steps > 0 and self.run > self.SETTLE + steps and seconds is not None:
            self._from_runs(self.depth)
            self._record(self.depth, seconds / steps)

    def idle(self, sequences: int, margin: int) -> bool:
        """A step that is sure to draft nothing, with no trial within `margin` steps: counted and True (the caller
        then does nothing on the MTP side). Only once depth 0 is the settled choice for this many sequences."""
        if self.hold or self.plain_steps(sequences, margin) <= 0:
            return False
        self.skipped(1)
        return True

    def choose(self, caps: list[int], other_rows: int) -> list[int]:
        """caps: each drafting request's own limit; other_rows: rows of the step that are not theirs -> depths."""
        self.steps += 1
        prev, seqs = self.depth, self.sequences
        self.sequences = other_rows + len(caps)
        top = max(caps, default=0)
        self.depth = self._pick(caps, top) if top else 0
        self.run = self.run + 1 if self.depth == prev and self.sequences == seqs else 1
        return [min(self.depth, c) for c in caps]

    def _pick(self, caps: list[int], top: int) -> int:
        if (self.hold > 0 or (self.need > 0 and self.depth and self.cap > 0)) and self.depth is not None \
                and self.depth <= top:
            self.hold, self.cap = max(0, self.hold - 1), self.cap - 1
            return self.depth
        for k in (0, 1):                              # measure depths 0 and 1 first (the cheapest two) ...
            if k not in self.step_time:
                if self.depth != k:
                    self._hold(k)
                return k
        if not self.checked:                          # ... then depth 0 again: its first samples came from the
            self.checked = True                       # engine's first steps (first touches), or a busy moment, and
            self._hold(0)                             # once made depth 1 look cheaper at 8 sequences
            return 0
        rate = self.rates(caps, self.sequences)
        best = max(rate, key=rate.__getitem__)
        chosen = self.best.get(self.sequences)
        cur = chosen if chosen in rate else 0
        if best != cur and rate[best] < (1 + self.MARGIN) * rate[cur]:
            best = cur                                # a change of depth costs a catch-up; timings are noisy
        if self.trial is not None:                    # a trial just ended
            tried, share = self.trial
            self.trial = None
            if best == chosen:                        # it did not change the choice: wait longer
                self.interval = min(self.interval * (8 if share < self.FAR else 2), 256 * self.explore)
                self.next_trial = self.steps + self.interval
        if chosen is not None and best != chosen:     # the choice moved: watch it closely again
            self.interval, self.next_trial = 2 * self.explore, self.steps + 2 * self.explore
        self.best[self.sequences] = self.last_best = best
        if self.explore and self.steps >= self.next_trial:
            self.up = not self.up                     # deeper and shallower in turn
            t = best + 1 if best < top and (best == 0 or self.up) else best - 1
            if t >= 0:
                self.trial = (t, rate[t] / rate[best] if t in rate else 1.0)    # unmeasured: not known far
                self.next_trial = self.steps + self.interval     # until the trial's verdict moves it
                self._hold(t)
                return t
        return best

    def _hold(self, depth: int) -> None:
        """Keep `depth` for HOLD steps and, with drafts, until JUDGED verifications judged them (acceptance is
        measured only while drafting: alone, 4 steps would judge 4 first drafts), at most JUDGED steps. Depth 0 is
        held JUDGED steps: an engine may run them as plain decoding, several per call (`plain_steps`), and the
        cost per step of a short run is not that of the runs of up to 8 steps that plain decoding makes."""
        self.hold = (self.HOLD if depth else self.JUDGED) - 1
        self.need, self.cap = self.JUDGED if depth else 0, self.JUDGED - 1


class MTPDrafter:
    """Drafting, verification and the MTP-side state of every speculating request (module docstring)."""

    CATCH_UP = 16

    def __init__(self, model, runner: ModelRunner, config: SpeculativeConfig, max_draft: int):
        self.model, self.runner, self.config = model, runner, config
        mc = model.config
        self.num_layers = mc.num_nextn_predict_layers
        if self.num_layers < 1:
            raise ValueError("speculative decoding with method 'mtp' needs a model with MTP layers "
                             "(num_nextn_predict_layers >= 1); this model has none")
        if config.num_speculative_tokens > self.num_layers:
            warnings.warn(f"num_speculative_tokens={config.num_speculative_tokens} with {self.num_layers} MTP layer(s): "
                          f"drafts {self.num_layers + 1}..{config.num_speculative_tokens} reuse the last MTP layer",
                          stacklevel=3)
        self.window = runner.layout.swa_keys
        # After a prefill or a stretch without drafting, a block's ring is brought up to date over at most the last
        # `catch_up` positions and the older entries are masked: on the shipped model, resuming after 22 steps
        # without drafts gave first-draft acceptance 0.83 with 16 positions as with the whole window of 128 (0.59
        # with 1), at an eighth of the catch-up cost.
        self.catch_up = min(self.window, self.CATCH_UP)
        self.keep = self.catch_up + max_draft + 1        # hidden states kept per request
        self.hbuf: torch.Tensor | None = None             # (rings * keep, D), see observe
        self.states: dict[str, _State] = {}
        self.vocab = config.vocab(mc.vocab_size)          # (S,) or None
        self.head_weight = None
        self.vocab_ids = None if self.vocab is None else self.vocab.tolist()     # draft column -> token id
        if self.vocab is not None:
            self.head_weight = model.lm_head.weight.detach().index_select(0, self.vocab).contiguous()
        self.hidden_pre_norm = all(getattr(l, "hidden_pre_norm", True) for l in model.mtp_layers())
        self.adaptive = (AdaptiveDepth(config.num_speculative_tokens, clock=time.process_time) if config.adaptive
                         else None)
        self.chain = True           # greedy passes in one runner call where it can (`_propose_chain`); tests: off

    # ------------------------------------------------------------------ state
    def state(self, req: Request) -> _State:
        st = self.states.get(req.request_id)
        if st is None or st.preemptions != req.num_preemptions:       # recomputed from scratch: so is our side
            st = self.states[req.request_id] = _State(req.num_preemptions, self.num_layers)
        return st

    def forget(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def plain_steps(self, sequences: int) -> int:
        """How many of the next steps of `sequences` sequences are sure to draft nothing (adaptive depth settled on
        or measuring depth 0; `AdaptiveDepth.plain_steps`): the engine may run them as plain decoding, several per
        call, and then reports them with `skipped`. 0 without adaptive depth (every step drafts). The runs may reach
        the next trial: the engine keeps their hidden states (`observe`), which the trial's catch-up reads, as the
        single steps just before a trial keep theirs (`AdaptiveDepth.idle`'s margin)."""
        return 0 if self.adaptive is None else self.adaptive.plain_steps(sequences, 0)

    def skipped(self, steps: int, seconds: float) -> None:
        """`steps` steps run as plain decoding in one call, in `seconds` of CPU time. The MTP side needs nothing
        else: the requests' rings are brought up to date, bounded, when they draft again (`propose`)."""
        if self.adaptive is not None:
            self.adaptive.skipped(steps, seconds)

    def observe(self, spans: list[tuple[Request, int, int, int]], hidden: torch.Tensor) -> None:
        """spans: (request, first position, first row of `hidden`, rows); hidden (N, D): the step's final hidden
        states. Each request's newest `keep` positions are kept in one buffer of `keep` slots per ring (slot
        ring_id * keep + position % keep), written with one copy for the whole step."""
        keep, runs = self.keep, []
        for req, start, lo, n in spans:
            st = self.state(req)
            if n > keep:
                lo, start, n = lo + n - keep, start + n - keep, keep
            if start != st.end:                                     # first rows, or recomputed after preemption
                st.h0 = start
            st.end = start + n
            runs.append((lo, req.ring_id * keep, start, n))
        if not runs:
            return
        if self.hbuf is None:
            self.hbuf = hidden.new_zeros(self.runner.layout.num_rings * keep, hidden.shape[1])
        if len(runs) <= 2 and all(start % keep + n <= keep for _, _, start, n in runs):
            for lo, base, start, n in runs:           # a request or two (batch 1): slice copies, no index tensors
                self.hbuf[base + start % keep:base + start % keep + n].copy_(hidden[lo:lo + n])
            return
        src = [i for lo, _, _, n in runs for i in range(lo, lo + n)]
        dst = [base + p % keep for _, base, start, n in runs for p in range(start, start + n)]
        rows = hidden if len(src) == hidden.shape[0] and src[-1] == len(src) - 1 else hidden[torch.tensor(src)]
        self.hbuf.index_copy_(0, torch.tensor(dst), rows)

    def hidden(self, req: Request, lo: int, hi: int) -> torch.Tensor:
        """(hi - lo, D) the kept final hidden states at positions lo .. hi - 1 (lo >= h0, within the newest keep)."""
        base, keep = req.ring_id * self.keep, self.keep
        if lo // keep == (hi - 1) // keep:                          # no wrap in the buffer: a view
            return self.hbuf[base + lo % keep:base + (hi - 1) % keep + 1]
        return self.hbuf[torch.tensor([base + p % keep for p in range(lo, hi)])]

    # ------------------------------------------------------------------ drafting
    def propose(self, reqs: list[Request], depths: list[int], shared_generator, generators: dict) -> None:
        """Draft `depths[i]` tokens for each request (decoding at position num_computed_tokens - 1); sets
        req.draft_token_ids and, for sampled requests, the draft distributions."""
        work = []
        for r, k in zip(reqs, depths):
            if k <= 0:
                continue
            st = self.state(r)
            r.draft_token_ids = []
            st.draft_probs = None
            toks = r.prompt_token_ids + r.output_token_ids               # t_0 .. t_{q+1}, once per request
            for n in range(self.num_layers):             # tentative entries the new tokens confirmed
                d, tent = st.done[n], st.tentative[n]
                while d in tent and d + n + 1 < len(toks) and toks[d + n + 1] == tent[d]:
                    d += 1
                st.done[n] = d
                if tent:
                    st.tentative[n] = {}
            work.append((r, k, st, toks))
        if not work:
            return
        probs: dict[str, list[torch.Tensor]] = {}
        greedy = (isinstance(self.runner, ModelRunner)          # (a tensor-parallel group's runner: execute_mtp)
                  and all(r.params.greedy and not r.params.needs_penalties for r, *_ in work))
        depth = max(w[1] for w in work)
        if greedy and self.chain and self._propose_chain(work, depth):
            return
        for n in range(depth):
            li, slices, hid, owners, fill, fill_hid = self._pass_rows(n, work, [w[0].draft_token_ids for w in work])
            if fill:
                self.runner.fill_mtp_kv(li, fill, torch.cat(fill_hid) if self.hidden_pre_norm
                                        else self.model.model.norm(torch.cat(fill_hid)))
            hidden = self._pass_hidden(hid)
            if greedy:                                   # the argmax in the pass's own C call
                tok = self.runner.draft_greedy(li, slices, hidden, self.head_weight)
                if self.vocab is not None:
                    tok = [self.vocab_ids[i] for i in tok]
            else:
                logits = self.runner.execute_mtp(li, slices, hidden, self.head_weight)     # (R, S or V)
                tok = self._draft_tokens(logits, owners, shared_generator, generators, probs)
            self._passed(owners)
            for (r, *_), t in zip(owners, tok):
                r.draft_token_ids.append(t)
        for r, k, st, _ in work:
            if r.request_id in probs:
                st.draft_probs = torch.stack(probs[r.request_id])

    def _pass_rows(self, n: int, work: list, drafts: list[list[int]]) -> tuple:
        """Draft pass n's rows: (MTP block, slices, per slice the hidden states it reads, owners (request, state, first
        row's position, q, n), catch-up slices that only store K/V, their hidden states). drafts[i]: work item i's
        drafts d_1 .. d_n so far, or what stands for them (`_propose_chain`)."""
        li = min(n, self.num_layers - 1)
        slices, hid, owners, fill, fill_hid = [], [], [], [], []
        for (r, k, st, toks), dl in zip(work, drafts):
            if k <= n:
                continue
            q = r.num_computed_tokens - 1
            if n < self.num_layers:
                s = max(st.done[li], q - self.catch_up + 1, st.h0, 0)
                if s > st.done[li]:           # a catch-up bounded to `catch_up` positions: the stale ring
                    st.key_from[li] = s       # entries before s are masked rather than recomputed
                # row i (s <= i <= q) reads t_{i+n+1}: a known token for i <= q - n, else draft d_{i+n-q}
                ids = toks[s + n + 1:q + 2] + dl[max(0, s + n - q - 1):n]
            else:                                    # the last block reused: one row, h_q and the newest draft,
                s, ids = q + n - li, [dl[n - 1]]     # one position further per reuse (below)
            if len(ids) > self.runner.max_rows:        # a catch-up: the older rows only need their K/V
                cut = len(ids) - self.runner.max_rows
                fill.append(Slice(r, s, ids[:cut], "none"))
                fill_hid.append(self.hidden(r, s, s + cut))
                s, ids = s + cut, ids[cut:]
            kf = st.key_from[li]                     # once the window has moved past it, no mask is needed
            slices.append(Slice(r, s, ids, "last", kf if kf > s - self.window + 1 else 0))
            hid.append(self.hidden(r, min(s, q), q + 1))
            owners.append((r, st, s, q, n))
        return li, slices, hid, owners, fill, fill_hid

    def _pass_hidden(self, hid: list[torch.Tensor]) -> torch.Tensor:
        hidden = hid[0] if len(hid) == 1 else torch.cat(hid)
        return hidden if self.hidden_pre_norm else self.model.model.norm(hidden)

    def _passed(self, owners: list) -> None:
        """After a draft pass: which of its block's ring entries are right, which tentative (rows fed a draft)."""
        for r, st, s, q, n in owners:
            if n < self.num_layers and n:
                tent = st.tentative[n]
                for i in range(max(s, q - n + 1), q + 1):     # rows fed a draft token: tentative
                    tent[i] = r.draft_token_ids[i + n - q - 1]
                st.done[n] = min([i for i in tent if i >= s] + [q + 1])
            elif n == 0:                                       # block 0 reads known tokens only
                st.done[0] = q + 1

    def _propose_chain(self, work: list, depth: int) -> bool:
        """Every greedy draft pass of the step in one runner call (`ModelRunner.draft_chain`, kernels/draft.c): the
        passes' rows are known before any runs (a pass's rows depend on its block's state alone), the drafts they
        read are not, so work item i's draft d_{j+1} stands in them as -(1 + j * W + i), its place in the output.
        Catch-ups (the older rows of a pass longer than the rows path takes: known tokens only, K/V only) are stored
        first: each touches only its own block's ring, which no other pass of the step reads.
        -> False (nothing drafted) where the runner cannot chain the passes."""
        W = len(work)
        stand_in = [[-(1 + j * W + i) for j in range(k)] for i, (_, k, _, _) in enumerate(work)]
        passes, owned = [], []
        for n in range(depth):
            li, slices, hid, owners, fill, fill_hid = self._pass_rows(n, work, stand_in)
            if fill:
                self.runner.fill_mtp_kv(li, fill, self._pass_hidden(fill_hid))
            at = [n * W + i for i, w in enumerate(work) if w[1] > n]
            passes.append((li, slices, self._pass_hidden(hid), at))
            owned.append(owners)
        out = self.runner.draft_chain(passes, self.head_weight, self.vocab, depth * W)
        if out is None:
            return False
        for i, (r, k, _, _) in enumerate(work):
            r.draft_token_ids = [out[j * W + i] for j in range(k)]
        for owners in owned:
            self._passed(owners)
        return True

    def cycles(self, req: Request, n: int, stops: frozenset, out_left: int, len_left: int
               ) -> tuple[list[list[int]], bool] | None:
        """Up to n greedy speculative cycles of `req` (verify its drafts, accept, draft again) in one runner call
        (`ModelRunner.spec_cycles`, kernels/speculate.c), the cache reserved for all of them by the caller: the
        same verification, acceptance and drafting as the engine's steps with `verify` and `propose`, this drafter's
        state (kept hidden states, the rings' done / key_from / tentative entries) handed over and taken back.
        out_left / len_left: tokens the request may still emit / still hold (max_tokens, max_model_len): the run
        ends before a cycle that could not verify the full depth. -> (each cycle's kept tokens, whether the drafts
        for the next step are made: if not, `propose` has to run), or None (nothing run: see spec_cycles)."""
        st, k = self.state(req), len(req.draft_token_ids)
        if (self.hbuf is None or not self.chain or not self.hidden_pre_norm or not 1 <= k < kernels.SPEC_DRAFTS
                or st.end != req.num_computed_tokens or st.draft_probs is not None):
            return None
        S = kernels
        state = np.zeros(S.SPEC_STATE, dtype=np.int64)
        pos = req.num_computed_tokens
        state[[S.SPEC_POS, S.SPEC_DEPTH, S.SPEC_OUT_LEFT, S.SPEC_LEN_LEFT, S.SPEC_H0, S.SPEC_END]] = (
            pos, k, out_left, len_left, st.h0, st.end)
        state[S.SPEC_DRAFTS_AT:S.SPEC_DRAFTS_AT + k] = req.draft_token_ids
        for b in range(self.num_layers):
            state[S.SPEC_DONE + b], state[S.SPEC_KEY_FROM + b] = st.done[b], st.key_from[b]
            tent = st.tentative[b]
            if tent:
                lo = min(tent)
                if sorted(tent) != list(range(lo, lo + len(tent))):
                    return None
                state[S.SPEC_TENT_LO + b], state[S.SPEC_TENT_N + b] = lo, len(tent)
                at = S.SPEC_TENT + b * S.SPEC_DRAFTS
                state[at:at + len(tent)] = [tent[i] for i in range(lo, lo + len(tent))]
        base = max(0, pos - 4 * self.keep)            # rows and confirmations read a few dozen positions back
        seq = np.zeros(pos - base + 2 + n * (k + 1), dtype=np.int64)
        seq[:pos + 1 - base] = req.token_slice(base, pos + 1)
        got = self.runner.spec_cycles(req, n, state, seq, base, stops, self.head_weight, self.vocab, self.hbuf,
                                      self.keep, self.catch_up)
        if got is None:
            return None
        ran, toks, counts = got
        st.h0, st.end = int(state[S.SPEC_H0]), int(state[S.SPEC_END])
        depth = int(state[S.SPEC_DEPTH])
        if depth >= 0:                                 # (-1: the last cycle's drafting state untouched)
            for b in range(self.num_layers):
                st.done[b], st.key_from[b] = int(state[S.SPEC_DONE + b]), int(state[S.SPEC_KEY_FROM + b])
                lo, m = int(state[S.SPEC_TENT_LO + b]), int(state[S.SPEC_TENT_N + b])
                at = S.SPEC_TENT + b * S.SPEC_DRAFTS
                st.tentative[b] = dict(zip(range(lo, lo + m), state[at:at + m].tolist()))
        req.draft_token_ids = state[S.SPEC_DRAFTS_AT:S.SPEC_DRAFTS_AT + max(depth, 0)].tolist()
        out, i = [], 0
        for c in counts:
            out.append(toks[i:i + c])
            i += c
        return out, depth > 0

    def _draft_tokens(self, logits: torch.Tensor, owners: list, shared_generator, generators: dict,
                      probs: dict) -> list[int]:
        """One draft per row of `logits` (R, S or V): the argmax for greedy rows, else a draw from the row's
        distribution under its own sampling settings (kept in `probs`, full vocabulary, for verification)."""
        if all(r.params.greedy and not r.params.needs_penalties for r, *_ in owners):       # plain argmax
            best = kernels.argmax_rows(logits).tolist()
            return best if self.vocab is None else [self.vocab_ids[i] for i in best]
        V = self.model.config.vocab_size
        penalties = any(r.params.needs_penalties for r, *_ in owners)
        if self.vocab is not None and penalties:              # penalties index by token id: the full vocabulary
            full = logits.new_full((logits.shape[0], V), float("-inf"))
            logits = full.index_copy_(1, self.vocab, logits)
        reduced = self.vocab is not None and not penalties      # distributions over the draft vocabulary's columns
        # Token lists are read only for penalties: the drafts before this one count as output (docs/MTP.md).
        rows = [SampleRow(r.params, generators.get(r.request_id), r.prompt_token_ids,
                          r.output_token_ids + r.draft_token_ids if r.params.needs_penalties else ())
                for r, *_ in owners]
        greedy, p, rand = distributions(logits, rows)
        tok = (self.vocab[greedy] if reduced else greedy).tolist()
        for j, i in enumerate(rand):
            r = owners[i][0]
            g = generators.get(r.request_id) or shared_generator
            t = draw(p[j], g)
            if reduced:
                tok[i] = int(self.vocab[t])
                q = p.new_zeros(V).index_copy_(0, self.vocab, p[j])
            else:
                tok[i], q = t, p[j]
            probs.setdefault(r.request_id, []).append(q)
        return tok

    # ------------------------------------------------------------------ verification
    def verify(self, req: Request, logits: torch.Tensor, drafts: list[int], generator, shared_generator
               ) -> tuple[list[int], int]:
        """logits (k+1, V): the main model after [t, d_1 .. d_k] -> (tokens to append, drafts accepted)."""
        k, params = len(drafts), req.params
        if params.greedy and not params.needs_penalties:
            greedy, rand = kernels.argmax_rows(logits.float()), []
        else:
            # Token lists are read only for penalties: row j counts drafts d_1 .. d_j as output.
            rows = ([SampleRow(params, generator, req.prompt_token_ids, req.output_token_ids + drafts[:j])
                     for j in range(k + 1)] if params.needs_penalties else [SampleRow(params, generator)] * (k + 1))
            greedy, p, rand = distributions(logits, rows)
        if not rand:                                      # temperature 0: the longest prefix the argmax agrees with
            g = greedy.tolist()
            a = 0
            while a < k and drafts[a] == g[a]:
                a += 1
            return drafts[:a] + [g[a]], a
        gen = generator or shared_generator
        q = self.states[req.request_id].draft_probs
        for j in range(k):
            d = drafts[j]
            u = float(torch.rand((), generator=gen))
            if u * float(q[j, d]) < float(p[j, d]):        # accept with probability min(1, p/q)
                continue
            resid = (p[j] - q[j]).clamp_(min=0)
            total = float(resid.sum())
            t = draw(resid if total > 0 else p[j], gen)
            return drafts[:j] + [t], j
        return list(drafts) + [draw(p[k], gen)], k

