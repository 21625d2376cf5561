"""Held-out evaluation: validation loss on a token file, MTP draft acceptance, greedy samples.

MTP acceptance (`mtp_acceptance`) is measured greedily against the *data* tokens of held-out text, with the MTP
blocks fed the true tokens ahead (teacher forcing):

* `acc[k]` = fraction of positions where argmax of MTP block k equals the true token k+2 ahead;
* `accept_length` = 1 + mean number of leading depths that are all correct at a position, i.e. the tokens one
  verify step would emit (the bonus token included, as in docs/MODEL.md §3.4) if the main model's greedy choice were the
  data token. While depths 0..k-1 are correct, the drafts fed to block k *are* the true tokens, so teacher forcing
  gives exactly the chained draft; the chain stops at the first miss.
* `main_acc` = next-token accuracy of the main model, for scale.

This is a proxy for speculative-decoding acceptance (which compares drafts with the main model's own greedy
tokens, not with the data); it is cheap, deterministic and moves the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, TokenDataset


@torch.no_grad()
def mtp_acceptance(model, dataset: TokenDataset, batch_size: int = 8, max_batches: int | None = 8) -> dict:
    """Per-depth greedy accuracy of the MTP blocks and the chained acceptance length (see module docstring)."""
    from .train import mtp_ahead_ids

    n_mtp = model.config.num_nextn_predict_layers
    if dataset.n_future < n_mtp:
        raise ValueError(f"dataset has n_future={dataset.n_future}, the model has {n_mtp} MTP blocks")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros(1 + n_mtp, dtype=torch.float64)
    total = torch.zeros(1 + n_mtp, dtype=torch.float64)
    run_sum, run_n = 0.0, 0
    for inp, tgt in dataset.iter_eval_batches(batch_size, max_batches):
        inp, tgt = inp.to(device), tgt.to(device)
        hidden = model.model(inp)
        hits = [model.logits(hidden).argmax(-1) == tgt[:, 0]]
        for d in range(n_mtp):
            pred = model.mtp_logits(d, hidden, mtp_ahead_ids(tgt, d, dataset.separator_id)).argmax(-1)
            hits.append(pred == tgt[:, d + 1])
        for k, h in enumerate(hits):
            valid = tgt[:, k] != IGNORE_INDEX
            correct[k] += float((h & valid).sum())
            total[k] += float(valid.sum())
        # Chained run over the MTP depths, counted where every depth has a target (the window's last n_mtp
        # positions lack one and are skipped, as are positions whose chain would cross a document boundary).
        if n_mtp:
            ok = torch.stack([hits[d + 1] & (tgt[:, d + 1] != IGNORE_INDEX) for d in range(n_mtp)], -1)  # (B,T,F)
            full = (tgt[:, n_mtp] != IGNORE_INDEX)
            T = tgt.shape[-1]
            full[:, T - n_mtp:] = False
            run = ok.long().cumprod(-1).sum(-1)                                                      # (B, T)
            run_sum += float(run[full].sum())
            run_n += int(full.sum())
    model.train(was_training)
    acc = (correct / total.clamp_min(1)).tolist()
    return {"main_acc": round(acc[0], 4), "mtp_acc": [round(a, 4) for a in acc[1:]],
            "accept_length": round(1 + run_sum / max(1, run_n), 4), "positions": int(total[0])}


def read_tokens(path: str | Path, dtype: str = "uint16") -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=dtype).astype(np.int64))


@torch.no_grad()
def heldout_loss(model, tokens: torch.Tensor, seq_len: int) -> float:
    """Mean next-token CE of `model` over `tokens` cut into consecutive windows of seq_len (+1 for the targets)."""
    model.eval()
    n = (len(tokens) - 1) // seq_len
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1: n * seq_len + 1].view(n, seq_len)
    device = next(model.parameters()).device
    total = 0.0
    for i in range(n):
        logits = model(x[i:i + 1].to(device)).float()
        total += float(F.cross_entropy(logits.view(-1, logits.shape[-1]), y[i:i + 1].reshape(-1).to(device),
                                       reduction="sum"))
    return total / (n * seq_len)


@torch.no_grad()
def greedy_generate(model, ids: list[int], max_new_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
    """Plain greedy decoding by full recomputation (no KV cache); for model cards and smoke tests."""
    model.eval()
    device = next(model.parameters()).device
    ids = list(ids)
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([ids], device=device))[0, -1].argmax())
        ids.append(nxt)
        if stop_ids and nxt in stop_ids:
            break
    return ids
