"""Where a decode step's time goes: the default CPU engine on bench_decode.py's model, per decoder-layer kind and
the lm_head, for one request and for 16 concurrent ones.

    python benchmarks/profile_decode_step.py               # about a minute
    python benchmarks/profile_decode_step.py --batches 1 16 --repeats 3

Each decode step runs every decoder layer as one `kernels.decode_layer` call (engine/fused_decode.py); this script
wraps that call and the lm_head's product (`kernels.linear_panels`, or `kernels.linear_bf16w` with
`weight_panels=False`) with wall-clock timers, runs 96 new tokens after a
32-token prompt (greedy), and reports milliseconds per decode step, medians over `--repeats` runs. Inside the
layers, the kernel's own phase timers (`kernels.decode_phase_timing`) split the time into the q|k|v product, RoPE
and the K/V store, attention, the o product, the routed experts and the dense MLPs, summed over the layers. Prefill
is excluded (its steps do not go through these calls, except the lm_head of the last prompt token, one call per
request). Seeded; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import bench_config, build_model, run_ours  # noqa: E402

from mimoflash import kernels  # noqa: E402
from mimoflash.engine.llm import LLM  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--no-weight-panels", dest="weight_panels", action="store_false",
                    help="the dense linears row-major (LLM(weight_panels=False)), for comparison")
    ap.add_argument("--huge-pages", action="store_true",
                    help="weights and KV cache on 2 MB huge pages (LLM(huge_pages=True)), for comparison")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = bench_config()
    llm = LLM(build_model(cfg).cast(torch.bfloat16), max_num_seqs=max(a.batches), max_num_batched_tokens=512,
              weight_panels=a.weight_panels, huge_pages=a.huge_pages)
    if llm.engine.runner.fused is None:
        print("the fused decode path is not in use (CPU kernels unavailable?)", file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (32,), generator=g).tolist() for _ in range(max(a.batches))]

    acc: collections.Counter = collections.Counter()
    names = {}
    for i, layer in enumerate(llm.model.model.layers):
        kind = ("SWA" if layer.is_sliding else "GA") + (" MoE" if hasattr(layer.mlp, "experts") else " dense")
        names[i] = kind
    layer_of = {id(args): i for i, (args, _, _) in enumerate(llm.engine.runner.fused.layers)}
    decode_layer, linear, linear_p = kernels.decode_layer, kernels.linear_bf16w, kernels.linear_panels

    def timed_layer(args, *rest, **kw):
        t = time.perf_counter()
        decode_layer(args, *rest, **kw)
        acc[names[layer_of[id(args)]] + " layers"] += time.perf_counter() - t

    lm_head = llm.model.lm_head.weight.data_ptr()

    def timed_linear(x, w):
        t = time.perf_counter()
        y = linear(x, w)
        if w.data_ptr() == lm_head:                       # prefill's small expert products use this kernel too
            acc["lm_head"] += time.perf_counter() - t
        return y

    lm_panels = getattr(llm.model.lm_head, "_panels", None)
    lm_panels_ptr = lm_panels.wp.data_ptr() if lm_panels is not None else None

    def timed_linear_p(x, wp, n):
        t = time.perf_counter()
        y = linear_p(x, wp, n)
        if wp.data_ptr() == lm_panels_ptr:
            acc["lm_head"] += time.perf_counter() - t
        return y

    kernels.decode_layer, kernels.linear_bf16w, kernels.linear_panels = timed_layer, timed_linear, timed_linear_p
    runner = llm.engine.runner
    execute = runner.execute

    def timed_execute(batch):
        t = time.perf_counter()
        out = execute(batch)
        acc["runner.execute (all steps)"] += time.perf_counter() - t
        return out

    runner.execute = timed_execute
    out = {"threads": a.threads, "new_tokens": a.new_tokens, "ms_per_decode_step": {},
           "layer_phases_ms_per_decode_step": {}, "tok_s": {}}
    try:
        run_ours(llm, prompts[:1], 8)                                        # warm-up
        for B in a.batches:
            per, ph, rates = collections.defaultdict(list), collections.defaultdict(list), []
            for _ in range(a.repeats):
                acc.clear()
                kernels.decode_phase_timing(True)
                try:
                    rate, _ = run_ours(llm, prompts[:B], a.new_tokens)
                finally:
                    phases = kernels.decode_phase_timing(False)
                rates.append(rate)
                for k, v in acc.items():
                    per[k].append(v / (a.new_tokens - 1) * 1e3)
                for k, v in phases.items():
                    ph[k].append(v / (a.new_tokens - 1) * 1e3)
            out["ms_per_decode_step"][B] = {k: round(statistics.median(v), 2) for k, v in sorted(per.items())}
            out["layer_phases_ms_per_decode_step"][B] = {k: round(statistics.median(ph[k]), 2)
                                                         for k in kernels.DECODE_PHASES}
            out["tok_s"][B] = round(statistics.median(rates), 1)
    finally:
        kernels.decode_layer, kernels.linear_bf16w, kernels.linear_panels = decode_layer, linear, linear_p
    print(f"ms per decode step (medians of {a.repeats}, {a.threads} thread(s)); 'runner.execute' includes prefill")
    for B, parts in out["ms_per_decode_step"].items():
        print(f"{B} request(s), {out['tok_s'][B]} tok/s:")
        for k, v in parts.items():
            print(f"  {k:<28}{v:>8.2f}")
        print("  inside the layers (all kinds):")
        for k, v in out["layer_phases_ms_per_decode_step"][B].items():
            print(f"    {k:<26}{v:>8.2f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
