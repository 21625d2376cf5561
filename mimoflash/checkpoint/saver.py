"""Save `MiMoForCausalLM` as an official-layout checkpoint that mimoflash, transformers 5.23 and SGLang/vLLM can read.

The layout is the release's (docs/MODEL.md §4), so the same files serve every consumer:
* per-expert tensors `mlp.experts.{e}.{gate,up,down}_proj.weight`, made by `keys.internal_to_official`. A tied
  `lm_head.weight` is left out, and MTP blocks are kept under `model.mtp.layers.N.*` (transformers drops them at load).
* With `fp8=True`, the weights `keys.is_fp8_candidate` selects are stored as block-FP8 plus a `weight_scale_inv`
  sibling (checkpoint/fp8.py). `config.json` then gets the release's `quantization_config`. Its `ignored_layers` lists
  every `o_proj`, which transformers reads as "leave this Linear alone".
* The router (`mlp.gate.weight`, `e_score_correction_bias`) is always fp32, like the release: a bf16 correction bias
  flips near-tied experts. Everything else is stored in `dtype`.

The writer streams. A safetensors file is an 8-byte header length, a JSON header of (dtype, shape, byte range)
per tensor, and then the raw bytes. All of these are known from shapes alone, so the header is written first and
each tensor is converted (cast or quantized), written and freed one at a time. No second copy of the model exists
at any point, even for a single-file FP8 save. The files are read back with the official `safetensors` library in
the tests.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import torch

from ..model.mimo import MiMoForCausalLM
from ..model.moe import Router
from . import keys
from .fp8 import FP8_DTYPE, quantize_fp8_block, scale_shape
from .loader import INDEX_FILE, SINGLE_FILE, _resolve_dtype

_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", FP8_DTYPE: "F8_E4M3"}
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def plan_entries(model: MiMoForCausalLM, dtype: torch.dtype, block: tuple[int, int] | None):
    """-> [(group, ckpt name, stored dtype, shape, make)] in state-dict order: the write plan of `model` (which may
    live on the meta device: only `make` reads data). `make()` produces the stored tensor lazily. A weight and its
    scale share a group so that they always land in the same shard."""
    fp32_names = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, Router)
                  for p in ("weight", "e_score_correction_bias")}
    out = []
    for pname, t in model.state_dict().items():
        if pname == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        for oname, part in keys.internal_to_official(pname, t):
            shape = tuple(part.shape)
            if keys.is_fp8_candidate(oname, block):
                cache = {}

                def quant(part=part, cache=cache):   # one quantization feeds both the weight and its scale
                    if not cache:
                        cache["q"], cache["s"] = quantize_fp8_block(part, block)
                    return cache.pop("q") if "q" in cache else cache.pop("s")
                out.append((oname, oname, FP8_DTYPE, shape, quant))
                out.append((oname, oname + keys.SCALE_SUFFIX, torch.float32, scale_shape(shape, block), quant))
            else:
                want = torch.float32 if pname in fp32_names else dtype
                out.append((oname, oname, want, shape, lambda part=part, want=want: part.to(want)))
    return out


def nbytes(dtype: torch.dtype, shape) -> int:
    """Bytes of a tensor of `shape` stored as `dtype`."""
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def _write_safetensors(file: Path, entries) -> None:
    """Stream `entries` ([(group, name, dtype, shape, make)]) into one safetensors file."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for _, name, dtype, shape, _ in entries:
        n = nbytes(dtype, shape)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                       # the reference writer pads the header to 8 bytes
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, name, dtype, shape, make in entries:
            t = make().detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{file}: tensor {name} has shape {tuple(t.shape)}, the header says {tuple(shape)}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


def _shards(entries, max_shard_bytes: int | None) -> list[list]:
    """Greedy split in order; a weight and its scale (same group) are never separated."""
    if max_shard_bytes is None:
        return [entries]
    shards, size = [[]], 0
    for i, ent in enumerate(entries):
        n = nbytes(ent[2], ent[3])
        new_group = i == 0 or entries[i - 1][0] != ent[0]
        if new_group and shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(ent)
        size += n
    return shards


def checkpoint_config(config, dtype: torch.dtype, block: tuple[int, int] | None) -> dict:
    """The `config.json` contents for `config` stored in `dtype`, with the release's `quantization_config` when
    `block` is set (its `ignored_layers` lists every `o_proj`, which transformers reads as "leave this Linear
    alone")."""
    cfg = config.to_dict()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("quantization_config", None)
    if block is not None:
        with torch.device("meta"):
            names = [n for n, _ in MiMoForCausalLM(config).named_modules() if n.endswith(".o_proj")]
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(block), "ignored_layers": names}
    return cfg


def write_checkpoint(path, cfg: dict, entries, max_shard_bytes: int | None = None, on_shard=None) -> Path:
    """Write `config.json` (`cfg`) and the tensors of `entries` (`plan_entries`' tuples, each `make` called once,
    in order) into directory `path`: `model.safetensors`, or with `max_shard_bytes` shards
    `model-0000i-of-0000N.safetensors` and their index. Old weight files in the directory are removed first (a stale
    index or shard set would shadow, or mix with, the new files). `on_shard(file name, bytes)` is called after each
    shard. -> the directory. Used by `save_model` and the synthetic checkpoint writer (checkpoint/synthetic.py)."""
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes must be a positive int or None, got {max_shard_bytes!r}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD.match(old.name):
            old.unlink()
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    with torch.no_grad():
        if max_shard_bytes is None:
            _write_safetensors(root / SINGLE_FILE, entries)
            return root
        shards = _shards(entries, max_shard_bytes)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(root / fname, shard)
            size = sum(nbytes(dt, shape) for _, _, dt, shape, _ in shard)
            weight_map.update((name, fname) for _, name, _, _, _ in shard)
            total += size
            if on_shard is not None:
                on_shard(fname, size)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return root


def save_model(model: MiMoForCausalLM, path, dtype=torch.bfloat16, fp8: bool = False,
               fp8_block_size: tuple[int, int] = (128, 128), max_shard_bytes: int | None = None,
               tokenizer_dir=None) -> Path:
    """Write `config.json` + `model.safetensors` (or `model-0000i-of-0000N.safetensors` shards + index when
    `max_shard_bytes` is set) into directory `path`. Returns the directory.

    Example: `save_model(model, "out/tiny", fp8=True, fp8_block_size=(16, 16), max_shard_bytes=1 << 20)`."""
    dtype = _resolve_dtype(dtype)
    if not isinstance(model, MiMoForCausalLM):
        raise TypeError(f"save_model expects a MiMoForCausalLM, got {type(model).__name__}")
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes must be a positive int or None, got {max_shard_bytes!r}")
    block = tuple(fp8_block_size) if fp8 else None
    if block is not None and (len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"fp8_block_size must be two positive ints, got {fp8_block_size!r}")
    if tokenizer_dir is not None and not (Path(tokenizer_dir) / "tokenizer.json").exists():
        raise FileNotFoundError(f"{Path(tokenizer_dir) / 'tokenizer.json'}: tokenizer_dir has no tokenizer.json")
    with torch.no_grad():
        root = write_checkpoint(path, checkpoint_config(model.config, dtype, block), plan_entries(model, dtype, block),
                                max_shard_bytes)
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / fname).exists():
                shutil.copyfile(Path(tokenizer_dir) / fname, root / fname)
    return root
