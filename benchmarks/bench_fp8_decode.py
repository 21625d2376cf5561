"""FP8 vs bf16 weights, whole decode steps: the same MiMo-shaped model saved as bf16 and as block-FP8, each decoded
by `LLM(path)` with its defaults (FP8 kept FP8 through the fused step; bf16 through the fused step on bf16 weights).

    python benchmarks/bench_fp8_decode.py                       # 1 and 16 sequences, 3 repeats, 1 thread
    python benchmarks/bench_fp8_decode.py --threads 1 2 --repeats 5

Model: benchmarks/bench_decode.py's seeded "mimo128m" (hidden 512, 8 layers, 16 experts top-2, vocab 32k),
written with `save_model` as bf16 and as block-FP8 128 x 128 (`fp8=True`: q/k/v, MLP and expert weights E4M3 with
fp32 tile scales; o_proj, embedding and LM head bf16, as the release ships them) into `--dir` (reused by later
runs). Per thread count, the two checkpoints alternate (order flipping every repeat): a 32-token prompt and
`--new` greedy tokens per sequence, rate = tokens after each sequence's first / the span from the first first
token to the last finish (bench_decode.run_ours). Also reported: the bytes one step reads (weights touched at the
dtype held + attended K/V: mimoflash.bench.step_bytes) and, as a bound, those bytes at the read bandwidth of the
kernels' threaded reader over 16 MiB (profile_step_split.read_bandwidth over LLC_PROBE_BYTES: the last-level
cache's rate, which a step's weights, cached between steps on a model this small, do not beat).
Medians, a table, then ONE JSON line. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import bench_config, build_model, run_ours  # noqa: E402
from profile_step_split import LLC_PROBE_BYTES, read_bandwidth  # noqa: E402

from mimoflash import LLM, bench, kernels  # noqa: E402
from mimoflash.checkpoint.saver import save_model  # noqa: E402

FORMATS = ("bf16", "fp8")


def checkpoints(root: Path) -> dict[str, Path]:
    """The bf16 and FP8 checkpoints of the seeded model under root (written once)."""
    out = {}
    model = None
    for fmt in FORMATS:
        d = root / f"mimo128m-{fmt}"
        if not (d / "config.json").exists():
            model = model or build_model(bench_config())
            save_model(model, d, dtype=torch.bfloat16, fp8=fmt == "fp8")
        out[fmt] = d
    return out


def step_mb(llm, batch: int, context: int) -> float:
    """MB one decode step of `batch` sequences reads (weights at the dtype held, expected distinct experts, K/V)."""
    m = llm.model
    return bench.step_bytes(m.config, bench.weight_bytes(m), batch, context, 4) / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="build/bench_fp8", help="where the two checkpoints are written (reused)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=96)
    a = ap.parse_args(argv)
    if not kernels.available():
        print("the CPU kernels are not built: nothing to compare", file=sys.stderr)
        return 1
    paths = checkpoints(Path(a.dir))
    llms = {fmt: LLM(str(p), progress=False) for fmt, p in paths.items()}
    for fmt, llm in llms.items():
        if llm.engine.runner.fused is None:
            print(f"warning: {fmt} does not run the fused decode step", file=sys.stderr)
    V = bench_config().vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {B: [torch.randint(0, V, (a.prompt,), generator=g).tolist() for _ in range(B)] for B in a.batches}
    ctx = a.prompt + a.new // 2
    rates: dict = {}
    bw: dict = {}
    load = [os.getloadavg()[0]]
    for T in a.threads:
        torch.set_num_threads(T)
        kernels.set_num_threads(T)
        for fmt, llm in llms.items():                        # warm-up: experts faulted in, buffers sized
            for B in a.batches:
                run_ours(llm, prompts[B], 8)
        bw[T] = []
        for r in range(a.repeats):
            order = FORMATS if r % 2 == 0 else FORMATS[::-1]
            for B in a.batches:
                for fmt in order:
                    rate, _ = run_ours(llms[fmt], prompts[B], a.new)
                    rates.setdefault((T, B, fmt), []).append(rate)
            bw[T].append(read_bandwidth(LLC_PROBE_BYTES))
    load.append(os.getloadavg()[0])

    rows, js = [], []
    print(f"\nmimo128m, {a.prompt}-token prompts, {a.new} greedy tokens, medians of {a.repeats}; load average "
          f"{load[0]:.1f} -> {load[1]:.1f}")
    print(f"{'threads':>7} {'seqs':>4} {'format':>6} {'tok/s':>8} {'MB/step':>8} {'bound tok/s':>11} {'of bound':>8} "
          f"{'fp8/bf16':>8}")
    for T in a.threads:
        bwT = statistics.median(bw[T])
        for B in a.batches:
            base = statistics.median(rates[(T, B, "bf16")])
            for fmt in FORMATS:
                med = statistics.median(rates[(T, B, fmt)])
                mb = step_mb(llms[fmt], B, ctx)
                bound = B * bwT / (mb * 1e6)
                print(f"{T:>7} {B:>4} {fmt:>6} {med:>8.1f} {mb:>8.1f} {bound:>11.1f} {med / bound:>8.0%} "
                      f"{med / base:>8.2f}")
                js.append({"threads": T, "batch": B, "format": fmt, "tok_s": round(med, 1),
                           "all_tok_s": [round(x, 1) for x in rates[(T, B, fmt)]], "mb_per_step": round(mb, 2),
                           "read_gb_s": round(bwT / 1e9, 2), "bound_tok_s": round(bound, 1),
                           "fraction_of_bound": round(med / bound, 3), "vs_bf16": round(med / base, 3)})
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    print(json.dumps({"bench": "fp8_decode", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "commit": commit, "load": [round(x, 2) for x in load],
                      "prompt": a.prompt, "new": a.new, "repeats": a.repeats, "results": js}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
