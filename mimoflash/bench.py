"""`mimoflash bench`: what this machine can do with a model, against its roofline, in tokens/s and in money.

Measure (default): the roofline of the machine it runs on, then the engine on a checkpoint (default: the shipped
model), then a table and one JSON line.

    mimoflash bench                                   # the shipped model, 3 repeats, medians
    mimoflash bench /tmp/mimo-synth --price-per-hour 0.50 --threads 2
    mimoflash bench --quick                           # seconds: small sizes, one repeat

* Roofline: memory read bandwidth (an fp32 sum over a buffer far larger than the caches: bytes read per second),
  copy bandwidth (STREAM "copy": bytes read + written per second) and fp32 matmul FLOP/s (torch.mm, 2n^3 per product).
* Engine (`LLM`, greedy, random token prompts, EOS ignored): prefill tokens/s for 1 and 16 prompts
  (prompt tokens / wall time of a 1-token generation), decode tokens/s for 1 and 16 sequences (tokens after each
  sequence's first / the span from the first first-token to the last finish).
* Fraction of the bandwidth bound = (bytes a decode step reads / read bandwidth) / measured time per step. The bytes
  come from the engine's model as loaded, at the dtype it holds them in (FP8 bytes for weights kept in FP8): every
  main-model weight except the embedding table (one row per token) and the MTP blocks (plain decoding does not run
  them), the routed experts of each MoE layer, and the K/V attended at the mean context. At 16 sequences a step
  reads the experts any of them picked. For an FP8 checkpoint the engine's expert store counts them per step
  (measured); otherwise the count is E * (1 - (1 - k/E)^B) per layer, the expectation under uniform routing.
* Cost per million tokens = price per machine-hour / (3600 * tokens/s) * 1e6, input at the prefill rate and output
  at the decode rate, beside MiMo-V2-Flash's API launch price (0.7 / 2.1 CNY per million input / output tokens).

Plan (`--plan CONFIG`): no weights, no measurement. Memory and decode tokens/s of a config (the full 48-layer
release: tests/fixtures/mimo_v2_flash_config.json) on a described machine:

    mimoflash bench --plan config.json --ram 384GiB --bandwidth 200GB/s --cores 32 --context 32768 --batch 1

Weights are counted tensor by tensor from the checkpoint layout the saver would write (FP8 with its scales, or
bf16). Panels are the engine's packed second copy of bf16 linears (docs/ENGINE.md): with bf16 weights every dense
linear, with FP8 weights only the bf16 ones (o_proj, lm_head, MTP eh_proj), made when engine/fp8_layout.py's
`panels_fit` allows (at most `PANEL_SHARE` of the weights, or at most `PANEL_SMALL` bytes). KV is `summary.kv_report`. The
decode prediction is the smaller of the bandwidth bound and the compute bound, with the formula printed:
    tokens/s = B * bandwidth / (W_dense + L_moe * U(B) * W_expert + B * KV(context)),  U(B) = E (1 - (1 - k/E)^B)
    compute  = cores * core_gflops / (2 * active params + attention FLOPs per token)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

CNY_PER_MTOK = {"input": 0.7, "output": 2.1}     # MiMo-V2-Flash API launch price, CNY per million tokens
CNY_PER_USD = 7.1                                  # for the "about" figure printed beside it


# ---------------------------------------------------------------------------------------------- roofline
def _median_time(fn, reps: int, pick=statistics.median, clock=time.perf_counter) -> float:
    """`pick` (the median, or min for the fastest pass) of `reps` timed calls of fn after one untimed call."""
    fn()                                            # warm: page faults, thread pool start
    ts = []
    for _ in range(reps):
        t = clock()
        fn()
        ts.append(clock() - t)
    return pick(ts)


def read_bandwidth(nbytes: int, reps: int = 5, fastest: bool = False, clock=time.perf_counter) -> float:
    """Bytes read per second over a buffer of `nbytes`, median of `reps` passes after one untimed pass: the kernels'
    `read_sum` (the engine's own thread pool, vector loads, integer adds: limited by the loads, as a weight-streaming
    decode kernel is), or torch's fp32 sum where the C kernels are not built. `fastest`: the fastest pass instead,
    what the level of the memory hierarchy that holds `nbytes` can give rather than what it gave on average."""
    import torch
    from . import kernels
    pick = min if fastest else statistics.median
    if kernels.available():
        a = torch.ones(nbytes, dtype=torch.uint8)
        return nbytes / _median_time(lambda: kernels.read_sum(a), reps, pick, clock)
    a = torch.ones(nbytes // 4)
    return nbytes / _median_time(lambda: a.sum(), reps, pick, clock)


def copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """STREAM copy: (bytes read + bytes written) per second."""
    import torch
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    return 2 * nbytes / _median_time(lambda: b.copy_(a), reps)


def matmul_flops(n: int, reps: int = 5) -> float:
    """fp32 FLOP/s of an n x n x n torch.mm (2 n^3 FLOPs)."""
    import torch
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    return 2 * n ** 3 / _median_time(lambda: torch.mm(a, b), reps)


# ---------------------------------------------------------------------------------------------- model bytes
def distinct_experts(E: int, k: int, batch: int) -> float:
    """Expected distinct experts picked by `batch` tokens choosing k of E uniformly: E (1 - (1 - k/E)^B)."""
    return E * (1 - (1 - k / E) ** batch)


def weight_bytes(model) -> dict:
    """Bytes of the loaded model's tensors by role, at the dtype held (parameters and buffers, shared storage once):
    `dense` = read by every decode step (attention, dense MLPs, router, norms, lm_head), `experts` = all routed
    experts, `embedding` = the table (a step reads one row per token), `mtp` = the MTP blocks, `row` = one embedding
    row. Experts an FP8 model reads from its files (a module with an expert `store`, engine/fp8_layout.py) count
    at the size of their stored tensors."""
    out = {"dense": 0, "experts": 0, "embedding": 0, "mtp": 0, "row": 0}
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta" or t.numel() == 0 or (t.data_ptr(), t.numel()) in seen:
            continue
        seen.add((t.data_ptr(), t.numel()))
        nb = t.numel() * t.element_size()
        if ".mtp." in name:
            out["mtp"] += nb
        elif "embed_tokens" in name:
            out["embedding"] += nb
            out["row"] = t.shape[-1] * t.element_size()
        elif ".mlp.experts." in name:
            out["experts"] += nb
        elif "inv_freq" not in name and "rope" not in name.lower():
            out["dense"] += nb
    for name, m in model.named_modules():
        store = getattr(m, "store", None)
        if store is not None and hasattr(store, "expert_bytes"):
            out["mtp" if ".mtp." in name else "experts"] += sum(store.expert_bytes(m.layer, e)
                                                               for e in range(m.num_experts))
    return out


def kv_bytes_per_sequence(cfg, context: int, elem_bytes: int) -> int:
    """K/V bytes one decode step of one sequence attends to (sliding layers: the window)."""
    from .summary import kv_report
    return kv_report(cfg, context, 1, elem_bytes)["kv_bytes"]


def step_bytes(cfg, wb: dict, batch: int, context: int, kv_elem: int, experts_per_layer: float | None = None
               ) -> float:
    """Bytes one decode step of `batch` sequences reads (module docstring). `experts_per_layer`: the distinct
    experts a step reads per MoE layer when measured; default the uniform-routing expectation."""
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    per_expert = wb["experts"] / max(1, moe_layers * E)
    U = distinct_experts(E, k, batch) if experts_per_layer is None else experts_per_layer
    return wb["dense"] + batch * wb["row"] + moe_layers * U * per_expert + batch * kv_bytes_per_sequence(
        cfg, context, kv_elem)


# ---------------------------------------------------------------------------------------------- engine runs
def _prompts(vocab: int, n: int, length: int, seed: int) -> list[dict]:
    import torch
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (length,), generator=g).tolist()} for _ in range(n)]


def prefill_rate(llm, vocab: int, batch: int, length: int, seed: int) -> float:
    """Prompt tokens per second: `batch` prompts of `length` tokens, one generated token each."""
    from .engine.sampling import SamplingParams
    prompts = _prompts(vocab, batch, length, seed)
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    return batch * length / (time.perf_counter() - t)


def decode_rate(llm, vocab: int, batch: int, length: int, new: int, seed: int) -> tuple[float, float | None]:
    """-> (generated tokens per second once decoding: sum(new - 1) / (last finish - first first-token),
    distinct experts read per MoE layer per decode step, from the expert store's per-step counters, or None for
    a model without a store). The engine is stepped here so that each step's counters can be read after it; a
    decode step is one taken when every unfinished sequence already has its first token (whichever path ran it:
    the fused step keeps the store's counters as the per-module path does)."""
    from .engine.sampling import SamplingParams
    store = getattr(llm, "expert_store", None)
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    reqs = []
    for p in _prompts(vocab, batch, length, seed):
        eng.add_request(p["prompt_token_ids"], sp)
        reqs.append(eng.scheduler.waiting[-1])
    log = []
    while eng.has_unfinished_requests():
        decoding = all(r.first_token_time is not None for r in reqs if r.finish_time is None)
        eng.step()
        if decoding and store is not None:
            log.append(store.stats().step_touched)
    span = max(r.finish_time for r in reqs) - min(r.first_token_time for r in reqs)
    cfg = llm.model.config
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    touched = statistics.mean(log) / moe_layers if log and moe_layers else None
    return len(reqs) * (new - 1) / span, touched


def measure(args) -> dict:
    import torch
    from . import kernels
    from .engine.llm import LLM

    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    roof_bytes = args.roofline_mb << 20
    roof = {"read_bandwidth": read_bandwidth(roof_bytes, args.repeats + 2),
            "copy_bandwidth": copy_bandwidth(roof_bytes, args.repeats + 2),
            "matmul_flops": matmul_flops(args.matmul_n, args.repeats + 2)}
    t0 = time.perf_counter()
    llm = LLM(args.model, max_num_seqs=max(args.batch), max_model_len=args.prompt + args.new + 16,
              skip_tokenizer_init=True, progress=False,
              **({"memory_budget": args.memory_budget} if args.memory_budget else {}))
    load_s = time.perf_counter() - t0
    cfg = llm.model.config
    vocab = cfg.vocab_size
    decode_rate(llm, vocab, 1, 4, 2, seed=99)                       # warm-up: kernels, caches, first pages
    runs = {(kind, b): [] for kind in ("prefill", "decode", "experts") for b in args.batch}
    for r in range(args.repeats):
        order = args.batch if r % 2 == 0 else args.batch[::-1]      # interleaved, order flipping per repeat
        for b in order:
            runs["prefill", b].append(prefill_rate(llm, vocab, b, args.prompt, seed=r))
            rate, touched = decode_rate(llm, vocab, b, args.prompt, args.new, seed=1000 + r)
            runs["decode", b].append(rate)
            if touched is not None:
                runs["experts", b].append(touched)
    wb = weight_bytes(llm.model)
    kv_dtype = llm.engine.config.kv_cache_dtype or llm.dtype
    kv_elem = torch.empty((), dtype=kv_dtype).element_size()
    context = args.prompt + args.new // 2
    rows = {}
    for b in args.batch:
        pre, dec = statistics.median(runs["prefill", b]), statistics.median(runs["decode", b])
        touched = statistics.median(runs["experts", b]) if runs["experts", b] else None
        sb = step_bytes(cfg, wb, b, context, kv_elem, touched)
        bound = b * roof["read_bandwidth"] / sb                     # tokens/s if a step only streamed its bytes
        rows[b] = {"prefill_tok_s": pre, "decode_tok_s": dec, "bytes_per_step": sb, "bytes_per_token": sb / b,
                   "experts_per_layer_step": touched, "experts_measured": touched is not None,
                   "bandwidth_bound_tok_s": bound, "fraction_of_bound": dec / bound,
                   "usd_per_mtok_input": args.price_per_hour / 3600 / pre * 1e6,
                   "usd_per_mtok_output": args.price_per_hour / 3600 / dec * 1e6}
    stats = llm.expert_stats() if hasattr(llm, "expert_stats") else None
    return {"model": str(args.model), "threads": args.threads, "load_s": load_s, "roofline": roof,
            "expert_stats": stats.as_dict() if stats is not None else None,
            "weights": {"dtype": str(llm.weight_dtype).removeprefix("torch."), **wb},
            "kv_elem_bytes": kv_elem, "prompt": args.prompt, "new_tokens": args.new, "repeats": args.repeats,
            "price_per_hour_usd": args.price_per_hour, "launch_price_cny_per_mtok": CNY_PER_MTOK, "batches": rows}


def print_measure(res: dict) -> None:
    roof, w = res["roofline"], res["weights"]
    print(f"machine: {os.cpu_count()} CPUs, {res['threads']} threads; read {roof['read_bandwidth'] / 1e9:.1f} GB/s, "
          f"copy {roof['copy_bandwidth'] / 1e9:.1f} GB/s, fp32 matmul {roof['matmul_flops'] / 1e9:.1f} GFLOP/s")
    print(f"model: {res['model']} (loaded in {res['load_s']:.1f} s; matmul weights {w['dtype']}; per step: "
          f"{w['dense'] / 1e6:.1f} MB dense + routed experts of {w['experts'] / 1e6:.1f} MB + KV)")
    print(f"prompt {res['prompt']} tokens, {res['new_tokens']} new, greedy; medians of {res['repeats']}; "
          f"price ${res['price_per_hour_usd']:.2f}/machine-hour")
    hdr = (f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'MB/token':>9} {'bound tok/s':>12} "
           f"{'of bound':>9} {'$/M in':>9} {'$/M out':>9}")
    print(hdr)
    for b, r in res["batches"].items():
        print(f"{b:>5} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} {r['bytes_per_token'] / 1e6:>9.2f} "
              f"{r['bandwidth_bound_tok_s']:>12.1f} {r['fraction_of_bound']:>8.0%} "
              f"{r['usd_per_mtok_input']:>9.4f} {r['usd_per_mtok_output']:>9.4f}")
    if any(r["fraction_of_bound"] > 1 for r in res["batches"].values()):
        print("above 100% of the bound: the bytes of a step stay partly in the CPU caches between steps "
              "(a model this small is not bandwidth-bound)")
    i, o = CNY_PER_MTOK["input"], CNY_PER_MTOK["output"]
    print(f"MiMo-V2-Flash API launch price: CNY {i} / {o} per million input / output tokens "
          f"(about ${i / CNY_PER_USD:.2f} / ${o / CNY_PER_USD:.2f})")


