"""What one rank of a tensor-/expert-parallel group holds, and reading exactly that from a model or a checkpoint.

`ShardPlan(config, rank, world)` splits the model (docs/PARALLEL.md has the table):
* attention: the query heads of each kind (GA, SWA) evenly, with their sink logits; the KV heads evenly when the
  world size divides them, else (world a multiple of the KV heads: the real model has 4 GA / 8 SWA KV heads) every
  rank keeps the one KV head its query heads read, so KV heads are *replicated* `world / kv_heads` times;
* dense SwiGLU (layer 0): the intermediate dimension (gate/up rows, down columns), split as evenly as it goes;
* routed experts: each rank owns a contiguous range of experts (uneven when the count does not divide); the
  router (a few KB) is replicated so every rank computes the same top-k;
* embedding and LM head: the vocabulary, in equal ranges of ceil(V / world) rows (the last one zero-padded);
* norms, router and rotary tables: replicated;
* MTP blocks (only with `mtp`, for speculative decoding): as a sliding-window layer with a dense MLP.

`rank_config()` is the config each rank's module tree is built from: head counts and the dense intermediate size
are the rank's own, so the engine's KV cache (engine/kv_cache.py sizes it from the config) holds only the rank's
heads. `vocab_size` and `n_routed_experts` stay global (the engine validates token ids against the vocabulary; the
router scores every expert); the modules in parallel/modules.py narrow the embedding, LM head and experts.

Readers. `index(name)` gives, for a parameter name of the full model, the slices of the full tensor this rank
keeps. `StateDictReader` cuts them out of a full state dict (a built model); `CheckpointReader` reads them from the
memory-mapped safetensors files through `safe_open(...).get_slice`, so only the rank's bytes are read: per-expert
tensors of the rank's experts only, and row / column ranges of the projections. Block-FP8 weights (docs/MODEL.md
§4.2) are read on block boundaries: the blocks covering the wanted range with their scale rows / columns, which
are dequantised and then trimmed to the range (an exact cut: a block's scale applies to each of its elements);
`read_raw` reads them as stored for a rank that keeps them FP8 (parallel/fp8.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import keys
from ..config import MiMoConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_MTP = re.compile(r"^model\.mtp\.layers\.(\d+)\.")
_FP8_ST_DTYPES = ("F8_E4M3", "F8_E5M2")


def split_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank's share when n items are split as evenly as possible (the first n % world ranks get one
    more)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class Heads:
    """One attention kind's share: query heads [q_lo, q_hi), KV heads [kv_lo, kv_hi)."""
    q_lo: int
    q_hi: int
    kv_lo: int
    kv_hi: int
    replicated_kv: bool               # True when world > KV heads (each KV head is held by several ranks)


