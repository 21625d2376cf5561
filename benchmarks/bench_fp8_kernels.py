"""Block-FP8 weight products (mimoflash/kernels/fp8.c) vs the bf16-weight kernel and torch, on MiMo-V2-Flash's
real decode shapes, CPU.

    python benchmarks/bench_fp8_kernels.py                  # about a minute on 2 cores
    python benchmarks/bench_fp8_kernels.py --repeats 9 --rows 1 16

For each weight shape (q_proj 12288 x 4096, the dense FFN's gate 16384 x 4096 and down 4096 x 16384, an expert's
gate 2048 x 4096 and down 4096 x 2048; block-FP8 128 x 128, seeded values) and each row count, side by side and
interleaved (the variants' order rotates every repeat), medians of `--repeats`:
  * fp8: `kernels.fp8.linear_fp8` on the E4M3 bytes and scales (the FP8 runtime's path; bytes = 1 per weight + the
    scale grid);
  * bf16: `kernels.linear_bf16w` on the weights rounded to bf16 (what a bf16-dequantising loader runs; 2 per weight);
  * reference: `linear_fp8_reference`, the exact dequantisation to fp32 then F.linear (dequantising every call).
Then one MoE layer: `kernels.fp8.experts_fp8` on 8 routed experts of 2048 x 4096 for one token (the decode case),
with its bytes. And the read bandwidth of this machine measured between the runs (a reduction over 1 GiB of fp32,
median), so the GB/s columns can be read as a fraction of it. The last stdout line is one JSON object.
Not run in CI; on a shared machine the absolute numbers move with the load: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mimoflash import kernels
from mimoflash.checkpoint.fp8 import quantize_fp8_block
from mimoflash.kernels import fp8 as kfp8

SHAPES = {"q_proj": (12288, 4096), "dense gate": (16384, 4096), "dense down": (4096, 16384),
          "expert gate": (2048, 4096), "expert down": (4096, 2048)}
BLOCK = (128, 128)


def timed(fn, inner: int) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner


def bandwidth(buf: torch.Tensor) -> float:
    t = time.perf_counter()
    buf.sum()
    return buf.numel() * 4 / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args(argv)
    if not kernels.available():
        raise SystemExit("the CPU kernels are not built (no C compiler?)")
    torch.set_num_threads(a.threads)
    kernels.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(1 << 28, generator=g)                           # 1 GiB fp32
    bws = []
    rows_out, results = [], {}
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, generator=g) * 0.02
        q, s = quantize_fp8_block(w, BLOCK)
        wb = w.bfloat16()
        del w
        fp8_bytes, bf16_bytes = q.numel() + s.numel() * 4, wb.numel() * 2
        for M in a.rows:
            x = torch.randn(M, K, generator=g)
            variants = {"fp8": (lambda: kfp8.linear_fp8(x, q, s, BLOCK), fp8_bytes),
                        "bf16": (lambda: kernels.linear_bf16w(x, wb), bf16_bytes),
                        "reference": (lambda: kfp8.linear_fp8_reference(x, q, s, BLOCK), fp8_bytes)}
            times = {k: [] for k in variants}
            order = list(variants)
            for r in range(a.repeats):
                for k in order[r % 3:] + order[:r % 3]:
                    fn, _ = variants[k]
                    fn()
                    times[k].append(timed(fn, 1 if k == "reference" else 5))
                bws.append(bandwidth(buf))
            med = {k: statistics.median(v) for k, v in times.items()}
            results[f"{name} M={M}"] = {k: {"ms": med[k] * 1e3, "GBps": variants[k][1] / med[k] / 1e9} for k in med}
            rows_out.append((name, N, K, M, med, {k: variants[k][1] for k in variants}))
    # one MoE layer's routed experts for one token: 8 of them, 2048 x 4096
    Fd, D, n = 2048, 4096, 8
    ex = []
    for _ in range(n):
        for shape in ((Fd, D), (Fd, D), (D, Fd)):
            ex.extend(quantize_fp8_block(torch.randn(*shape, generator=g) * 0.02, BLOCK))
    ptrs = torch.tensor([[t.data_ptr() for t in ex[6 * i:6 * i + 6]] for i in range(n)], dtype=torch.int64)
    ex_bytes = sum(t.numel() * t.element_size() for t in ex)
    x = torch.randn(n, D, generator=g)
    ts = []
    for _ in range(a.repeats):
        ts.append(timed(lambda: kfp8.experts_fp8(x, [1] * n, ptrs, D, Fd, BLOCK), 3))
        bws.append(bandwidth(buf))
    moe_s = statistics.median(ts)
    bw = statistics.median(bws)

    print(f"threads {a.threads}, read bandwidth {bw / 1e9:.1f} GB/s (median of {len(bws)}), medians of {a.repeats}")
    print(f"{'shape':12s} {'N x K':>12s} {'M':>3s} | {'fp8 ms':>8s} {'GB/s':>6s} | {'bf16 ms':>8s} {'GB/s':>6s} | "
          f"{'ref ms':>8s} | fp8 vs bf16")
    for name, N, K, M, med, nbytes in rows_out:
        print(f"{name:12s} {f'{N}x{K}':>12s} {M:3d} | {med['fp8'] * 1e3:8.2f} {nbytes['fp8'] / med['fp8'] / 1e9:6.1f} | "
              f"{med['bf16'] * 1e3:8.2f} {nbytes['bf16'] / med['bf16'] / 1e9:6.1f} | {med['reference'] * 1e3:8.1f} | "
              f"{med['bf16'] / med['fp8']:.2f}x")
    print(f"experts_fp8, 8 experts of {Fd}x{D}, one token: {moe_s * 1e3:.2f} ms, {ex_bytes / moe_s / 1e9:.1f} GB/s "
          f"({ex_bytes / moe_s / bw:.0%} of the read bandwidth)")
    print(json.dumps({"threads": a.threads, "read_bandwidth_GBps": bw / 1e9, "products": results,
                      "experts_fp8": {"ms": moe_s * 1e3, "GBps": ex_bytes / moe_s / 1e9,
                                      "fraction_of_bandwidth": ex_bytes / moe_s / bw}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
