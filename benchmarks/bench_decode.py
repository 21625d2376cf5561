"""Decode benchmark: mimoflash's engine vs transformers `generate()` on a random MiMo-shaped ~125M model, CPU.

    python benchmarks/bench_decode.py                      # full run (a few minutes)
    python benchmarks/bench_decode.py --repeats 1 --no-hf  # quick look
    python benchmarks/bench_decode.py --threads 2 --repeats 9 --variants default   # the headline figures only

What is measured, side by side in one process, interleaved (so that machine noise hits every candidate alike),
`--repeats` times, medians reported:
  * single-request decode tokens/s: 96 new tokens after a 32-token prompt, greedy. Decode rate = (new - 1) / (time
    of the last token - time of the first), so prefill is excluded for both engines (for transformers the prefill
    time is measured with max_new_tokens=1 and subtracted);
  * the memory-bandwidth bound: bytes a decode step must read (the weights it touches: attention, dense MLP, the
    2 chosen experts per MoE layer, router, norms, lm_head; plus the K/V it attends to at the mean context) divided
    by the copy bandwidth measured in the same run (STREAM "copy": read + write bytes per second). The fraction
    is bound time / measured time per token;
  * 16 concurrent requests: aggregate decode tokens/s (16 x 95 tokens over the span in which all 16 decode), and its
    ratio to one request, both as the ratio of the medians and as the median of the per-repeat ratios (each
    variant's single request and batch run back to back, their order and the variants' order flipping every
    repeat);
  * KV-cache bytes per token at 32k context vs an all-global-attention model of the same shape.
Six mimoflash settings run on the same bf16-valued checkpoint (transformers gets it upcast to fp32, its fastest
CPU setting): "default" = what LLM() does with a bf16 checkpoint on CPU (bf16 weights through mimoflash/kernels,
the dense linears on their packed panels, fp32 activations and KV cache), "hugepages" = the same on 2 MB
transparent huge pages (huge_pages=True, engine/hugepages.py), "bf16kv" = the default with the KV cache stored in
bf16 (kv_cache_dtype="bfloat16": half the K/V bytes, keys and values rounded once), "rowmajor" = the default
without the panels (weight_panels=False: the row-major kernel, no second copy), "fp32" = weights upcast to fp32,
"bf16" = everything in bf16 (dtype="bfloat16").
The last stdout line is one JSON object. Seeded: the same model and prompts every run.
Threads: `--threads` (default 1); OMP_WAIT_POLICY defaults to PASSIVE (set before torch is imported). On a shared
machine an OpenMP barrier waiting for a descheduled thread can slow tiny ops by 100x; one thread measures the code,
not the neighbours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Before torch loads OpenMP: idle threads sleep instead of spinning, so a busy neighbour cannot stall a barrier.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from mimoflash.config import MiMoConfig
from mimoflash.engine.kv_cache import plan_cache
from mimoflash.engine.llm import LLM
from mimoflash.engine.sampling import SamplingParams
from mimoflash.model.mimo import MiMoForCausalLM


def bench_config() -> MiMoConfig:
    # hidden 512, 8 layers (2 GA + 6 SWA, MiMo's pattern formula), 16 experts top-2, vocab 32k, window 128,
    # MiMo's head-dim ratio (Q/K 96, V 64) and GQA (8 q heads; 2 kv heads GA, 4 SWA).
    return MiMoConfig(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=96, v_head_dim=64, swa_num_attention_heads=8,
                      swa_num_key_value_heads=4, swa_head_dim=96, swa_v_head_dim=64, intermediate_size=2048,
                      moe_intermediate_size=480, n_routed_experts=16, num_experts_per_tok=2, sliding_window_size=128,
                      max_position_embeddings=4096, num_nextn_predict_layers=0, torch_dtype="float32")


def build_model(cfg: MiMoConfig, seed: int = 0) -> MiMoForCausalLM:
    g = torch.Generator().manual_seed(seed)
    model = MiMoForCausalLM(cfg)
    model.init_weights(std=0.02, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():          # untied routing, non-trivial sinks
            if name.endswith("mlp.gate.weight") or name.endswith("attention_sink_bias"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif not name.endswith("mlp.gate.weight"):     # a bf16 checkpoint, as released (router in fp32)
                p.copy_(p.bfloat16().float())
    return model.eval()


# The engines compared, all on the same bf16-valued checkpoint (see the module docstring).
VARIANTS = {
    # what LLM() does with a bf16 checkpoint on CPU: bf16 weights, fp32 compute and KV
    "default": lambda cfg, kw: LLM(build_model(cfg).cast(torch.bfloat16), **kw),
    "hugepages": lambda cfg, kw: LLM(build_model(cfg).cast(torch.bfloat16), huge_pages=True, **kw),
    "bf16kv": lambda cfg, kw: LLM(build_model(cfg).cast(torch.bfloat16), kv_cache_dtype="bfloat16", **kw),
    "rowmajor": lambda cfg, kw: LLM(build_model(cfg).cast(torch.bfloat16), weight_panels=False, **kw),
    "fp32": lambda cfg, kw: LLM(build_model(cfg), **kw),                                   # weights upcast to fp32
    "bf16": lambda cfg, kw: LLM(build_model(cfg).cast(torch.bfloat16), dtype="bfloat16", **kw),   # all-bf16
}


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 7) -> float:
    a = torch.rand(nbytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        ts.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(ts)             # STREAM copy: bytes read + bytes written


def decode_bytes_per_token(model: MiMoForCausalLM, context: int, ring_slots: int, kv_elt: int) -> int:
    """Bytes one single-sequence decode step reads: touched weights + attended K/V."""
    cfg = model.config
    total = 0
    for name, p in model.named_parameters():
        nb = p.numel() * p.element_size()
        if name == "model.embed_tokens.weight":
            total += p.shape[1] * p.element_size()                        # one row
        elif ".mlp.experts." in name:
            total += nb * cfg.num_experts_per_tok // cfg.n_routed_experts  # 2 of 16 experts
        else:
            total += nb
    elt = kv_elt
    for i in range(cfg.num_hidden_layers):
        _, h, d, dv = cfg.attn_shape(cfg.is_sliding(i))
        keys = min(context, ring_slots) if cfg.is_sliding(i) else context
        total += keys * h * (d + dv) * elt
    return total


def run_ours(llm: LLM, prompts, new: int) -> tuple[float, float]:
    """-> (aggregate decode tokens/s, mean TTFT s)."""
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    eng = llm.engine
    reqs = []
    for p in prompts:
        eng.add_request(p, sp)
        reqs.append(eng.scheduler.waiting[-1])
    while eng.has_unfinished_requests():
        eng.step()
    first = max(r.first_token_time for r in reqs)
    last = max(r.finish_time for r in reqs)
    ttft = statistics.mean(r.first_token_time - r.arrival_time for r in reqs)
    return len(reqs) * (new - 1) / (last - first), ttft


def run_hf(hf, prompt, new: int) -> float:
    ids = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        tn = time.perf_counter() - t
    assert out.shape[1] == len(prompt) + new
    return (new - 1) / (tn - t1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated mimoflash settings to run (default: all of {', '.join(VARIANTS)})")
    a = ap.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad or not a.variants:
        ap.error(f"--variants: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = bench_config()
    base = build_model(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(a.concurrency)]

    hf = None
    if not a.no_hf:
        from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM
        from mimoflash.checkpoint.keys import to_transformers_state_dict
        hcfg = MiMoV2FlashConfig(**cfg.to_dict())
        hcfg._attn_implementation = "eager"
        hf = MiMoV2FlashForCausalLM(hcfg).eval()
        hf.load_state_dict(to_transformers_state_dict(base.state_dict()), strict=False)
    kw = dict(max_num_seqs=a.concurrency, max_num_batched_tokens=max(512, a.concurrency * a.prompt_len))
    llms = {name: VARIANTS[name](cfg, kw) for name in a.variants}
    if "default" in llms:
        assert llms["default"].weight_dtype == torch.bfloat16, "the CPU kernels did not build: see mimoflash/kernels"

    res: dict[str, list[float]] = {}
    bw = []
    for rep in range(a.repeats):
        bw.append(copy_bandwidth())
        if hf is not None:
            res.setdefault("hf_single", []).append(run_hf(hf, prompts[0], a.new_tokens))
        # Each variant's single request and batch run back to back (the order flipping every repeat, as does the
        # order of the variants), so that the per-repeat ratio compares the two in the same phase of the machine.
        names = list(llms) if rep % 2 == 0 else list(llms)[::-1]
        for name in names:
            llm = llms[name]
            for kind in (("single", "batch") if rep % 2 == 0 else ("batch", "single")):
                if kind == "single":
                    rate, ttft = run_ours(llm, prompts[:1], a.new_tokens)
                    res.setdefault(f"{name}_single", []).append(rate)
                    res.setdefault(f"{name}_ttft", []).append(ttft)
                else:
                    res.setdefault(f"{name}_batch", []).append(run_ours(llm, prompts, a.new_tokens)[0])
        print(f"repeat {rep + 1}/{a.repeats}: " + ", ".join(f"{k}={v[-1]:.1f}" for k, v in res.items()),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in res.items()}
    bandwidth = statistics.median(bw)

    rows = []
    out = {"params_M": round(n_params / 1e6, 1), "threads": a.threads, "copy_GBps": round(bandwidth / 1e9, 2),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    mean_ctx = a.prompt_len + a.new_tokens // 2
    for name, llm in llms.items():
        lay = llm.engine.layout
        bpt = decode_bytes_per_token(llm.model, mean_ctx, lay.ring_slots,
                                     torch.empty(0, dtype=lay.dtype).element_size())
        bound = bandwidth / bpt                                 # tokens/s if only memory traffic counted
        single = med[f"{name}_single"]
        rows.append((f"mimoflash {name}", single, med[f"{name}_batch"], bpt / 1e6, single / bound,
                     med[f"{name}_ttft"] * 1e3))
        out[name] = {"single_tok_s": round(single, 2), "batch16_tok_s": round(med[f"{name}_batch"], 2),
                     "batch_over_single": round(med[f"{name}_batch"] / single, 2),
                     # the same ratio per repeat (single and batch run back to back), median: less exposed to
                     # the machine drifting between repeats than the ratio of the two medians
                     "batch_over_single_paired": round(statistics.median(
                         b / s for b, s in zip(res[f"{name}_batch"], res[f"{name}_single"])), 2),
                     "bytes_per_token_MB": round(bpt / 1e6, 2), "bandwidth_bound_tok_s": round(bound, 1),
                     "fraction_of_bound": round(single / bound, 3), "ttft_ms": round(med[f"{name}_ttft"] * 1e3, 1)}
        if hf is not None:
            out[name]["speedup_vs_hf"] = round(single / med["hf_single"], 2)
            out[name]["bound_over_hf"] = round(bound / med["hf_single"], 2)   # the most any engine could reach
    if hf is not None:
        rows.append(("transformers fp32 eager", med["hf_single"], float("nan"), float("nan"), float("nan"),
                     float("nan")))
        out["hf_single_tok_s"] = round(med["hf_single"], 2)
    out["fastest_single"] = max(llms, key=lambda n: out[n]["single_tok_s"])

    bs = next(iter(llms.values())).engine.layout.block_size
    lay = plan_cache(cfg, 1 << 40, max_num_seqs=1, block_size=bs, dtype=torch.float32)   # the default's fp32 cache
    ctx = 32768
    ours_kv = lay.bytes_per_sequence(ctx) / ctx
    all_ga = plan_cache(cfg.replace(hybrid_layer_pattern=[0] * cfg.num_hidden_layers), 1 << 40, max_num_seqs=1,
                        block_size=lay.block_size, dtype=lay.dtype)
    ga_kv = all_ga.bytes_per_sequence(ctx) / ctx
    b16 = plan_cache(cfg, 1 << 40, max_num_seqs=1, block_size=lay.block_size, dtype=torch.bfloat16)
    b16_kv = b16.bytes_per_sequence(ctx) / ctx                       # LLM(kv_cache_dtype="bfloat16")
    out["kv_bytes_per_token_32k"] = {"hybrid": round(ours_kv, 1), "all_global": round(ga_kv, 1),
                                     "ratio": round(ga_kv / ours_kv, 2), "hybrid_bf16_kv": round(b16_kv, 1)}
    dm = next(iter(llms.values())).model              # what weight_panels costs: the packed copies' bytes
    panels_mb = sum(p.wp.numel() * p.wp.element_size() for m in dm.modules()
                    for p in (getattr(m, "_panels", None), getattr(m, "_qkv_panels", None)) if p is not None) / 1e6
    weights_mb = sum(p.numel() * p.element_size() for p in dm.parameters()) / 1e6
    out["weight_panels_MB"] = {"panels": round(panels_mb, 1), "weights": round(weights_mb, 1)}

    print(f"\nrandom MiMo-shaped model: {n_params / 1e6:.1f}M params, {a.threads} thread(s), copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s, {a.repeats} repeats (medians), prompt {a.prompt_len}, new {a.new_tokens}")
    print(f"{'engine':<26}{'1-req tok/s':>12}{f'{a.concurrency}-req tok/s':>14}{'MB/token':>10}{'of bound':>10}"
          f"{'TTFT ms':>9}")
    for r in rows:
        print(f"{r[0]:<26}{r[1]:>12.1f}{r[2]:>14.1f}{r[3]:>10.1f}{r[4]:>10.0%}{r[5]:>9.1f}")
    print(f"{a.concurrency} requests over one, per repeat (median): "
          + ", ".join(f"{n} {out[n]['batch_over_single_paired']}x" for n in llms))
    print(f"KV bytes/token at 32k context: hybrid {ours_kv:.0f} vs all-global {ga_kv:.0f} "
          f"({ga_kv / ours_kv:.1f}x smaller); {b16_kv:.0f} with kv_cache_dtype=\"bfloat16\"")
    print(f"weight panels ({next(iter(llms))} engine): {panels_mb:.1f} MB packed next to {weights_mb:.1f} MB of weights "
          f"(+{100 * panels_mb / weights_mb:.0f}%)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
