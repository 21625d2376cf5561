"""Training data: text files -> flat token files -> (input, target) batches for the main and MTP losses.

`prepare_data` tokenizes a corpus once. One file is one document. Documents are shuffled with a seed and a
seeded set of whole documents is held out for validation, so no validation text leaks into training through
a shared file. Each document is followed by one separator token (`<|endoftext|>`), and the ids are written
back to back into `train.bin` / `val.bin`: raw little-endian uint16 (or uint32 for vocabularies over 65,536
ids) with no header, the nanoGPT layout, so `np.memmap` reads them without parsing. `meta.json` records the
dtype, counts and separator id.

`TokenDataset` samples fixed-length windows at uniformly random offsets, so documents are packed and a
window may span several of them (there is no cross-document attention mask; the separator token is the
model's cue). Targets for MTP follow docs/MODEL.md §3: with `n_future` MTP heads, row k of the targets holds the
token k+1 steps after the main next token:

    targets[b, 0, t] = tokens[s + t + 1]                    main next-token loss
    targets[b, k, t] = tokens[s + t + 1 + k], k = 1..n_future   MTP head k

A target is replaced by -100 (the cross-entropy ignore index) when a separator lies at a position p with
`s + t < p < target position`: the target then belongs to a later document than the input token and cannot be
predicted from it. The target may itself be the separator, which teaches the model where documents end; the
main target is therefore never masked.

Resuming: sampling is a pure function of the `torch.Generator` passed to `get_batch`, so a training run
saves `generator.get_state()` with its checkpoint and restores it with `generator.set_state(...)` to continue
with exactly the batches it would have seen. The validation walk (`iter_eval_batches`) has no state.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from mimoflash.tokenizer import ENDOFTEXT, Tokenizer

IGNORE_INDEX = -100
_SNIFF_BYTES = 8192


# ---------------------------------------------------------------- corpus files


def collect_files(inputs: Sequence[str | os.PathLike], pattern: str = "*") -> list[Path]:
    """Expand input paths into a sorted, duplicate-free file list.

    A file is taken as is; a directory is walked recursively for names matching `pattern`, skipping hidden
    files and directories (`.git` and friends are not corpus text). Sorting makes the list, and therefore the
    seeded shuffle, independent of the file system's listing order.
    """
    files: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.add(path.resolve())
        elif path.is_dir():
            for p in path.rglob(pattern):
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
                    files.add(p.resolve())
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return sorted(files)


def read_document(path: Path, skipped: Counter | None = None) -> str | None:
    """Return the UTF-8 text of `path`, or None (and count why in `skipped`) if it is unreadable, binary or empty."""
    try:
        data = path.read_bytes()
    except OSError:
        reason = "unreadable"
    else:
        # A NUL byte in the head is the usual sign of a binary file; valid UTF-8 text almost never has one.
        if b"\x00" in data[:_SNIFF_BYTES]:
            reason = "binary"
        elif not data.strip():
            reason = "empty"
        else:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                reason = "not utf-8"
    if skipped is not None:
        skipped[reason] += 1
    return None


def skip_summary(skipped: Counter) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "none"


# ---------------------------------------------------------------- prepare


def _token_dtype(vocab_size: int, dtype: str) -> np.dtype:
    fits16 = vocab_size <= 2**16  # ids are 0..vocab_size-1
    if dtype == "auto":
        return np.dtype(np.uint16 if fits16 else np.uint32)
    if dtype == "uint16" and not fits16:
        raise ValueError(f"vocab_size {vocab_size} does not fit in uint16; use uint32 or auto")
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"dtype must be auto, uint16 or uint32, got {dtype!r}")
    return np.dtype(dtype)


def separator_id(tokenizer: Tokenizer) -> int:
    """The document separator: `<|endoftext|>`, else the eos token."""
    sep = tokenizer.token_to_id(ENDOFTEXT)
    sep = tokenizer.eos_token_id if sep is None else sep
    if sep is None:
        raise ValueError(f"tokenizer has neither {ENDOFTEXT} nor an eos token to separate documents")
    return sep


def prepare_data(
    files: Sequence[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.01,
    seed: int = 0,
    dtype: str = "auto",
    source: str | None = None,
    batch_docs: int = 256,
    progress: bool = True,
) -> dict:
    """Tokenize `files` (one document each) into `out_dir/{train,val}.bin` and `meta.json`; return the meta dict.

    The shuffled order decides the split: the first `round(val_fraction * len(files))` readable documents (at
    least one when `val_fraction > 0` and there are two or more files) go to validation. Unreadable, binary and
    empty files are skipped and counted, so with skips the split is approximately, not exactly, that fraction.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    paths = sorted(Path(f).resolve() for f in files)
    if not paths:
        raise ValueError("prepare_data got no input files")
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    sep = separator_id(tokenizer)
    np_dtype = _token_dtype(tokenizer.vocab_size, dtype)
    random.Random(seed).shuffle(paths)
    n_val_target = round(val_fraction * len(paths))
    if val_fraction > 0 and len(paths) >= 2:
        n_val_target = min(max(n_val_target, 1), len(paths) - 1)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {split: {"tokens": 0, "docs": 0} for split in ("train", "val")}
    skipped: Counter = Counter()
    # Write to temporary names and rename at the end, so an interrupted run never leaves a half file behind.
    tmp = {split: out_dir / f"{split}.bin.tmp" for split in counts}
    sinks = {split: open(p, "wb") for split, p in tmp.items()}
    try:
        bar = progress_bar(total=len(paths), desc="tokenizing", unit="file", enable=progress)
        for i in range(0, len(paths), batch_docs):
            chunk = paths[i : i + batch_docs]
            texts = [t for t in (read_document(p, skipped) for p in chunk) if t is not None]
            for ids in tokenizer.encode_batch(texts):
                split = "val" if counts["val"]["docs"] < n_val_target else "train"
                arr = np.asarray(ids + [sep], dtype=np_dtype)
                sinks[split].write(arr.tobytes())
                counts[split]["tokens"] += len(arr)
                counts[split]["docs"] += 1
            bar.update(len(chunk))
            bar.set_postfix(tokens=counts["train"]["tokens"] + counts["val"]["tokens"])
        bar.close()
    finally:
        for f in sinks.values():
            f.close()
    if counts["train"]["docs"] == 0:
        for p in tmp.values():
            p.unlink()
        raise ValueError(
            f"no training documents: {len(paths)} files, {counts['val']['docs']} went to validation, "
            f"skipped: {skip_summary(skipped)}"
        )
    for split, p in tmp.items():
        os.replace(p, out_dir / f"{split}.bin")

    meta = {
        "dtype": np_dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "separator_id": sep,
        "separator_token": tokenizer.id_to_token(sep),
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "source": source or f"{len(paths)} files",
        "seed": seed,
        "val_fraction": val_fraction,
        "train": {"file": "train.bin", **counts["train"]},
        "val": {"file": "val.bin", **counts["val"]},
        "skipped_files": dict(skipped),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def progress_bar(total: int, desc: str, unit: str, enable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enable)


# ---------------------------------------------------------------- batches


class TokenDataset:
    """Random fixed-length windows over one split of a `prepare_data` directory (see module docstring)."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, n_future: int = 0):
        data_dir = Path(data_dir)
        meta_file = data_dir / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"no meta.json in {data_dir}; run `mimoflash prepare-data` first")
        self.meta = json.loads(meta_file.read_text())
        if seq_len < 1 or n_future < 0:
            raise ValueError(f"need seq_len >= 1 and n_future >= 0, got {seq_len}, {n_future}")
        self.seq_len, self.n_future = seq_len, n_future
        self.separator_id = int(self.meta["separator_id"])
        path = data_dir / self.meta.get(split, {}).get("file", f"{split}.bin")
        if not path.is_file():
            raise FileNotFoundError(f"split {split!r} not found: {path}")
        n_tokens = path.stat().st_size // np.dtype(self.meta["dtype"]).itemsize
        # A window holds seq_len inputs plus the main target plus n_future MTP targets.
        self.window = seq_len + 1 + n_future
        if n_tokens < self.window:
            raise ValueError(
                f"split {split!r} has {n_tokens} tokens, fewer than one window of {self.window} "
                f"(seq_len {seq_len} + 1 + n_future {n_future})"
            )
        self.tokens = np.memmap(path, dtype=self.meta["dtype"], mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def batch_at(self, starts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows starting at the given token offsets -> (input_ids (B, T), targets (B, 1+n_future, T))."""
        T, F = self.seq_len, self.n_future
        starts = np.asarray(starts, dtype=np.int64)
        if starts.size and (starts.min() < 0 or starts.max() > len(self.tokens) - self.window):
            raise IndexError(f"window start out of range [0, {len(self.tokens) - self.window}]")
        idx = starts[:, None] + np.arange(self.window)  # (B, W)
        chunk = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))  # (B, W), W = T + 1 + F
        # seps[:, j] counts separators in chunk[:, 0..j], so those strictly between input t and its
        # target t+1+k (positions t+1..t+k) number seps[:, t+k] - seps[:, t].
        seps = torch.cumsum(chunk == self.separator_id, dim=1)  # (B, W)
        targets = []
        for k in range(F + 1):
            tgt = chunk[:, 1 + k : 1 + k + T]  # (B, T)
            crossed = seps[:, k : k + T] - seps[:, :T]  # (B, T)
            targets.append(tgt.masked_fill(crossed > 0, IGNORE_INDEX))
        return chunk[:, :T].contiguous(), torch.stack(targets, dim=1)  # (B, T), (B, 1+F, T)

    def get_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of windows at uniformly random offsets drawn from `generator` (CPU int64 tensors)."""
        high = len(self.tokens) - self.window + 1
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        return self.batch_at(starts.numpy())

    def iter_eval_batches(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Walk the split in order with non-overlapping input windows; the last batch may be smaller."""
        n_windows = (len(self.tokens) - 1 - self.n_future) // self.seq_len
        starts = np.arange(n_windows, dtype=np.int64) * self.seq_len
        for b, i in enumerate(range(0, n_windows, batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.batch_at(starts[i : i + batch_size])


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Tokenize a corpus for training.

    Example:
        mimoflash prepare-data --input src/ --glob '*.py' --tokenizer runs/tok --out data/py
    """
    from ..cli import HelpFormatter
    parser = argparse.ArgumentParser(prog="mimoflash prepare-data", description=main.__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--input", action="append", required=True, help="file or directory (repeatable)")
    parser.add_argument("--glob", default="*", help="file-name pattern for directories")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    parser.add_argument("--out", required=True, help="output directory for train.bin, val.bin, meta.json")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of the files held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file shuffle that picks the held-out files")
    parser.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"],
                        help="token storage (auto: uint16 when the vocabulary fits)")
    args = parser.parse_args(argv)

    files = collect_files(args.input, args.glob)
    if not files:
        parser.error(f"no files matching {args.glob!r} under {args.input}")
    source = f"{' '.join(args.input)} (glob {args.glob!r}, {len(files)} files)"
    meta = prepare_data(files, args.tokenizer, args.out, args.val_fraction, args.seed, args.dtype, source)
    print(
        f"train: {meta['train']['docs']} docs, {meta['train']['tokens']:,} tokens | "
        f"val: {meta['val']['docs']} docs, {meta['val']['tokens']:,} tokens | "
        f"skipped files: {skip_summary(Counter(meta['skipped_files']))} | {meta['dtype']} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