class ShardPlan:
    """`mtp`: also hold the MTP blocks (speculative decoding), split like a sliding-window decoder layer with a dense
    MLP (their eh_proj and norms replicated); without it they are not loaded."""

    def __init__(self, config: MiMoConfig, rank: int, world: int, mtp: bool = False):
        if not (isinstance(world, int) and world >= 1 and 0 <= rank < world):
            raise ValueError(f"rank {rank} of world size {world} is out of range")
        self.config, self.rank, self.world = config, rank, world
        self.mtp = bool(mtp and config.num_nextn_predict_layers)
        self.heads = {s: self._heads(s) for s in (False, True)}
        self.ffn = split_range(config.intermediate_size, world, rank)
        if config.intermediate_size < world:
            raise ValueError(f"intermediate_size={config.intermediate_size} cannot be split over {world} ranks")
        self.moe = any(config.moe_layer_freq)
        self.experts = split_range(config.n_routed_experts, world, rank)
        if self.moe and config.n_routed_experts < world:
            raise ValueError(f"n_routed_experts={config.n_routed_experts} cannot be split over {world} ranks "
                             "(every rank owns at least one expert)")
        self.vocab_per_rank = math.ceil(config.vocab_size / world)
        self.vocab = (min(rank * self.vocab_per_rank, config.vocab_size),
                      min((rank + 1) * self.vocab_per_rank, config.vocab_size))

    def _heads(self, sliding: bool) -> Heads:
        nq, nkv, _, _ = self.config.attn_shape(sliding)
        w, r = self.world, self.rank
        kind = "swa_" if sliding else ""
        if nq % w:
            raise ValueError(f"{kind}num_attention_heads={nq} is not divisible by tensor_parallel_size={w}")
        per = nq // w
        if nkv % w == 0:
            kv = nkv // w
            return Heads(r * per, (r + 1) * per, r * kv, (r + 1) * kv, False)
        if w % nkv == 0:                   # more ranks than KV heads: each rank keeps the one its queries read
            g = nq // nkv
            return Heads(r * per, (r + 1) * per, (r * per) // g, (r * per) // g + 1, True)
        raise ValueError(f"{kind}num_key_value_heads={nkv} and tensor_parallel_size={w}: one must divide the other")

    @property
    def replicated_kv(self) -> bool:
        return any(h.replicated_kv for h in self.heads.values())

    def rank_config(self) -> MiMoConfig:
        """The config of this rank's module tree (module docstring); no MTP blocks unless `mtp`."""
        ga, swa = self.heads[False], self.heads[True]
        return self.config.replace(
            num_attention_heads=ga.q_hi - ga.q_lo, num_key_value_heads=ga.kv_hi - ga.kv_lo,
            swa_num_attention_heads=swa.q_hi - swa.q_lo, swa_num_key_value_heads=swa.kv_hi - swa.kv_lo,
            intermediate_size=self.ffn[1] - self.ffn[0],
            num_nextn_predict_layers=self.config.num_nextn_predict_layers if self.mtp else 0)

    def index(self, name: str) -> tuple[slice, ...]:
        """Full-model parameter name -> the slices (one per leading dim; () = all) of the full tensor this rank
        keeps. The embedding / LM head range may be shorter than the rank's padded table."""
        c = self.config
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (slice(*self.vocab),)
        m = _LAYER.match(name) or _MTP.match(name)
        if m is None:
            return ()                                                   # final norm: replicated
        sliding = m.re is _MTP or c.is_sliding(int(m[1]))                # MTP blocks: sliding-window attention
        rest = name[m.end():]
        h = self.heads[sliding]
        _, _, d, dv = c.attn_shape(sliding)
        if rest == "self_attn.q_proj.weight":
            return (slice(h.q_lo * d, h.q_hi * d),)
        if rest == "self_attn.k_proj.weight":
            return (slice(h.kv_lo * d, h.kv_hi * d),)
        if rest == "self_attn.v_proj.weight":
            return (slice(h.kv_lo * dv, h.kv_hi * dv),)
        if rest == "self_attn.o_proj.weight":
            return (slice(None), slice(h.q_lo * dv, h.q_hi * dv))
        if rest == "self_attn.attention_sink_bias":
            return (slice(h.q_lo, h.q_hi),)
        if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            return (slice(*self.ffn),)
        if rest == "mlp.down_proj.weight":
            return (slice(None), slice(*self.ffn))
        if rest in ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"):
            return (slice(*self.experts),)
        return ()                                                       # norms, router: replicated


class StateDictReader:
    """Slices of a full model's state dict (a built model: tests, notebooks)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.sd = state_dict

    def shape(self, name: str) -> tuple[int, ...] | None:
        t = self.sd.get(name)
        return None if t is None else tuple(t.shape)

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.sd[name][index]

    def close(self) -> None:
        pass


class CheckpointReader:
    """Slices of a checkpoint directory's tensors, read from memory-mapped safetensors (module docstring) through the
    loader's handles (checkpoint/loader.py: opened lazily, closed and reopened every 128 MiB of reads so the mapped
    pages leave RSS). Names are the model's (stacked experts: `...mlp.experts.gate_proj`), mapped to the per-expert
    checkpoint names by checkpoint/keys.py."""

    def __init__(self, root: Path, config: MiMoConfig):
        from ..checkpoint.loader import _read_headers, _Shards, _weight_map
        self.root, self.block = Path(root), config.fp8_block_size
        self.weight_map = _weight_map(self.root)
        self.info = _read_headers(self.root, self.weight_map)       # name -> (file, shape, safetensors dtype)
        self.shards = _Shards(self.root)
        self._done = 0                                               # bytes read before the last reopening

    @property
    def read_bytes(self) -> int:
        """Bytes read so far (FP8 blocks count as stored)."""
        return self._done + self.shards.read

    def _slice(self, name: str):
        before = self.shards.read
        sl = self.shards.get_slice(self.weight_map[name], name)
        if self.shards.read < before:                                # the handles were reopened: count what was read
            self._done += before
        return sl

    def _count(self, t: torch.Tensor) -> None:
        self.shards.read += t.numel() * t.element_size()

    def shape(self, name: str) -> tuple[int, ...] | None:
        if not keys.is_stacked_expert(name):
            got = self.info.get(name)
            return None if got is None else got[1]
        per = [self.info.get(keys.expert_name(name, e)) for e in range(self.count_experts(name))]
        if not per:
            return None
        return (len(per),) + tuple(per[0][1])

    def count_experts(self, name: str) -> int:
        e = 0
        while keys.expert_name(name, e) in self.info:
            e += 1
        return e

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        if not keys.is_stacked_expert(name):
            return self._read(name, index)
        lo, hi = index[0].start, index[0].stop
        return torch.stack([self._read(keys.expert_name(name, e), index[1:]) for e in range(lo, hi)])

    def read_raw(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Slices of a tensor as stored (FP8 bytes stay FP8: parallel/fp8.py)."""
        t = self._slice(name)[index]
        self._count(t)
        return t

    def _read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        from ..checkpoint.fp8 import dequantize_fp8_block
        from ..checkpoint.loader import CheckpointError
        _, shape, st = self.info[name]
        full = tuple(index) + (slice(None),) * (len(shape) - len(index))
        spans = [s.indices(n)[:2] for s, n in zip(full, shape)]                       # [(lo, hi)] per dim
        sl = self._slice(name)
        if st not in _FP8_ST_DTYPES:
            t = sl[tuple(slice(lo, hi) for lo, hi in spans)]
            self._count(t)
            return t
        scale_name = name + keys.SCALE_SUFFIX
        if self.block is None or scale_name not in self.info or len(shape) != 2:
            raise CheckpointError(f"{name} is FP8 but has no usable {scale_name} / weight_block_size")
        (r0, r1), (c0, c1) = spans
        br, bc = self.block
        R0, C0 = r0 // br * br, c0 // bc * bc                                         # covering blocks
        R1, C1 = min(shape[0], -(-r1 // br) * br), min(shape[1], -(-c1 // bc) * bc)
        w = sl[R0:R1, C0:C1]
        s = self._slice(scale_name)[R0 // br:-(-R1 // br), C0 // bc:-(-C1 // bc)]
        self._count(w)
        self._count(s)
        t = dequantize_fp8_block(w, s, self.block, torch.float32, name=name)
        return t[r0 - R0:r1 - R0, c0 - C0:c1 - C0]

    def close(self) -> None:
        self._done += self.shards.read
        self.shards.close()
