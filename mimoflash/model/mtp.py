"""Multi-token-prediction (MTP) blocks, docs/MODEL.md §3. Checkpoint prefix: model.mtp.layers.N.

Each block predicts one more token ahead. Block k at position i sees
  e = embed_tokens[t_{i+k+1}]   (the token k+1 steps ahead of i; the main model's embedding, shared)
  h = H_main(i)                 (the main model's residual stream at i, *before* model.norm — SGLang's choice,
                                 docs/MTP.md explains why and what vLLM does instead)
and computes
  u = eh_proj(cat(enorm(e), hnorm(h)))           # embedding half first
  u = u + SWA_Attention(input_layernorm(u))       # sinks, SWA theta, its own KV cache (layer id L + k)
  u = u + MLP(pre_mlp_layernorm(u))               # dense SwiGLU of width intermediate_size
  logits = lm_head(final_layernorm(u))            # shared head; predicts t_{i+k+2}
MiMo's blocks are *not chained* through their own hidden output: every block consumes the main model's hidden
state; only the token stream advances (docs/MODEL.md §3.4).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MiMoConfig
from .attention import Attention, AttentionBackend
from .layers import MLP, RMSNorm


class MTPLayer(nn.Module):
    # The setting for h: True = the main model's residual stream before model.norm (what `forward` is handed by
    # training and by the engine's drafter); False = after it (vLLM's choice): the drafter then applies model.norm
    # first. docs/MTP.md, "Which hidden state".
    hidden_pre_norm: bool = True

    def __init__(self, config: MiMoConfig, n: int):
        super().__init__()
        H, eps = config.hidden_size, config.layernorm_epsilon
        self.depth = n
        self.enorm = RMSNorm(H, eps)
        self.hnorm = RMSNorm(H, eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.input_layernorm = RMSNorm(H, eps)
        self.self_attn = Attention(config, config.num_hidden_layers + n, sliding=True)
        self.pre_mlp_layernorm = RMSNorm(H, eps)
        self.mlp = MLP(H, config.intermediate_size)
        self.final_layernorm = RMSNorm(H, eps)

    def forward(self, token_emb: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend | None = None) -> torch.Tensor:
        """token_emb, hidden (B, T, D) -> normed output (B, T, D), ready for the shared lm_head."""
        u = self.eh_proj(torch.cat([self.enorm(token_emb), self.hnorm(hidden)], dim=-1))
        u = u + self.self_attn(self.input_layernorm(u), positions, rope, backend)
        u = u + self.mlp(self.pre_mlp_layernorm(u))
        return self.final_layernorm(u)
