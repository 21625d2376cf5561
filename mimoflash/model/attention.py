"""Attention for both layer kinds: global (GA) and sliding-window (SWA) with a learned per-head sink logit.

MiMo-specific points (docs/MODEL.md §2.3-2.4):
* Q/K heads are `head_dim` wide, V heads `v_head_dim` (192 vs 128 in the real model): K and V are separate tensors
  everywhere, never padded to a common width.
* V is multiplied by `attention_value_scale` *before* it is cached; only Q and K are rotated.
* Scores use 1/sqrt(qk head dim) for both kinds.
* Sink: one logit per query head joins the softmax denominator (no value vector), so rows sum to < 1.
* The window is expressed as `window_keys` = how many keys a query sees, itself included (config.swa_keys).

Who attends: the module computes q/k/v and RoPE, then either runs dense causal attention over the tokens it was
given (no cache: training, parity tests) or hands q/k/v to an `AttentionBackend` that the engine passes in. The
backend owns the KV-cache layout; the model never learns about requests or blocks.

On CPU the engine swaps in `engine.cpu_layout.FastAttention` (one fused q|k|v product, RoPE and the value scale in
one kernel); its backend (engine/runner.py) picks the cached-attention path.

Sink attention, the six implementations and when each runs (all tested against `attend_reference`):

| implementation                               | runs                                                   | test                 |
|----------------------------------------------|--------------------------------------------------------|----------------------|
| `attend_reference` (here)                    | the reference; `impl="reference"` (cache-free) and the | -                    |
|                                              | engine's `attention_impl="reference"`, per sequence    |                      |
| `attend_sdpa` (here)                         | cache-free forward: training, parity with transformers | test_attention.py    |
| `runner.PagedAttention`, general path        | engine steps with long slices (prefill chunks): SDPA   | test_kv_cache.py,    |
|                                              | in blocks of query rows, the sink as a zero key in     | test_cpu_layout.py   |
|                                              | column 0                                               |                      |
| `kernels.prefill.attention` (prefill.c)      | the general path with fp32 activations (fp32 or bf16   | test_prefill_kernels |
|                                              | cache) on AVX-512F machines: one call, masks from      | .py, test_cpu_layout |
|                                              | positions                                              |                      |
| `runner.PagedAttention`, rows path in torch  | rows path (every slice a few tokens: decode, draft     | test_kv_cache.py     |
|                                              | verification; each row one query with its own keys)    |                      |
|                                              | without the kernels (bf16 compute, no compiler)        |                      |
| `kernels.attn_decode_paged` (ops.c)          | rows path with fp32 queries and the kernels; also      | test_kernels.py,     |
|                                              | inside the fused decode step (decode.c)                | test_kv_cache.py     |

Two cache-free implementations of the same math, which `tests/test_attention.py` keeps in agreement:
* `attend_reference`: explicit scores, mask, sink column, softmax — a transcription of the spec;
* `attend_sdpa`: torch's fused scaled_dot_product_attention. The sink becomes one extra key whose K and V are zero
  and whose additive mask entry is the sink logit: its score is exactly `sink_h`, it adds nothing to the output.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MiMoConfig
from .layers import apply_partial_rope


class AttentionBackend(Protocol):
    def attend(self, layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, T, nq, d), k (B, T, nkv, d), v (B, T, nkv, dv) for the new tokens -> (B, T, nq, dv)."""
        ...


