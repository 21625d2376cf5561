"""The MiMo-V2-Flash network: embedding -> decoder layers (GA or SWA attention; dense or MoE FFN) -> norm -> lm_head.

Read top to bottom with docs/MODEL.md §2. Parameter names equal the official checkpoint names (after the expert stacking
done in `checkpoint/keys.py`), so `model.state_dict()` is the map from names to tensors.

`MiMoForCausalLM.forward(input_ids)` is the full, cache-free forward (training, parity tests). The engine passes an
`AttentionBackend` and explicit `positions` instead; the network itself does not change.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MiMoConfig
from .attention import Attention, AttentionBackend
from .layers import MLP, RMSNorm, RotaryEmbedding
from .moe import MoE, Router
from .mtp import MTPLayer


class DecoderLayer(nn.Module):
    def __init__(self, config: MiMoConfig, layer_idx: int):
        super().__init__()
        self.is_sliding = config.is_sliding(layer_idx)
        self.self_attn = Attention(config, layer_idx, self.is_sliding)
        self.mlp = MoE(config) if config.is_moe(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)

    def forward(self, x, positions, rope, backend=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """Container so that MTP parameters are named model.mtp.layers.N.* as in the checkpoint."""

    def __init__(self, config: MiMoConfig):
        super().__init__()
        self.layers = nn.ModuleList([MTPLayer(config, n) for n in range(config.num_nextn_predict_layers)])


class MiMoModel(nn.Module):
    def __init__(self, config: MiMoConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        # One rotary table per attention kind: GA and SWA differ in theta (5e6 vs 1e4) and possibly head dim.
        self.rotary = nn.ModuleDict({
            "full": RotaryEmbedding(config.rotary_dim(False), config.rope_theta),
            "sliding": RotaryEmbedding(config.rotary_dim(True), config.swa_rope_theta),
        })
        if config.num_nextn_predict_layers:
            self.mtp = MTPModule(config)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        return {False: self.rotary["full"](positions, dtype), True: self.rotary["sliding"](positions, dtype)}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D); a tensor-parallel rank overrides it (its vocabulary slice, then a sum)."""
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                backend: AttentionBackend | None = None) -> torch.Tensor:
        """input_ids (B, T) -> residual stream before the final norm (B, T, D); MTP consumes this (docs/MODEL.md §3.3)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        rope = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, positions, rope[layer.is_sliding], backend)
        return x


class MiMoForCausalLM(nn.Module):
    def __init__(self, config: MiMoConfig):
        super().__init__()
        self.config = config
        self.model = MiMoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden (..., D) -> logits (..., V)."""
        return self.lm_head(self.model.norm(hidden))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                backend: AttentionBackend | None = None) -> torch.Tensor:
        """input_ids (B, T) LongTensor -> logits (B, T, vocab)."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor of shape [B, T], got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids contain ids outside [0, {self.config.vocab_size})")
        return self.logits(self.model(input_ids, positions, backend))

    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.mtp.layers) if self.config.num_nextn_predict_layers else []

    def mtp_logits(self, depth: int, hidden: torch.Tensor, ahead_ids: torch.Tensor,
                   positions: torch.Tensor | None = None, backend: AttentionBackend | None = None) -> torch.Tensor:
        """MTP block `depth` at each position i: hidden (B, T, D) = H_main(i), ahead_ids (B, T) = t_{i+depth+1}
        -> logits (B, T, V) predicting t_{i+depth+2}. Positions are those of i (never shifted)."""
        B, T = ahead_ids.shape
        if positions is None:
            positions = torch.arange(T, device=ahead_ids.device).expand(B, T)
        rope = self.model.rotary["sliding"](positions, hidden.dtype)
        out = self.model.mtp.layers[depth](self.model.embed_tokens(ahead_ids), hidden, positions, rope, backend)
        return self.lm_head(out)

    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """Random init for fresh models (training, tests): N(0, std) weights, unit norms, zero biases/sinks."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("attention_sink_bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * std)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    # -------------------------------------------------------------- convenience
    def cast(self, dtype: torch.dtype) -> "MiMoForCausalLM":
        """Cast to `dtype` but keep the router (weight and correction bias) in fp32: the release stores them in
        fp32 and expert selection is sensitive to bias rounding (a bf16 bias flips near-tied experts). RoPE's
        inverse frequencies stay fp32 too, as in transformers (computed in fp32, never cast by from_pretrained)."""
        inv_freq = {id(m): m.inv_freq for m in self.modules() if isinstance(m, RotaryEmbedding)}
        self.to(dtype)
        for m in self.modules():
            if isinstance(m, RotaryEmbedding):
                m.inv_freq = inv_freq[id(m)].to(m.inv_freq.device)
            if isinstance(m, Router):
                m.weight.data = m.weight.data.float()
                m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
        return self

    def set_attention_impl(self, impl: str) -> None:
        """'sdpa' (default, fused) or 'reference' (literal spec transcription) for cache-free attention."""
        if impl not in ("sdpa", "reference"):
            raise ValueError(f"attention impl must be 'sdpa' or 'reference', got {impl!r}")
        for m in self.modules():
            if isinstance(m, Attention):
                m.impl = impl
