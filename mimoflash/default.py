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
           acceptance_batches: int | None = None, greedy_prompts: int = 16, greedy_tokens: int = 128,
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
    from .train.evaluate import (greedy_acceptance, greedy_generate, heldout_acceptance, heldout_loss,
                                 mtp_acceptance, read_tokens)
    from .train.train import evaluate, load_trainer_state

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    main_ckpt = checkpoint
    run_cfg = json.loads((checkpoint.parent / "train_config.json").read_text())
    extra_card = dict(extra_card or {})
    pretraining, mtp_phases = None, []
    data_dir = data_dir or run_cfg["data"]
    run_dir = checkpoint.parent
    while run_cfg.get("only_mtp"):
        # An --only-mtp run on top of another run: the card describes the pre-training run, plus each phase. The
        # chain of inits ends at a pre-training checkpoint or at an exported model, whose training_metrics.json
        # carries the pre-training record forward (read before `out_dir`, possibly that directory, is rewritten).
        init = Path(run_cfg["init"])
        mtp_phases.insert(0, _mtp_phase_line(run_dir, json.loads((init / "config.json").read_text())))
        if (init / "trainer_state.pt").exists():
            main_ckpt, run_dir = init, init.parent
            run_cfg = json.loads((run_dir / "train_config.json").read_text())
        else:
            pretraining = json.loads((init / "training_metrics.json").read_text())["pretraining"]
            mtp_phases = list(pretraining.get("mtp_phases", [])) + mtp_phases
            main_ckpt = None     # no pre-training run directory: keep the exported loss.png
            break
    if pretraining is None:
        state = load_trainer_state(main_ckpt / "trainer_state.pt")
        pretraining = {"steps": state["step"], "tokens_seen": state["tokens_seen"],
                       "train_time_s": state["elapsed_s"], "train_config": run_cfg["train"]}
    for key in ("hardware", "history", "throughput_note"):
        if key in pretraining and key not in extra_card:
            extra_card[key] = pretraining[key]
    pretraining.update({k: extra_card[k] for k in ("hardware", "history", "throughput_note") if k in extra_card})
    pretraining["mtp_phases"] = mtp_phases
    state = {"step": pretraining["steps"], "tokens_seen": pretraining["tokens_seen"],
             "elapsed_s": pretraining["train_time_s"]}
    data_dir = Path(data_dir)
    run_cfg = {"train": pretraining["train_config"]}
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
    held_tokens = read_tokens(out_dir / "heldout.bin", meta["dtype"])
    hloss = heldout_loss(shipped, held_tokens, seq_len)
    heldout = {"file": "heldout.bin", "dtype": meta["dtype"], "tokens": int(len(held)), "seq_len": seq_len,
               "loss": round(hloss, 5), "note": "first tokens of the validation split; loss = mean next-token CE "
               "of the shipped weights loaded in fp32 (mimoflash.train.evaluate.heldout_loss)"}
    if n_mtp:
        heldout["mtp_acceptance"] = heldout_acceptance(shipped, held_tokens, seq_len, val.separator_id)
        heldout["separator_id"] = val.separator_id
    (out_dir / "heldout.json").write_text(json.dumps(heldout, indent=2) + "\n")

    t0 = time.time()
    full_val = evaluate(shipped, val, eval_batch_size, eval_batches, n_mtp)
    acc = mtp_acceptance(shipped, val, eval_batch_size, acceptance_batches)
    greedy_acc = greedy_acceptance(shipped, val, n_prompts=greedy_prompts, prompt_len=64,
                                   new_tokens=greedy_tokens) if n_mtp else None
    tok = Tokenizer.from_dir(out_dir)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = greedy_generate(shipped, tok.encode(prompt), 48, stop_ids={val.separator_id})
        samples.append((prompt, tok.decode(ids[len(tok.encode(prompt)):])))
    counts = count_parameters(cfg)
    info = {"state": state, "run": run_cfg, "meta": meta, "heldout": heldout, "val": full_val, "acceptance": acc,
            "acceptance_greedy": greedy_acc, "samples": samples, "counts": counts, "config": cfg,
            "eval_s": time.time() - t0, "mtp_phases": mtp_phases, **extra_card}
    from .train.train import plot_losses
    metrics_file = main_ckpt.parent / "metrics.jsonl" if main_ckpt is not None else None
    if metrics_file is not None and metrics_file.exists():
        plot_losses(metrics_file, out_dir / "loss.png")
        info["loss_png"] = True
    (out_dir / "README.md").write_text(_model_card(info))
    metrics = {k: v for k, v in info.items() if k in ("heldout", "val", "acceptance", "acceptance_greedy")}
    metrics["pretraining"] = pretraining
    (out_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _mtp_phase_line(run_dir: Path, init_config: dict) -> str:
    """One model-card line for an `--only-mtp` run in `run_dir` (its metrics.jsonl, train_config.json and
    mtp_acceptance.json) on top of a model with `init_config`."""
    import json

    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    last = [r for r in recs if "step" in r][-1]
    run = json.loads((run_dir / "train_config.json").read_text())
    tr = run["train"]
    heads, old = run["model"]["num_nextn_predict_layers"], init_config.get("num_nextn_predict_layers", 0)
    how = ("self-distillation: loss = KL from the main model's distribution at position i+k+1 to head k's at "
           "position i, so the heads learn what the main model will say" if tr.get("distill")
           else "cross-entropy to the data tokens")
    grown = ""
    if heads > old:
        init = run.get("new_mtp_init") or "copy"
        grown = (f"; grown from {old} to {heads} heads, the new one" + (" a copy of the last trained head"
                 if init == "copy" else " randomly initialised"))
    line = (f"MTP-only phase (`--only-mtp{' --distill' if tr.get('distill') else ''}`, main model frozen, {how}"
            f"{grown}): {last['step']} steps of {tr['batch_size'] * tr['grad_accum']} x {tr['seq_len']} tokens "
            f"({last['tokens']:,} tokens), LR {tr['lr']:g} with {tr['warmup_steps']} warmup step{'s' * (tr['warmup_steps'] != 1)} and cosine decay "
            f"to {tr['min_lr_ratio']:g}x, {last['elapsed_s'] / 60:.0f} minutes")
    acc_file = run_dir / "mtp_acceptance.json"
    if acc_file.exists():
        acc = json.loads(acc_file.read_text())
        b, a = acc.get("before"), acc.get("after")
        if b and a:
            fmt = lambda x, key, length: ", ".join(f"{v:.3f}" for v in x[key]) + f" (length {x[length]:.2f})"
            line += (f". Acceptance by depth on {a['positions']:,} validation positions against the data, before: "
                     f"{fmt(b, 'mtp_acc', 'accept_length')}; "
                     f"after: {fmt(a, 'mtp_acc', 'accept_length')}")
            if "mtp_acc_model" in a and "mtp_acc_model" in b:
                line += (f"; against the main model's greedy token, before: "
                         f"{fmt(b, 'mtp_acc_model', 'accept_length_model')}; after: "
                         f"{fmt(a, 'mtp_acc_model', 'accept_length_model')}")
    return line + "."


def _model_card(i: dict) -> str:
    cfg, st, tr, meta, c = i["config"], i["state"], i["run"]["train"], i["meta"], i["counts"]
    acc = i["acceptance"]
    pattern = "".join("G" if not cfg.is_sliding(l) else "S" for l in range(cfg.num_hidden_layers))
    ffn = "".join("M" if cfg.is_moe(l) else "D" for l in range(cfg.num_hidden_layers))
    hours = st["elapsed_s"] / 3600
    corpus_tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    lines = [
        "# mimoflash default model: a tiny MiMo-V2-Flash-architecture Python completion model",
        "",
        "A small model with MiMo-V2-Flash's architecture (hybrid sliding-window/global attention with attention "
        "sinks, sigmoid-routed MoE with aux-loss-free balancing, multi-token-prediction heads), trained from scratch "
        "on the Python standard library's source. It exists so that the inference engine and its tests run end to "
        "end on real (if modest) weights, and its MTP heads are trained to draft tokens for speculative decoding; "
        "it completes Python code, nothing more.",
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
        f"The `*.py` files of the CPython {i.get('corpus_python', '3.11')} standard library (every module and "
        "package directory of the stdlib except `site-packages`, i.e. no third-party code), "
        f"{meta['train']['docs'] + meta['val']['docs']} files after skipping "
        f"{sum(meta.get('skipped_files', {}).values())} empty or non-UTF-8 ones, {corpus_tokens:,} tokens with "
        "this model's tokenizer, licensed under the Python Software Foundation License (PSF-2.0). Each file is one "
        "document, followed by `<|endoftext|>`. "
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
    for phase in i.get("mtp_phases", []):
        lines.append(f"- {phase}")
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
        f"windows): loss **{i['heldout']['loss']:.3f}**"
        + (f"; MTP acceptance by depth against the data "
           + ", ".join(f"{a:.3f}" for a in i["heldout"]["mtp_acceptance"]["mtp_acc"])
           + ", against the main model's greedy token "
           + ", ".join(f"{a:.3f}" for a in i["heldout"]["mtp_acceptance"]["mtp_acc_model"])
           if "mtp_acceptance" in i["heldout"] else "")
        + " (tests/test_train.py recomputes these).",
        f"- Greedy next-token accuracy of the main model: {acc['main_acc']:.3f}.",
        "- MTP draft acceptance on the validation split (greedy, teacher-forced, "
        f"{acc['positions']:,} positions; see `mimoflash/train/evaluate.py`), by depth (head k drafts the token "
        "k+2 ahead):",
        "",
        "  | reference | " + " | ".join(f"depth {d}" for d in range(len(acc["mtp_acc"])))
        + " | chained length (max " + f"{1 + len(acc['mtp_acc'])}) |",
        "  |---|" + "---|" * (len(acc["mtp_acc"]) + 1),
        "  | the data token | " + " | ".join(f"{a:.3f}" for a in acc["mtp_acc"]) + f" | {acc['accept_length']:.2f} |",
        "  | the main model's greedy token | " + " | ".join(f"{a:.3f}" for a in acc["mtp_acc_model"])
        + f" | {acc['accept_length_model']:.2f} |",
    ]
    g = i.get("acceptance_greedy")
    if g:
        lines += [
            "",
            f"- On the model's own greedy output ({g['prompts']} prompts of {g['prompt_len']} validation tokens, "
            f"{g['new_tokens']} greedy tokens each; this is what greedy speculative decoding accepts): acceptance "
            "by depth " + ", ".join(f"{a:.3f}" for a in g["mtp_acc"]) + "; tokens per verify step with "
            + ", ".join(f"{k + 1} draft{'s' if k else ''} {t:.2f}" for k, t in enumerate(g["tokens_per_step"]))
            + ". The greedy output of a model this small repeats itself, which makes it easier to draft than the "
            "data.",
        ]
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
    import platform

    p = argparse.ArgumentParser(description="export a training run's checkpoint as mimoflash/default_model/")
    p.add_argument("checkpoint", help="run checkpoint dir (OUT/checkpoint)")
    p.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--data", help="prepared data dir (default: the run's)")
    p.add_argument("--hardware", help="hardware line for the card")
    p.add_argument("--history", help="extra training-history line for the card")
    p.add_argument("--throughput-note", help="throughput line for the card")
    p.add_argument("--acceptance-batches", type=int)
    p.add_argument("--corpus-python", default=platform.python_version(),
                   help="CPython version whose stdlib is the corpus (default: this interpreter's)")
    a = p.parse_args()
    extra = {k: v for k, v in {"hardware": a.hardware, "history": a.history, "throughput_note": a.throughput_note,
                               "corpus_python": a.corpus_python}.items() if v}
    print(json.dumps(export(a.checkpoint, a.out, a.data, acceptance_batches=a.acceptance_batches,
                            extra_card=extra), indent=2))