def allowed_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window_keys: int | None) -> torch.Tensor:
    """q_pos (B, Tq), k_pos (B, Tk) -> bool (B, Tq, Tk). k_pos < 0 marks an empty/padding key slot."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    ok = (kp <= qp) & (kp >= 0)
    if window_keys is not None:
        ok &= (qp - kp) < window_keys
    return ok


def attend_reference(q, k, v, q_pos, k_pos, window_keys, sinks, scale) -> torch.Tensor:
    """Slow, literal version of docs/MODEL.md §2.3 steps 4-7. Shapes as in `AttentionBackend.attend` (k/v may be longer)."""
    B, Tq, nq, d = q.shape
    group = nq // k.shape[2]
    kk = k.repeat_interleave(group, dim=2).transpose(1, 2)             # (B, nq, Tk, d)
    vv = v.repeat_interleave(group, dim=2).transpose(1, 2)             # (B, nq, Tk, dv)
    s = torch.matmul(q.transpose(1, 2), kk.transpose(2, 3)) * scale    # (B, nq, Tq, Tk)
    ok = allowed_mask(q_pos, k_pos, window_keys)[:, None]              # (B, 1, Tq, Tk)
    s = s.masked_fill(~ok, torch.finfo(s.dtype).min)
    if sinks is not None:
        sink_col = sinks.to(s.dtype).view(1, nq, 1, 1).expand(B, nq, Tq, 1)
        s = torch.cat([s, sink_col], dim=-1)
    s = s - s.amax(dim=-1, keepdim=True)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    o = torch.matmul(p.to(vv.dtype), vv)                               # (B, nq, Tq, dv)
    return o.transpose(1, 2)                                           # (B, Tq, nq, dv)


def attend_sdpa(q, k, v, q_pos, k_pos, window_keys, sinks, scale, causal_aligned: bool = False) -> torch.Tensor:
    """Fused path. `causal_aligned=True` promises q_pos == k_pos == arange(T) (no cache), enabling is_causal."""
    B, Tq, nq, d = q.shape
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, heads, T, dim)
    if causal_aligned and window_keys is None and sinks is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        return o.transpose(1, 2)
    ok = allowed_mask(q_pos, k_pos, window_keys)[:, None]             # (B, 1, Tq, Tk)
    bias = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill(~ok, float("-inf"))
    if sinks is not None:
        nkv = kh.shape[1]
        kh = torch.cat([kh, kh.new_zeros(B, nkv, 1, kh.shape[-1])], dim=2)
        vh = torch.cat([vh, vh.new_zeros(B, nkv, 1, vh.shape[-1])], dim=2)
        sink_col = sinks.to(q.dtype).view(1, nq, 1, 1).expand(B, nq, Tq, 1)
        bias = torch.cat([bias.expand(B, nq, Tq, bias.shape[-1]), sink_col], dim=-1)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)                                           # (B, Tq, nq, dv)


class Attention(nn.Module):
    """Attribute names mirror the checkpoint: q_proj, k_proj, v_proj, o_proj, attention_sink_bias."""

    def __init__(self, config: MiMoConfig, layer_idx: int, sliding: bool):
        super().__init__()
        self.layer_idx = layer_idx                    # cache slot id (MTP blocks use num_hidden_layers + n)
        self.sliding = sliding
        nq, nkv, d, dv = config.attn_shape(sliding)
        self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim = nq, nkv, d, dv
        self.window_keys = config.swa_keys if sliding else None
        self.scale = d ** -0.5
        self.value_scale = float(config.attention_value_scale)
        H = config.hidden_size
        self.q_proj = nn.Linear(H, nq * d, bias=False)
        self.k_proj = nn.Linear(H, nkv * d, bias=False)
        self.v_proj = nn.Linear(H, nkv * dv, bias=False)
        self.o_proj = nn.Linear(nq * dv, H, bias=False)
        self.attention_sink_bias = nn.Parameter(torch.zeros(nq)) if config.has_sinks(sliding) else None
        self.impl = "sdpa"                            # "sdpa" | "reference" (see module docstring)

    def fused_qkv(self) -> tuple[torch.Tensor, Callable] | None:
        """q|k|v as one tensor and its product, for the engine's fused decode step: None here (three projections);
        the engine's CPU layout swaps in `engine.cpu_layout.FastAttention`, which keeps one."""
        return None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                backend: AttentionBackend | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        nq, nkv, d, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        cos, sin = rope
        q = self.q_proj(x).view(B, T, nq, d)
        k = self.k_proj(x).view(B, T, nkv, d)
        v = self.v_proj(x).view(B, T, nkv, dv) * self.value_scale
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        return self.attend_project(q, k, v, positions, backend)

    def attend_project(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       backend: AttentionBackend | None = None) -> torch.Tensor:
        """q (B, T, nq, d), k (B, T, nkv, d), v (B, T, nkv, dv) after RoPE and the value scale -> o_proj's output
        (B, T, H): the engine's backend (cached keys), or cache-free attention over these tokens."""
        B, T = q.shape[:2]
        if backend is not None:
            o = backend.attend(self, q, k, v)
        elif self.impl == "reference":
            o = attend_reference(q, k, v, positions, positions, self.window_keys, self.attention_sink_bias, self.scale)
        else:
            o = attend_sdpa(q, k, v, positions, positions, self.window_keys, self.attention_sink_bias, self.scale,
                            causal_aligned=True)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_head_dim))
