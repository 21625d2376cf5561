"""Routed mixture of experts with sigmoid scores and aux-loss-free (bias-corrected) selection, docs/MODEL.md §2.5.

Shape legend: T tokens, D hidden size, F expert width, E routed experts, K experts per token, G groups.

Routing, in fp32 whatever the activation dtype (every engine does this; the router was trained in fp32):
  scores_TE = sigmoid(x_TD @ W_gate^T)
  choice_TE = scores_TE + e_score_correction_bias_E         # the bias only *selects*
  group-limited top-K over choice_TE (n_group / topk_group; a no-op for the real model: 1 / 1)
  weights_TK = scores_TE[topk_idx_TK]                       # weights come from the unbiased scores
  optional normalisation (norm_topk_prob), then * routed_scaling_factor

Experts are stored stacked (`experts.gate_proj` (E, F, D), `up_proj` (E, F, D), `down_proj` (E, D, F)); the checkpoint
keeps one tensor per expert and `checkpoint/keys.py` stacks them. Dispatch groups the T*K (token, expert) pairs by
expert and runs one grouped matmul (`torch._grouped_mm`), or a loop over *experts* with tokens, never over tokens.
`MoE.forward_dense_reference` computes every expert for every token; tests use it as the slow reference.

What runs in the engine: on CPU the runner swaps in subclasses of `Experts` and `MoE` (engine/cpu_layout.py, whose
docstring has the table: `Bf16Experts` and `KernelMoE` with bf16 weights, `Fp32Experts`, `PickedExperts` under bf16
compute) that run only the picked experts; `print(model)` shows them. Each is tested against
`forward_dense_reference`, and falls back to `Experts.forward` / `MoE.forward` under autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MiMoConfig


class Router(nn.Module):
    """Checkpoint names: mlp.gate.weight (E, D), mlp.gate.e_score_correction_bias (E,)."""

    def __init__(self, config: MiMoConfig):
        super().__init__()
        E = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        self.weight = nn.Parameter(torch.zeros(E, config.hidden_size, dtype=torch.float32))
        # A buffer, not a parameter: it is moved by the load balancer, never by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (topk_idx_TK int64, topk_weight_TK fp32, scores_TE fp32)."""
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()   # skip no-op casts
        scores_TE = torch.sigmoid(F.linear(x_TD if x_TD.dtype == torch.float32 else x_TD.float(), w))
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.n_group > 1:
            T, E = choice_TE.shape
            grouped_TGe = choice_TE.view(T, self.n_group, E // self.n_group)
            group_score_TG = grouped_TGe.topk(2, dim=-1).values.sum(-1)
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_score_TG.topk(self.topk_group, dim=-1).indices, True)
            choice_TE = grouped_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E)
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weight_TK = scores_TE.gather(1, topk_idx_TK)
        if self.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(-1, keepdim=True) + 1e-20)
        return topk_idx_TK, weight_TK * self.routed_scaling_factor, scores_TE


class Experts(nn.Module):
    """Stacked SwiGLU experts: gate_proj/up_proj (E, F, D), down_proj (E, D, F)."""

    def __init__(self, config: MiMoConfig):
        super().__init__()
        E, Fd, D = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(E, Fd, D))
        self.up_proj = nn.Parameter(torch.empty(E, Fd, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fd))
        self.use_grouped_mm = hasattr(torch, "_grouped_mm")

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        T, D = x_TD.shape
        K = topk_idx_TK.shape[1]
        E = self.gate_proj.shape[0]
        flat_idx = topk_idx_TK.reshape(-1)                                 # (T*K,)
        order = flat_idx.argsort(stable=True)                               # pairs grouped by expert
        token_of_pair = order // K                                          # (T*K,)
        x_PD = x_TD[token_of_pair]                                          # (P=T*K, D), expert-sorted
        counts_E = torch.bincount(flat_idx, minlength=E)
        if self.use_grouped_mm and x_TD.dtype in (torch.float32, torch.bfloat16):
            offs = counts_E.cumsum(0).to(torch.int32)
            g = torch._grouped_mm(x_PD, self.gate_proj.transpose(1, 2), offs=offs)        # (P, F)
            u = torch._grouped_mm(x_PD, self.up_proj.transpose(1, 2), offs=offs)
            y_PD = torch._grouped_mm(F.silu(g) * u, self.down_proj.transpose(1, 2), offs=offs)
        else:
            y_PD = torch.empty_like(x_PD)
            start = 0
            for e, n in enumerate(counts_E.tolist()):
                if n:
                    xe = x_PD[start:start + n]
                    y_PD[start:start + n] = F.linear(F.silu(F.linear(xe, self.gate_proj[e])) *
                                                     F.linear(xe, self.up_proj[e]), self.down_proj[e])
                    start += n
        w_P = weight_TK.reshape(-1)[order].to(y_PD.dtype)
        out_TD = torch.zeros_like(x_TD)
        out_TD.index_add_(0, token_of_pair, y_PD * w_P[:, None])
        return out_TD


class MoE(nn.Module):
    def __init__(self, config: MiMoConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.last_topk_idx: torch.Tensor | None = None   # read by the trainer's load balancer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        topk_idx_TK, weight_TK, _ = self.gate(x_TD)
        self.last_topk_idx = topk_idx_TK.detach()
        return self.experts(x_TD, topk_idx_TK, weight_TK).view(shape)

    def forward_dense_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, mixed by a dense (T, E) weight matrix. Slow; for tests."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        topk_idx_TK, weight_TK, _ = self.gate(x_TD)
        E = self.experts.gate_proj.shape[0]
        mix_TE = torch.zeros(x_TD.shape[0], E, dtype=torch.float32, device=x.device)
        mix_TE.scatter_(1, topk_idx_TK, weight_TK)
        ex = self.experts
        h_ETF = F.silu(torch.einsum("td,efd->etf", x_TD, ex.gate_proj)) * torch.einsum("td,efd->etf", x_TD, ex.up_proj)
        y_ETD = torch.einsum("etf,edf->etd", h_ETF, ex.down_proj)
        return torch.einsum("etd,te->td", y_ETD, mix_TE.to(y_ETD.dtype)).view(shape)
