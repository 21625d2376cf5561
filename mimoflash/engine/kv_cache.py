"""The hybrid KV cache: paged blocks for global-attention layers, a fixed ring per sequence for sliding layers.

Why two pools. A global (GA) layer's query attends to every earlier token, so its K/V grows with the context; it is
kept in fixed-size *blocks* (`block_size` tokens each) listed in a per-sequence block table, so memory is handed out
as the sequence grows and returned without fragmentation (vLLM's paged attention, nano-vllm's block manager).
A sliding-window (SWA) layer only ever looks at the last `swa_keys` tokens, so it gets a *ring* of `ring_slots`
slots per sequence: position p lives in slot `p % ring_slots`, and the ring never grows. For MiMo-V2-Flash (39 of 48
layers SWA, window 128) this is what makes long contexts cheap: at 32k tokens the SWA layers hold 129 positions
instead of 32k.

Ring size. `ring_slots = swa_keys + max_draft`. A step reads the ring *before* writing the step's new tokens (the
runner appends them to the keys it gathered), so a query at position q needs positions `q - swa_keys + 1 .. q - 1`
to still be there: `swa_keys - 1` slots. Speculative decoding writes up to `max_draft + 1` tokens and may roll back
all but one of them: the rejected tokens overwrote slots that held positions we still need after the rollback, so
`max_draft` slots of slack keep them (mlx-lm's `RotatingKVCache` has no slack and so cannot be trimmed once full).
The last slot makes the ring also valid for a write-then-read decode kernel (a fused GPU path would do that).
After a rollback the ring's slots hold some positions "from the future"; they are always outside the window of any
later query (see `tests/test_kv_cache.py::test_ring_rollback`), so masking by position hides them.

Budget. One number, `kv_cache_memory` (bytes, or a fraction of RAM / free GPU memory when <= 1), is split from the
model's shape: every running sequence needs one ring (a fixed cost) and at least one block, so
`num_rings = min(max_num_seqs, budget // (ring_bytes + block_bytes))` and every remaining byte becomes blocks.
K and V are stored with their own head dims (192 and 128 in the real model), never padded to a common width.


`KVCacheManager` is the pure-Python bookkeeping the scheduler consults; `KVCache` owns the tensors the runner
reads and writes. MTP blocks are SWA layers with ids `num_hidden_layers + n`; `include_mtp=True` gives them rings.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..config import MiMoConfig
from . import hugepages
from .request import Request


@dataclass(frozen=True)
class CacheLayout:
    global_layers: tuple[int, ...]        # layer ids with paged K/V
    sliding_layers: tuple[int, ...]       # layer ids with rings (incl. MTP ids L+n when include_mtp)
    global_shape: tuple[int, int, int]    # (kv heads, qk dim, v dim)
    sliding_shape: tuple[int, int, int]
    block_size: int
    num_blocks: int
    ring_slots: int
    num_rings: int
    swa_keys: int
    dtype: torch.dtype

    @property
    def elem_bytes(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def block_bytes(self) -> int:
        h, d, dv = self.global_shape
        return len(self.global_layers) * self.block_size * h * (d + dv) * self.elem_bytes

    @property
    def ring_bytes(self) -> int:
        h, d, dv = self.sliding_shape
        return len(self.sliding_layers) * self.ring_slots * h * (d + dv) * self.elem_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes + self.num_rings * self.ring_bytes

    @property
    def token_capacity(self) -> int:
        """Most tokens one sequence can hold in the global layers (all blocks)."""
        return self.num_blocks * self.block_size if self.global_layers else 1 << 62

    def bytes_per_sequence(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size) * self.block_bytes + (self.ring_bytes if self.sliding_layers
                                                                              else 0)


def resolve_memory(kv_cache_memory: int | float, device: torch.device) -> int:
    """Bytes, or a fraction (<= 1) of free GPU memory / available RAM."""
    if kv_cache_memory is None or kv_cache_memory <= 0:
        raise ValueError(f"kv_cache_memory must be > 0 (bytes, or a fraction <= 1), got {kv_cache_memory!r}")
    if kv_cache_memory > 1:
        return int(kv_cache_memory)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * kv_cache_memory)
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(avail * kv_cache_memory)


def plan_cache(config: MiMoConfig, memory_bytes: int, *, max_num_seqs: int, block_size: int = 16,
               max_draft: int = 0, include_mtp: bool = False, dtype: torch.dtype = torch.float32) -> CacheLayout:
    """Split `memory_bytes` between the ring pool and the block pool (see the module docstring)."""
    if block_size < 1 or max_num_seqs < 1 or max_draft < 0:
        raise ValueError(f"block_size={block_size}, max_num_seqs={max_num_seqs}, max_draft={max_draft} out of range")
    L = config.num_hidden_layers
    glob = tuple(i for i in range(L) if not config.is_sliding(i))
    slid = tuple(i for i in range(L) if config.is_sliding(i))
    if include_mtp:
        slid += tuple(L + n for n in range(config.num_nextn_predict_layers))
    gshape, sshape = config.attn_shape(False)[1:], config.attn_shape(True)[1:]
    proto = CacheLayout(glob, slid, gshape, sshape, block_size, 0, config.swa_keys + max_draft, 0,
                        config.swa_keys, dtype)
    per_seq_min = proto.ring_bytes + proto.block_bytes
    num_rings = min(max_num_seqs, memory_bytes // per_seq_min) if per_seq_min else max_num_seqs
    if num_rings < 1:
        raise ValueError(f"kv_cache_memory={memory_bytes} bytes is too small: one sequence needs at least "
                         f"{per_seq_min} bytes (one ring of {proto.ring_slots} slots x {len(slid)} sliding layers "
                         f"+ one block of {block_size} tokens x {len(glob)} global layers)")
    rest = memory_bytes - (num_rings * proto.ring_bytes if slid else 0)
    num_blocks = rest // proto.block_bytes if glob else 0
    return CacheLayout(glob, slid, gshape, sshape, block_size, int(num_blocks), proto.ring_slots,
                       int(num_rings) if slid else 0, config.swa_keys, dtype)


class KVCacheManager:
    """Pure-Python accounting: which blocks and ring a request holds. Block ids and ring ids start at 0; the
    tensor slot of (block b, offset o) is `b * block_size + o` and of (ring r, position p) `r * R + p % R`, so a
    block or a ring is one contiguous run of slots."""

    def __init__(self, layout: CacheLayout):
        self.layout = layout
        self.free_blocks: list[int] = list(range(layout.num_blocks - 1, -1, -1))   # pop() hands out low ids first
        self.free_rings: list[int] = list(range(layout.num_rings - 1, -1, -1))
        self.uses_blocks = bool(layout.global_layers)
        self.uses_rings = bool(layout.sliding_layers)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_free_rings(self) -> int:
        return len(self.free_rings)

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        if not self.uses_blocks:
            return 0
        total = math.ceil((req.num_computed_tokens + num_new_tokens) / self.layout.block_size)
        return max(0, total - len(req.block_ids))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        ring_ok = not self.uses_rings or req.ring_id is not None or bool(self.free_rings)
        return ring_ok and self.blocks_needed(req, num_new_tokens) <= len(self.free_blocks)

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        """Make room for `num_new_tokens` more tokens of `req` (blocks as needed, a ring on first use)."""
        need = self.blocks_needed(req, num_new_tokens)
        if need > len(self.free_blocks):
            raise RuntimeError(f"{req.request_id}: need {need} blocks, {len(self.free_blocks)} free")
        req.block_ids.extend(self.free_blocks.pop() for _ in range(need))
        if self.uses_rings and req.ring_id is None:
            if not self.free_rings:
                raise RuntimeError(f"{req.request_id}: no free ring")
            req.ring_id = self.free_rings.pop()

    def free(self, req: Request) -> None:
        """Return everything `req` holds (finish, abort, preemption)."""
        if len(set(req.block_ids)) != len(req.block_ids):
            raise RuntimeError(f"{req.request_id}: duplicate block ids")
        self.free_blocks.extend(reversed(req.block_ids))
        req.block_ids = []
        if req.ring_id is not None:
            self.free_rings.append(req.ring_id)
            req.ring_id = None
        if len(self.free_blocks) > self.layout.num_blocks or len(self.free_rings) > self.layout.num_rings:
            raise RuntimeError("KV cache accounting: more free blocks or rings than the pools hold")

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Forget cached tokens from position `num_tokens` on (rejected speculative drafts). Blocks past the new end
        go back to the pool; the ring needs nothing (its slack covers `max_draft` overwritten slots)."""
        if not 0 <= num_tokens <= req.num_computed_tokens:
            raise ValueError(f"{req.request_id}: rollback to {num_tokens}, outside 0..{req.num_computed_tokens}")
        keep = math.ceil(num_tokens / self.layout.block_size) if self.uses_blocks else 0
        self.free_blocks.extend(reversed(req.block_ids[keep:]))
        del req.block_ids[keep:]
        req.num_computed_tokens = num_tokens


