"""Load a MiMo-V2-Flash checkpoint (official layout, docs/MODEL.md §4) into `MiMoForCausalLM`, strictly and in bounded memory.

A checkpoint is a directory with `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Files are always found through the index's `weight_map`. Shard names are never
guessed, because the releases do not agree on a naming scheme.

Loading has three phases, so that a bad checkpoint fails before any weight data is read:
1. **Plan.** Read every shard header (names, shapes, dtypes) and map each name to its slot through
   `keys.official_to_internal` (per-expert tensors go to slot `[e]` of the stacked parameter). Strictness is
   checked here. Every parameter, persistent buffer and expert index must be filled exactly
   once, no tensor may be left over, and shapes must agree, including the FP8 scale grids. All problems are
   reported together in one `CheckpointError`.
2. **Build.** Construct the model on the `meta` device, cast it (the router stays fp32, see
   `MiMoForCausalLM.cast`), and then `to_empty` on the target device. Nothing is randomly initialised, and no fp32
   copy of a bf16 model ever exists. `to_empty` leaves non-persistent buffers (the rotary `inv_freq`) uninitialised
   and unties shared weights, so both are fixed up explicitly.
3. **Stream.** Copy the tensors one at a time out of memory-mapped `safe_open` handles. FP8 weights are
   dequantized with their `weight_scale_inv` sibling (checkpoint/fp8.py). Each source tensor is freed after it is
   copied. Pages of a mapped file stay resident for as long as the file is open, so the handles are closed and
   reopened after every `_REMAP_BYTES` (128 MiB) of reads. This keeps peak RSS near model size + 128 MiB instead
   of model size + checkpoint size (see benchmarks/bench_load_memory.py).

A truncated file, a garbage header, a missing shard or a malformed index raises `CheckpointError` naming the file
(and the tensor where there is one). Errors from inside safetensors are never passed through raw.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ConfigError, MiMoConfig
from ..model.layers import RotaryEmbedding
from ..model.mimo import MiMoForCausalLM
from . import keys
from .fp8 import dequantize_fp8_block, scale_shape

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_REMAP_BYTES = 128 << 20
_MTP = re.compile(r"^model\.mtp\.layers\.(\d+)\.")
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float": torch.float32, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_FP8_ST_DTYPES = ("F8_E4M3", "F8_E5M2")     # safetensors dtype names of FP8 tensors


class CheckpointError(ValueError):
    """The checkpoint on disk does not match the model, or a file in it is unreadable. The message names it."""


def _listing(items: list[str], limit: int = 20) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {shown}{more}"


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.").lower()
        if key not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[key]
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32 (or its name), got {dtype!r}")
    return dtype


def _resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device: {e}") from e
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no data; load to 'cpu' or an accelerator")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def _resolve_path(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: expected a checkpoint directory (config.json + safetensors), got a file")
    missing = f"{p}: checkpoint directory does not exist{_near_miss(p)}"
    # "owner/name" may be a hub repo id, unless its first part is a local directory ("runs/smal" is a typo of a
    # local path, not something to look for on the network).
    if (re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith((".", "/"))
            and not p.parent.is_dir()):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(f"{missing} (and downloading a hub repo id needs `pip install "
                                  "mimoflash[hub]`)") from None
        try:
            return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{missing}, and it is not a downloadable hub repo id either ({reason})") from e
    raise CheckpointError(missing)


def _near_miss(p: Path) -> str:
    """'; did you mean runs/small?' when a sibling directory has a close name, else ''."""
    import difflib
    try:
        siblings = [d.name for d in p.parent.iterdir() if d.is_dir()] if p.parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, siblings, n=1)
    return f"; did you mean {p.parent / close[0]}?" if close else ""


def _weight_map(root: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index if there is one, else from the single file's header."""
    index, single = root / INDEX_FILE, root / SINGLE_FILE
    if index.exists() and single.exists():
        raise CheckpointError(f"{root}: both {SINGLE_FILE} and {INDEX_FILE} exist; remove the stale one")
    if index.exists():
        try:
            wm = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid index JSON object ({e})") from e
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index}: has no usable 'weight_map' (a non-empty object tensor name -> file)")
        outside = sorted({f for f in wm.values() if Path(f).is_absolute() or ".." in Path(f).parts})
        if outside:
            raise CheckpointError(f"{index}: weight_map points outside the checkpoint directory: {outside[:5]}")
        return wm
    if single.exists():
        with _open(single) as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _guarded(file: Path, name: str | None, fn):
    """Run a safetensors call; any failure inside it becomes a CheckpointError naming the file (and tensor)."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit, CheckpointError):
        raise
    except BaseException as e:   # SafetensorsError, OSError, and Rust panics (a BaseException in pyo3)
        what = f"cannot read tensor {name!r}" if name else "unreadable safetensors file"
        raise CheckpointError(f"{file}: {what} ({type(e).__name__}: {e})") from e


def _open(file: Path):
    if not file.exists():
        raise CheckpointError(f"{file}: shard file is missing")
    return _guarded(file, None, lambda: safe_open(str(file), framework="pt"))


class _Shards:
    """Lazily opened `safe_open` handles. All of them are closed after `_REMAP_BYTES` of reads, so that the mapped
    pages they hold leave RSS. A budget per handle would not be enough: the tails of finished shards stay mapped."""

    def __init__(self, root: Path):
        self.root, self.handles, self.read = root, {}, 0

    def get(self, file: str, name: str) -> torch.Tensor:
        t = _guarded(self.root / file, name, lambda: self._handle(file).get_tensor(name))
        self.read += t.numel() * t.element_size()
        return t

    def get_slice(self, file: str, name: str):
        """The tensor's lazy slice, to read part of it (a tensor-parallel rank's rows, parallel/shard.py); the caller
        adds the bytes it reads to `read`."""
        return _guarded(self.root / file, name, lambda: self._handle(file).get_slice(name))

    def _handle(self, file: str):
        if self.read > _REMAP_BYTES:     # earlier tensors are copied and freed by now: unmap them
            self.close()
        if file not in self.handles:
            self.handles[file] = _open(self.root / file).__enter__()
        return self.handles[file]

    def close(self) -> None:
        for h in self.handles.values():
            h.__exit__(None, None, None)
        self.handles, self.read = {}, 0


def _read_headers(root: Path, weight_map: dict[str, str] | None) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (file, shape, safetensors dtype string) for every name in the weight map (None: every tensor of the
    single file)."""
    info = {}
    by_file: dict[str, list[str] | None] = {SINGLE_FILE: None} if weight_map is None else {}
    for name, file in (weight_map or {}).items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with _open(root / file) as f:
            present = set(_guarded(root / file, None, f.keys))
            names = sorted(present) if names is None else names
            absent = [n for n in names if n not in present]
            if absent:
                raise CheckpointError(f"{root / file}: {len(absent)} tensor(s) listed in {INDEX_FILE} are not in this "
                                      f"shard:\n{_listing(sorted(absent))}")
            for n in names:
                sl = _guarded(root / file, n, lambda: f.get_slice(n))
                info[n] = (file, tuple(sl.get_shape()), sl.get_dtype())
    return info


