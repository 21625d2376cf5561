"""Held-out evaluation: validation loss on a token file, MTP draft acceptance, greedy samples.

MTP acceptance is measured greedily, with the MTP blocks fed the true tokens ahead (teacher forcing). While depths
0..k-1 are correct, the drafts fed to block k *are* those tokens, so teacher forcing gives exactly the chained
draft; the chain stops at the first miss. Two references, two texts:

`mtp_acceptance(model, dataset)` on held-out *data*:
* `mtp_acc[k]` = fraction of positions i where the argmax of MTP block k equals the data token k+2 ahead;
* `mtp_acc_model[k]` = fraction where it equals the *main model's* argmax at position i+k+1 (its greedy choice for
  that token, given the data up to there), which is what a verify step checks and what `--distill` trains for;
* `accept_length` / `accept_length_model` = 1 + mean number of leading depths that are all correct at a position,
  i.e. the tokens one verify step would emit (the bonus token included, docs/MODEL.md §3.4);
* `main_acc` = next-token accuracy of the main model, for scale.

`greedy_acceptance(model, dataset)` on the model's *own greedy output*: the main model continues held-out prompts
greedily, and the MTP blocks are scored on that continuation, where the main model's greedy choice *is* the next
token. This is exactly what greedy speculative decoding accepts: `tokens_per_step[k-1]` replays the draft/verify
cycle with k drafts (accept the longest correct prefix plus one token, jump, repeat) and counts tokens per verify
step. Greedy output of a small model repeats itself, which makes drafting easier than on data; both are reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, TokenDataset


def _leading_run(ok: torch.Tensor) -> torch.Tensor:
    """(..., F) bool hits per depth -> (...) number of leading True values."""
    return ok.long().cumprod(-1).sum(-1)


@torch.no_grad()
def _hits(model, inp: torch.Tensor, tgt: torch.Tensor, fill_id: int) -> tuple[list, list]:
    """Teacher-forced greedy hits on one batch: ([main, block 0, ...] vs data, [block 0, ...] vs the main model).

    inp (B, T), tgt (B, 1+F, T) as from TokenDataset.batch_at; the main model runs on the window extended by
    n_mtp tokens so that its argmax at i+k+1 exists for every position i (train/distill.py)."""
    from .distill import extend_window
    from .train import mtp_ahead_ids

    n_mtp = model.config.num_nextn_predict_layers
    T = inp.shape[1]
    hidden = model.model(extend_window(inp, tgt, n_mtp, fill_id))                     # (B, T + n_mtp, D)
    greedy = model.logits(hidden).argmax(-1)                                           # (B, T + n_mtp)
    hidden = hidden[:, :T]
    vs_data, vs_model = [greedy[:, :T] == tgt[:, 0]], []
    for d in range(n_mtp):
        pred = model.mtp_logits(d, hidden, mtp_ahead_ids(tgt, d, fill_id)).argmax(-1)  # (B, T)
        vs_data.append(pred == tgt[:, d + 1])
        vs_model.append(pred == greedy[:, d + 1: d + 1 + T])
    return vs_data, vs_model


@torch.no_grad()
def mtp_acceptance(model, dataset: TokenDataset, batch_size: int = 8, max_batches: int | None = 8) -> dict:
    """Per-depth greedy accuracy of the MTP blocks against the data and against the main model, and the chained
    acceptance lengths (see module docstring), over the first `max_batches` in-order batches of `dataset`."""
    n_mtp = model.config.num_nextn_predict_layers
    if dataset.n_future < n_mtp:
        raise ValueError(f"dataset has n_future={dataset.n_future}, the model has {n_mtp} MTP blocks")
    return _acceptance(model, dataset.iter_eval_batches(batch_size, max_batches), dataset.separator_id)


@torch.no_grad()
def heldout_acceptance(model, tokens: torch.Tensor, seq_len: int, separator_id: int) -> dict:
    """`mtp_acceptance` on a token file such as the model card's `heldout.bin`: consecutive windows of `seq_len`
    inputs (plus the n_mtp + 1 tokens after each for the targets), all in one batch."""
    F_ = model.config.num_nextn_predict_layers
    n = (len(tokens) - 1 - F_) // seq_len
    ids = torch.stack([tokens[i * seq_len: i * seq_len + seq_len + 1 + F_] for i in range(n)])   # (n, T + 1 + F)
    return _acceptance(model, [_windows(ids, seq_len, F_, separator_id)], separator_id)


def _windows(ids: torch.Tensor, T: int, n_future: int, sep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, >= T+1+n_future) token rows -> inputs (B, T) and targets (B, 1+n_future, T), masked exactly as
    `TokenDataset.batch_at` masks them (a separator between position t and target t+1+k hides that target)."""
    seps = torch.cumsum(ids == sep, dim=1)
    tgt = torch.stack([ids[:, 1 + k: 1 + k + T].masked_fill((seps[:, k: k + T] - seps[:, :T]) > 0, IGNORE_INDEX)
                       for k in range(1 + n_future)], dim=1)
    return ids[:, :T], tgt


