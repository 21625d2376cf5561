"""Synthetic checkpoints with the release's real layer shapes, written tensor by tensor (a few GB on a laptop).

The full MiMo-V2-Flash is 309B parameters (about 310 GB of block-FP8 files). Memory, bandwidth and loading behaviour
depend on the *shapes* of its tensors, not on their values. So this module writes a checkpoint that has the release's
per-layer shapes and file layout, with fewer layers and experts and seeded random values. With the defaults that is
hidden 4096, 64 query heads, Q/K head dim 192, V head dim 128, vocab 152,576, a dense FFN of 16,384, experts of 2,048,
2 layers (layer 0 global attention + dense FFN, layer 1 sliding-window + MoE, as in the release), 32 experts top-8,
1 MTP layer, block-FP8 128 x 128: 4.15 GB of files.

    python -m mimoflash.checkpoint.synthetic --out /tmp/mimo-synth                 # the defaults above
    python -m mimoflash.checkpoint.synthetic --out /tmp/s --layers 6 --experts 64 --experts-per-tok 8
    python -m mimoflash.checkpoint.synthetic --out /tmp/s --config path/to/config.json   # start from a config file

The layout comes from the saver (checkpoint/saver.py), not from a second table. A `MiMoForCausalLM` is built on
PyTorch's meta device, which gives names and shapes without any storage. The saver's own plan for it then says which
tensors become block-FP8 plus a `weight_scale_inv`, which stay bf16, and which stay fp32 (the router). Only the
values are new. Each tensor is generated when the writer reaches it, written, and freed. The bf16 ones are filled
in row chunks, so the peak extra memory is about one tensor (the 1.25 GB embedding or LM head), never the model.
Every tensor has its own generator, seeded from `seed` and its name, so its values do not depend on the shard split.

Values: norms 1, sinks N(0, 1), router N(0, 1/hidden) (well-spread sigmoid scores), correction bias N(0, 0.01),
every other weight N(0, `std`). FP8 weights are the block quantisation (checkpoint/fp8.py) of such a draw.
The directory holds `config.json` (official keys plus the transformers dialect, with the release's
`quantization_config` when FP8) and the shards and index. There is no tokenizer. mimoflash (`load_model`, `LLM`
with token-id prompts) and transformers 5.23 (`AutoModelForCausalLM.from_pretrained`, which dequantises FP8 to
bf16 on CPU) both load it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import torch

from ..config import MiMoConfig
from ..model.mimo import MiMoForCausalLM
from . import keys, saver
from .fp8 import FP8_DTYPE, quantize_fp8_block

# The release's token ids (docs/MODEL.md §5); everything else in MiMoConfig's defaults is the release's shape.
_RELEASE_IDS = {"eos_token_id": 151645, "pad_token_id": 151643}
_ROW_CHUNK_ELEMS = 1 << 24          # bf16 tensors are drawn 16M elements (64 MB of fp32) at a time


def synthetic_config(layers: int = 2, experts: int = 32, experts_per_tok: int = 8, mtp_layers: int = 1,
                     base: MiMoConfig | None = None) -> MiMoConfig:
    """The release's config (or `base`) cut to `layers` layers, `experts` routed experts and `mtp_layers` MTP
    blocks. The per-layer patterns are the first `layers` entries of the base's (GA/SWA, dense/MoE)."""
    if base is None:
        base = MiMoConfig(**_RELEASE_IDS)
    for name, v, lo in (("layers", layers, 1), ("experts", experts, 1), ("experts_per_tok", experts_per_tok, 1),
                        ("mtp_layers", mtp_layers, 0)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if layers > base.num_hidden_layers:
        raise ValueError(f"layers={layers} exceeds the base config's {base.num_hidden_layers} layers")
    if experts_per_tok > experts:
        raise ValueError(f"experts_per_tok={experts_per_tok} exceeds experts={experts}")
    n_group = base.n_group if experts % base.n_group == 0 else 1
    return base.replace(num_hidden_layers=layers, hybrid_layer_pattern=list(base.hybrid_layer_pattern[:layers]),
                        moe_layer_freq=list(base.moe_layer_freq[:layers]), n_routed_experts=experts,
                        num_experts_per_tok=experts_per_tok, num_nextn_predict_layers=mtp_layers,
                        n_group=n_group, topk_group=min(base.topk_group, n_group), quantization_config=None)


def checkpoint_plan(config: MiMoConfig, dtype: torch.dtype = torch.bfloat16,
                    fp8_block: tuple[int, int] | None = (128, 128)) -> list[tuple[str, str, torch.dtype, tuple]]:
    """-> [(group, checkpoint name, stored dtype, shape)] exactly as `save_model` would write this config, without
    allocating a tensor (the model lives on the meta device). Also used by `mimoflash bench --plan`."""
    with torch.device("meta"):
        model = MiMoForCausalLM(config)
    return [(g, n, dt, shape) for g, n, dt, shape, _ in saver.plan_entries(model, dtype, fp8_block)]


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & ((1 << 63) - 1))