@dataclass(frozen=True)
class CheckpointFiles:
    """A checkpoint's files as read from disk: `weight_map` (tensor name -> file) and `info` (tensor name -> (file,
    shape, safetensors dtype string)) for every tensor, from the shard headers; no tensor data."""
    root: Path
    weight_map: dict[str, str]
    info: dict[str, tuple[str, tuple[int, ...], str]]

    def dtype_of(self, name: str) -> str | None:
        """The safetensors dtype string of tensor `name`, or None if the checkpoint has no such tensor."""
        got = self.info.get(name)
        return None if got is None else got[2]


_files_cache: dict = {}     # the last checkpoint read: {(root, the files' sizes and mtimes): CheckpointFiles}


def read_checkpoint(path) -> CheckpointFiles:
    """The checkpoint's weight map and every shard header, read once: callers that look at the same checkpoint one
    after the other (LLM choosing how to load it, then the loader) share one read, while the files are unchanged
    (same sizes and modification times). Errors as `load_model` raises them."""
    root = _resolve_path(path)
    single = (root / SINGLE_FILE).exists() and not (root / INDEX_FILE).exists()
    weight_map = None if single else _weight_map(root)          # the index (or its errors)
    try:
        stamp = tuple((f, st.st_size, st.st_mtime_ns) for f in ([SINGLE_FILE] if single else
                                                                 sorted(set(weight_map.values())))
                      for st in [(root / f).stat()])
    except OSError:
        stamp = None                    # a missing shard: _read_headers names it
    key = (str(root.resolve()), stamp)
    if stamp is None or key not in _files_cache:
        if single:                      # one header read gives both the names and their entries
            info = _read_headers(root, None)
            weight_map = {name: SINGLE_FILE for name in info}
        else:
            info = _read_headers(root, weight_map)
        _files_cache.clear()
        _files_cache[key] = CheckpointFiles(root, weight_map, info)
    return _files_cache[key]


