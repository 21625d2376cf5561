"""The shipped default model: a small MiMo-architecture code-completion model trained on the Python stdlib.

`default_model()` returns the path of `mimoflash/default_model/` (weights in the official layout, tokenizer, model
card), so anything that takes a checkpoint directory can use it:

    from mimoflash.checkpoint.loader import load_model
    from mimoflash.default import default_model
    model = load_model(default_model(), "float32", "cpu")

`scripts/train_default_model.sh` rebuilds it from scratch (docs/TRAINING.md).
"""

from __future__ import annotations

import math
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def default_model() -> str:
    """Path of the shipped model directory; raises FileNotFoundError with the fix if it is missing."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the default model is missing: {DEFAULT_MODEL_DIR}/config.json not found. It ships inside the package "
            "(mimoflash/default_model/); reinstall mimoflash, or rebuild it with scripts/train_default_model.sh")
    return str(DEFAULT_MODEL_DIR)


# ------------------------------------------------------------------------------------------------ export

SAMPLE_PROMPTS = [   # each ends inside a line: BPE merges whitespace with the next word, so a prompt ending in
    "def fibonacci(n):\n    if",                         # "\n    " would be tokenized unlike any training text
    "import os\n\n\ndef list_python_files(root):\n    \"\"\"Return the .py files under root.\"\"\"\n    result =",
    "class Stack:\n    def __init__(self):\n        self",
    "    def __repr__(self):\n        return",
    "        except KeyError:\n            raise",
]


def export(checkpoint: str | Path, out_dir: str | Path = DEFAULT_MODEL_DIR, data_dir: str | Path | None = None,
           heldout_tokens: int = 4097, eval_batch_size: int = 16, eval_batches: int | None = None,
           acceptance_batches: int | None = None,
           extra_card: dict | None = None) -> dict:
    """Write a trained run's checkpoint as the shipped model: bf16 weights + tokenizer (save_model), a held-out
    token sample with its loss (`heldout.bin` / `heldout.json`), and the model card README.md.

    Every figure on the card is measured here on the exported (bf16) weights, loaded back in fp32."""
    import json
    import time

    import numpy as np
    import torch

    from .checkpoint.loader import load_model
    from .checkpoint.saver import save_model
    from .summary import count_parameters
    from .tokenizer import Tokenizer
    from .train.data import TokenDataset
    from .train.evaluate import greedy_generate, heldout_loss, mtp_acceptance, read_tokens
    from .train.train import evaluate, load_trainer_state

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    main_ckpt = checkpoint
    run_cfg = json.loads((checkpoint.parent / "train_config.json").read_text())
    extra_card = dict(extra_card or {})
    if run_cfg.get("only_mtp"):
        # An --only-mtp run on top of a pre-training run: the card describes the pre-training run, plus this phase.
        mstate = load_trainer_state(checkpoint / "trainer_state.pt")
        main_ckpt = Path(run_cfg["init"])
        run_cfg = json.loads((main_ckpt.parent / "train_config.json").read_text())
        acc_file = checkpoint.parent / "mtp_acceptance.json"
        line = (f"MTP-only phase (`--only-mtp`, main model frozen): {mstate['step']} steps, "
                f"{mstate['tokens_seen']:,} tokens, {mstate['elapsed_s'] / 60:.0f} minutes")
        if acc_file.exists():
            acc = json.loads(acc_file.read_text())
            if acc.get("before") and acc.get("after"):
                fmt = lambda a: ", ".join(f"{x:.3f}" for x in a["mtp_acc"]) + f"; length {a['accept_length']:.2f}"
                line += f". Acceptance by depth before: {fmt(acc['before'])}; after: {fmt(acc['after'])}"
        extra_card.setdefault("mtp_only", line + ".")
    state = load_trainer_state(main_ckpt / "trainer_state.pt")
    data_dir = Path(data_dir or run_cfg["data"])
    meta = json.loads((data_dir / "meta.json").read_text())
    model = load_model(checkpoint, torch.float32, "cpu")
    save_model(model, out_dir, torch.bfloat16, tokenizer_dir=str(checkpoint))
    shipped = load_model(out_dir, torch.float32, "cpu").eval()
    cfg, tcfg = shipped.config, run_cfg["train"]
    n_mtp = cfg.num_nextn_predict_layers
    seq_len = tcfg["seq_len"]

    val = TokenDataset(data_dir, "val", seq_len, n_mtp)
    held = np.asarray(val.tokens[:heldout_tokens], dtype=meta["dtype"])
    held.tofile(out_dir / "heldout.bin")
    hloss = heldout_loss(shipped, read_tokens(out_dir / "heldout.bin", meta["dtype"]), seq_len)
    heldout = {"file": "heldout.bin", "dtype": meta["dtype"], "tokens": int(len(held)), "seq_len": seq_len,
               "loss": round(hloss, 5), "note": "first tokens of the validation split; loss = mean next-token CE "
               "of the shipped weights loaded in fp32 (mimoflash.train.evaluate.heldout_loss)"}
    (out_dir / "heldout.json").write_text(json.dumps(heldout, indent=2) + "\n")

    t0 = time.time()
    full_val = evaluate(shipped, val, eval_batch_size, eval_batches, n_mtp)
    acc = mtp_acceptance(shipped, val, eval_batch_size, acceptance_batches)
    tok = Tokenizer.from_dir(out_dir)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = greedy_generate(shipped, tok.encode(prompt), 48, stop_ids={val.separator_id})
        samples.append((prompt, tok.decode(ids[len(tok.encode(prompt)):])))
    counts = count_parameters(cfg)
    info = {"state": state, "run": run_cfg, "meta": meta, "heldout": heldout, "val": full_val, "acceptance": acc,
            "samples": samples, "counts": counts, "config": cfg, "eval_s": time.time() - t0, **extra_card}
    from .train.train import plot_losses
    metrics_file = main_ckpt.parent / "metrics.jsonl"
    if metrics_file.exists():
        plot_losses(metrics_file, out_dir / "loss.png")
        info["loss_png"] = True
    (out_dir / "README.md").write_text(_model_card(info))
    metrics = {k: v for k, v in info.items() if k in ("heldout", "val", "acceptance")}
    metrics["tokens_seen"] = state["tokens_seen"]
    metrics["steps"] = state["step"]
    metrics["train_time_s"] = state["elapsed_s"]
    metrics.update(extra_card)
    (out_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _model_card(i: dict) -> str:
    cfg, st, tr, meta, c = i["config"], i["state"], i["run"]["train"], i["meta"], i["counts"]
    acc = i["acceptance"]
    pattern = "".join("G" if not cfg.is_sliding(l) else "S" for l in range(cfg.num_hidden_layers))
    ffn = "".join("M" if cfg.is_moe(l) else "D" for l in range(cfg.num_hidden_layers))
    hours = st["elapsed_s"] / 3600
    lines = [
        "# mimoflash default model: a tiny MiMo-V2-Flash-architecture Python completion model",
        "",
        "A small model with MiMo-V2-Flash's architecture (hybrid sliding-window/global attention with attention "
        "sinks, sigmoid-routed MoE with aux-loss-free balancing, multi-token-prediction heads), trained from scratch "
        "on the Python standard library's source. It exists so that the engine, server and speculative decoding "
        "can be exercised end to end with real (if modest) weights; it completes Python code, nothing more.",
        "",
        "Load it with `mimoflash.checkpoint.loader.load_model(mimoflash.default.default_model())`, or with "
        "transformers' `AutoModelForCausalLM.from_pretrained` (`model_type` `mimo_v2_flash`; transformers ignores the "
        "MTP heads). Rebuild it with `scripts/train_default_model.sh` (docs/TRAINING.md).",
        "",
        "## Architecture",
        "",
        "| | |\n|---|---|",
        f"| parameters | {c['total'] / 1e6:.2f}M main model + {c['mtp_total'] / 1e6:.2f}M in {cfg.num_nextn_predict_layers} "
        f"MTP heads = {(c['total'] + c['mtp_total']) / 1e6:.2f}M total; {c['active'] / 1e6:.2f}M active per token "
        f"(main model, embeddings included) |",
        f"| layers | {cfg.num_hidden_layers}; attention `{pattern}` (G = global, S = sliding window "
        f"{cfg.sliding_window_size}, {cfg.swa_keys} keys, with learned sinks); FFN `{ffn}` (D = dense SwiGLU "
        f"{cfg.intermediate_size}, M = MoE) |",
        f"| hidden size | {cfg.hidden_size}; vocab {cfg.vocab_size} (byte-level BPE trained on the corpus) |",
        f"| attention | {cfg.num_attention_heads} query heads; {cfg.num_key_value_heads} KV head (global) / "
        f"{cfg.swa_num_key_value_heads} (sliding); Q/K head dim {cfg.head_dim} (partial RoPE on "
        f"{cfg.rotary_dim(False)} dims, theta {cfg.rope_theta:g} global / {cfg.swa_rope_theta:g} sliding), "
        f"V head dim {cfg.v_head_dim}, value scale {cfg.attention_value_scale} |",
        f"| MoE | {cfg.n_routed_experts} routed experts (width {cfg.moe_intermediate_size}), top-"
        f"{cfg.num_experts_per_tok}, sigmoid scores, normalised top-k weights, no shared expert |",
        f"| MTP | {cfg.num_nextn_predict_layers} heads (SWA attention + dense FFN, shared embedding and LM head); "
        f"head k predicts the token k+2 ahead |",
        f"| context | trained on {tr['seq_len']}-token windows |",
        "| weights | bfloat16 (router in fp32), official MiMo-V2-Flash checkpoint layout |",
        "",
        "## Training data",
        "",
        f"The `*.py` files of the CPython {meta.get('python_version', '3.11')} standard library "
        f"(`{meta.get('source', '')}`), "
        f"{meta['train']['docs'] + meta['val']['docs']} files, licensed under the Python Software Foundation "
        "License (PSF-2.0). Each file is one document, followed by `<|endoftext|>`. "
        f"Training split: {meta['train']['docs']} files, {meta['train']['tokens']:,} tokens; validation split: "
        f"{meta['val']['docs']} whole files held out at random (seed {meta.get('seed', 0)}), "
        f"{meta['val']['tokens']:,} tokens. The corpus itself is not redistributed here; `heldout.bin` holds the "
        f"first {i['heldout']['tokens']:,} validation tokens (PSF-licensed code).",
        "",
        "## Training",
        "",
        f"- {st['tokens_seen']:,} tokens seen ({st['tokens_seen'] / meta['train']['tokens']:.2f} epochs), "
        f"{st['step']} optimizer steps of {tr['batch_size'] * tr['grad_accum']} x {tr['seq_len']} tokens.",
        f"- {hours:.2f} hours of training on {i.get('hardware', '2 shared CPU cores (AMD EPYC, AVX2), fp32')}"
        f"{'; ' + i['throughput_note'] if i.get('throughput_note') else ''}.",
        f"- AdamW (beta {tr['beta1']}, {tr['beta2']}), weight decay {tr['weight_decay']} on matrices, peak LR "
        f"{tr['lr']:g} with {tr['warmup_steps']} warmup steps and cosine decay to {tr['min_lr_ratio']:g}x over "
        f"{tr['max_steps']} steps, gradient clipping {tr['grad_clip']}, init std {tr['init_std']}.",
        f"- Loss: next-token CE + {tr['mtp_weights']} x MTP CE per depth; aux-loss-free expert balancing with "
        f"bias rate {tr['balance_rate']:g}; sequence-level balance loss coefficient {tr['seq_aux_coef']:g}.",
    ]
    if i.get("history"):
        lines.append(f"- {i['history']}")
    if i.get("loss_png"):
        lines += ["", "![training and validation loss](loss.png)"]
    v = i["val"]
    lines += [
        "",
        "## Evaluation (the shipped bf16 weights, computed in fp32)",
        "",
        f"- Validation loss ({v['val_tokens']:,} targets of the validation split, {tr['seq_len']}-token windows): "
        f"**{v['val_loss']:.3f}** nats/token (perplexity {math.exp(v['val_loss']):.1f}); MTP heads: "
        + ", ".join(f"depth {d} {x:.3f}" for d, x in enumerate(v["val_mtp_loss"])) + ".",
        f"- Held-out sample `heldout.bin` ({i['heldout']['tokens']:,} tokens, {i['heldout']['seq_len']}-token "
        f"windows): loss **{i['heldout']['loss']:.3f}** (tests/test_train.py recomputes it).",
        f"- Greedy next-token accuracy of the main model: {acc['main_acc']:.3f}.",
        "- MTP draft acceptance on the validation split (greedy, against the data tokens, teacher-forced; see "
        "`mimoflash/train/evaluate.py`): "
        + ", ".join(f"depth {d} (token {d + 2} ahead) {a:.3f}" for d, a in enumerate(acc["mtp_acc"]))
        + f"; chained acceptance length {acc['accept_length']:.2f} tokens per verify step (bonus token included, "
        f"max {1 + len(acc['mtp_acc'])}).",
    ]
    if i.get("mtp_only"):
        lines.append(f"- {i['mtp_only']}")
    lines += ["", "## Greedy samples", ""]
    for prompt, out in i["samples"]:
        lines += ["```python", prompt + out, "```", ""]
    lines += [
        "## Limitations",
        "",
        "Tiny and under-trained by design (a few million tokens on a CPU): it produces plausible-looking Python "
        "with the standard library's idioms and naming, but not correct programs. No instruction tuning, no chat.",
        "",
    ]
    return "\n".join(lines)





if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(description="export a training run's checkpoint as mimoflash/default_model/")
    p.add_argument("checkpoint", help="run checkpoint dir (OUT/checkpoint)")
    p.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--data", help="prepared data dir (default: the run's)")
    p.add_argument("--hardware", help="hardware line for the card")
    p.add_argument("--history", help="extra training-history line for the card")
    p.add_argument("--throughput-note", help="throughput line for the card")
    p.add_argument("--mtp-only", help="line about the MTP-only phase for the card")
    p.add_argument("--acceptance-batches", type=int)
    a = p.parse_args()
    extra = {k: v for k, v in {"hardware": a.hardware, "history": a.history, "throughput_note": a.throughput_note,
                               "mtp_only": a.mtp_only}.items() if v}
    print(json.dumps(export(a.checkpoint, a.out, a.data, acceptance_batches=a.acceptance_batches,
                            extra_card=extra), indent=2))
