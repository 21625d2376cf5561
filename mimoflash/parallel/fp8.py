"""A rank's block-FP8 weights kept compressed: its slices of the FP8 projections stay E4M3 with their scales.

On an E4M3 checkpoint whose other weights are bf16 (the release), `weight_dtype="auto"` keeps the FP8 weights
compressed in one process (engine/fp8_layout.py); a tensor-parallel rank does the same with its share:

* each FP8 projection the rank slices (q / k / v rows, the dense MLP's gate / up rows and down columns, the MTP
  blocks' MLP) becomes an `fp8_layout.FP8Linear` at the rank's shape, filled with the E4M3 bytes of its rows and
  columns and the scales of the tiles they lie in. A column range must start on a tile edge; a row range that does
  not (a KV head narrower than a tile) gets a finer row grid: rows of `g` (dividing the tile rows and the range's
  ends), each tile's scale repeated for its row groups: the same weight values, no requantisation;
* the rank's routed experts [lo, hi) of each MoE layer are `fp8_layout.FP8Experts` over an `ExpertStore` holding
  only those experts (zero-copy views of the mapped files, read when routed, as in one process), under local ids;
  the router stays replicated (parallel/modules.ParallelMoE picks the rank's pairs);
* q|k|v are fused into one FP8 product per attention (`fp8_layout.fuse_fp8_qkv`), as in one process.

So the rank's resident FP8 bytes are its share of the checkpoint's, and results equal one process's FP8 path up to
the order of the partial sums. A `memory_budget` (a bounded expert cache) stays single-process.
"""

from __future__ import annotations

import math

import torch

from ..checkpoint import keys
from ..engine.expert_store import ExpertStore
from ..engine.fp8_layout import FP8Experts, FP8Linear, fuse_fp8_qkv
from .shard import _FP8_ST_DTYPES, ShardPlan

_MIN_ROWS = 16              # finest row grid accepted (the kernel rescales x per block row)


def _block(plan: ShardPlan, name: str, shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) tile grid of the rank's slice of FP8 weight `name` (module docstring)."""
    index = plan.index(name) + (slice(None),) * 2
    (r0, r1), (c0, c1) = (s.indices(n)[:2] for s, n in zip(index[:2], shape))
    br, bc = block
    g = math.gcd(br, r0, r1)
    if g < min(br, _MIN_ROWS) or c0 % bc or (c1 % bc and c1 != shape[1]):
        raise ValueError(f"{name}: rows [{r0}, {r1}) / columns [{c0}, {c1}) of this rank do not lie on the FP8 "
                         f"tiles ({br} x {bc}) of the checkpoint: use weight_dtype='bfloat16' with "
                         f"tensor_parallel_size={plan.world}")
    return g, bc


def swap_fp8(model, plan: ShardPlan, reader) -> dict[str, tuple[int, int]]:
    """On the rank's meta model (called outside the meta device context: the store maps the files): FP8 projections
    -> FP8Linear at the rank's shapes, FP8 routed experts -> FP8Experts over the rank's ExpertStore (set as
    model.expert_store) -> {weight name: its grid}."""
    block = tuple(plan.config.fp8_block_size)
    store = ExpertStore(reader.root, reader.weight_map)
    grids, fp8_names = {}, []
    for name in list(model.state_dict(keep_vars=True)):
        if keys.is_stacked_expert(name):
            first = keys.expert_name(name, 0)
            if not name.endswith("gate_proj") or reader.info[first][2] not in _FP8_ST_DTYPES:
                continue
            prefix = name[:-len(".gate_proj")]
            moe = model.get_submodule(prefix[:-len(".experts")])
            lo, hi = plan.experts
            E, F, D = moe.experts.gate_proj.shape
            moe.experts = FP8Experts(store, store.add_layer(prefix, hi - lo, first=lo), E, D, F, block)
        elif name in reader.info and reader.info[name][2] in _FP8_ST_DTYPES:
            fp8_names.append(name)
    # One row grid per block (the finest its slices need): the fused q|k|v product and the fused decode step take
    # one grid per attention / MLP.
    per_block: dict[str, list[str]] = {}
    for name in fp8_names:
        per_block.setdefault(name.split(".self_attn.")[0].split(".mlp.")[0], []).append(name)
    for names in per_block.values():
        got = {n: _block(plan, n, reader.info[n][1], block) for n in names}
        g = math.gcd(*(r for r, _ in got.values()))
        if g < min(block[0], _MIN_ROWS):
            raise ValueError(f"{', '.join(names)}: this rank's rows need a {g}-row FP8 grid: use "
                             f"weight_dtype='bfloat16' with tensor_parallel_size={plan.world}")
        for name in names:
            grids[name] = (g, block[1])
            parent, child = name[:-len(".weight")].rsplit(".", 1)
            lin = model.get_submodule(f"{parent}.{child}")
            with torch.device("meta"):                 # allocated by the caller's to_empty
                fp8 = FP8Linear(lin.in_features, lin.out_features, grids[name])
            setattr(model.get_submodule(parent), child, fp8)
    model.expert_store = store
    return grids


@torch.no_grad()
def fill_fp8(model, plan: ShardPlan, reader, grids: dict[str, tuple[int, int]]) -> None:
    """Copy the rank's E4M3 bytes and scale rows into the FP8Linears `swap_fp8` made, then fuse q|k|v."""
    br, bc = plan.config.fp8_block_size
    for name, (g, _) in grids.items():
        lin = model.get_submodule(name[:-len(".weight")])
        index = plan.index(name) + (slice(None),) * 2
        (r0, r1), (c0, c1) = (s.indices(n)[:2] for s, n in zip(index[:2], reader.info[name][1]))
        lin.weight.copy_(reader.read_raw(name, (slice(r0, r1), slice(c0, c1))))
        rows = torch.arange(r0, r1, g) // br                                  # each row group's tile row
        s = reader.read_raw(name + keys.SCALE_SUFFIX, (slice(r0 // br, -(-r1 // br)), slice(c0 // bc, -(-c1 // bc))))
        lin.weight_scale_inv.copy_(s.index_select(0, rows - r0 // br))
    fuse_fp8_qkv(model)
    model.model.register_forward_pre_hook(model.expert_store.on_forward)
