"""Expert load balancing for training: the aux-loss-free bias update and an optional sequence-level aux loss.

MiMo-V2-Flash follows DeepSeek-V3 (docs/MODEL.md §2.5): the router's `e_score_correction_bias` is added to the sigmoid
scores for *selection only*, and the trainer moves it after every optimizer step, with no gradient:

    load_e   = number of (token, expert) pairs routed to expert e in this step (all micro-batches, all ranks)
    bias_e  += rate * sign(mean(load) - load_e)

so an overloaded expert becomes a little less attractive and an idle one a little more. Under data parallelism
the counts must be all-reduced first, or the ranks' biases drift apart (`update_expert_bias(..., group=...)`).

The sequence-level auxiliary loss (DeepSeek-V3 eq. 17-20; the MiMo report quotes a coefficient of 1e-5) is a
small safety net against extreme imbalance *within* one sequence. For one sequence of T tokens and one MoE layer:

    f_e = E / (K T) * #{t : e in topk(t)}          (load share, no gradient)
    P_e = 1/T * sum_t s_te / sum_j s_tj            (normalised router probability, has gradient)
    L   = sum_e f_e P_e

averaged over sequences and MoE layers, times the coefficient. It needs the router scores, which `MoE.forward`
does not keep, so `RouterTap` collects them with forward hooks on the routers (only while the coefficient is > 0).

Shape legend: L MoE layers, E experts, T tokens, K experts per token, B sequences.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import MoE, Router


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


class LoadCounter:
    """Accumulates per-layer expert counts (L, E) from `MoE.last_topk_idx` over the micro-batches of one step."""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        E = self.layers[0].gate.e_score_correction_bias.numel() if self.layers else 0
        self.counts_LE = torch.zeros(len(self.layers), E, dtype=torch.float64)

    def add(self) -> None:
        """Call after each forward pass of the main model."""
        for i, moe in enumerate(self.layers):
            idx = moe.last_topk_idx
            if idx is not None:
                self.counts_LE[i] += torch.bincount(idx.reshape(-1).cpu(), minlength=self.counts_LE.shape[1]).double()

    def reset(self) -> None:
        self.counts_LE.zero_()

    def all_reduce(self, group=None) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            # gloo and nccl both reduce float64 on CPU/GPU respectively; move to the backend's device.
            device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            t = self.counts_LE.to(device)
            dist.all_reduce(t, group=group)
            self.counts_LE.copy_(t.cpu())


@torch.no_grad()
def update_expert_bias(routers: list[Router], counts_LE: torch.Tensor, rate: float) -> None:
    """bias_e += rate * sign(mean load - load_e) per layer. `counts_LE` must already be summed over all ranks."""
    if rate == 0:
        return
    for router, load_E in zip(routers, counts_LE):
        delta_E = torch.sign(load_E.mean() - load_E).to(router.e_score_correction_bias)
        router.e_score_correction_bias.add_(rate * delta_E)


def imbalance(counts_LE: torch.Tensor) -> float:
    """max/mean expert load, averaged over MoE layers (1.0 = perfectly balanced, E/K = everything on K experts)."""
    if counts_LE.numel() == 0 or float(counts_LE.sum()) == 0:
        return 1.0
    mean_L = counts_LE.mean(dim=1).clamp_min(1e-9)
    return float((counts_LE.max(dim=1).values / mean_L).mean())


class RouterTap:
    """Forward hooks that keep each router's (topk_idx_TK, scores_TE) of the last forward, for the aux loss."""

    def __init__(self, model: nn.Module):
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [m.gate.register_forward_hook(self._hook) for m in moe_layers(model)]

    def _hook(self, module, args, output) -> None:
        topk_idx_TK, _, scores_TE = output
        self.outputs.append((topk_idx_TK, scores_TE))

    def clear(self) -> None:
        self.outputs.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def sequence_aux_loss(self, batch_size: int) -> torch.Tensor:
        """Mean over MoE layers and sequences of sum_e f_e P_e (see module docstring); consumes the outputs."""
        losses = []
        for topk_idx_TK, scores_TE in self.outputs:
            T_all, E = scores_TE.shape
            K = topk_idx_TK.shape[1]
            T = T_all // batch_size
            probs_BTE = (scores_TE / scores_TE.sum(-1, keepdim=True)).view(batch_size, T, E)
            chosen_BTE = torch.zeros_like(scores_TE).scatter_(1, topk_idx_TK, 1.0).view(batch_size, T, E)
            f_BE = chosen_BTE.sum(1) * (E / (K * T))
            P_BE = probs_BTE.mean(1)
            losses.append((f_BE.detach() * P_BE).sum(-1).mean())
        self.outputs.clear()
        if not losses:
            return torch.zeros(())
        return torch.stack(losses).mean()
