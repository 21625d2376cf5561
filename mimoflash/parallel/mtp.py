"""MTP speculative decoding on a tensor-parallel group: the drafter's two runner calls, run by every rank.

The MTP blocks are sharded like a sliding-window decoder layer with a dense MLP (parallel/modules.ParallelMTPLayer:
heads and MLP width split, an all_reduce after the attention and after the MLP; eh_proj and the norms replicated),
so their K/V rings hold only the rank's heads, in the same cache layout as the decoder's rings. Sharding rather
than replicating them keeps the one cache layout every rank shares (a replicated block would need rings with all
the KV heads) and splits their weights like the rest.

The drafter (engine/speculative.py) stays on rank 0: it decides which rows to draft and samples the drafts. Its
calls `fill_mtp_kv` and `execute_mtp` reach the followers through rank 0's `BroadcastingRunner` (the slices as
plain data in the step plan, the hidden-state rows by a broadcast), and every rank runs the functions below. They
are the runner's MTP calls (engine/runner.py) with the vocabulary-parallel embedding (`ParallelMiMoModel.embed`)
and LM head (`ParallelMiMoForCausalLM.head`) in place of the full tables; draft rows take the block's fused rows
(parallel/fused.ParallelFusedMTPLayer) while the rank's fused decode step is on, else the module path.
"""

from __future__ import annotations

import torch

from ..engine.runner import PagedAttention


@torch.inference_mode()
def fill_mtp_kv(runner, layer: int, slices: list, hidden: torch.Tensor) -> None:
    """Only the K/V of MTP block `layer` at the slices' rows: the runner's own method, whose embedding is the
    model's `embed` (on a rank, its vocabulary slice and a sum)."""
    runner.fill_mtp_kv(layer, slices, hidden)


@torch.inference_mode()
def execute_mtp(runner, layer: int, slices: list, hidden: torch.Tensor) -> torch.Tensor:
    """MTP block `layer` over the slices' rows -> full-vocabulary logits (R, V) of the wanted rows
    (runner.execute_mtp on a rank, without a reduced draft vocabulary)."""
    step = runner.prepare_slices(slices, kinds=(True,))
    fused = getattr(runner, "parallel_fused_mtp", None)
    if fused is not None and runner.fused is not None and step.meta.decode:       # the fused step is on
        out = fused[layer].forward(step.input_ids, step.positions, step.meta.kinds, hidden)      # (N, D) normed
    else:
        mm = runner.model.model
        backend = PagedAttention(runner.cache, step.meta, runner.impl, runner._buffers, runner.use_kernels)
        rope = mm.rotary["sliding"](step.positions, hidden.dtype)
        out = mm.mtp.layers[layer](mm.embed(step.input_ids), hidden[None], step.positions, rope, backend)[0]
    picked = out if step.all_rows else out.index_select(0, step.sample_rows)
    return runner.model.head(picked).float()
