"""MTP self-distillation and MTP-head growth, for `mimoflash train --only-mtp --distill [--mtp-heads N]`.

Speculative decoding accepts a draft when it equals what the *main model* would say, not what the training text
says. So instead of the data token, MTP head k at position i can learn the main model's own distribution for the
token it drafts: the main model's softmax at position i+k+1 (which predicts token i+k+2 from the text up to i+k+1),
with the main model frozen. The head still sees the data token i+k+1 (teacher forcing, as in pre-training), so
the teacher and the student condition on the same text. The loss is KL(p_main || p_head) per position, summed and
divided by the same valid-target counts as the data loss; positions whose data target is masked (a document
boundary lies between i and i+k+2) are masked here too.

The main model's logits at positions i+k+1 for the window's last positions need up to n_mtp tokens beyond the
window; the targets of a batch already hold them (`TokenDataset.batch_at`), so the main model runs on the
window extended by those tokens. Causal attention makes the first T hidden states identical to the plain window's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def extend_window(input_ids: torch.Tensor, targets: torch.Tensor, n_extra: int, fill_id: int) -> torch.Tensor:
    """(B, T) inputs + (B, 1+F, T) targets -> (B, T + n_extra) inputs: tokens s..s+T+n_extra-1.

    targets[:, 0] holds tokens s+1..s+T and targets[:, k, T-1] the token s+T+k; a masked one (after a document
    boundary) is replaced by `fill_id`: every distillation target that could depend on it is masked anyway."""
    T = input_ids.shape[1]
    if n_extra == 0:
        return input_ids
    if targets.shape[1] - 1 < n_extra:
        raise ValueError(f"targets hold {targets.shape[1] - 1} tokens beyond the window, need {n_extra}")
    extra = torch.cat([targets[:, 0, T - 1:], targets[:, 1:n_extra, T - 1]], dim=1)     # (B, n_extra)
    extra = extra.masked_fill(extra == IGNORE_INDEX, fill_id)
    return torch.cat([input_ids, extra], dim=1)


def distill_loss(head_logits: torch.Tensor, main_logits_ext: torch.Tensor, depth: int, targets: torch.Tensor,
                 n_valid: torch.Tensor) -> torch.Tensor:
    """Sum over valid positions of KL(p_main(i+depth+1) || p_head(i)), divided by `n_valid` (a global count).

    head_logits (B, T, V) from MTP block `depth`; main_logits_ext (B, >= T+depth+1, V) of the extended window
    (computed without autograd); targets (B, 1+F, T) for the mask of depth `depth` (row depth+1)."""
    T = head_logits.shape[1]
    teacher = main_logits_ext[:, depth + 1: depth + 1 + T].detach().float()                 # (B, T, V)
    log_p = F.log_softmax(teacher, dim=-1)
    log_q = F.log_softmax(head_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)                                             # (B, T)
    valid = targets[:, depth + 1] != IGNORE_INDEX
    return kl.masked_fill(~valid, 0.0).sum() / n_valid.clamp_min(1)


@torch.no_grad()
def grow_mtp_heads(model, n_heads: int, init: str = "copy", std: float = 0.02,
                   generator: torch.Generator | None = None):
    """Return `model` with `n_heads` MTP blocks (>= its current number): the existing blocks and every other weight
    are kept bit for bit; each new block is a copy of the last trained one (`init="copy"`: block k+1 does block
    k's job one token further on, so it starts from a useful function) or a fresh random block (`"fresh"`)."""
    from ..model.mimo import MiMoForCausalLM

    old = model.config.num_nextn_predict_layers
    if n_heads < old:
        raise ValueError(f"the model has {old} MTP heads; shrinking to {n_heads} is not supported")
    if n_heads == old:
        return model
    if init not in ("copy", "fresh"):
        raise ValueError(f"new MTP heads start as 'copy' or 'fresh', got {init!r}")
    if init == "copy" and old == 0:
        raise ValueError("init='copy' needs at least one trained MTP head to copy")
    cfg = model.config.to_dict()
    cfg["num_nextn_predict_layers"] = n_heads
    new = MiMoForCausalLM(type(model.config).from_dict(cfg))
    new.init_weights(std=std, generator=generator)
    new = new.to(dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)
    src = model.state_dict()
    state = new.state_dict()
    for name, t in src.items():
        state[name] = t
    if init == "copy":
        prefix = f"model.mtp.layers.{old - 1}."
        for k in range(old, n_heads):
            for name, t in src.items():
                if name.startswith(prefix):
                    state[f"model.mtp.layers.{k}." + name[len(prefix):]] = t.clone()
    new.load_state_dict(state)
    return new