class KVCache:
    """The tensors: per kind one (layers, kv heads, slots, dim) tensor for K and one for V.

Head-major, so that the keys of one kv head for a batch of sequences come out of a gather as a (heads, B, K, dim)
tensor that matmul consumes without a transposing copy (the decode path reads every cached key once per step).

    `layer_index[layer_id] = (sliding, i)` maps an attention layer (main or MTP) to its row in the pool."""

    def __init__(self, layout: CacheLayout, device: torch.device | str = "cpu", huge_pages: bool = False):
        self.layout = layout
        self.device = torch.device(device)
        dt = layout.dtype

        def zeros(*shape):
            if huge_pages and self.device.type == "cpu":     # engine/hugepages.py: the same zeros, on 2 MB pages
                return hugepages.zeros(shape, dt)
            return torch.zeros(*shape, dtype=dt, device=device)

        h, d, dv = layout.global_shape
        g_slots = layout.num_blocks * layout.block_size
        nG = len(layout.global_layers)
        self.k_global = zeros(nG, h, g_slots, d)
        self.v_global = zeros(nG, h, g_slots, dv)
        h, d, dv = layout.sliding_shape
        s_slots = layout.num_rings * layout.ring_slots
        nS = len(layout.sliding_layers)
        self.k_ring = zeros(nS, h, s_slots, d)
        self.v_ring = zeros(nS, h, s_slots, dv)
        self.layer_index = {lid: (False, i) for i, lid in enumerate(layout.global_layers)}
        self.layer_index.update({lid: (True, i) for i, lid in enumerate(layout.sliding_layers)})

    def pools(self, layer_id: int) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """-> (sliding, K pool (h, slots, d), V pool (h, slots, dv)) of one layer."""
        if layer_id not in self.layer_index:
            raise KeyError(f"attention layer {layer_id} has no KV cache (MTP layers need include_mtp=True)")
        sliding, i = self.layer_index[layer_id]
        return (sliding, self.k_ring[i], self.v_ring[i]) if sliding else (sliding, self.k_global[i], self.v_global[i])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_global, self.v_global, self.k_ring, self.v_ring))
