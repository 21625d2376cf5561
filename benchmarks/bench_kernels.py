"""Kernel benchmark: mimoflash's bf16-weight GEMM (mimoflash/kernels/wgemm.c) vs torch on the same products, CPU.

    python benchmarks/bench_kernels.py                # a few seconds per shape
    python benchmarks/bench_kernels.py --threads 1 --repeats 7

For each weight shape of the decode benchmark's model (bench_decode.py) and M = 1, 2, 3, 4, 6, 16 rows, side by
side and interleaved, medians of `--repeats`:
  * kernel: y = x @ w.T, x fp32, w bf16 row-major (wgemm.c; the experts' path, and the dense linears' with
    `weight_panels=False`);
  * panels: the same product on w packed in panels (panels.c; the engine's default for the dense linears);
  * torch fp32: F.linear on an fp32 copy of w (the layout MKL runs fastest for few rows: column-major);
  * torch bf16: F.linear with x and w in bf16 (what torch offers for bf16 weights; activations rounded).
GB/s counts the weight bytes each variant reads (2 per weight for bf16, 4 for fp32).
Then the pieces of a 16-request decode step that are not one product:
  * experts: `kernels.experts_bf16` on one MoE layer of that model (16 experts, F = 480) for 16 tokens' top-2 picks
    (seeded), with the bytes of the experts it touches and that time's GB/s;
  * argmax: greedy sampling over (16, 32000) logits, `kernels.argmax_rows` vs torch's argmax;
  * reference: a large fp32 matmul in torch (MKL, 1024^3), the GFLOP/s this machine reaches at all.
With --pool, instead: the thread pool on a single sequence's small products (the shipped model's shapes, one row),
at 1 and 2 threads interleaved, each call back to back ("warm") and after an idle gap of --gap-us (the engine's
Python between two decode steps, when the workers may have gone to sleep), and one layer's routed experts (two
experts' gate|up then down, `kernels.experts_bf16`: two parallel regions for both experts).
Seeded; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from mimoflash import kernels

SHAPES = {"lm_head": (32000, 512), "qkv (SWA)": (1408, 512), "o_proj": (512, 512), "dense gate": (2048, 512),
          "dense down": (512, 2048), "expert gate|up": (960, 512), "expert down": (512, 480)}


def timeit(f, reps: int) -> float:
    f()
    n = 1
    while True:                                    # calls per sample: about 20 ms of work
        t = time.perf_counter()
        for _ in range(n):
            f()
        dt = time.perf_counter() - t
        if dt > 0.02 or n >= 4096:
            return dt / n
        n *= 4


def step_pieces(g: torch.Generator, repeats: int) -> dict:
    """The experts of one MoE layer for a 16-token batch, greedy argmax over its logits, and a compute reference."""
    E, Fd, D = 16, 480, 512
    gate_up = (torch.randn(E, 2 * Fd, D, generator=g) * 0.02).bfloat16()
    down = (torch.randn(E, D, Fd, generator=g) * 0.02).bfloat16()
    picks = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(16)]).view(-1)   # 16 tokens, top-2
    counts = torch.bincount(picks, minlength=E)
    x_PD = torch.randn(int(counts.sum()), D, generator=g)
    logits = torch.randn(16, 32000, generator=g)
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    cands = {"experts": lambda: kernels.experts_bf16(x_PD, counts, gate_up, down),
             "argmax kernel": lambda: kernels.argmax_rows(logits), "argmax torch": lambda: logits.argmax(dim=-1),
             "matmul": lambda: a @ b}
    ts = {k: [] for k in cands}
    for _ in range(repeats):
        for k, f in cands.items():
            ts[k].append(timeit(f, repeats))
    med = {k: statistics.median(v) for k, v in ts.items()}
    touched = int((counts > 0).sum()) * 3 * Fd * D * 2                # bytes of the experts with a token
    return {"experts": {"counts": counts.tolist(), "us": round(med["experts"] * 1e6, 1),
                        "MB": round(touched / 1e6, 1), "GBps": round(touched / med["experts"] / 1e9, 1)},
            "argmax": {"kernel_us": round(med["argmax kernel"] * 1e6, 1),
                       "torch_us": round(med["argmax torch"] * 1e6, 1)},
            "reference_fp32_GFLOPs": round(2 * 1024 ** 3 / med["matmul"] / 1e9, 1)}


POOL_SHAPES = {"lm_head": (8192, 192), "qkv (SWA)": (704, 192), "o_proj": (192, 256), "expert gate|up": (768, 192),
               "expert down": (192, 384)}


def pool_bench(g: torch.Generator, repeats: int, gap_us: float) -> dict:
    """Single-row products and one layer's two routed experts at 1 and 2 threads, warm and after an idle gap."""
    def gapped(f):                                  # one call after gap_us of spinning in Python (pool idle)
        def run():
            end = time.perf_counter() + gap_us * 1e-6
            while time.perf_counter() < end:
                pass
            t = time.perf_counter()
            f()
            return time.perf_counter() - t
        return run

    cands = {}
    for name, (N, K) in POOL_SHAPES.items():
        w, x = (torch.randn(N, K, generator=g) * 0.02).bfloat16(), torch.randn(1, K, generator=g)
        wp = kernels.pack_panels(w)
        cands[name] = lambda x=x, wp=wp, N=N: kernels.linear_panels(x, wp, N)
    E, Fd, D = 8, 384, 192
    gate_up = (torch.randn(E, 2 * Fd, D, generator=g) * 0.02).bfloat16()
    down = (torch.randn(E, D, Fd, generator=g) * 0.02).bfloat16()
    counts, x_PD = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0]), torch.randn(2, D, generator=g)
    cands["2 experts"] = lambda: kernels.experts_bf16(x_PD, counts, gate_up, down)
    ts: dict = {}
    for rep in range(repeats):
        for t in ((1, 2) if rep % 2 == 0 else (2, 1)):
            kernels.set_num_threads(t)
            for k, f in cands.items():
                ts.setdefault((k, t, "warm"), []).append(timeit(f, repeats))
                run = gapped(f)
                ts.setdefault((k, t, "gap"), []).append(statistics.median(run() for _ in range(50)))
    out = {}
    for k in cands:
        out[k] = {f"{mode}_{t}T_us": round(statistics.median(ts[(k, t, mode)]) * 1e6, 2)
                  for t in (1, 2) for mode in ("warm", "gap")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pool", action="store_true", help="the thread pool on one row's small products (see above)")
    ap.add_argument("--gap-us", type=float, default=400.0, help="--pool: idle time before each 'gap' call")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not kernels.available():
        print("mimoflash kernels unavailable (no C compiler?)", file=sys.stderr)
        return 1
    kernels.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    if a.pool:
        res = pool_bench(g, a.repeats, a.gap_us)
        print(f"one row, panels (experts: row-major), us per call; 'gap': after {a.gap_us:.0f} us idle")
        print(f"{'product':<16}{'1T warm':>9}{'2T warm':>9}{'1T gap':>9}{'2T gap':>9}{'2T/1T warm':>12}")
        for k, r in res.items():
            print(f"{k:<16}{r['warm_1T_us']:>9.1f}{r['warm_2T_us']:>9.1f}{r['gap_1T_us']:>9.1f}{r['gap_2T_us']:>9.1f}"
                  f"{r['warm_1T_us'] / r['warm_2T_us']:>11.2f}x")
        print(json.dumps({"pool": res, "gap_us": a.gap_us}))
        return 0
    rows, out = [], {"threads": a.threads, "simd_level": kernels.simd_level(), "results": []}
    for name, (N, K) in SHAPES.items():
        w16 = (torch.randn(N, K, generator=g) * 0.02).bfloat16()
        w32 = w16.float().t().contiguous().t()                # column-major: MKL's fast GEMV case
        wp = kernels.pack_panels(w16)
        for M in (1, 2, 3, 4, 6, 16):
            x = torch.randn(M, K, generator=g)
            xb = x.bfloat16()
            cands = {"kernel": lambda: kernels.linear_bf16w(x, w16), "panels": lambda: kernels.linear_panels(x, wp, N),
                     "torch fp32": lambda: F.linear(x, w32),
                     "torch bf16": lambda: F.linear(xb, w16)}
            ts = {k: [] for k in cands}
            for _ in range(a.repeats):
                for k, f in cands.items():
                    ts[k].append(timeit(f, a.repeats))
            med = {k: statistics.median(v) for k, v in ts.items()}
            wbytes = {"kernel": 2, "panels": 2, "torch fp32": 4, "torch bf16": 2}
            r = {"shape": name, "N": N, "K": K, "M": M}
            for k, t in med.items():
                r[k] = {"us": round(t * 1e6, 1), "GBps": round(N * K * wbytes[k] / t / 1e9, 1),
                        "GFLOPs": round(2 * M * N * K / t / 1e9, 1)}
            r["kernel_speedup_vs_fp32"] = round(med["torch fp32"] / med["kernel"], 2)
            r["panels_speedup_vs_kernel"] = round(med["kernel"] / med["panels"], 2)
            out["results"].append(r)
            rows.append(r)
    out["step_pieces"] = step_pieces(g, a.repeats)
    print(f"{'shape':<16}{'N x K':>12}{'M':>4}{'kernel us':>11}{'GB/s':>7}{'GFLOP/s':>9}{'panels us':>11}"
          f"{'GFLOP/s':>9}{'p/k':>6}{'fp32 us':>10}{'GB/s':>7}{'bf16 us':>10}{'k/fp32':>8}")
    for r in rows:
        k, p, f32, b16 = r["kernel"], r["panels"], r["torch fp32"], r["torch bf16"]
        print(f"{r['shape']:<16}{r['N']:>6} x {r['K']:<5}{r['M']:>3}{k['us']:>11.1f}{k['GBps']:>7.1f}"
              f"{k['GFLOPs']:>9.1f}{p['us']:>11.1f}{p['GFLOPs']:>9.1f}{r['panels_speedup_vs_kernel']:>5.2f}x"
              f"{f32['us']:>10.1f}{f32['GBps']:>7.1f}{b16['us']:>10.1f}{r['kernel_speedup_vs_fp32']:>7.2f}x")
    sp = out["step_pieces"]
    print(f"experts, 16 tokens top-2 (counts {sp['experts']['counts']}): {sp['experts']['us']} us, "
          f"{sp['experts']['MB']} MB of experts at {sp['experts']['GBps']} GB/s")
    print(f"argmax (16, 32000): kernel {sp['argmax']['kernel_us']} us, torch {sp['argmax']['torch_us']} us")
    print(f"reference: torch fp32 matmul 1024^3 {sp['reference_fp32_GFLOPs']} GFLOP/s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
