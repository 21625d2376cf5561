"""Peak resident memory of `load_model` relative to the size of the model it returns (target: < 1.5x).

Example: `python benchmarks/bench_load_memory.py` (about 2.5 GB of temporary disk, a minute or two on 2 cores).

The script writes a seeded, MiMo-shaped synthetic checkpoint of more than 1 GB (hidden 1024, 64 experts, bf16 on disk,
sharded) and the same weights as block-FP8 (128 x 128). It then loads each one to bf16 in a fresh subprocess. The
child measures `ru_maxrss` after `import torch, mimoflash` as its baseline and again after loading. The difference,
divided by the bytes of the returned model, is the reported ratio. Mapped checkpoint pages count towards RSS, which is
why the loader remaps its files (checkpoint/loader.py). The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch, mimoflash
from mimoflash.checkpoint.loader import load_model
def hwm():  # per-process high-water mark, a cross-check on ru_maxrss
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
base, base_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, hwm()
t0 = time.perf_counter()
model = load_model(sys.argv[1], dtype=torch.bfloat16)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"peak_bytes": peak, "peak_hwm_bytes": hwm() - base_hwm, "model_bytes": size, "load_s": seconds}))
"""


def bench_config():
    from mimoflash.config import MiMoConfig
    return MiMoConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=128, v_head_dim=128, intermediate_size=4096,
                      moe_intermediate_size=512, n_routed_experts=64, num_experts_per_tok=4,
                      num_nextn_predict_layers=1, sliding_window_size=128, max_position_embeddings=4096)


def write_checkpoints(root: Path, seed: int) -> None:
    """Runs in its own subprocess: Linux copies ru_maxrss across fork, so a parent that had held the model would
    inflate every child's baseline. The parent never imports torch."""
    import torch
    from mimoflash.checkpoint.saver import save_model
    from mimoflash.model.mimo import MiMoForCausalLM

    with torch.device("meta"):
        model = MiMoForCausalLM(bench_config()).cast(torch.bfloat16)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:   # per leading slice, so that no fp32 copy of a whole stacked expert tensor is made
                for part in (t if t.dim() == 3 else [t]):
                    part.copy_(torch.randn(part.shape, generator=g) * 0.02)
    save_model(model, root / "bf16", dtype=torch.bfloat16, max_shard_bytes=400 << 20)
    save_model(model, root / "fp8", dtype=torch.bfloat16, fp8=True, fp8_block_size=(128, 128),
               max_shard_bytes=400 << 20)


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmpdir", default=None, help="where to write the temporary checkpoints")
    ap.add_argument("--write-only", default=None, help=argparse.SUPPRESS)   # internal: the writer subprocess
    args = ap.parse_args()
    if args.write_only:
        return write_checkpoints(Path(args.write_only), args.seed)
    root = Path(tempfile.mkdtemp(prefix="mimoflash_bench_load_", dir=args.tmpdir))
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--seed", str(args.seed), "--write-only", str(root)], check=True)
        write_s = time.perf_counter() - t0
        paths = {"bf16": root / "bf16", "fp8->bf16": root / "fp8"}
        rows = {}
        for kind, path in paths.items():
            disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            rows[kind] = {"disk_bytes": disk, **measure(path)}
            rows[kind]["ratio"] = rows[kind]["peak_bytes"] / rows[kind]["model_bytes"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gb = 1e9
    print(f"checkpoints written in {write_s:.1f}s (seed {args.seed}); loaded to bf16 on CPU, {os.cpu_count()} cores")
    print(f"{'checkpoint':<12}{'disk GB':>9}{'model GB':>10}{'peak GB':>9}{'peak/model':>12}{'VmHWM GB':>10}"
          f"{'load s':>8}")
    for kind, r in rows.items():
        print(f"{kind:<12}{r['disk_bytes'] / gb:>9.3f}{r['model_bytes'] / gb:>10.3f}{r['peak_bytes'] / gb:>9.3f}"
              f"{r['ratio']:>12.3f}{r['peak_hwm_bytes'] / gb:>10.3f}{r['load_s']:>8.1f}")
    worst = max(r["ratio"] for r in rows.values())
    print(json.dumps({"bench": "load_memory", "target_ratio": 1.5, "worst_ratio": round(worst, 3),
                      "pass": worst < 1.5, **{k: {kk: (round(v, 3) if isinstance(v, float) else v)
                                                   for kk, v in r.items()} for k, r in rows.items()}}))


if __name__ == "__main__":
    main()
