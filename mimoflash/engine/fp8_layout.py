"""FP8 checkpoints run as shipped: block-FP8 weights stay FP8 in memory, experts are read from the files when routed.

The release stores its projections as E4M3 bytes with one fp32 scale per 128 x 128 tile (docs/MODEL.md §4.3).
Dequantising them to bf16 at load time, as the plain loader does for `weight_dtype="bfloat16"`, doubles the bytes
and rounds every weight. Here they stay as they are and the products dequantise tile by tile inside the kernels
(kernels/fp8.c), so:

* resident weight memory is about the checkpoint's size (the bf16 tensors it already has, plus its FP8 bytes);
* results are the fp32 dequantisation's up to rounding order (activations and accumulation in fp32);
* no whole-model fp32 or bf16 copy exists while loading: the model is built on the meta device, the FP8
  projections are swapped for `FP8Linear` (which holds `weight` and `weight_scale_inv` under the checkpoint's names),
  the routed experts for `FP8Experts`, and only then is memory allocated and filled tensor by tensor.

`FP8Experts` reads its experts through an `ExpertStore` (engine/expert_store.py): zero-copy views into the mapped
shards, touched only when routed, with an LRU cache bounded by `memory_budget`. `print(model)` shows these modules.

What stays as it was: bf16 tensors (embedding, o_proj, lm_head, MTP eh_proj) run through the bf16 kernels and the
rest of the engine's CPU layout (engine/cpu_layout.py). Decode steps run the fused one-call-per-layer step
(engine/fused_decode.py) on the E4M3 bytes: `fused_layer_args` fills the kernel's FP8 fields (scale grids, the
experts' addresses from the store) and `account_fused_step` keeps the store's statistics. With a bounded expert
cache (a memory budget) the per-module path runs instead, whose experts are acquired and evicted layer by layer.
The optional packed copy of the bf16 linears (`weight_panels`) is counted: it is made
only if it costs at most `PANEL_SHARE` of the weights' bytes or at most `PANEL_SMALL` bytes (`panels_fit`), and fits
the memory budget (the 152k-row LM head alone is 1.25 GB of panels, 30% of a 2-layer real-shape checkpoint but 0.4%
of the release; a 128M-parameter model's 33 MB LM head reads 1.6x faster at one row from its panels).

The LM head in FP8 (opt-in: `LLM(..., lm_head_fp8=True)`, `quantize_lm_head`). The release keeps its lm_head in
bf16; llama.cpp's Q8_0 files quantise their output tensor too. With the option the bf16 (or fp32) head is quantised
at load time to E4M3 with 128 x 128 block scales, the release's format, and runs as an `FP8Linear`: half the bytes a
decode step reads for it (152k x 4096: 1.25 GB -> 0.63 GB). The logits become those of the dequantised head (each
weight rounded to E4M3 in its tile's scale), so results differ from the bf16 head's by that error: off by default.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import loader as L
from ..checkpoint.fp8 import FP8_DTYPE, dequantize_fp8_block, quantize_fp8_block, scale_shape
from ..kernels import fp8 as kfp8
from ..model.attention import Attention
from ..model.mimo import MiMoForCausalLM
from .expert_store import ExpertStore, available_ram, current_rss, parse_bytes

log = logging.getLogger(__name__)

PANEL_SHARE = 0.10          # panels of the bf16 linears are made only below this share of the weights' bytes,
PANEL_SMALL = 256 << 20     # ... or below this many bytes, whatever the share (a small model)
_MARGIN = 256 << 20         # activations, scratch buffers and allocator slack assumed on top of the counted bytes


class FP8Linear(nn.Module):
    """y = x @ W.T with W = weight (E4M3, (out, in)) * weight_scale_inv (fp32, one scale per `block` tile), computed
    in fp32 by kernels.fp8.linear_fp8. The buffers carry the checkpoint's names, so state_dict() is the checkpoint's."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int]):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE))
        self.register_buffer("weight_scale_inv", torch.empty(scale_shape((out_features, in_features), block)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kfp8.linear_fp8(x if x.dtype == torch.float32 else x.float(), self.weight, self.weight_scale_inv,
                            self.block)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The exact fp32 dequantisation, then F.linear (slow; tests)."""
        return F.linear(x.float(), self.dequantized()).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return dequantize_fp8_block(self.weight, self.weight_scale_inv, self.block, torch.float32)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3 "
                f"block={self.block[0]}x{self.block[1]}")


LM_HEAD_BLOCK = (128, 128)      # the release's tile
_QUANT_ROWS = 8192              # rows of the head quantised at a time (a whole number of tiles): bounded scratch


def check_lm_head_fp8(device: torch.device, compute: torch.dtype) -> None:
    """ValueError unless the FP8 head can run: on CPU, float32 compute, the CPU kernels built (FP8Linear's product
    and the C decode loop's head are fp8.c's; without them every product would dequantise the head again)."""
    if device.type != "cpu" or compute != torch.float32 or not kfp8.available():
        raise ValueError("lm_head_fp8=True runs the LM head through the CPU FP8 kernels: it needs device 'cpu', "
                         f"float32 compute and the kernels built (got device {device.type!r}, compute {compute}, "
                         f"kernels {'built' if kfp8.available() else 'unavailable'})")


def quantize_lm_head(model: nn.Module, block: tuple[int, int] = LM_HEAD_BLOCK) -> FP8Linear:
    """model.lm_head (an nn.Linear without bias, any float weight) -> an FP8Linear holding its weight quantised to
    E4M3 with one fp32 scale per `block` tile (checkpoint/fp8.quantize_fp8_block), swapped in as model.lm_head
    (module docstring: the bytes saved, the numerics). A head tied to the embedding is untied: the embedding keeps
    its weight. Quantised `_QUANT_ROWS` rows at a time (tiles never straddle chunks), so the fp32 scratch stays
    small next to a 152k-row head. -> the new module."""
    head = model.lm_head
    if type(head) is not nn.Linear or head.bias is not None:
        raise ValueError(f"lm_head_fp8=True quantises a bf16/fp32 nn.Linear LM head without bias; this model's is "
                         f"{type(head).__name__}")
    w = head.weight.detach()
    fp8 = FP8Linear(head.in_features, head.out_features, block)
    step = max(block[0], _QUANT_ROWS // block[0] * block[0])
    with torch.no_grad():
        for lo in range(0, w.shape[0], step):
            q, sc = quantize_fp8_block(w[lo:lo + step], block)
            fp8.weight[lo:lo + step].copy_(q)
            fp8.weight_scale_inv[lo // block[0]:lo // block[0] + sc.shape[0]].copy_(sc)
    model.lm_head = fp8
    return fp8


class FP8Experts(nn.Module):
    """`Experts.forward(x_TD, topk_idx_TK, weight_TK)` with each expert's FP8 tensors read from an ExpertStore, only
    for the experts some token picked. Tokens are grouped by expert (one argsort), all picked experts of the layer run
    in one kernel call (kernels.fp8.experts_fp8), outputs are weighted and added back per token in fp32."""

    def __init__(self, store: ExpertStore, layer: str, num_experts: int, hidden: int, inter: int,
                 block: tuple[int, int]):
        super().__init__()
        self.store, self.layer = store, layer
        self.num_experts, self.hidden, self.inter, self.block = num_experts, hidden, inter, tuple(block)

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        T, K = topk_idx_TK.shape
        flat = topk_idx_TK.reshape(-1)
        order = flat.argsort(stable=True)                                     # (T*K,) pairs grouped by expert
        tok_P = order // K
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        ids = [e for e, n in enumerate(counts) if n]
        rows = [counts[e] for e in ids]
        x32 = x_TD if x_TD.dtype == torch.float32 else x_TD.float()
        if not ids:                                                            # no tokens
            return torch.zeros_like(x_TD)
        x_PD = x32.index_select(0, tok_P)                                      # (P, D), expert-sorted
        ptrs = self.store.acquire(self.layer, ids)
        try:
            if kfp8.available() and x_PD.device.type == "cpu" and max(rows) <= kfp8.KERNEL_MAX_ROWS:
                y_PD = kfp8.experts_fp8(x_PD, rows, ptrs, self.hidden, self.inter, self.block)
            else:                                                              # prefill: chunked products
                y_PD = self._per_expert(x_PD, ids, rows, kfp8.linear_fp8)
        finally:
            self.store.release(self.layer, ids)
        y_PD.mul_(weight_TK.float().reshape(-1).index_select(0, order)[:, None])
        out_TD = torch.zeros_like(x32)
        out_TD.index_add_(0, tok_P, y_PD)
        return out_TD if x_TD.dtype == torch.float32 else out_TD.to(x_TD.dtype)

    def _per_expert(self, x_PD, ids, rows, linear) -> torch.Tensor:
        y_PD = torch.empty_like(x_PD)
        lo = 0
        for e, n in zip(ids, rows):
            gw, gs, uw, us, dw, ds = self.store.expert(self.layer, e)
            xe = x_PD[lo:lo + n]
            h = F.silu(linear(xe, gw, gs, self.block)) * linear(xe, uw, us, self.block)
            y_PD[lo:lo + n] = linear(h, dw, ds, self.block)
            lo += n
        return y_PD

    def forward_reference(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor):
        """Every picked expert dequantised exactly to fp32 and run with F.linear, token by token (slow; tests)."""
        out = torch.zeros(x_TD.shape, dtype=torch.float32)
        for t in range(x_TD.shape[0]):
            for e, w in zip(topk_idx_TK[t].tolist(), weight_TK[t].float().tolist()):
                v = self.store.expert(self.layer, e)
                gw, uw, dw = (dequantize_fp8_block(v[i], v[i + 1], self.block, torch.float32) for i in (0, 2, 4))
                x = x_TD[t:t + 1].float()
                out[t] += w * F.linear(F.silu(F.linear(x, gw)) * F.linear(x, uw), dw)[0]
        return out.to(x_TD.dtype)

    def extra_repr(self) -> str:
        cap = self.store.capacity
        return (f"num_experts={self.num_experts}, hidden={self.hidden}, inter={self.inter}, fp8_e4m3 "
                f"block={self.block[0]}x{self.block[1]}, read from {self.store.root.name} when routed, cache "
                f"{'unbounded' if cap is None else f'{cap / 2**20:.0f} MiB'}")


# ---------------------------------------------------------------------------------------------- choosing the mode

def checkpoint_dtypes(path) -> tuple[bool, str | None]:
    """-> (whether the checkpoint's projections are block-FP8, safetensors dtype of its o_proj / lm_head). Reads
    headers only, through the loader's `read_checkpoint` (which the load that follows reuses)."""
    files = L.read_checkpoint(path)
    other = files.dtype_of("model.layers.0.self_attn.o_proj.weight") or files.dtype_of("lm_head.weight")
    return files.dtype_of("model.layers.0.self_attn.q_proj.weight") == "F8_E4M3", other


def wants_fp8(path, weight_dtype, compute: torch.dtype, device: torch.device) -> bool:
    """LLM's choice: keep FP8 when asked ("fp8") or, for "auto", on an E4M3 checkpoint whose other weights are bf16,
    on CPU with fp32 compute and the kernels built. Raises ValueError when "fp8" is asked where it cannot run."""
    asked = weight_dtype in ("fp8", "float8", "float8_e4m3fn")
    if not asked and weight_dtype not in (None, "auto"):
        return False
    is_fp8, other = checkpoint_dtypes(path)
    ok = is_fp8 and device.type == "cpu" and compute == torch.float32 and kfp8.available()
    if asked and not ok:
        why = ("the checkpoint's projections are not E4M3 block-FP8" if not is_fp8 else
               "FP8 weights run on CPU, with float32 compute and the CPU kernels built")
        raise ValueError(f"weight_dtype='fp8' cannot be used here: {why}")
    return ok and (asked or other == "BF16")


def _tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def panels_fit(panel_bytes: int, weight_bytes: int) -> bool:
    """Whether the bf16 linears' panels are worth their memory next to FP8 weights: at most `PANEL_SHARE` of the
    weights' bytes, or at most `PANEL_SMALL` bytes (the memory budget, when given, is checked apart)."""
    return panel_bytes <= max(PANEL_SHARE * weight_bytes, PANEL_SMALL)


def panel_bytes(model: nn.Module) -> int:
    """Bytes the packed copy of the bf16 linears would take (use_bf16_weights packs every bf16 nn.Linear)."""
    return sum(-(-m.out_features // 16) * 16 * m.in_features * 2 for m in model.modules()
               if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16)


def load_fp8(path, memory_budget=None, kv_bytes: int = 0, panels: bool = True, progress: bool = False
             ) -> tuple[MiMoForCausalLM, bool]:
    """FP8 checkpoint -> (model with FP8Linear / FP8Experts, whether panels fit). The checkpoint is validated
    first exactly as load_model does (same errors). memory_budget (bytes or "24G"): resident bytes for the whole
    process (what Python and torch hold now, the resident weights, panels, `kv_bytes` of KV cache and a margin);
    what is left bounds the expert cache. ValueError if the budget cannot hold the non-expert weights."""
    budget = parse_bytes(memory_budget)
    prep = L.prepare(path)                             # validated as load_model validates it
    root, weight_map, config, block, plan = prep.files.root, prep.files.weight_map, prep.config, prep.block, prep.plan
    fp8_dense = {t for _, s, t, e in plan if s is not None and e is None}
    expert_fp8: dict[str, bool] = {}
    for _, s, t, e in plan:
        if e is not None:
            prefix = t.rsplit(".", 1)[0]
            expert_fp8[prefix] = expert_fp8.get(prefix, True) and s is not None
    store = ExpertStore(root, weight_map)
    stored = {p for p, ok in expert_fp8.items() if ok}

    def swap(model):
        for t in fp8_dense:
            parent, child = t[:-len(".weight")].rsplit(".", 1)
            lin = model.get_submodule(f"{parent}.{child}")
            setattr(model.get_submodule(parent), child, FP8Linear(lin.in_features, lin.out_features, block))
        for prefix in sorted(stored):
            moe = model.get_submodule(prefix[:-len(".experts")])
            E, Fd, D = moe.experts.gate_proj.shape
            moe.experts = FP8Experts(store, store.add_layer(prefix, E), E, D, Fd, block)

    base_rss = current_rss()
    model = L._build(config, torch.bfloat16, torch.device("cpu"), swap=swap)
    resident = _tensor_bytes(model)
    pbytes = panel_bytes(model)
    panels = panels and panels_fit(pbytes, resident + store.total_bytes)
    files = sum((root / f).stat().st_size for f in set(weight_map.values()))
    if budget is not None:
        fixed = base_rss + resident + kv_bytes + _MARGIN
        if panels and fixed + pbytes > budget:
            panels = False
        if fixed > budget:
            raise ValueError(f"memory budget {budget / 2**30:.2f} GiB is too small: the weights that stay resident "
                             f"need {resident / 2**30:.2f} GiB, plus {base_rss / 2**30:.2f} GiB already used by the "
                             f"process, {kv_bytes / 2**30:.2f} GiB of KV cache and a {_MARGIN >> 20} MiB margin")
        store.set_capacity(budget - fixed - (pbytes if panels else 0))
    else:
        avail = available_ram()
        if avail is not None and files > avail:
            cap = max(0, int(0.9 * avail) - resident - (pbytes if panels else 0) - kv_bytes - _MARGIN)
            store.set_capacity(cap)
            log.warning("the checkpoint's files (%.1f GiB) exceed the available RAM (%.1f GiB): experts are read "
                        "from the files when routed and at most %.1f GiB of them stay cached, so decoding is slower; "
                        "set --memory-budget / memory_budget= to choose the bound", files / 2**30, avail / 2**30,
                        cap / 2**30)
    _fill(model, store, weight_map, plan, block, fp8_dense, stored, progress)
    fuse_fp8_qkv(model)
    model.model.register_forward_pre_hook(store.on_forward)
    model.expert_store = store
    return model, panels


class FP8QKVProduct:
    """The fused q|k|v product of an FP8 attention, x @ dequant(t, scale).T for t the stacked (q|k|v rows, H) E4M3
    bytes: holds the stacked scale grid and its block, which the fused decode step reads too."""

    def __init__(self, scale: torch.Tensor, block: tuple[int, int]):
        self.scale, self.block = scale, tuple(block)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return kfp8.linear_fp8(x, t, self.scale, self.block)


_MIN_QKV_ROWS = 16          # finest row block the stacked q|k|v grid may use (the kernel rescales x per block row)


def fuse_fp8_qkv(model: nn.Module) -> int:
    """Each attention's FP8 q/k/v as one E4M3 tensor of row blocks with one stacked scale grid, the projections'
    weights becoming views of it, and the attention a `cpu_layout.FastAttention` over that product: one kernel
    call instead of three, and RoPE plus the value scale by the layout's in-place kernel. Where the q and k rows
    are whole tiles the grids stack as they are (the projections' scales become views too). Otherwise the stacked
    grid uses a row block g dividing the tile rows, q's rows and k's rows (each scale row repeated br / g times: the
    same weight values), and the projections keep their own grids (their state dict stays the checkpoint's); not
    fused when g would be below `_MIN_QKV_ROWS`. -> attentions fused."""
    from .cpu_layout import FastAttention, _swap
    fused = {}
    with torch.no_grad():
        for m in model.modules():
            lins = [m.q_proj, m.k_proj, m.v_proj] if type(m) is Attention else []
            if not lins or not all(isinstance(lin, FP8Linear) for lin in lins) or len({lin.block for lin in lins}) != 1:
                continue
            br, bc = lins[0].block
            g = math.gcd(br, lins[0].out_features, lins[1].out_features)
            if g < min(br, _MIN_QKV_ROWS):
                continue
            t = torch.cat([lin.weight.view(torch.uint8) for lin in lins]).view(FP8_DTYPE)    # (q|k|v, H)
            if g == br:
                s = torch.cat([lin.weight_scale_inv for lin in lins])
            else:                       # row i of a projection's finer grid is row i * g // br of its own
                s = torch.cat([lin.weight_scale_inv[torch.arange(-(-lin.out_features // g)) * g // br]
                               for lin in lins])
            lo = slo = 0
            for lin in lins:
                n, ns = lin.out_features, lin.weight_scale_inv.shape[0]
                lin.weight = t[lo:lo + n]
                if g == br:
                    lin.weight_scale_inv = s[slo:slo + ns]
                lo, slo = lo + n, slo + ns
            fused[id(m)] = (t, FP8QKVProduct(s, (g, bc)), None)
    _swap(model, lambda m: FastAttention.adopt(m, *fused[id(m)]) if id(m) in fused else None)
    return len(fused)


# ---------------------------------------------------------------------------------------------- fused decode step

def fused_layer_args(cfg, attn, in_norm, post_norm, mlp, cache, keep: list, panels: list | None = None):
    """A decoder block whose projections are block-FP8 as the fused decode step's `kernels.LayerArgs` (its FP8
    fields: E4M3 bytes with their scale grids, the experts' addresses from the store) -> (args, sliding, experts
    per token), or None when it does not qualify: q|k|v not fused, mixed FP8 blocks, experts behind a bounded cache
    (the per-module path then evicts between layers), or a tensor the kernel cannot take. Appends the tensors the
    args point into to `keep`, and where every bf16 linear of the block (o_proj, as released) has packed panels,
    the kernel reads those and their `Panels` go to `panels` (refreshed each step by the caller). Called by
    engine/fused_decode.py for blocks `is_fp8_block` accepts."""
    from ..model.layers import MLP
    from ..model.moe import MoE
    from .fused_decode import attention_args, set_router

    def ok(t, dtype):
        return t is not None and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"

    with torch.no_grad():
        fused = attn.fused_qkv()
    sinks = attn.attention_sink_bias
    sliding, k_pool, v_pool = cache.pools(attn.layer_idx)
    if (fused is None or not isinstance(fused[1], FP8QKVProduct) or not ok(fused[0], FP8_DTYPE)
            or not ok(fused[1].scale, torch.float32) or not ok(in_norm.weight, torch.float32)
            or not ok(post_norm.weight, torch.float32) or (sinks is not None and not ok(sinks, torch.float32))
            or k_pool.dtype not in (torch.float32, torch.bfloat16) or not ok(k_pool, k_pool.dtype)
            or not ok(v_pool, k_pool.dtype)):
        return None
    block = None
    scales = {}
    bf16_lins = {}                      # name -> bf16 linear (panels read instead when all of them have them)

    def fp8_or_bf16(lin, name) -> bool:
        """Whether lin's weight is one the kernel takes: E4M3 with its scale grid (recorded in `scales` under
        `name`; one block size per layer) or bf16. Its tensors are appended to `keep`."""
        nonlocal block
        if isinstance(lin, FP8Linear):
            if (block not in (None, lin.block) or not ok(lin.weight, FP8_DTYPE)
                    or not ok(lin.weight_scale_inv, torch.float32)):
                return False
            block = lin.block
            scales[name] = lin.weight_scale_inv
            keep.extend([lin.weight, lin.weight_scale_inv])
            return True
        if not ok(lin.weight, torch.bfloat16):
            return False
        keep.append(lin.weight)
        bf16_lins[name] = lin
        return True

    qb = fused[1].block
    if not fp8_or_bf16(attn.o_proj, "o"):
        return None
    a = attention_args(cfg, attn, in_norm, post_norm, fused[0], k_pool, v_pool, sliding)
    a.panels, a.qkv_br, a.qkv_s = 0, qb[0], fused[1].scale.data_ptr()
    keep += [fused[0], fused[1].scale, k_pool, v_pool]
    top_k = 1
    if isinstance(mlp, MLP):
        lins = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not all(fp8_or_bf16(lin, n) for lin, n in zip(lins, ("gate", "up", "down"))):
            return None
        a.moe, a.F_dense = 0, lins[0].out_features
        a.gate_w, a.up_w, a.down_w = (lin.weight.data_ptr() for lin in lins)
    elif isinstance(mlp, MoE) and isinstance(mlp.experts, FP8Experts):
        ex, r = mlp.experts, mlp.gate
        if (ex.store.capacity is not None or block not in (None, ex.block) or r.n_group > 1 or r.top_k > 64
                or not ok(r.weight, torch.float32) or not ok(r.e_score_correction_bias, torch.float32)):
            return None
        block = ex.block
        table = torch.tensor([[v.data_ptr() for v in ex.store.expert(ex.layer, e)] for e in range(ex.num_experts)],
                             dtype=torch.int64)                                          # (E, 6) addresses
        a.moe, a.F_moe, a.E, a.top_k = 1, ex.inter, ex.num_experts, r.top_k
        set_router(a, r)
        a.experts_fp8 = table.data_ptr()
        keep += [table, r.weight, r.e_score_correction_bias]
        top_k = r.top_k
        a.expert_layer = (ex.store, ex.layer)            # a Python attribute: account_fused_step reads it
    else:
        return None
    block = block or qb
    if block[1] != qb[1]:               # one column block per layer (the kernel's scale grids' row length)
        return None
    a.fp8_br, a.fp8_bc = block
    for name, t in scales.items():
        setattr(a, f"{name}_s", t.data_ptr())
    got = {n: getattr(lin, "_panels", None) for n, lin in bf16_lins.items()}
    if panels is not None and got and all(p is not None and p.get() is not None for p in got.values()):
        a.panels = 1                    # decode.c: the bf16 weights (only) are read from their panels
        for n, p in got.items():
            setattr(a, f"{n}_w", p.wp.data_ptr())
        panels.extend(got.values())
    return a, sliding, top_k


def is_fp8_block(attn, mlp) -> bool:
    """Whether a decoder block holds FP8 projections (its fused step arguments come from `fused_layer_args`)."""
    return any(isinstance(m, (FP8Linear, FP8Experts)) for m in list(attn.modules()) + list(mlp.modules()))


def account_fused_step(layers, chosen) -> None:
    """After a fused decode step: the expert store's statistics for it, as the per-module path keeps them (each MoE
    block's distinct experts acquired and released: counted, and made most recently used; `ExpertStore.record_steps`).
    chosen: per layer, the (B, top_k) ids it wrote. The ids of all blocks come to Python in one conversion (a step's
    fixed cost matters at batch 1)."""
    moe = [(args.expert_layer, ch) for (args, _, _), ch in zip(layers, chosen) if hasattr(args, "expert_layer")]
    if moe:
        _record([m for m, _ in moe], [torch.cat([ch.view(1, -1) for _, ch in moe]).tolist()])


class RunExperts:
    """The routed expert ids of a C run's steps (kernels/steps.c) and their count in the expert store after the run:
    ids[i, l, :B * top_k] = step i's layer l's (B, top_k) ids (`table` holds those rows' addresses, the (n, L) table
    kernels.decode_steps takes), so every step keeps its own. Made once per batch size (FusedDecoder.loop_args),
    with what `account` needs worked out beforehand: it runs right after the run has streamed the weights through the
    caches, where each Python or torch operation costs several times its warm time."""

    def __init__(self, layers, B: int, cap: int):
        L, W = len(layers), B * max(k for _, _, k in layers)
        self.ids = np.zeros((cap, L, W), dtype=np.int64)                                # (cap, L, B * max top_k)
        self.table = torch.from_numpy(self.ids.ctypes.data + 8 * W * np.arange(cap * L, dtype=np.int64).reshape(cap, L))
        cols = [j for j, (args, _, _) in enumerate(layers) if hasattr(args, "expert_layer")]
        self.blocks = [layers[j][0].expert_layer for j in cols]                         # (store, layer key) each
        widths = {B * layers[j][2] for j in cols}
        # the MoE blocks' rows as one numpy view where they are adjacent layers of one width (MiMo's), else per block
        self._view = (slice(cols[0], cols[-1] + 1), widths.pop()) if (
            cols and cols == list(range(cols[0], cols[-1] + 1)) and len(widths) == 1) else None
        self._cols = [(j, B * layers[j][2]) for j in cols]

    def account(self, n: int) -> None:
        """After a run of n steps: the statistics each step's `account_fused_step` would have kept."""
        if not self.blocks or n <= 0:
            return
        if self._view is not None:
            sel, w = self._view
            steps = self.ids[:n, sel, :w].tolist()                                      # (n, MoE blocks, B * top_k)
        else:
            steps = [[step[j][:w] for j, w in self._cols] for step in self.ids[:n].tolist()]
        _record(self.blocks, steps)


def _record(blocks: list[tuple], steps: list) -> None:
    """blocks[j] = (store, layer key) of MoE block j; steps[i][j] = the ids block j routed to in step i."""
    stores: dict[int, tuple] = {}                       # a store's blocks: (store, their layer keys, their columns)
    for j, (store, layer) in enumerate(blocks):
        got = stores.setdefault(id(store), (store, [], []))
        got[1].append(layer)
        got[2].append(j)
    for store, keys, cols in stores.values():
        store.record_steps(keys, steps if len(cols) == len(blocks) else [[step[j] for j in cols] for step in steps])


def _fill(model, store: ExpertStore, weight_map, plan, block, fp8_dense, stored, progress: bool) -> None:
    """Copy every tensor the store does not serve into its slot, straight from the mapped file (the store's
    mapping: no intermediate copy of a tensor, not even of the 1.25 GB embedding), `_CHUNK` bytes of rows at a
    time, each chunk's pages dropped once copied: peak memory is the model plus one chunk. FP8 bytes and their
    scales are kept as they are, the rest cast to the slot's dtype."""
    slots = model.state_dict(keep_vars=True)
    todo = [p for p in plan if not (p[3] is not None and p[2].rsplit(".", 1)[0] in stored)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="tensor", desc=f"loading {store.root.name} (fp8)")
    try:
        with torch.no_grad():
            for name, scale, target, e in sorted(todo, key=lambda p: (weight_map[p[0]], p[0])):
                slot = slots[target] if e is None else slots[target][e]
                if target in fp8_dense:
                    _copy(slot, store.file(weight_map[name]), name)
                    _copy(slots[target + "_scale_inv"], store.file(weight_map[scale]), scale)
                elif scale is not None:                     # FP8 outside the modules kept FP8: dequantised
                    m, ms = store.file(weight_map[name]), store.file(weight_map[scale])
                    slot.copy_(dequantize_fp8_block(m.view(name), ms.view(scale), block, torch.float32, name=name))
                    m.drop(*m.span(name))
                else:
                    _copy(slot, store.file(weight_map[name]), name)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


_CHUNK = 64 << 20


def _copy(slot: torch.Tensor, m, name: str) -> None:
    src = m.view(name)
    a, b = m.span(name)
    if tuple(src.shape) != tuple(slot.shape):
        raise L.CheckpointError(f"{m.path}: {name} has shape {list(src.shape)}, the model wants {list(slot.shape)}")
    rows = max(1, _CHUNK // max(1, (b - a) // max(1, src.shape[0]))) if src.dim() else 1
    if src.dim() == 0 or src.shape[0] <= rows:
        slot.copy_(src)
    else:
        per = (b - a) // src.shape[0]
        for lo in range(0, src.shape[0], rows):
            slot[lo:lo + rows].copy_(src[lo:lo + rows])
            m.drop(a + lo * per, a + min(src.shape[0], lo + rows) * per)
    m.drop(a, b)