def _draw(name: str, shape: tuple, std: float, hidden: int, g: torch.Generator) -> torch.Tensor:
    """fp32 values for one (small, or FP8-bound) tensor, by its role."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith("attention_sink_bias"):
        return torch.randn(shape, generator=g)
    if name.endswith("mlp.gate.weight"):
        return torch.randn(shape, generator=g) * hidden ** -0.5
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=g) * 0.01
    return torch.randn(shape, generator=g) * std


def _draw_chunked(shape: tuple, dtype: torch.dtype, std: float, g: torch.Generator) -> torch.Tensor:
    """N(0, std) straight into `dtype`, a few rows at a time: no fp32 copy of a whole 1.25 GB embedding."""
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(shape[0], -1)
    rows = max(1, _ROW_CHUNK_ELEMS // max(1, flat.shape[1]))
    for lo in range(0, flat.shape[0], rows):
        part = flat[lo:lo + rows]
        part.copy_(torch.randn(part.shape, generator=g).mul_(std))
    return out


def _makers(plan, seed: int, std: float, hidden: int, block) -> list:
    """The saver's entry tuples (group, name, dtype, shape, make) with generating `make`s. A weight and its
    `weight_scale_inv` share one quantisation: the plan lists the weight first, then its scale, and the writer
    makes them in that order, so the scale waits in `pending` for one tensor."""
    out, pending = [], {}
    for group, name, dtype, shape in plan:
        if dtype == FP8_DTYPE:
            def make(group=group, shape=shape):
                q, pending[group] = quantize_fp8_block(_draw(group, shape, std, hidden, _generator(seed, group)),
                                                       block)
                return q
        elif name.endswith(keys.SCALE_SUFFIX):
            def make(group=group):
                return pending.pop(group)
        elif len(shape) == 2 and dtype != torch.float32:
            def make(name=name, shape=shape, dtype=dtype):
                return _draw_chunked(shape, dtype, std, _generator(seed, name))
        else:
            def make(name=name, shape=shape, dtype=dtype):
                return _draw(name, shape, std, hidden, _generator(seed, name)).to(dtype)
        out.append((group, name, dtype, shape, make))
    return out


def write_synthetic_checkpoint(out, config: MiMoConfig | None = None, *, seed: int = 0, std: float = 0.02,
                               fp8: bool = True, fp8_block: tuple[int, int] = (128, 128),
                               max_shard_bytes: int | None = 1 << 30, progress: bool = False) -> Path:
    """Write a seeded synthetic checkpoint of `config` (default: `synthetic_config()`) into directory `out`.
    Returns the directory. Files are streamed one tensor at a time (module docstring)."""
    config = synthetic_config() if config is None else config
    block = tuple(fp8_block) if fp8 else None
    entries = _makers(checkpoint_plan(config, torch.bfloat16, block), seed, std, config.hidden_size, block)
    t0 = time.perf_counter()

    def report(fname: str, size: int) -> None:
        if progress:
            print(f"  {fname}: {size / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return saver.write_checkpoint(out, saver.checkpoint_config(config, torch.bfloat16, block), entries,
                                  max_shard_bytes, on_shard=report)


def parse_size(text: str) -> int:
    """'1GB', '512MiB', '8G', '1e9' -> bytes. kB/MB/GB/TB are powers of 1000; KiB/MiB/GiB/TiB and a bare K/M/G/T
    are powers of 1024, as `--memory-budget` reads them (expert_store.parse_bytes)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ValueError(f"not a size: {text!r} (examples: 1GB, 512MiB, 2e9)")
    return int(value * units[unit])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mimoflash.checkpoint.synthetic",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory to write (created; old shards in it are replaced)")
    ap.add_argument("--config", help="start from this config.json (default: the release's shapes)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--experts-per-tok", type=int, default=8)
    ap.add_argument("--mtp-layers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02, help="std of the weight draws")
    ap.add_argument("--bf16", action="store_true", help="store bf16 weights instead of block-FP8")
    ap.add_argument("--shard-size", default="1GB", help="max bytes per shard (default 1GB)")
    a = ap.parse_args(argv)
    try:
        base = MiMoConfig.from_file(a.config) if a.config else None
        cfg = synthetic_config(a.layers, a.experts, a.experts_per_tok, a.mtp_layers, base)
        plan = checkpoint_plan(cfg, torch.bfloat16, None if a.bf16 else (128, 128))
        size = sum(saver.nbytes(dt, shape) for _, _, dt, shape in plan)
        print(f"writing {size / 1e9:.2f} GB to {a.out}: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} "
              f"experts top-{cfg.num_experts_per_tok}, {cfg.num_nextn_predict_layers} MTP, hidden "
              f"{cfg.hidden_size}, vocab {cfg.vocab_size}, {'bf16' if a.bf16 else 'block-FP8 128x128'}",
              file=sys.stderr)
        t0 = time.perf_counter()
        root = write_synthetic_checkpoint(a.out, cfg, seed=a.seed, std=a.std, fp8=not a.bf16,
                                          max_shard_bytes=parse_size(a.shard_size), progress=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    files = sum(f.stat().st_size for f in root.glob("*.safetensors"))
    print(json.dumps({"path": str(root), "bytes": files, "tensors": len(plan), "seconds":
                      round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