@torch.no_grad()
def _acceptance(model, batches, separator_id: int) -> dict:
    n_mtp = model.config.num_nextn_predict_layers
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros(1 + 2 * n_mtp, dtype=torch.float64)     # main, vs data per depth, vs model per depth
    total = torch.zeros(1 + 2 * n_mtp, dtype=torch.float64)
    run_sum, run_sum_model, run_n = 0.0, 0.0, 0
    for inp, tgt in batches:
        inp, tgt = inp.to(device), tgt.to(device)
        vs_data, vs_model = _hits(model, inp, tgt, separator_id)
        valid = [tgt[:, k] != IGNORE_INDEX for k in range(1 + n_mtp)]
        for k, h in enumerate(vs_data + vs_model):
            v = valid[k if k <= n_mtp else k - n_mtp]
            correct[k] += float((h & v).sum())
            total[k] += float(v.sum())
        # Chained runs over the MTP depths, counted where every depth has a target (the window's last n_mtp
        # positions lack one and are skipped, as are positions whose chain would cross a document boundary).
        if n_mtp:
            full = valid[n_mtp].clone()
            full[:, inp.shape[1] - n_mtp:] = False
            run_sum += float(_leading_run(torch.stack(vs_data[1:], -1))[full].sum())
            run_sum_model += float(_leading_run(torch.stack(vs_model, -1))[full].sum())
            run_n += int(full.sum())
    model.train(was_training)
    acc = (correct / total.clamp_min(1)).tolist()
    return {"main_acc": round(acc[0], 4), "mtp_acc": [round(a, 4) for a in acc[1:1 + n_mtp]],
            "mtp_acc_model": [round(a, 4) for a in acc[1 + n_mtp:]],
            "accept_length": round(1 + run_sum / max(1, run_n), 4),
            "accept_length_model": round(1 + run_sum_model / max(1, run_n), 4), "positions": int(total[0])}


def _replay_cycle(hits: torch.Tensor, start: int, drafts: int) -> tuple[int, int]:
    """Greedy draft/verify cycle along one sequence: hits (L, F) bool (block d right at position i), verify steps
    begin at `start`; each step emits the leading run of correct drafts (at most `drafts`) plus one token.
    Returns (tokens emitted, verify steps) up to the last position with every depth scored."""
    run = _leading_run(hits[:, :drafts]).tolist()
    i, tokens, steps = start, 0, 0
    while i < len(run):
        emitted = run[i] + 1
        tokens, steps, i = tokens + emitted, steps + 1, i + emitted
    return tokens, steps


@torch.no_grad()
def greedy_acceptance(model, dataset: TokenDataset, n_prompts: int = 16, prompt_len: int = 64,
                      new_tokens: int = 64) -> dict:
    """MTP acceptance on the model's own greedy continuations of `n_prompts` held-out prompts (evenly spaced
    windows of `dataset`; see module docstring). Returns per-depth accuracy (`mtp_acc`), `tokens_per_step[k-1]`
    for k = 1..n_mtp drafts, and `main_acc` on the continuation (1.0 up to fp ties: a sanity check)."""
    from .train import mtp_ahead_ids

    n_mtp = model.config.num_nextn_predict_layers
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sep = dataset.separator_id
    span = len(dataset) - prompt_len
    starts = np.linspace(0, span - 1, n_prompts).astype(np.int64)
    ids = torch.from_numpy(np.stack([np.asarray(dataset.tokens[s:s + prompt_len], dtype=np.int64)
                                     for s in starts])).to(device)                        # (P, prompt_len)
    for _ in range(new_tokens + n_mtp):          # n_mtp more, so that every continuation position is scored
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    T = ids.shape[1] - 1 - n_mtp
    inp, tgt = _windows(ids, T, n_mtp, sep)                                             # (P, T), (P, 1+F, T)
    hidden = model.model(inp)
    main_hit = model.logits(hidden).argmax(-1) == tgt[:, 0]
    hits = torch.stack([model.mtp_logits(d, hidden, mtp_ahead_ids(tgt, d, sep)).argmax(-1) == tgt[:, d + 1]
                        for d in range(n_mtp)], -1)                                    # (P, T, n_mtp)
    hits &= tgt[:, 1:].permute(0, 2, 1) != IGNORE_INDEX
    scored = slice(prompt_len - 1, T)            # positions whose next token is generated
    acc = hits[:, scored].float().mean(dim=(0, 1)).tolist()
    per_k = []
    for k in range(1, n_mtp + 1):
        tokens = steps = 0
        for row in hits:
            t, s = _replay_cycle(row, prompt_len - 1, k)
            tokens, steps = tokens + t, steps + s
        per_k.append(round(tokens / max(1, steps), 4))
    model.train(was_training)
    return {"mtp_acc": [round(a, 4) for a in acc], "tokens_per_step": per_k,
            "main_acc": round(float(main_hit[:, scored].float().mean()), 4),
            "prompts": n_prompts, "prompt_len": prompt_len, "new_tokens": new_tokens}


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