# ---------------------------------------------------------------------------------------------- plan
def plan(cfg, *, ram: int, bandwidth: float, cores: int, fp8: bool, context: int, batch: int,
         core_gflops: float, kv_bytes: int, panels: bool, disk_bandwidth: float | None = None) -> dict:
    """Memory and decode tokens/s of `cfg` on a described machine (module docstring); nothing is allocated."""
    from .checkpoint.saver import nbytes
    from .checkpoint.synthetic import checkpoint_plan
    from .summary import count_parameters, kv_report
    import torch

    params = count_parameters(cfg)
    tensors = checkpoint_plan(cfg, torch.bfloat16, (128, 128) if fp8 else None)
    wb = {"dense": 0, "experts": 0, "embedding": 0, "mtp": 0, "row": 0}
    for _, name, dt, shape in tensors:
        nb = nbytes(dt, shape)
        role = ("mtp" if ".mtp." in name else "embedding" if "embed_tokens" in name
                else "experts" if ".mlp.experts." in name else "dense")
        wb[role] += nb
        if role == "embedding":
            wb["row"] = shape[-1] * dt.itemsize
    weights = wb["dense"] + wb["experts"] + wb["embedding"] + wb["mtp"]
    if not fp8:     # bf16 weights: every dense linear (q|k|v fused, o_proj, dense MLPs, lm_head, MTP) packed again
        panel_bytes = 2 * params["dense_linear"] if panels else 0
    else:           # FP8 weights: only the bf16 linears are packed, and only below the engine's share of the weights
        from .engine.fp8_layout import panels_fit
        panel_bytes = sum(nbytes(dt, shape) for _, name, dt, shape in tensors
                          if dt == torch.bfloat16 and len(shape) == 2 and "embed_tokens" not in name)
        panel_bytes = panel_bytes if panels and panels_fit(panel_bytes, weights) else 0
    kv = kv_report(cfg, context, batch, kv_bytes)
    need = weights + panel_bytes + kv["kv_bytes"]

    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    per_expert = wb["experts"] / max(1, moe_layers * E)
    U = distinct_experts(E, k, batch)
    kv_seq = kv_bytes_per_sequence(cfg, context, kv_bytes)
    step = step_bytes(cfg, wb, batch, context, kv_bytes)          # the measured runs' formula, same terms
    bw_tok_s = batch * bandwidth / step
    # FLOPs per token: 2 per active weight (the embedding lookup is not a product) + QK^T and PV over the keys
    attn = 0
    for i in range(cfg.num_hidden_layers):
        nq, _, d, dv = cfg.attn_shape(cfg.is_sliding(i))
        keys = min(context, cfg.swa_keys) if cfg.is_sliding(i) else context
        attn += 2 * nq * (d + dv) * keys
    flops_tok = 2 * (params["active"] - cfg.vocab_size * cfg.hidden_size) + attn
    peak = cores * core_gflops * 1e9
    compute_tok_s = peak / flops_tok
    out = {"config": {"layers": cfg.num_hidden_layers, "experts": E, "experts_per_tok": k, "moe_layers": moe_layers,
                      "params_total": params["total"], "params_active": params["active"],
                      "params_mtp": params["mtp_total"]},
           "machine": {"ram": ram, "bandwidth": bandwidth, "cores": cores, "core_gflops": core_gflops,
                       "disk_bandwidth": disk_bandwidth},
           "weights_format": "fp8" if fp8 else "bf16", "context": context, "batch": batch, "kv_elem_bytes": kv_bytes,
           "memory": {"weights": weights, "weights_by_role": wb, "panels": panel_bytes, "kv": kv["kv_bytes"],
                      "total": need, "fits": need <= ram},
           "per_step": {"dense": wb["dense"], "experts": moe_layers * U * per_expert, "distinct_experts": U,
                        "expert_bytes": per_expert, "kv": batch * kv_seq, "total": step},
           "flops_per_token": flops_tok, "decode_bandwidth_bound_tok_s": bw_tok_s,
           "compute_bound_tok_s": compute_tok_s, "prefill_compute_bound_tok_s": compute_tok_s}
    predicted = min(bw_tok_s, compute_tok_s)
    if need > ram:
        # experts beyond RAM stay memory-mapped: a step reads the uncached fraction of its experts from storage
        missing = min(wb["experts"], need - ram)
        frac = missing / wb["experts"]
        out["memory"]["experts_not_resident_fraction"] = frac
        if disk_bandwidth and fp8:      # the engine maps the experts of FP8 checkpoints only (fp8_layout.py)
            t_step = (step - frac * moe_layers * U * per_expert) / bandwidth \
                + frac * moe_layers * U * per_expert / disk_bandwidth
            predicted = min(batch / t_step, compute_tok_s)
        else:
            predicted = None
    out["decode_predicted_tok_s"] = predicted
    return out


