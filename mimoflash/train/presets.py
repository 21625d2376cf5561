"""Named training presets: a model shape (MiMoConfig keys) plus the optimisation recipe.

`mimoflash train --config NAME` takes one of these; `--config FILE.json` takes the same two-part structure from a
file (`{"model": {...MiMoConfig keys...}, "train": {...TrainConfig fields...}}`). Command-line flags override
`train` fields afterwards.

* `tiny`: the docs/MODEL.md §7.1 shape (8 experts top-2, window 4, hybrid pattern), 2 MTP heads, vocab 512. Tests use it;
  one step takes a few milliseconds.
* `default-small`: the shipped code-completion model (`mimoflash/default_model/`). 13.5M parameters in the main
  model + 0.7M per MTP head, 6.9M active per token, six layers in MiMo's layout (GA + dense FFN first, four SWA
  layers with sinks, one GA layer), hidden 192, 8 routed experts top-2, window 128, trained on 256-token windows.
  Pre-training uses 2 MTP heads; the shipped model gets its third, a copy of the second, in a self-distillation
  phase afterwards (`--only-mtp --distill --mtp-heads 3`, train/distill.py), much as MiMo-V2-Flash copied its one
  pre-trained MTP head to three in post-training (docs/MODEL.md §3.1). Sized for two (shared) CPU cores and about
  two hours of pre-training (scripts/train_default_model.sh): 4,096 tokens per step; the MTP losses use a quarter of each batch (`mtp_fraction`), because the three
  8192-way LM-head passes would otherwise be half of the compute; balance rate 1e-2 because a run of a few
  hundred steps cannot wait for DeepSeek-V3's 1e-3 to move the biases.
"""

from __future__ import annotations

import copy

PRESETS: dict[str, dict] = {
    "tiny": {
        "model": dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=24, v_head_dim=16, swa_num_attention_heads=4,
                      swa_num_key_value_heads=2, swa_head_dim=24, swa_v_head_dim=16, intermediate_size=128,
                      moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, sliding_window_size=4,
                      hybrid_layer_pattern=[0, 1, 1, 0], moe_layer_freq=[0, 1, 1, 1], max_position_embeddings=512,
                      num_nextn_predict_layers=2, torch_dtype="float32"),
        "train": dict(seq_len=32, batch_size=8, grad_accum=1, lr=3e-3, warmup_steps=5, max_steps=50,
                      eval_every=0, eval_batches=2, ckpt_every_steps=0, ckpt_every_min=0.0, init_std=0.02),
    },
    "default-small": {
        "model": dict(vocab_size=8192, hidden_size=192, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=96, v_head_dim=64, swa_num_attention_heads=4,
                      swa_num_key_value_heads=2, swa_head_dim=96, swa_v_head_dim=64, intermediate_size=768,
                      moe_intermediate_size=384, n_routed_experts=8, num_experts_per_tok=2,
                      sliding_window_size=128, hybrid_layer_pattern=[0, 1, 1, 1, 1, 0],
                      moe_layer_freq=[0, 1, 1, 1, 1, 1], max_position_embeddings=4096, num_nextn_predict_layers=2,
                      bos_token_id=None, eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16"),
        "train": dict(seq_len=256, batch_size=16, grad_accum=1, lr=2e-3, warmup_steps=50, max_steps=1100,
                      balance_rate=1e-2, mtp_fraction=0.25, eval_every=50, eval_batches=8, ckpt_every_steps=0,
                      ckpt_every_min=5.0, init_std=0.02),
    },
}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
