"""Pre-training (and MTP-only training) for MiMo-architecture models: one loop, CPU or GPU, 1..N processes.

Example:
    mimoflash train --config tiny --data runs/data --out runs/tiny --max-steps 200
    torchrun --nproc-per-node 2 -m mimoflash.train.train --config tiny --data runs/data --out runs/tiny2
    mimoflash train --config default-small --data runs/default/data --out runs/default/train --resume
    mimoflash train --only-mtp --init mimoflash/default_model --data runs/default/data --out runs/mtp

What one optimizer step does (docs/MODEL.md §2.5, §3, §6):

1. For each of `grad_accum` micro-steps, draw a *global* micro-batch of `batch_size` windows from the data
   generator (every rank draws the same one) and keep rows `rank::world` of it. The loss is normalised by the
   number of valid targets in the global micro-batch, and gradients are summed over ranks, so N processes compute
   exactly what one process computes on the whole batch (up to summation order).
2. Loss = main next-token CE + sum_k w_k * CE of MTP block k (block k predicts the token k+2 ahead; w_k = 0.3 by
   default, the report's stage-1 weight) + an optional sequence-level balance loss (`--seq-aux-coef`, default 0).
   MTP blocks receive the main model's pre-norm hidden state and the *true* token k+1 ahead (teacher forcing), and
   their gradient flows into the main model, as in DeepSeek-V3 / MiMo pre-training.
3. All-reduce gradients (one flat buffer), clip the global norm to 1.0, AdamW (0.9, 0.95, weight decay 0.1 on
   matrices only: embeddings, projections, experts, router; not on norms or sink logits), learning rate with
   linear warmup then cosine decay to `min_lr_ratio * lr`, computed from the step number (no scheduler object, so
   resuming cannot disagree with it).
4. Aux-loss-free balancing (`balance.py`): all-reduce the step's per-expert token counts and move each MoE
   layer's `e_score_correction_bias` by `rate * sign(mean - load)`.

Data parallelism is plain `torch.distributed` (gloo on CPU, NCCL on GPU) with a manual flat all-reduce instead of
the `DistributedDataParallel` wrapper: the MTP losses call `model.model`, `model.logits` and `model.mtp_logits`
rather than `model.forward`, which DDP's reducer would not see. The arithmetic is the same as DDP's.

Checkpoints (`OUT/checkpoint/`, replaced atomically, every `--ckpt-every-min` minutes, at the end, and when SIGTERM
or Ctrl-C stops the run after the current step; a second signal kills as usual) hold the
weights in the official layout (`checkpoint.saver.save_model`, fp32, so resuming is bit-exact) plus
`trainer_state.pt`: optimizer moments, step, tokens seen, data-generator state and RNG state. `--resume` continues
from it and reproduces the uninterrupted run's losses exactly (tests/test_train.py kills a run with SIGKILL).

Outputs in OUT: `metrics.jsonl` (one JSON object per step, plus `{"val_loss": ...}` lines), `loss.png`,
`checkpoint/`, `train_config.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import MiMoConfig
from ..model.mimo import MiMoForCausalLM
from ..model.moe import MoE
from .balance import LoadCounter, RouterTap, imbalance, update_expert_bias
from .data import IGNORE_INDEX, TokenDataset
from .distill import distill_loss, extend_window, grow_mtp_heads
from .presets import PRESETS, get_preset


@dataclass
class TrainConfig:
    seq_len: int = 512
    batch_size: int = 16              # sequences per micro-step, global (summed over ranks)
    grad_accum: int = 1               # micro-steps per optimizer step
    max_steps: int = 1000             # length of the LR schedule
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weights: list[float] = field(default_factory=lambda: [0.3])   # one per MTP block; the last one repeats
    mtp_fraction: float = 1.0         # MTP losses on the first ceil(f * batch_size) rows of each global micro-batch
    balance_rate: float = 1e-3        # aux-loss-free bias step (DeepSeek-V3: 0.001)
    seq_aux_coef: float = 0.0         # sequence-level balance loss coefficient (MiMo report: 1e-5)
    init_std: float = 0.02
    seed: int = 0
    eval_every: int = 100             # steps; 0 = only at the end
    eval_batches: int = 8
    ckpt_every_min: float = 5.0       # 0 = only at the end (and --ckpt-every-steps)
    ckpt_every_steps: int = 0
    log_every: int = 1
    bf16: bool = False                # torch.autocast(bfloat16) for matmuls; master weights stay fp32
    compile: bool = False             # torch.compile each decoder layer and MTP block
    distill: bool = False             # --only-mtp: MTP heads learn the main model's distribution (train/distill.py)

    def mtp_weight(self, depth: int) -> float:
        w = self.mtp_weights or [0.0]
        return float(w[min(depth, len(w) - 1)])


# ------------------------------------------------------------------------------------------------ helpers


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def mtp_ahead_ids(targets: torch.Tensor, depth: int, fill_id: int) -> torch.Tensor:
    """Tokens t_{i+depth+1} for MTP block `depth` from the (B, 1+F, T) targets.

    targets[:, 0] (never masked) holds tokens s+1..s+T; the token s+T+k sits in targets[:, k, T-1]. A masked
    entry there means a document boundary lies before it, so every target that could depend on it is masked too;
    any id will do (`fill_id`)."""
    T = targets.shape[-1]
    stream = torch.cat([targets[:, 0], targets[:, 1:, T - 1]], dim=1)          # (B, T + F): tokens s+1..s+T+F
    ahead = stream[:, depth: depth + T]                                         # (B, T)
    return ahead.masked_fill(ahead == IGNORE_INDEX, fill_id)


def world_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, NCCL on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world_info()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_info()[1] > 1:
        dist.all_reduce(t)
    return t


def autocast_ctx(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


# ------------------------------------------------------------------------------------------------ losses


def step_losses(model: MiMoForCausalLM, input_ids: torch.Tensor, targets: torch.Tensor, n_valid: torch.Tensor,
                n_mtp: int, fill_id: int, main_grad: bool = True, tap: RouterTap | None = None,
                mtp_rows: int | None = None, distill: bool = False,
                ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Main and per-depth MTP losses, each = sum of token CE over this rank's rows / `n_valid` (global counts).

    Returns (main, [mtp_0, ...], seq_aux). `main_grad=False` runs the main model without autograd (--only-mtp).
    `mtp_rows` limits the MTP losses to this rank's first rows (`n_valid[1:]` must count the same rows).
    `distill=True` (frozen main model) makes each MTP loss the KL to the main model's distribution instead of the
    CE to the data token (train/distill.py); the main model then runs on the window extended by n_mtp tokens."""
    V = model.config.vocab_size
    T = input_ids.shape[1]
    if distill and main_grad:
        raise ValueError("distillation trains the MTP heads against a frozen main model (--only-mtp)")
    with torch.set_grad_enabled(main_grad and torch.is_grad_enabled()):
        run_ids = extend_window(input_ids, targets, n_mtp, fill_id) if distill else input_ids
        hidden = model.model(run_ids)                                             # (B, T(+F), D) pre-norm
        logits = model.logits(hidden)                                             # (B, T(+F), V)
        hidden = hidden[:, :T]
        main = F.cross_entropy(logits[:, :T].float().reshape(-1, V), targets[:, 0].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum") / n_valid[0].clamp_min(1)
    if not distill:
        del logits
    seq_aux = tap.sequence_aux_loss(input_ids.shape[0]) if tap is not None else torch.zeros(())
    mtp = []
    if mtp_rows is not None:
        hidden, targets = hidden[:mtp_rows], targets[:mtp_rows]
    if distill and mtp_rows is not None:
        logits = logits[:mtp_rows]
    for d in range(n_mtp):
        ahead = mtp_ahead_ids(targets, d, fill_id)
        lg = model.mtp_logits(d, hidden, ahead)
        if distill:
            mtp.append(distill_loss(lg, logits, d, targets, n_valid[d + 1]))
            continue
        mtp.append(F.cross_entropy(lg.float().view(-1, V), targets[:, d + 1].reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum") / n_valid[d + 1].clamp_min(1))
    return main, mtp, seq_aux


@torch.no_grad()
def evaluate(model: MiMoForCausalLM, dataset: TokenDataset, batch_size: int, max_batches: int | None,
             n_mtp: int, bf16: bool = False) -> dict:
    """Mean validation CE (main and each MTP depth) over the first `max_batches` in-order batches of `dataset`.
    Under data parallelism each rank takes rows rank::world and the sums are all-reduced."""
    rank, world = world_info()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(2 * (1 + n_mtp), dtype=torch.float64)
    for inp, tgt in dataset.iter_eval_batches(batch_size, max_batches):
        inp, tgt = inp[rank::world].to(device), tgt[rank::world].to(device)
        if inp.shape[0] == 0:
            continue
        ones = torch.ones(1 + n_mtp, device=device)
        with autocast_ctx(device, bf16):
            main, mtp, _ = step_losses(model, inp, tgt, ones, n_mtp, dataset.separator_id)
        for k, l in enumerate([main] + mtp):
            sums[2 * k] += float(l)
            sums[2 * k + 1] += int((tgt[:, k] != IGNORE_INDEX).sum())
    all_reduce_sum(sums)
    model.train(was_training)
    losses = [float(sums[2 * k] / max(1.0, float(sums[2 * k + 1]))) for k in range(1 + n_mtp)]
    return {"val_loss": losses[0], "val_mtp_loss": losses[1:], "val_tokens": int(sums[1])}


# ------------------------------------------------------------------------------------------------ checkpoints


def save_weights(model: MiMoForCausalLM, path: Path, tokenizer_dir: str | None) -> None:
    """Official layout via checkpoint.saver (fp32: resuming must be exact); plain state_dict if it is missing."""
    try:
        from ..checkpoint.saver import save_model
    except ImportError:
        path.mkdir(parents=True, exist_ok=True)
        model.config.save(path / "config.json")
        torch.save(model.state_dict(), path / "model_state.pt")
        return
    save_model(model, path, torch.float32, tokenizer_dir=tokenizer_dir)


def load_weights(model: MiMoForCausalLM, path: Path) -> None:
    if (path / "model_state.pt").exists():
        model.load_state_dict(torch.load(path / "model_state.pt", map_location="cpu", weights_only=True))
        return
    from ..checkpoint.loader import load_model
    loaded = load_model(path, torch.float32, "cpu")
    model.load_state_dict(loaded.state_dict())


def save_checkpoint(out_dir: Path, model: MiMoForCausalLM, state: dict, tokenizer_dir: str | None) -> Path:
    """Write OUT/checkpoint atomically: build checkpoint.tmp, then swap it in (a SIGKILL leaves one intact copy)."""
    final, tmp, old = out_dir / "checkpoint", out_dir / "checkpoint.tmp", out_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp, tokenizer_dir)
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict:
    """Read `trainer_state.pt` without running code from it. The state holds only tensors and plain Python data
    (numbers, strings, lists, dicts), which `torch.load(weights_only=True)` (torch's restricted unpickler) reads;
    a file that names any other object, such as a tampered one that would call a function, is refused."""
    import pickle
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        raise ValueError(f"{path}: refused: the trainer state holds objects other than tensors and plain data, and "
                         f"loading them could run code from the file{f' ({detail})' if detail else ''}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: not a mimoflash trainer state (a dict with 'step', 'optimizer', ...)")
    return state


def find_checkpoint(out_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):   # .old survives only a kill between the two renames
        p = out_dir / name
        if (p / "trainer_state.pt").exists():
            return p
    return None


# ------------------------------------------------------------------------------------------------ the loop


def build_model(model_cfg: MiMoConfig, cfg: TrainConfig, device: torch.device) -> MiMoForCausalLM:
    model = MiMoForCausalLM(model_cfg)
    model.init_weights(std=cfg.init_std, generator=torch.Generator().manual_seed(cfg.seed))
    return model.float().to(device)


def train(model_cfg: MiMoConfig, cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
          only_mtp: bool = False, init: str | Path | None = None, stop_step: int | None = None,
          device: str | torch.device | None = None, progress: bool = True,
          tokenizer_dir: str | None = None, mtp_heads: int | None = None, new_mtp_init: str = "copy") -> dict:
    """Run (or continue) training; returns a summary dict (final losses, tokens seen, throughput).

    `mtp_heads` grows the `init` model to that many MTP heads before training (train/distill.py)."""
    if cfg.distill and not only_mtp:
        raise ValueError("--distill trains the MTP heads against the frozen main model: it needs --only-mtp")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    out_dir = Path(out_dir)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    if init is not None:
        from ..checkpoint.loader import load_model
        model = load_model(init, torch.float32, "cpu").float().to(device)
        if mtp_heads is not None:
            model = grow_mtp_heads(model, mtp_heads, new_mtp_init, cfg.init_std,
                                   torch.Generator().manual_seed(cfg.seed))
        model_cfg = model.config
    else:
        model = build_model(model_cfg, cfg, device)
    n_mtp = model_cfg.num_nextn_predict_layers
    if only_mtp:
        if not n_mtp:
            raise ValueError("--only-mtp needs a model with num_nextn_predict_layers > 0")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("model.mtp."))
    model.train()

    meta_path = Path(data_dir) / "meta.json"
    if tokenizer_dir is None and meta_path.exists():
        tok = json.loads(meta_path.read_text()).get("tokenizer")
        tokenizer_dir = tok if tok and Path(tok, "tokenizer.json").exists() else None
    train_ds = TokenDataset(data_dir, "train", cfg.seq_len, n_mtp)
    val_ds = TokenDataset(data_dir, "val", cfg.seq_len, n_mtp)
    if train_ds.meta.get("vocab_size", model_cfg.vocab_size) > model_cfg.vocab_size:
        raise ValueError(f"data vocabulary {train_ds.meta['vocab_size']} exceeds model vocab_size "
                         f"{model_cfg.vocab_size}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=None if device.type == "cuda" else False)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, tokens_seen, elapsed = 0, 0, 0.0

    ckpt = find_checkpoint(out_dir) if resume else None
    if resume and ckpt is None and is_main:
        print(f"--resume: no checkpoint in {out_dir}, starting fresh", file=sys.stderr)
    if ckpt is not None:
        state = load_trainer_state(ckpt / "trainer_state.pt")
        if state.get("only_mtp", False) != only_mtp:
            raise ValueError(f"checkpoint {ckpt} was written with only_mtp={state.get('only_mtp')}")
        load_weights(model, ckpt)
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["data_generator"])
        torch.set_rng_state(state["torch_rng"])
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed_s"]
    if is_main:
        (out_dir / "train_config.json").write_text(json.dumps(
            {"train": dataclasses.asdict(cfg), "model": model_cfg.to_dict(), "data": str(data_dir),
             "world_size": world, "only_mtp": only_mtp, "init": str(init) if init else None,
             "mtp_heads": mtp_heads, "new_mtp_init": new_mtp_init if mtp_heads else None}, indent=2) + "\n")
        _truncate_metrics(out_dir / "metrics.jsonl", step)

    fwd_model = model
    if cfg.compile:
        # Attention and dense MLPs only: MoE routing is data-dependent, and the fake-tensor kernel of
        # torch._grouped_mm (torch 2.13) accepts only bf16, so fp32 MoE layers cannot be traced; they stay eager.
        for layer in model.model.layers:
            layer.self_attn.compile(dynamic=False)
            if not isinstance(layer.mlp, MoE):
                layer.mlp.compile(dynamic=False)
        for block in (model.model.mtp.layers if n_mtp else []):
            block.compile(dynamic=False)
    counter = LoadCounter(model)
    tap = RouterTap(model) if cfg.seq_aux_coef > 0 and not only_mtp else None
    routers = [m.gate for m in counter.layers]
    end_step = cfg.max_steps if stop_step is None else min(stop_step, cfg.max_steps)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    # MTP rows: the first `mtp_rows_global` rows of each global micro-batch; rank r holds rows r, r+world, ...
    mtp_rows_global = min(cfg.batch_size, max(1, math.ceil(cfg.mtp_fraction * cfg.batch_size)))
    mtp_rows_local = max(0, math.ceil((mtp_rows_global - rank) / world))
    metrics_f = open(out_dir / "metrics.jsonl", "a") if is_main else None
    bar = None
    if is_main and progress:
        from tqdm import tqdm
        bar = tqdm(total=end_step, initial=step, desc="train", unit="step", dynamic_ncols=True)
    last_ckpt_t = time.time()
    last_val = None
    t_run = time.time()
    stop_flag = _StopOnSignal()
    try:
        while step < end_step:
            t0 = time.time()
            lr = lr_at(cfg, step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            counter.reset()
            logs = torch.zeros(2 + n_mtp, dtype=torch.float64)   # main, mtp..., seq_aux (global, summed)
            for _ in range(cfg.grad_accum):
                inp, tgt = train_ds.get_batch(cfg.batch_size, gen)                       # global micro-batch
                n_valid = (tgt != IGNORE_INDEX).sum(dim=(0, 2))                          # (1+F,) global counts
                n_valid[1:] = (tgt[:mtp_rows_global, 1:] != IGNORE_INDEX).sum(dim=(0, 2))
                inp, tgt = inp[rank::world].to(device), tgt[rank::world].to(device)
                with autocast_ctx(device, cfg.bf16):
                    main, mtp, aux = step_losses(fwd_model, inp, tgt, n_valid.to(device), n_mtp,
                                                 train_ds.separator_id, main_grad=not only_mtp, tap=tap,
                                                 mtp_rows=mtp_rows_local, distill=cfg.distill)
                    loss = sum((cfg.mtp_weight(d) * l for d, l in enumerate(mtp)), main * (0.0 if only_mtp else 1.0))
                    if tap is not None:
                        loss = loss + cfg.seq_aux_coef * aux / world   # aux is a per-rank mean; average ranks
                counter.add()
                (loss / cfg.grad_accum).backward()
                logs += torch.tensor([main.item()] + [l.item() for l in mtp] + [aux.item() / world],
                                     dtype=torch.float64) / cfg.grad_accum
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if world > 1:
                flat = torch._utils._flatten_dense_tensors([p.grad for p in params])
                dist.all_reduce(flat)
                for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, [p.grad for p in params])):
                    p.grad.copy_(g)
                dist.all_reduce(logs)
                counter.all_reduce()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not only_mtp:
                update_expert_bias(routers, counter.counts_LE, cfg.balance_rate)
            step += 1
            tokens_seen += tokens_per_step
            dt = time.time() - t0
            elapsed += dt
            rec = {"step": step, "tokens": tokens_seen, "loss": round(float(logs[0]), 5),
                   "mtp_loss": [round(float(x), 5) for x in logs[1:1 + n_mtp]], "lr": lr,
                   "tok_per_s": round(tokens_per_step / dt, 1), "imbalance": round(imbalance(counter.counts_LE), 4),
                   "grad_norm": round(grad_norm, 4), "elapsed_s": round(elapsed, 1)}
            if tap is not None:
                rec["seq_aux"] = round(float(logs[-1]), 6)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == end_step:
                last_val = evaluate(model, val_ds, cfg.batch_size, cfg.eval_batches, n_mtp, cfg.bf16)
                rec.update(last_val)
            if metrics_f is not None and (step % cfg.log_every == 0 or "val_loss" in rec):
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
            if bar is not None:
                post = {"loss": f"{rec['loss']:.3f}", "mtp": "/".join(f"{x:.2f}" for x in rec["mtp_loss"]),
                        "tok/s": f"{rec['tok_per_s']:.0f}", "imb": f"{rec['imbalance']:.2f}"}
                if last_val:
                    post["val"] = f"{last_val['val_loss']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            due = (cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0) or \
                  (cfg.ckpt_every_min and time.time() - last_ckpt_t >= 60 * cfg.ckpt_every_min)
            stop = stop_flag.requested
            if world > 1:   # every rank must leave the loop at the same step
                t = torch.tensor([float(stop)], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                stop = bool(t.item())
            if is_main and (due or step == end_step or stop):
                state = {"step": step, "tokens_seen": tokens_seen, "elapsed_s": elapsed,
                         "optimizer": optimizer.state_dict(), "data_generator": gen.get_state(),
                         "torch_rng": torch.get_rng_state(), "only_mtp": only_mtp, "world_size": world,
                         "train_config": dataclasses.asdict(cfg), "model_config": model_cfg.to_dict()}
                save_checkpoint(out_dir, model, state, tokenizer_dir)
                last_ckpt_t = time.time()
            if stop:
                if is_main:
                    print(f"\nstopped by signal after step {step}; checkpoint saved, continue with --resume",
                          file=sys.stderr)
                break
    finally:
        stop_flag.restore()
        if bar is not None:
            bar.close()
        if metrics_f is not None:
            metrics_f.close()
        if tap is not None:
            tap.remove()
    if is_main:
        try:
            plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
        except Exception as e:   # a missing plot must not fail a finished run
            print(f"loss plot failed: {e}", file=sys.stderr)
    wall = time.time() - t_run
    summary = {"step": step, "tokens_seen": tokens_seen, "elapsed_s": round(elapsed, 1),
               "tok_per_s": round(tokens_seen / elapsed, 1) if elapsed else None, "run_wall_s": round(wall, 1),
               **(last_val or {}), "model": model}
    return summary


class _StopOnSignal:
    """SIGTERM / SIGINT (Ctrl-C) ask the loop to finish the current step, checkpoint and return; a second signal
    acts as usual (the original handlers are back after the first)."""

    def __init__(self):
        self.requested = False
        self.saved = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, self._handle)
        except ValueError:   # not the main thread: no handlers, signals act as usual
            self.saved = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.restore()

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved = {}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines from steps after the checkpoint (they will be recomputed)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training loss (raw and smoothed), MTP losses and validation loss against tokens seen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not recs:
        return
    tok = [r["tokens"] / 1e6 for r in recs]
    loss = [r["loss"] for r in recs]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(tok, loss, color="C0", alpha=0.25, lw=0.8)
    ax.plot(tok, _ema(loss), color="C0", label="train (main)")
    n_mtp = len(recs[0].get("mtp_loss", []))
    for d in range(n_mtp):
        ax.plot(tok, _ema([r["mtp_loss"][d] for r in recs]), color=f"C{2 + d}", label=f"train MTP depth {d}")
    val = [(r["tokens"] / 1e6, r["val_loss"]) for r in recs if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", color="C1", label="validation (main)")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_ylim(top=min(max(loss), 12))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _ema(xs: list[float], alpha: float = 0.05) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else (1 - alpha) * m + alpha * x
        out.append(m)
    return out


# ------------------------------------------------------------------------------------------------ CLI


def load_config(spec: str) -> tuple[MiMoConfig, TrainConfig]:
    """A preset name (presets.PRESETS) or a JSON file {"model": {...}, "train": {...}}."""
    if spec in PRESETS:
        raw = get_preset(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise SystemExit(f"--config {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a file")
        raw = json.loads(path.read_text())
        if "train" not in raw and "model" in raw:
            raw = {"model": raw["model"], "train": {}}
        elif "model" not in raw:
            raw = {"model": raw, "train": {}}
    return MiMoConfig.from_dict(raw["model"]), TrainConfig(**raw.get("train", {}))


RUN_OUTPUTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "metrics.jsonl", "loss.png", "train_config.json",
               "mtp_acceptance.json")


def _check_out_dir(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An --out that already holds a run is never overwritten by accident: --resume continues it, --overwrite
    deletes that run's outputs (RUN_OUTPUTS; nothing else in the directory) and starts afresh."""
    out = Path(args.out)
    if args.resume and args.overwrite:
        p.exit(2, f"{p.prog}: error: --resume continues the run in --out and --overwrite replaces it: give one\n")
    if out.exists() and not out.is_dir():
        p.exit(2, f"{p.prog}: error: --out {out} exists and is not a directory\n")
    found = [n for n in RUN_OUTPUTS if (out / n).exists()]
    if not found or args.resume:
        return
    if not args.overwrite:
        p.exit(2, f"{p.prog}: error: --out {out} already holds a run ({', '.join(found)}); add --resume to continue "
                  "it or --overwrite to replace it\n")
    if int(os.environ.get("RANK", "0")) == 0:
        for name in found:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()


def main(argv: Sequence[str] | None = None) -> dict:
    """Train a MiMo-architecture model (main + MTP losses, aux-loss-free balancing) on a prepared token directory.

    Example:
        mimoflash train --config tiny --data runs/data --out runs/tiny --max-steps 200
    """
    from ..cli import HelpFormatter
    p = argparse.ArgumentParser(prog="mimoflash train", description=main.__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--config", default="tiny", help=f"preset ({', '.join(sorted(PRESETS))}) or JSON file")
    p.add_argument("--data", required=True, help="directory from `mimoflash prepare-data` (train.bin, val.bin)")
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, loss.png, checkpoint/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (without it, or --resume, an existing run is refused)")
    p.add_argument("--only-mtp", action="store_true", help="freeze the main model, train only the MTP blocks")
    p.add_argument("--init", help="start from this checkpoint (official layout) instead of random weights")
    p.add_argument("--stop-step", type=int, help="stop after this step without changing the LR schedule")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--tokenizer", help="tokenizer dir copied into checkpoints (default: the one in meta.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and scripts)")
    p.add_argument("--acceptance-batches", type=int, default=8, help="--only-mtp: held-out batches for acceptance")
    ints = ("seq_len", "batch_size", "grad_accum", "max_steps", "warmup_steps", "seed", "eval_every",
            "eval_batches", "ckpt_every_steps", "log_every")
    floats = ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "balance_rate", "seq_aux_coef", "init_std",
              "ckpt_every_min", "beta1", "beta2", "mtp_fraction")
    for name in ints:
        p.add_argument("--" + name.replace("_", "-"), type=int, help="(default: the --config preset's value)")
    for name in floats:
        p.add_argument("--" + name.replace("_", "-"), type=float, help="(default: the --config preset's value)")
    p.add_argument("--mtp-weights", type=float, nargs="+", help="loss weight per MTP depth (last one repeats)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile layers")
    p.add_argument("--distill", action="store_true", default=None,
                   help="--only-mtp: train the MTP heads on the main model's own distribution (KL) instead of "
                        "the data tokens")
    p.add_argument("--mtp-heads", type=int, help="grow the --init model to this many MTP heads first")
    p.add_argument("--new-mtp-init", choices=("copy", "fresh"), default="copy",
                   help="new MTP heads start as a copy of the last trained head, or random (default: copy)")
    args = p.parse_args(argv)
    # Flag combinations first: a refused command must not have deleted an --overwrite'd run.
    if args.distill and not args.only_mtp:
        p.error("--distill needs --only-mtp (the main model is the frozen teacher)")
    if args.mtp_heads is not None and not args.init:
        p.error("--mtp-heads needs --init CHECKPOINT (the model whose MTP heads it grows)")
    if args.only_mtp and not args.init and not args.resume:
        p.error("--only-mtp needs --init CHECKPOINT (the trained main model)")
    _check_out_dir(p, args)

    model_cfg, cfg = load_config(args.config)
    for name in ints + floats + ("mtp_weights", "bf16", "compile", "distill"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    if args.bf16 and not _bf16_ok():
        print("warning: this CPU has no native bf16 matmul; autocast will be slow", file=sys.stderr)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    acc_before = None
    if cfg.distill and not args.only_mtp:        # distill set in a --config file
        p.error("--distill needs --only-mtp (the main model is the frozen teacher)")
    if args.only_mtp:
        from ..checkpoint.loader import load_model
        from .evaluate import mtp_acceptance
        if args.init and world_info()[0] == 0 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            ref = load_model(args.init, torch.float32, "cpu")
            if args.mtp_heads is not None:
                ref = grow_mtp_heads(ref, args.mtp_heads, args.new_mtp_init, cfg.init_std,
                                     torch.Generator().manual_seed(cfg.seed))
            n = ref.config.num_nextn_predict_layers
            acc_before = mtp_acceptance(ref, TokenDataset(args.data, "val", cfg.seq_len, n), cfg.batch_size,
                                        args.acceptance_batches)
            print("MTP acceptance before:", json.dumps(acc_before))
            del ref
    summary = train(model_cfg, cfg, args.data, args.out, resume=args.resume, only_mtp=args.only_mtp,
                    init=args.init, stop_step=args.stop_step, device=args.device,
                    progress=not args.no_progress, tokenizer_dir=args.tokenizer, mtp_heads=args.mtp_heads,
                    new_mtp_init=args.new_mtp_init)
    model = summary.pop("model")
    if args.only_mtp and world_info()[0] == 0:
        from .evaluate import mtp_acceptance
        n = model.config.num_nextn_predict_layers
        acc_after = mtp_acceptance(model, TokenDataset(args.data, "val", cfg.seq_len, n), cfg.batch_size,
                                   args.acceptance_batches)
        print("MTP acceptance after:", json.dumps(acc_after))
        summary["acceptance_before"], summary["acceptance_after"] = acc_before, acc_after
        Path(args.out, "mtp_acceptance.json").write_text(
            json.dumps({"before": acc_before, "after": acc_after}, indent=2) + "\n")
    if world_info()[0] == 0:
        print(json.dumps(summary))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()              # no rank tears gloo down while another still talks to it (it can abort at exit)
        dist.destroy_process_group()
    return summary


def _bf16_ok() -> bool:
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


if __name__ == "__main__":
    main()