def print_plan(p: dict) -> None:
    m, s, c, mach = p["memory"], p["per_step"], p["config"], p["machine"]
    gb = 1e9
    print(f"plan: {c['layers']} layers ({c['moe_layers']} MoE, {c['experts']} experts top-{c['experts_per_tok']}), "
          f"{c['params_total'] / 1e9:.1f}B parameters + {c['params_mtp'] / 1e9:.2f}B MTP, "
          f"{c['params_active'] / 1e9:.2f}B active per token; weights {p['weights_format']}")
    print(f"machine: {mach['ram'] / 2**30:.0f} GiB RAM, {mach['bandwidth'] / gb:.0f} GB/s, {mach['cores']} cores x "
          f"{mach['core_gflops']:g} GFLOP/s; context {p['context']} x batch {p['batch']}, KV "
          f"{p['kv_elem_bytes']} bytes/elem")
    print(f"{'memory':<34}{'GB':>10}")
    print(f"{'  weights (files, all resident)':<34}{m['weights'] / gb:>10.1f}")
    print(f"{'    of which routed experts':<34}{m['weights_by_role']['experts'] / gb:>10.1f}")
    print(f"{'  panels (packed bf16 linears)':<34}{m['panels'] / gb:>10.1f}")
    print(f"{'  KV cache':<34}{m['kv'] / gb:>10.1f}")
    print(f"{'  total':<34}{m['total'] / gb:>10.1f}   {'fits' if m['fits'] else 'does NOT fit'} in RAM")
    print(f"decode step bytes = W_dense + L_moe * U(B) * W_expert + B * KV(context)")
    print(f"  = {s['dense'] / gb:.2f} GB + {c['moe_layers']} * {s['distinct_experts']:.2f} * "
          f"{s['expert_bytes'] / 1e6:.1f} MB + {p['batch']} * {s['kv'] / p['batch'] / 1e6:.1f} MB "
          f"= {s['total'] / gb:.2f} GB   (U(B) = E (1 - (1 - k/E)^B))")
    print(f"bandwidth bound: B * bandwidth / step bytes = {p['batch']} * {mach['bandwidth'] / gb:.0f} GB/s / "
          f"{s['total'] / gb:.2f} GB = {p['decode_bandwidth_bound_tok_s']:.1f} tokens/s")
    print(f"compute bound: cores * GFLOP/s / FLOPs per token = {mach['cores']} * {mach['core_gflops']:g}e9 / "
          f"{p['flops_per_token'] / 1e9:.1f}e9 = {p['compute_bound_tok_s']:.1f} tokens/s (also the prefill bound)")
    if p["decode_predicted_tok_s"] is None and p["weights_format"] == "bf16":
        print("predicted decode: none, the model does not fit; the engine reads experts from the files (memory-"
              "mapped, within a budget) only for FP8 checkpoints")
    elif p["decode_predicted_tok_s"] is None:
        print(f"predicted decode: the model does not fit; {m['experts_not_resident_fraction']:.0%} of the experts "
              "would be read from storage per use: give --disk-bandwidth to estimate")
    elif not m["fits"]:
        print(f"predicted decode: {p['decode_predicted_tok_s']:.2f} tokens/s, with "
              f"{m['experts_not_resident_fraction']:.0%} of each step's expert bytes read from storage at "
              f"{mach['disk_bandwidth'] / gb:g} GB/s and the rest from RAM")
    else:
        print(f"predicted decode: {p['decode_predicted_tok_s']:.1f} tokens/s")


