"""Routed experts read from the checkpoint's safetensors files through mmap, only when routed.

MiMo-V2-Flash routes each token to 8 of 256 experts per layer, so a decode step touches ~3% of the expert bytes,
and experts are ~97% of the model (docs/MODEL.md §1). `ExpertStore` maps every shard that holds experts
(`SafetensorsMap`: a private, never-written mapping) and hands out zero-copy tensor views of one expert's six
tensors (gate / up / down weights and their FP8 scale grids). A page of the file enters the process only when an
expert on it is routed and the kernel reads it.

The cache. `capacity` bytes of experts may stay resident (None: no bound, every expert once read stays, the whole
model ends up in RAM; 0: none). The experts resident are kept in least-recently-used order; an expert that does not
fit, or that is evicted, has its pages dropped with `madvise(MADV_DONTNEED)`, so they leave the process's resident
set (the page cache may keep them, which makes the next read cheap but costs this process nothing). A page shared
by two experts' tensors (file layouts are not page aligned) is only dropped with the second; at most two pages per
tensor stay beyond the bound.

Statistics, per step and in total (`stats()`): experts touched, bytes read (the sizes of experts that were not
resident when routed: read from the page cache or disk), cache hits and misses. A step begins at each forward of
the model (`begin_step`, called by a forward pre-hook the FP8 loader registers).

Zero-copy views need the tensors' byte offsets, which the safetensors library does not expose (its `safe_open`
copies each tensor out), so `SafetensorsMap` reads the format's header itself: 8 bytes of little-endian length, then
a JSON object name -> {dtype, shape, data_offsets}. The loader has already validated the same files with the
library.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_ST_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_PAGE = mmap.PAGESIZE
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(value) -> int | None:
    """None, an int of bytes, or a string like "24G", "512MiB", "1.5 GB" (powers of 1024) -> bytes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"memory budget must be bytes (int) or a size like '24G', got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"memory budget {value!r} is not a size: use bytes or e.g. '24G', '512M'")
        n = int(float(m[1]) * 1024 ** " kmgt".index(m[2].lower() or " "))
    if n <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r}")
    return n


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int:
    """This process's resident set size in bytes (0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except OSError:
        return 0


class SafetensorsMap:
    """One safetensors file mapped privately (copy-on-write, never written), with zero-copy views of its tensors."""

    def __init__(self, path: Path):
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        try:
            (n,) = struct.unpack("<Q", self.mm[:8])
            header = json.loads(self.mm[8:8 + n])
        except (struct.error, ValueError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from e
        self.base = 8 + n
        self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
        if hasattr(mmap, "MADV_RANDOM"):
            self.mm.madvise(mmap.MADV_RANDOM)       # no readahead: only the routed experts' pages are read

    def span(self, name: str) -> tuple[int, int]:
        a, b = self.entries[name]["data_offsets"]
        return self.base + a, self.base + b

    def view(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        dtype = _ST_DTYPES.get(e["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: {name} has dtype {e['dtype']}, which the expert store does not read")
        a, b = self.span(name)
        if b == a:
            return torch.empty(e["shape"], dtype=dtype)
        raw = torch.frombuffer(self.mm, dtype=torch.uint8, count=b - a, offset=a)
        return raw.view(dtype).view(e["shape"])

    def drop(self, a: int, b: int) -> None:
        """Release the whole pages inside [a, b) from this process (they are re-read from the file when next used)."""
        lo, hi = -(-a // _PAGE) * _PAGE, b // _PAGE * _PAGE
        if hi > lo:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


@dataclass
class ExpertStats:
    """Counters of expert reads. `step_*`: the last step (a model forward); the others: since loading."""
    steps: int = 0
    step_touched: int = 0
    step_bytes_read: int = 0
    step_hits: int = 0
    step_misses: int = 0
    touched: int = 0
    bytes_read: int = 0
    hits: int = 0
    misses: int = 0
    resident_bytes: int = 0
    capacity: int | None = None

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    @property
    def step_hit_rate(self) -> float:
        n = self.step_hits + self.step_misses
        return self.step_hits / n if n else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(hit_rate=self.hit_rate, step_hit_rate=self.step_hit_rate)
        return d


@dataclass
class _Expert:
    views: list[torch.Tensor]                   # gate w, gate s, up w, up s, down w, down s
    spans: list[tuple[SafetensorsMap, int, int]]
    nbytes: int
    ptrs: list[int] = field(default_factory=list)


class ExpertStore:
    """The routed experts of every MoE layer, as views into the mapped shards, with an LRU cache of `capacity`
    bytes (None = unbounded). Keys are (layer key, expert index)."""

    PROJS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, root: Path, weight_map: dict[str, str], capacity: int | None = None):
        self.root, self.weight_map, self.capacity = Path(root), weight_map, capacity
        self._maps: dict[str, SafetensorsMap] = {}
        self._experts: dict[tuple[str, int], _Expert] = {}
        self._keys: dict[str, list[tuple[str, int]]] = {}    # layer key -> its experts' keys (record_steps)
        self._lru: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._stats = ExpertStats(capacity=capacity)
        self._step_seen: set = set()
        self._ever: set = set()                 # every (layer, expert) read since loading
        self._dirty = False                     # pages were faulted in since the last sweep
        self.total_bytes = 0

    def file(self, file: str) -> SafetensorsMap:
        """The mapping of one shard (opened once, shared by the loader's copies and the experts' views)."""
        return self._map(file)

    def _map(self, file: str) -> SafetensorsMap:
        if file not in self._maps:
            self._maps[file] = SafetensorsMap(self.root / file)
        return self._maps[file]

    def add_layer(self, prefix: str, num_experts: int, first: int = 0) -> str:
        """Register `<prefix>.<first + e>.{gate,up,down}_proj.weight` (+ `_scale_inv`) as expert e, for
        e < num_experts -> layer key. `first`: a tensor-parallel rank's experts start there (parallel/fp8.py)."""
        for e in range(num_experts):
            views, spans = [], []
            for proj in self.PROJS:
                for name in (f"{prefix}.{first + e}.{proj}.weight", f"{prefix}.{first + e}.{proj}.weight_scale_inv"):
                    m = self._map(self.weight_map[name])
                    views.append(m.view(name))
                    spans.append((m, *m.span(name)))
            ex = _Expert(views, spans, sum(b - a for _, a, b in spans))
            ex.ptrs = [v.data_ptr() for v in views]
            self._experts[(prefix, e)] = ex
            self.total_bytes += ex.nbytes
        self._keys[prefix] = [(prefix, e) for e in range(num_experts)]
        return prefix

    def expert(self, layer: str, e: int) -> list[torch.Tensor]:
        """The six views of one expert (no statistics, no cache change): for references and tests."""
        return self._experts[(layer, e)].views

    def expert_bytes(self, layer: str, e: int) -> int:
        return self._experts[(layer, e)].nbytes

    def set_capacity(self, capacity: int | None) -> None:
        """Bound the cache (bytes; None = unbounded), evicting least recently used experts to fit."""
        self.capacity = self._stats.capacity = capacity
        while capacity is not None and self._lru and self._stats.resident_bytes > capacity:
            self._evict(next(iter(self._lru)))
        if capacity is not None:
            self.sweep()

    def sweep(self) -> None:
        """Drop every mapped page outside the resident experts. Reading a page of a mapped file makes Linux map its
        neighbours too when they are in the page cache ("fault-around", 64 KB windows), so pages of experts that
        were not routed, or of tensors the loader copied, can enter the resident set at a tensor's edges. With a
        bounded cache each step starts with this sweep (one madvise per gap between resident experts)."""
        keep: dict[int, list[tuple[int, int]]] = {}
        for key in self._lru:
            for m, a, b in self._experts[key].spans:
                keep.setdefault(id(m), []).append((a, b))
        for m in self._maps.values():
            end = 0
            for a, b in sorted(keep.get(id(m), ())):
                m.drop(end, a)
                end = max(end, b)
            m.drop(end, len(m.mm))
        self._dirty = False

    # ------------------------------------------------------------------ the hot path
    def on_forward(self, module, args) -> None:
        """Forward pre-hook on the model: each forward is one step of the statistics."""
        self.begin_step()

    def begin_step(self) -> None:
        if self._dirty and self.capacity is not None:
            self.sweep()
        s = self._stats
        s.steps += 1
        s.step_touched = s.step_bytes_read = s.step_hits = s.step_misses = 0
        self._step_seen = set()

    def acquire(self, layer: str, ids: list[int]) -> torch.Tensor:
        """Experts `ids` of `layer` are about to be read -> their pointers (n, 6) int64 (for kernels.fp8); counts
        hits / misses and makes room in the cache. Call `release` with the same ids after the product."""
        s = self._stats
        rows, wanted = [], set(ids)
        for e in ids:
            key = (layer, e)
            ex = self._experts[key]
            if key not in self._step_seen:
                self._step_seen.add(key)
                self._ever.add(key)
                s.step_touched += 1
                s.touched += 1
            if key in self._lru:
                self._lru.move_to_end(key)
                s.hits += 1
                s.step_hits += 1
            else:
                self._dirty = True
                s.misses += 1
                s.step_misses += 1
                s.bytes_read += ex.nbytes
                s.step_bytes_read += ex.nbytes
                while self.capacity is not None and s.resident_bytes + ex.nbytes > self.capacity:
                    victim = next((k for k in self._lru if k[0] != layer or k[1] not in wanted), None)
                    if victim is None:          # everything resident is in use by this call: do not admit
                        break
                    self._evict(victim)
                if self.capacity is None or s.resident_bytes + ex.nbytes <= self.capacity:
                    self._lru[key] = None
                    s.resident_bytes += ex.nbytes
            rows.append(ex.ptrs)
        return torch.tensor(rows, dtype=torch.int64).view(-1, 6)

    def record_steps(self, layers: list[str], steps: list[list[list[int]]]) -> None:
        """The statistics and cache order of decode steps that already ran (the fused step reads experts by address,
        engine/fp8_layout.py): steps[i][j] = the expert ids layer layers[j] routed to in step i (repeats allowed).
        The same result as, per step, `begin_step` then `acquire` + `release` of each layer's distinct ids in
        ascending order (the reference, which a bounded cache or a repeated layer runs: it evicts and drops pages).
        Unbounded, nothing is evicted or dropped and no pointers are wanted: only the counters and the LRU order.
        A step's experts are then distinct keys (distinct layers, distinct ids), so it touched hits + misses of
        them; the keys read before are those resident (`_ever` only gains the misses)."""
        if self.capacity is not None or len(set(layers)) != len(layers):
            for step in steps:
                self.begin_step()
                for layer, row in zip(layers, step):
                    picked = sorted(set(row))
                    self.acquire(layer, picked)
                    self.release(layer, picked)
            return
        if not steps:
            return
        lru = self._lru
        keys = [self._keys[layer] for layer in layers]          # the (layer, e) tuples, made once per layer
        hits, missed = 0, []
        for step in steps:
            hits0, missed0 = hits, len(missed)                  # where the last step's counts begin
            for layer_keys, row in zip(keys, step):
                if len(row) == 2:                                # one row, top-2: the common case, without a set
                    a, b = row
                    row = (a, b) if a < b else (b, a) if a > b else (a,)
                else:
                    row = sorted(set(row))
                for e in row:
                    key = layer_keys[e]
                    if key in lru:
                        lru.move_to_end(key)
                        hits += 1
                    else:
                        lru[key] = None
                        missed.append(key)
        nbytes = [self._experts[k].nbytes for k in missed]
        read, last_read = sum(nbytes), sum(nbytes[missed0:])
        s = self._stats
        s.steps += len(steps)
        s.touched += hits + len(missed)
        s.hits, s.misses, s.bytes_read, s.resident_bytes = (s.hits + hits, s.misses + len(missed), s.bytes_read + read,
                                                            s.resident_bytes + read)
        s.step_hits, s.step_misses, s.step_bytes_read = hits - hits0, len(missed) - missed0, last_read
        s.step_touched = s.step_hits + s.step_misses
        self._ever.update(missed)
        self._step_seen = {k[e] for k, row in zip(keys, steps[-1]) for e in row}
        self._dirty = self._dirty or bool(missed)

    def release(self, layer: str, ids: list[int]) -> None:
        """After the product: experts that the cache did not admit leave memory now."""
        for e in ids:
            if (layer, e) not in self._lru:
                self._drop(self._experts[(layer, e)])

    def _evict(self, key) -> None:
        del self._lru[key]
        ex = self._experts[key]
        self._stats.resident_bytes -= ex.nbytes
        self._drop(ex)

    @staticmethod
    def _drop(ex: _Expert) -> None:
        for m, a, b in ex.spans:
            m.drop(a, b)

    def stats(self) -> ExpertStats:
        return ExpertStats(**{k: getattr(self._stats, k) for k in ExpertStats.__dataclass_fields__})

    def touched_keys(self) -> set[tuple[str, int]]:
        """Every (layer, expert) read since loading."""
        return set(self._ever)

    def resident_keys(self) -> list[tuple[str, int]]:
        return list(self._lru)

    def mapped_rss(self) -> int:
        """Resident bytes of this store's mappings, as the kernel counts them (/proc/self/smaps), or -1 if unknown."""
        starts = {}
        for m in self._maps.values():
            buf = (ctypes_addr(m.mm), len(m.mm))
            starts[buf[0]] = buf[1]
        total, cur = 0, None
        try:
            with open("/proc/self/smaps") as f:
                for line in f:
                    if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                        lo = int(line.split("-", 1)[0], 16)
                        cur = lo if lo in starts else None
                    elif cur is not None and line.startswith("Rss:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            return -1
        return total


def ctypes_addr(mm: mmap.mmap) -> int:
    """Start address of a mapping (through a zero-length-safe buffer view)."""
    import ctypes
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))
