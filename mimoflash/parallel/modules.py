"""The module classes of one rank's model: the standard modules at the rank's shapes, plus the collectives.

Where the collectives go. Every sharded block ends in a row-parallel product (o_proj over the rank's heads,
down_proj over its intermediate slice, the experts it owns), so each rank holds a *partial sum* of the block's
output; `ParallelDecoderLayer` (and `ParallelMTPLayer`) adds them with one all_reduce(SUM) per block before the
residual add: two per decoder layer. Attention, the dense MLP and the experts themselves are the ordinary classes
at the rank's sizes, so the engine's CPU layouts (engine/cpu_layout.py: fused q|k|v, bf16 panels, picked experts) apply to them
unchanged. The vocabulary-parallel embedding adds one all_reduce per step (each token's row lives on one rank;
the others contribute zeros, so the sum is exact), the LM head one all_gather of the rank's logit columns.

Numerics: the partial sums are added in the activation dtype, so under fp32 compute a sharded model equals the
single-process one up to summation order (tests/test_parallel.py compares logits at fp32 tolerance).

`COMM` counts the seconds spent inside the collectives (benchmarks/bench_parallel.py reports it per step).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from ..model.mimo import DecoderLayer, MiMoForCausalLM, MiMoModel
from ..model.moe import MoE
from ..model.mtp import MTPLayer
from .shard import ShardPlan


class CommStats:
    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


COMM = CommStats()


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (t is a fresh activation owned by the caller)."""
    t0 = time.perf_counter()
    if not t.is_contiguous():
        t = t.contiguous()
    dist.all_reduce(t)
    COMM.seconds += time.perf_counter() - t0
    COMM.calls += 1
    return t


class ParallelMoE(MoE):
    """Routing over all experts (replicated router: every rank picks the same top-k), then only the (token, expert)
    pairs whose expert this rank owns, through the rank's `experts` module (local indices, one pair per row). The
    output is this rank's share of the weighted sum; the layer's all_reduce completes it."""

    def __init__(self, config, expert_lo: int, expert_hi: int):
        super().__init__(config)
        self.expert_lo, self.expert_hi = expert_lo, expert_hi
        E, F, D = expert_hi - expert_lo, config.moe_intermediate_size, config.hidden_size
        self.experts.gate_proj = nn.Parameter(torch.empty(E, F, D))
        self.experts.up_proj = nn.Parameter(torch.empty(E, F, D))
        self.experts.down_proj = nn.Parameter(torch.empty(E, D, F))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        topk_idx_TK, weight_TK, _ = self.gate(x_TD)
        self.last_topk_idx = topk_idx_TK.detach()
        mine_TK = (topk_idx_TK >= self.expert_lo) & (topk_idx_TK < self.expert_hi)
        tok_P, slot_P = mine_TK.nonzero(as_tuple=True)                         # this rank's (token, k) pairs
        out_TD = torch.zeros_like(x_TD)
        if tok_P.numel():
            local_P1 = (topk_idx_TK[tok_P, slot_P] - self.expert_lo)[:, None]
            y_PD = self.experts(x_TD.index_select(0, tok_P), local_P1, weight_TK[tok_P, slot_P][:, None])
            out_TD.index_add_(0, tok_P, y_PD)
        return out_TD.view(shape)

    def extra_repr(self) -> str:
        return f"experts [{self.expert_lo}, {self.expert_hi}) of {self.gate.weight.shape[0]}"


class ParallelDecoderLayer(DecoderLayer):
    """DecoderLayer whose attention and MLP outputs are partial sums, completed by one all_reduce each."""

    def __init__(self, config, layer_idx: int, plan: ShardPlan):
        super().__init__(config, layer_idx)
        if config.is_moe(layer_idx):
            self.mlp = ParallelMoE(config, *plan.experts)

    def forward(self, x, positions, rope, backend=None):
        x = x + all_reduce(self.self_attn(self.input_layernorm(x), positions, rope, backend))
        return x + all_reduce(self.mlp(self.post_attention_layernorm(x)))


class ParallelMTPLayer(MTPLayer):
    """An MTP block at the rank's shapes (sliding-window heads, dense MLP slice): its attention and MLP outputs are
    partial sums, completed by one all_reduce each, as in `ParallelDecoderLayer`."""

    def forward(self, token_emb, hidden, positions, rope, backend=None):
        u = self.eh_proj(torch.cat([self.enorm(token_emb), self.hnorm(hidden)], dim=-1))
        u = u + all_reduce(self.self_attn(self.input_layernorm(u), positions, rope, backend))
        u = u + all_reduce(self.mlp(self.pre_mlp_layernorm(u)))
        return self.final_layernorm(u)


class ParallelMiMoModel(MiMoModel):
    """The decoder with a vocabulary-parallel embedding: rows [vocab_lo, vocab_hi) of the table live here."""

    def __init__(self, config, plan: ShardPlan):
        super().__init__(config)
        self.vocab_lo, self.vocab_hi = plan.vocab
        self.embed_tokens = nn.Embedding(plan.vocab_per_rank, config.hidden_size)
        self.layers = nn.ModuleList([ParallelDecoderLayer(config, i, plan) for i in range(config.num_hidden_layers)])
        if config.num_nextn_predict_layers:
            self.mtp.layers = nn.ModuleList([ParallelMTPLayer(config, n)
                                             for n in range(config.num_nextn_predict_layers)])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_lo
        mine = (input_ids >= self.vocab_lo) & (input_ids < self.vocab_hi)
        x = self.embed_tokens(torch.where(mine, local, 0))
        return all_reduce(x.masked_fill(~mine[..., None], 0))


class ParallelMiMoForCausalLM(MiMoForCausalLM):
    """One rank's model. `config` is the rank's config (ShardPlan.rank_config); `plan` says which slice it holds.
    `logits` all-gathers the ranks' vocabulary columns, so every rank returns the full (..., V) logits."""

    def __init__(self, plan: ShardPlan):
        config = plan.rank_config()
        super().__init__(config)
        self.plan = plan
        self.model = ParallelMiMoModel(config, plan)
        self.lm_head = nn.Linear(config.hidden_size, plan.vocab_per_rank, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.norm(hidden))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Normed (..., D) -> the full (..., V) logits: the rank's vocabulary columns, all-gathered."""
        local = self.lm_head(x).contiguous()                                         # (..., V / world)
        t0 = time.perf_counter()
        parts = [torch.empty_like(local) for _ in range(self.plan.world)]
        dist.all_gather(parts, local)
        COMM.seconds += time.perf_counter() - t0
        COMM.calls += 1
        return torch.cat(parts, dim=-1)[..., :self.config.vocab_size]

    def mtp_logits(self, *args, **kwargs):
        raise NotImplementedError("a tensor-parallel rank's MTP blocks run through the engine's drafter "
                                  "(parallel/mtp.py), not mtp_logits")