# ---------------------------------------------------------------------------------------------- CLI
def _rate(text: str) -> float:
    from .checkpoint.synthetic import parse_size
    return float(parse_size(text.strip().removesuffix("/s").removesuffix("/S")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mimoflash bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="checkpoint directory (default: the shipped model)")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (seconds; a smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="threads (default: torch's, = the CPUs)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 3; medians)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, default=None, help="generated tokens per sequence (default 32)")
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="batch sizes (default 1 16; with --plan: one, default 1)")
    ap.add_argument("--price-per-hour", type=float, default=1.0,
                    help="machine price in USD per hour for the cost per million tokens (default 1.0)")
    ap.add_argument("--memory-budget", default=None,
                    help="FP8 checkpoints: bound on resident bytes, e.g. 8G (experts beyond it are re-read)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    g = ap.add_argument_group("plan (no weights)")
    g.add_argument("--plan", metavar="CONFIG", help="predict memory and decode tokens/s of this config")
    g.add_argument("--ram", default="384GiB", help="RAM of the described machine (default 384GiB)")
    g.add_argument("--bandwidth", default="200GB/s", help="memory bandwidth (default 200GB/s)")
    g.add_argument("--cores", type=int, default=32, help="cores of the described machine (default 32)")
    g.add_argument("--core-gflops", type=float, default=64.0,
                   help="matmul GFLOP/s per core (default 64: 2 AVX2 FMA units x 8 fp32 lanes x 2 x 2 GHz)")
    g.add_argument("--disk-bandwidth", default=None, help="storage read bandwidth, for a model larger than RAM")
    fmt = g.add_mutually_exclusive_group()
    fmt.add_argument("--fp8", dest="fp8", action="store_true", default=True, help="FP8 weights (default)")
    fmt.add_argument("--bf16", dest="fp8", action="store_false", help="bf16 weights")
    g.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    g.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV element (default 2: bf16 KV)")
    g.add_argument("--no-panels", dest="panels", action="store_false", help="no packed copy of the dense linears")
    a = ap.parse_args(argv)

    if a.plan:
        from .config import MiMoConfig
        batch = a.batch[0] if a.batch else 1
        if a.batch and len(a.batch) > 1:
            ap.error("--plan takes one --batch (concurrent sequences)")
        if a.context < 1 or batch < 1 or a.cores < 1 or a.core_gflops <= 0 or a.kv_bytes < 1:
            ap.error("--context, --batch, --cores, --kv-bytes must be >= 1 and --core-gflops > 0")
        p = plan(MiMoConfig.from_file(a.plan), ram=int(_rate(a.ram)), bandwidth=_rate(a.bandwidth),
                 cores=a.cores, fp8=a.fp8, context=a.context, batch=batch, core_gflops=a.core_gflops,
                 kv_bytes=a.kv_bytes, panels=a.panels,
                 disk_bandwidth=_rate(a.disk_bandwidth) if a.disk_bandwidth else None)
        if not a.json:
            print_plan(p)
        print(json.dumps({"bench": "plan", **p}))
        return 0

    quick = a.quick
    a.repeats = a.repeats or (1 if quick else 3)
    a.prompt = a.prompt or (16 if quick else 128)
    a.new = a.new or (8 if quick else 32)
    a.batch = a.batch or ([1, 4] if quick else [1, 16])
    a.roofline_mb = 64 if quick else 1024
    a.matmul_n = 256 if quick else 2048
    if a.threads is None:
        import torch
        a.threads = torch.get_num_threads()
    if min(a.batch) < 1 or a.repeats < 1 or a.prompt < 1 or a.new < 2 or a.threads < 1 or a.price_per_hour <= 0:
        ap.error("--batch, --repeats, --prompt, --threads must be >= 1, --new >= 2, --price-per-hour > 0")
    if a.prompt <= max(a.batch):
        ap.error("--prompt must be longer than the largest --batch (decode steps are told from prefill by size)")
    if a.model is None:
        from .default import default_model
        a.model = default_model()
    elif not Path(a.model).is_dir():
        ap.error(f"{a.model}: not a checkpoint directory")
    res = measure(a)
    if not a.json:
        print_measure(res)
    print(json.dumps({"bench": "measure", **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
