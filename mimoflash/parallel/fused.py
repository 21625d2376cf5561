"""The fused CPU decode step on one rank: each layer as its two C halves with an all_reduce after each.

One process runs a decode step as one `kernels.decode_layer` call per layer (engine/fused_decode.py). A rank holds a
slice of every layer, and a layer's attention output and MLP / MoE output are partial sums over the ranks that must
be added before each residual add, so a rank calls the layer's halves instead (kernels/decode.c): `decode_attn`
(norm, q|k|v, RoPE, K/V store, attention over the rank's heads, o_proj over their columns) -> all_reduce -> residual
add -> `decode_ffn` (post-norm, the rank's slice of the dense MLP, or the router over every expert and the rank's
own experts only) -> all_reduce -> residual add. The argument building (LayerArgs from the rank's modules, the
step's RoPE rows, tables and masks) is FusedDecoder's; the embedding is vocabulary-parallel as on the module path
(rows outside the rank's range are zeros, the all_reduce completes them exactly).

The collectives are the module path's (parallel/modules.py) in the same order and shapes: 1 for the embedding,
2 per layer, and the LM head's all_gather after the step. `ParallelFusedMTPLayer` does the same for an MTP block's
draft rows (parallel/mtp.py). The module path stays the reference
(tests/test_parallel.py compares them).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..engine.fused_decode import FusedDecoder, FusedMTPLayer
from ..model.moe import MoE
from .modules import all_reduce


def vocab_embed(input_ids: torch.Tensor, emb: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(B,) ids -> (B, H) fp32 rows of the vocabulary-parallel table `emb` (rows [lo, hi)): this rank's rows, zeros
    elsewhere, summed over the ranks."""
    mine = (input_ids >= lo) & (input_ids < hi)
    x = kernels.embed_bf16(torch.where(mine, input_ids - lo, 0), emb)
    return all_reduce(x.masked_fill_(~mine[:, None], 0.0))


class ParallelFusedDecoder(FusedDecoder):
    """A rank's FusedDecoder (module docstring). `steps` counts the decode steps it ran."""

    def __init__(self, model, layers: list, keep: list, panels: list):
        super().__init__(model, layers, keep, panels)
        plan = model.plan
        self.vocab_lo, self.vocab_hi = plan.vocab
        self.experts = [plan.experts if isinstance(layer.mlp, MoE) else None for layer in model.model.layers]
        for (args, _, _), layer in zip(layers, model.model.layers):
            if isinstance(layer.mlp, MoE):       # route over all experts (FP8 arguments count the rank's own)
                args.E = layer.mlp.gate.weight.shape[0]
        self._y: dict[int, torch.Tensor] = {}          # batch size -> (B, H) partial-sum buffer
        self.steps = 0

    @classmethod
    def from_fused(cls, fused: FusedDecoder) -> "ParallelFusedDecoder":
        """The same layers' arguments (built by FusedDecoder.build for the rank's model), run in halves."""
        return cls(fused.model, fused.layers, fused._keep, fused._panels)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kinds: dict) -> torch.Tensor:
        B = input_ids.shape[1]
        per_kind, chosen = self.step_args(positions, kinds, B)
        x = vocab_embed(input_ids.view(-1), self.emb, self.vocab_lo, self.vocab_hi)  # (B, H) fp32
        y = self._y.get(B)
        if y is None:
            y = self._y[B] = torch.empty_like(x)
        for (args, sliding, _), ch, experts in zip(self.layers, chosen, self.experts):
            cos, sin, rows, table, chunk, K, slots, bias = per_kind[sliding]
            kernels.decode_attn(args, x, cos, sin, table, chunk, K, slots, bias, y, rope_rows=rows)
            x += all_reduce(y)
            kernels.decode_ffn(args, x, y, ch, experts)
            x += all_reduce(y)
        self.steps += 1
        self._account(chosen)
        return x.view(1, B, -1)

    def _account(self, chosen: list[torch.Tensor]) -> None:
        """FP8 experts: the expert store's statistics for the step, as fp8_layout.account_fused_step keeps them in
        one process, for the rank's own experts (local ids) among those routed."""
        begun = set()
        for (args, _, _), ch, experts in zip(self.layers, chosen, self.experts):
            got = getattr(args, "expert_layer", None)
            if got is None:
                continue
            store, layer = got
            if id(store) not in begun:
                begun.add(id(store))
                store.begin_step()
            lo, hi = experts
            picked = sorted({e - lo for e in ch.view(-1).tolist() if lo <= e < hi})
            if picked:
                store.acquire(layer, picked)
                store.release(layer, picked)


class ParallelFusedMTPLayer(FusedMTPLayer):
    """A rank's MTP block draft rows in a few calls (FusedMTPLayer's, with the vocabulary-parallel embedding and the
    block's two halves with an all_reduce after each). `steps` counts its calls."""

    @classmethod
    def from_fused(cls, fused: FusedMTPLayer) -> "ParallelFusedMTPLayer":
        new = cls(fused.model, fused.layer, fused.args, fused._keep, fused._panels)
        new.vocab_lo, new.vocab_hi = fused.model.plan.vocab
        new.steps = 0
        return new

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return vocab_embed(ids, self.emb, self.vocab_lo, self.vocab_hi)                  # (N, H) fp32

    def _block(self, x: torch.Tensor, attn_args: tuple, chosen: torch.Tensor, rope_rows) -> None:
        y = torch.empty_like(x)
        kernels.decode_attn(self.args, x, *attn_args, y, rope_rows=rope_rows)
        x += all_reduce(y)
        kernels.decode_ffn(self.args, x, y, chosen)
        x += all_reduce(y)
        self.steps += 1
