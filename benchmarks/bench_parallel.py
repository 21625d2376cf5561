"""Tensor/expert parallelism on the CPU: per-rank memory, decode tokens/s at 1 and 2 ranks, communication per step.

    python benchmarks/bench_parallel.py                     # ~3-5 minutes on 2 busy cores
    python benchmarks/bench_parallel.py --repeats 1 --max-tokens 16      # quick look

The model is random (seeded), built here, large enough that weights dominate the memory and the decode time
(default: hidden 1024, 4 layers, 32 experts top-4 of width 512, vocabulary 32k: ~0.23 GB of bf16 weights), kept
in bf16 with fp32 compute (the CPU default for a bf16 checkpoint). Three variants: one process (its fused decode
step, one C call per layer), 2 ranks with the fused step per rank (each layer in two C calls with an all_reduce
after each, parallel/fused.py) and 2 ranks on the module path (`ParallelGroup.use_fused(False)`). All live in this
process (rank 0 of the 2-rank group is this process; rank 1 a spawned worker) and are run interleaved, the order
rotating every repeat; medians are reported:
  * decode tokens/s at batch 1 and batch `--batch` (greedy, `--max-tokens` new tokens, prefill excluded: (tokens
    - 1) / (finish - first token), summed over the batch);
  * resident weight bytes and KV cache bytes per rank (distinct tensor storages, panels included), for the same
    KV capacity (blocks, rings) in both;
  * seconds spent in collectives per decode step (all_reduce after each attention and MLP block, one for the
    vocabulary-parallel embedding, one all_gather for the LM head) on rank 0, per 2-rank variant, over its measured
    runs (prefill steps included, counted as steps): this includes waiting for the other rank to arrive; and,
    apart, the median time of one all_reduce of a decode step's activations with both ranks ready (a barrier
    before each), the transfer cost alone.
Each rank uses `--threads` threads (default 1), so 2 ranks use twice the cores of 1 rank: on a machine where other
work shares the cores the figures are noisy; compare ratios from one run. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--max-tokens", type=int, default=32)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--hidden", type=int, default=1024)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--experts", type=int, default=32)
ap.add_argument("--vocab", type=int, default=32000)
ap.add_argument("--seed", type=int, default=0)

if __name__ == "__main__":
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)          # inherited by the spawned rank

import torch  # noqa: E402

from mimoflash import LLM, SamplingParams  # noqa: E402
from mimoflash.config import MiMoConfig  # noqa: E402
from mimoflash.model.mimo import MiMoForCausalLM  # noqa: E402
from mimoflash.parallel.load import resident_bytes  # noqa: E402


def build(a) -> MiMoForCausalLM:
    cfg = MiMoConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=128, v_head_dim=128, swa_num_attention_heads=8,
                     swa_num_key_value_heads=4, intermediate_size=4 * a.hidden, moe_intermediate_size=a.hidden // 2,
                     n_routed_experts=a.experts, num_experts_per_tok=4, sliding_window_size=128,
                     max_position_embeddings=4096, num_nextn_predict_layers=0, torch_dtype="bfloat16")
    g = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        m = MiMoForCausalLM(cfg)
        m.init_weights(std=0.02, generator=g)
        for n, p in m.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
    return m.cast(torch.bfloat16).eval()


def decode_rate(llm, prompts, max_tokens) -> float:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    rates = [o.metrics.decode_tokens_per_s for o in outs]
    return sum(r for r in rates if r)


def main() -> int:
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = build(a)
    kv = 64 << 20
    common = dict(kv_cache_memory=kv, progress=False, max_num_seqs=max(a.batch, 1))
    single = LLM(model, **common)
    tp = LLM(model, tensor_parallel_size=2, **common)
    group = tp._parallel
    try:
        assert single.engine.runner.fused is not None and group.use_fused(tp, True), "fused step not available"
        g = torch.Generator().manual_seed(a.seed + 1)
        prompts = [{"prompt_token_ids": torch.randint(0, a.vocab, (24,), generator=g).tolist()}
                   for _ in range(a.batch)]
        variants = ("1", "2 fused", "2 module")
        decode_rate(single, prompts[:1], 4)                    # warm-up
        for fused in (True, False):
            group.use_fused(tp, fused)
            decode_rate(tp, prompts[:1], 4)
        res = {(v, b): [] for v in variants for b in (1, a.batch)}
        comm = {v: [0.0, 0] for v in variants[1:]}              # seconds, collective calls on rank 0
        for rep in range(a.repeats):
            for b in (1, a.batch):
                k = rep % len(variants)
                for v in variants[k:] + variants[:k]:
                    if v == "1":
                        res[(v, b)].append(decode_rate(single, prompts[:b], a.max_tokens))
                        continue
                    group.use_fused(tp, v == "2 fused")
                    group.reset_comm()
                    res[(v, b)].append(decode_rate(tp, prompts[:b], a.max_tokens))
                    s0 = group.stats(tp)[0]
                    comm[v][0] += s0["comm_seconds"]
                    comm[v][1] += s0["comm_calls"]
        stats = group.stats(tp)
        probe = {b: group.probe(b * a.hidden) for b in (1, a.batch)}      # one all_reduce, ranks in step
        L = model.config.num_hidden_layers
        per_step = {v: sec / max(1, calls / (2 * L + 2)) for v, (sec, calls) in comm.items()}
        w1, kv1 = resident_bytes(single.model), single.engine.cache.layout.total_bytes
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"model: hidden {a.hidden}, {L} layers, {a.experts} experts, vocab {a.vocab}, bf16 weights, fp32 "
              f"compute; threads per rank {a.threads}; repeats {a.repeats}, {a.max_tokens} new tokens")
        print(f"{'variant':>14} | {'weights/rank MB':>15} | {'KV/rank MB':>10} | {'tok/s b=1':>9} | "
              f"{'tok/s b=' + str(a.batch):>10} | {'comm ms/step':>12}")
        print(f"{'1 rank, fused':>14} | {w1 / 1e6:15.1f} | {kv1 / 1e6:10.1f} | {med[('1', 1)]:9.1f} | "
              f"{med[('1', a.batch)]:10.1f} | {'':>12}")
        for v in variants[1:]:
            w = "/".join(f"{s['weights_bytes'] / 1e6:.1f}" for s in stats)
            kvs = "/".join(f"{s['kv_cache_bytes'] / 1e6:.1f}" for s in stats)
            print(f"{'2 ranks, ' + v.split()[1]:>14} | {w:>15} | {kvs:>10} | {med[(v, 1)]:9.1f} | "
                  f"{med[(v, a.batch)]:10.1f} | {per_step[v] * 1e3:12.2f}")
        print(f"(weights and KV: rank 0 / rank 1; comm: seconds rank 0 spends inside the {2 * L + 2} collectives of a "
              "step, waiting for the other rank included)")
        print("one all_reduce with both ranks ready (median): " +
              ", ".join(f"{b} x {a.hidden} fp32 {probe[b] * 1e6:.0f} us" for b in probe) +
              f" -> {(2 * L + 2) * probe[1] * 1e3:.2f} ms per batch-1 step")
        out = {"bench": "parallel", "threads_per_rank": a.threads, "hidden": a.hidden, "layers": L,
               "experts": a.experts, "vocab": a.vocab, "max_tokens": a.max_tokens, "batch": a.batch,
               "repeats": a.repeats,
               "weights_bytes": {"1": w1, "2": [s["weights_bytes"] for s in stats]},
               "kv_cache_bytes": {"1": kv1, "2": [s["kv_cache_bytes"] for s in stats]},
               "decode_tok_s": {f"{v.replace(' ', '_')}_b{b}": round(r, 2) for (v, b), r in med.items()},
               "comm_ms_per_step": {v.replace(" ", "_"): round(t * 1e3, 3) for v, t in per_step.items()},
               "all_reduce_us": {f"b{b}": round(v * 1e6, 1) for b, v in probe.items()}}
        print(json.dumps(out))
    finally:
        tp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