@dataclass(frozen=True)
class Prepared:
    """A checkpoint validated against the model its config describes (phase 1 of the module docstring): the files,
    the config, the FP8 block size (or None) and the plan [(ckpt name, scale name or None, param name, expert or
    None)]."""
    files: CheckpointFiles
    config: MiMoConfig
    block: tuple[int, int] | None
    plan: list[tuple[str, str | None, str, int | None]]


def prepare(path) -> Prepared:
    """Read and check a checkpoint without reading tensor data: load_model's phase 1, shared with the loader that
    keeps FP8 weights FP8 (engine/fp8_layout.py), so both raise the same errors for the same checkpoint."""
    root = _resolve_path(path)
    if not (root / "config.json").exists():
        raise CheckpointError(f"{root / 'config.json'}: config.json not found")
    files = read_checkpoint(root)
    config = _read_config(root, files.weight_map)
    block = config.fp8_block_size
    with torch.device("meta"):
        plan = _plan(MiMoForCausalLM(config), files.info, block)
    return Prepared(files, config, block, plan)


def _read_config(root: Path, names) -> MiMoConfig:
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path}: config.json not found")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if isinstance(raw, dict) and "num_nextn_predict_layers" not in raw:
        # The hub config has no MTP key (docs/MODEL.md §1.1); count the model.mtp.layers.N blocks, as Megatron-Bridge does.
        depths = [int(m[1]) for n in names if (m := _MTP.match(n))]
        raw["num_nextn_predict_layers"] = max(depths) + 1 if depths else 0
    try:
        return MiMoConfig.from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e


def _plan(model: MiMoForCausalLM, info: dict, block) -> list[tuple[str, str | None, str, int | None]]:
    """Check the checkpoint against the model; -> [(ckpt name, scale name or None, param name, expert or None)]."""
    expected = {}   # official name -> (param name, expert index or None, shape)
    for pname, t in model.state_dict(keep_vars=True).items():
        if pname == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        for oname, part in keys.internal_to_official(pname, t):
            expected[oname] = (*keys.official_to_internal(oname), tuple(part.shape))
    plan, unexpected, mismatched = [], [], []
    scales = {n for n in info if n.endswith("weight" + keys.SCALE_SUFFIX)}
    used_scales = set()
    for name, (_, shape, st_dtype) in sorted(info.items()):
        if name in scales:
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        target, e, want = expected.pop(name)
        if shape != want:
            mismatched.append(f"{name}: checkpoint {list(shape)} vs model {list(want)}")
            continue
        scale = None
        if st_dtype in _FP8_ST_DTYPES:
            scale = name + keys.SCALE_SUFFIX
            if scale not in info:
                mismatched.append(f"{name}: stored as {st_dtype} but has no {scale} sibling")
                continue
            if block is None:
                raise CheckpointError(f"{name} is FP8 but config.json has no quantization_config.weight_block_size")
            used_scales.add(scale)
            sshape, swant = info[scale][1], scale_shape(shape, block) if len(shape) == 2 else None
            if sshape != swant:
                mismatched.append(f"{scale}: checkpoint {list(sshape)} vs expected {list(swant or ())} "
                                  f"for a {list(shape)} weight in {list(block)} blocks")
                continue
        plan.append((name, scale, target, e))
    unexpected += sorted(scales - used_scales)
    missing = sorted(expected)
    problems = [f"{len(lst)} {what}:\n{_listing(lst)}" for lst, what in
                ((missing, "missing tensor(s) (model parameters with no checkpoint tensor)"),
                 (unexpected, "unexpected tensor(s) (checkpoint tensors the model has no slot for)"),
                 (mismatched, "shape mismatch(es)")) if lst]
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n" + "\n".join(problems))
    return plan


