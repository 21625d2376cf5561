"""Small building blocks shared by the decoder and the MTP blocks: RMSNorm, partial rotary embedding, SwiGLU MLP.

Numerics follow docs/MODEL.md §2.2-2.3 and transformers 5.23 exactly, because logits parity with it is a test:
RMSNorm statistics in fp32, the weight applied after casting back (`w * x.to(dtype)`, no `1 + w` offset);
RoPE angles in fp32, cos/sin cast to the activation dtype, rotate-half (GPT-NeoX) layout on the first
`rotary_dim` dims of each head, the remaining dims passed through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm computes x * rsqrt(mean(x^2) + eps), the same ops in the same order as `forward_reference`
        # (bit-identical, checked by tests/test_attention.py), as one call instead of five.
        if x.dtype == torch.float32:
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for one attention kind (theta and rotary dim differ between GA and SWA layers).

    The values are looked up in tables of cos / sin(p * inv_freq) (halves repeated, as rotate-half wants them) for
    p = 0 .. n-1, computed once and grown (to the next power of two) when a larger position comes: a decode step of
    16 sequences computing cos and sin of its (16, rd) angles opened four OpenMP regions in torch's elementwise
    kernels, ~0.1 ms each with idle threads asleep (OMP_WAIT_POLICY=PASSIVE), as long as the step's attention; and
    the fused decode step hands the tables to its kernel, which reads each token's row by position (no torch op at
    all). The table holds the same float32 products and the same torch cos/sin of them, so the values are those of
    `reference` (tests/test_attention.py checks it). Past MAX_TABLE positions the angles are computed directly (the
    tables stay <= 2 x 16 MB at rotary dim 64)."""

    MAX_TABLE = 1 << 16

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None    # (n, rd) cos, sin; not state: rebuilt
        self._table_of = None                   # the inv_freq it was built from (moved or cast: rebuilt)

    def tables(self, top: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """-> the (n, rd) fp32 cos, sin tables with n > top (grown if needed), or None when top >= MAX_TABLE."""
        if top >= self.MAX_TABLE:
            return None
        t, inv = self._table, self.inv_freq
        of = (inv.data_ptr(), inv._version, inv.dtype, inv.device)
        if t is None or t[0].shape[0] <= top or self._table_of != of:
            n = max(256, 1 << top.bit_length())
            with torch.inference_mode(False), torch.no_grad():
                freqs = torch.arange(n, device=inv.device).float()[:, None] * inv               # (n, rd/2)
                c, s = freqs.cos(), freqs.sin()
                t = self._table = (torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1))
                self._table_of = of
        return t

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., T) integer -> cos, sin (..., T, rd) in dtype."""
        if positions.numel() == 0 or positions.is_floating_point():
            return self.reference(positions, dtype)
        lo, hi = torch.aminmax(positions)
        t = self.tables(int(hi)) if int(lo) >= 0 else None
        if t is None:
            return self.reference(positions, dtype)
        return F.embedding(positions, t[0]).to(dtype), F.embedding(positions, t[1]).to(dtype)

    def reference(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The angles computed directly (the table's definition)."""
        freqs = positions.float()[..., None] * self.inv_freq          # (..., T, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                       # (..., T, rd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, d); cos/sin: (B, T, rd). Rotates dims [0, rd) in rotate-half layout; [rd, d) pass through."""
    rd = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)                   # (B, T, 1, rd)
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class MLP(nn.Module):
    """Dense SwiGLU: down(silu(gate(x)) * up(x)). Layer 0 and every MTP block use it."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