def _build(config: MiMoConfig, dtype: torch.dtype, device: torch.device, swap=None) -> MiMoForCausalLM:
    """Phase 2; `swap(model)`, if given, runs on the meta model before any memory is allocated (the FP8 loader
    swaps in its modules there)."""
    with torch.device("meta"):
        model = MiMoForCausalLM(config).cast(dtype)
        if swap is not None:
            swap(model)
    model.to_empty(device=device)
    if config.tie_word_embeddings:          # to_empty replaces meta parameters one by one, breaking the tie
        model.lm_head.weight = model.model.embed_tokens.weight
    fresh = {"model.rotary.full": RotaryEmbedding(config.rotary_dim(False), config.rope_theta),
             "model.rotary.sliding": RotaryEmbedding(config.rotary_dim(True), config.swa_rope_theta)}
    for name, module in fresh.items():
        model.get_submodule(name).inv_freq = module.inv_freq.to(device)
    persistent = set(model.state_dict())
    stale = [n for n, _ in model.named_buffers() if n not in persistent and n.rsplit(".", 1)[0] not in fresh]
    if stale:
        raise RuntimeError(f"non-persistent buffers the loader does not know how to recompute: {stale}")
    return model.eval()


_STORED = {"BF16": torch.bfloat16, "F8_E4M3": torch.bfloat16, "F8_E5M2": torch.bfloat16, "F16": torch.float16,
           "F32": torch.float32, "F64": torch.float32}


def stored_weight_dtype(path) -> torch.dtype:
    """The dtype a checkpoint's matmul weights are best kept in: bf16 for BF16 or FP8 (which dequantizes to bf16
    losslessly at the block scales' precision), else as stored: the lm_head's dtype, or the first projection's.
    Reads the headers through `read_checkpoint` (once for the loader that follows), no tensor data."""
    files = read_checkpoint(path)
    name = next((n for n in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight") if n in files.info),
                next(iter(sorted(files.info)), None))
    if name is None:
        raise CheckpointError(f"{files.root}: no tensors found")
    return _STORED.get(files.dtype_of(name), torch.float32)


def load_model(path, dtype=torch.bfloat16, device="cpu", progress: bool = False, keep_fp8: bool = False,
               memory_budget=None) -> MiMoForCausalLM:
    """Checkpoint directory (or hub repo id, with the [hub] extra) -> MiMoForCausalLM in `dtype` on `device`.

    keep_fp8 (CPU): block-FP8 weights stay FP8 with their scales instead of being dequantised to `dtype`, and the
    routed experts are read from the files when routed, within `memory_budget` (engine/fp8_layout.py).

    Example: `model = load_model("ckpt/MiMo-V2-Flash", dtype="bfloat16", device="cuda")`."""
    if keep_fp8:
        from ..engine.fp8_layout import load_fp8
        if _resolve_device(device).type != "cpu":
            raise ValueError("keep_fp8 runs on CPU (the FP8 kernels are CPU kernels)")
        return load_fp8(path, memory_budget=memory_budget, progress=progress)[0]
    dtype, device = _resolve_dtype(dtype), _resolve_device(device)
    prep = prepare(path)
    root, weight_map, config, block, plan = prep.files.root, prep.files.weight_map, prep.config, prep.block, prep.plan
    model = _build(config, dtype, device)
    slots = model.state_dict(keep_vars=True)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), unit="tensor", desc=f"loading {root.name}")
    shards = _Shards(root)
    try:
        # Grouped by file, so that each 128 MiB window of reads touches as few mapped files as possible.
        for name, scale, target, e in sorted(plan, key=lambda p: (weight_map[p[0]], p[0])):
            t = shards.get(weight_map[name], name)
            if scale is not None:   # dequantize on the target device: a GPU does it far faster than the CPU
                s = shards.get(weight_map[scale], scale).to(device)
                t = dequantize_fp8_block(t.to(device), s, block, torch.float32, name=name)
            slot = slots[target] if e is None else slots[target][e]
            with torch.no_grad():
                slot.copy_(t)
            del t
            if bar is not None:
                bar.update(1)
    finally:
        shards.close()
        if bar is not None:
            bar.close()
    return model
