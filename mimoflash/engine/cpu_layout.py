"""CPU transforms the runner applies to a model from outside: parameter names, shapes, values
and the module tree stay; memory layouts and a few forwards change. `use_cpu_layout(model, compute_dtype)` picks:

* **bf16 weights, fp32 compute** (`use_bf16_weights`; the CPU default for bf16/FP8 checkpoints). Decode reads every
  weight it touches once per token, so bytes per token set the speed; official checkpoints are bf16, and keeping
  them bf16 halves the bytes of an fp32 copy. Activations, norms, attention, the KV cache and accumulation stay fp32
  (bf16 -> fp32 is exact), so the result is the fp32 model's up to summation order. Every nn.Linear, the fused
  q|k|v projection and the experts multiply through `mimoflash.kernels.linear_bf16w` (an AVX2 kernel: torch has
  no fast bf16-weight x fp32-activation GEMV on CPUs without native bf16); on that row-major kernel, more than
  `KERNEL_MAX_ROWS` rows (prefill) go to MKL on the weight upcast per call. The embedding returns fp32 rows.
  With `panels=True` (the default) the dense linears and the fused q|k|v also get a copy packed in 16-row
  k-major panels (`Panels`, kernels/panels.c), which every row count multiplies against instead: an outer-product
  tile that runs the many-row products of batched decoding and prefill 1.2-1.3x faster than the row-major kernel's
  dot products (benchmarks/bench_kernels.py), and streams one or two rows at the memory rate. The cost is a second
  copy of those weights (not the experts, which stay row-major): +54 MB (+21%) on the 126M-parameter benchmark
  model. The copy follows the weight: replaced (`.data =`) or changed in place under no_grad, it is repacked
  before the next use.
* **fp32** (`_same_dtype_layout`): wide linears get column-major weights, q/k/v one (H, q|k|v) tensor, experts a
  fused (E, D, 2F) gate|up tensor, as MKL is fastest there for one or two rows.
* both fp32-compute modes route RMSNorm and the attention projection path (RoPE + value scale in place) through the
  fused kernels (`_fast_fp32_ops`); with bf16 weights, decode steps go further, one C call per layer
  (engine/fused_decode.py).
* **bf16 compute** (`_same_dtype_layout`): layouts stay (these layouts sent oneDNN/MKL to paths 4x slower in bf16
  here); bf16 experts only skip the unpicked experts for one or two tokens (`_picked_experts`).

Every transformed forward falls back to the module's own math under autograd or after a cast that breaks the
views, and `tests/test_engine.py` / `tests/test_kernels.py` check each against the untransformed model.
Idempotent. The saver copies each tensor, so saving after a transform works.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import kernels
from . import hugepages
from ..model.attention import Attention
from ..model.layers import RMSNorm
from ..model.moe import Experts, MoE

KERNEL_MAX_ROWS = 32        # above this many rows MKL on an upcast weight catches up with the bf16-weight kernel


# ---------------------------------------------------------------------------------------------- bf16 weights


def _w16_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) fp32 @ w (N, K) bf16 -> (..., N) fp32: the kernel for a few rows, MKL on the upcast for many."""
    if x.numel() <= KERNEL_MAX_ROWS * x.shape[-1]:
        return kernels.linear_bf16w(x, w)
    return F.linear(x, w.float())


class Panels:
    """A bf16 weight's copy in panels (kernels.pack_panels), kept in step with the weight: `get()` repacks in place
    when the weight's storage or version counter moved since packing (`.data =`, a no_grad in-place op; an edit
    through `.data.copy_` bypasses the counter and is not seen). The weight is `owner.<attr>` (so that a parameter
    replaced on its module is followed too) or, with attr None, the tensor `owner` itself. No closures: a transformed
    model still pickles."""

    __slots__ = ("owner", "attr", "N", "K", "wp", "_stamp")

    def __init__(self, owner, attr: str | None = None):
        self.owner, self.attr = owner, attr
        w = self.weight()
        self.N, self.K = w.shape
        self.wp = kernels.pack_panels(w)
        self._stamp = (w.data_ptr(), w._version)

    def weight(self) -> torch.Tensor:
        return self.owner if self.attr is None else getattr(self.owner, self.attr)

    def get(self) -> torch.Tensor | None:
        """-> the panels, current with the weight; None if the weight is no longer a (N, K) bf16 tensor."""
        w = self.weight()
        if w.dtype != torch.bfloat16 or w.shape != (self.N, self.K):
            return None
        if (w.data_ptr(), w._version) != self._stamp:
            self.wp.copy_(kernels.pack_panels(w))           # same shape: pointers into wp (fused decode) stay valid
            self._stamp = (w.data_ptr(), w._version)
        return self.wp


def _panels_matmul(panels: Panels, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for the fused q|k|v tensor w (contiguous: it is ours) on its panels, or row-major if w changed shape."""
    wp = panels.get()
    if wp is None:
        return _w16_matmul(x, w)
    return kernels.linear_panels(x, wp, panels.N)


def _w16_linear(lin: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = lin.weight
    if x.dtype == torch.float32 and w.dtype == torch.bfloat16 and not torch.is_grad_enabled():
        panels = getattr(lin, "_panels", None)
        wp = panels.get() if panels is not None else None
        if wp is not None:                      # any row count, prefill included (no upcast copy for MKL)
            return kernels.linear_panels(x, wp, panels.N)
        if w.is_contiguous():                   # no panels, or the weight stopped being what was packed
            return _w16_matmul(x, w)
    return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))


def _embed_as(emb: torch.nn.Embedding, dtype: torch.dtype, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, emb.weight).to(dtype)


def _fast_rms_norm(norm: RMSNorm, fallback, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32 and not torch.is_grad_enabled():
        return kernels.rms_norm(x, norm.weight, norm.eps)
    return fallback(x)


def _fast_attention(attn: Attention, fallback, x: torch.Tensor, positions: torch.Tensor, rope, backend=None):
    """`Attention.forward` for fp32 activations with a cache backend: the fused q|k|v product, then RoPE on q|k and
    the value scale in one in-place kernel (instead of ~15 slicing/cat/mul calls), then the backend and o_proj."""
    fused = attn.fused_qkv()
    if fused is None or backend is None or x.dtype != torch.float32:
        return fallback(x, positions, rope, backend)
    B, T, H = x.shape
    nq, nkv, d, dv = attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.v_head_dim
    qkv = fused[1](x.reshape(B * T, H), fused[0])                        # (BT, (nq + nkv) * d + nkv * dv)
    if not qkv.is_contiguous():
        qkv = qkv.contiguous()
    kernels.qkv_rope_(qkv, nq + nkv, d, rope[0], rope[1], (nq + nkv) * d, attn.value_scale)
    q = qkv[:, :nq * d].view(B, T, nq, d)
    k = qkv[:, nq * d:(nq + nkv) * d].view(B, T, nkv, d)
    v = qkv[:, (nq + nkv) * d:].view(B, T, nkv, dv)
    o = backend.attend(attn, q, k, v)
    return attn.o_proj(o.reshape(B, T, nq * dv))


def _fast_fp32_ops(model: torch.nn.Module) -> None:
    """fp32 compute on CPU (either weight mode): RMSNorm and the attention projection path through the kernels."""
    for m in model.modules():
        if isinstance(m, RMSNorm) and not hasattr(m, "_torch_forward"):
            m._torch_forward = m.forward
            m.forward = functools.partial(_fast_rms_norm, m, m._torch_forward)
        elif isinstance(m, Attention) and not hasattr(m, "_torch_forward"):
            m._torch_forward = m.forward
            m.forward = functools.partial(_fast_attention, m, m._torch_forward)


def _w16_experts(experts: Experts, fallback, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 weight_TK: torch.Tensor) -> torch.Tensor:
    """`Experts.forward`'s math with bf16 weights and fp32 activations, running only the picked experts: one fused
    gate|up product against the rows of `_gate_up[e]` (2F, D), one against `down_proj[e]` (D, F), mixed by
    `_mix_picked`."""
    gu = experts._gate_up
    if (x_TD.device.type != "cpu" or torch.is_grad_enabled() or experts.gate_proj.data_ptr() != gu.data_ptr()
            or gu.dtype != torch.bfloat16 or experts.down_proj.dtype != torch.bfloat16):
        dt = experts.gate_proj.dtype
        return fallback(x_TD.to(dt), topk_idx_TK, weight_TK).to(x_TD.dtype)
    gu_list, dn_list = experts._gate_up_list, experts._down_list

    def swiglu(x_nD, e):                                  # (n, D) -> (n, D), unweighted
        return _w16_matmul(kernels.silu_mul(_w16_matmul(x_nD, gu_list[e])), dn_list[e])

    def grouped(x_PD, counts_E):
        if int(counts_E.max()) > KERNEL_MAX_ROWS:        # prefill: expert by expert, MKL on upcast weights
            return None
        return kernels.experts_bf16(x_PD, counts_E, gu, experts.down_proj)      # decode: all in one kernel call
    return _mix_picked(x_TD, topk_idx_TK, weight_TK.float(), len(gu_list), swiglu, grouped)


def _mix_picked(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, w_TK: torch.Tensor, num_experts: int, swiglu,
                grouped=None) -> torch.Tensor:
    """`Experts.forward`'s mixing, running only the picked experts. swiglu(x_nD, e) -> expert e on those rows,
    unweighted; grouped(x_PD, counts_E) -> all rows at once, or None to use swiglu per expert. One token: the K
    experts in turn, no sort. More: (token, expert) pairs grouped by expert with one argsort and one host read of
    the counts (free on CPU), weighted, and added back per token."""
    T, K = topk_idx_TK.shape
    if T == 1:
        out_TD = None
        for e, w in zip(topk_idx_TK[0].tolist(), w_TK[0].tolist()):      # w: a Python float
            y = swiglu(x_TD, e).mul_(w)
            out_TD = y if out_TD is None else out_TD.add_(y)
        return out_TD
    flat = topk_idx_TK.reshape(-1)
    order = flat.argsort(stable=True)
    tok_P = order // K
    counts_E = torch.bincount(flat, minlength=num_experts)
    x_PD = x_TD.index_select(0, tok_P)                                                 # (P, D), expert-sorted
    y_PD = grouped(x_PD, counts_E) if grouped is not None else None
    if y_PD is None:
        y_PD = torch.empty_like(x_PD)
        lo = 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                y_PD[lo:lo + n] = swiglu(x_PD[lo:lo + n], e)
                lo += n
    y_PD.mul_(w_TK.reshape(-1).index_select(0, order)[:, None])
    out_TD = torch.zeros_like(x_TD)
    out_TD.index_add_(0, tok_P, y_PD)
    return out_TD


def _w16_moe(moe: MoE, fallback, x: torch.Tensor) -> torch.Tensor:
    """One token, fp32, plain (not group-limited) routing: router + picked experts in one kernel call."""
    ex, r = moe.experts, moe.gate
    if (x.numel() != x.shape[-1] or x.dtype != torch.float32 or torch.is_grad_enabled() or r.n_group > 1
            or not hasattr(ex, "_gate_up") or ex.gate_proj.data_ptr() != ex._gate_up.data_ptr()
            or ex.down_proj.dtype != torch.bfloat16 or not ex.down_proj.is_contiguous()):
        return fallback(x)
    y, moe.last_topk_idx = kernels.moe_token_bf16(x.reshape(1, -1), r.weight, r.e_score_correction_bias, r.top_k,
                                                  r.norm_topk_prob, r.routed_scaling_factor, ex._gate_up,
                                                  ex.down_proj)
    return y.view(x.shape)


def use_bf16_weights(model: torch.nn.Module, panels: bool = True) -> None:
    """bf16 matmul weights, fp32 everything else (module docstring). The model arrives cast to bf16 (router in
    fp32, as `MiMoForCausalLM.cast` leaves it); norms and sinks go back to fp32 (exact: they were bf16 values).
    panels: also pack the dense linears and the fused q|k|v (`Panels`)."""
    fused_parts = set()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm) and m.weight.dtype != torch.float32:
                m.weight.data = m.weight.data.float()
            elif isinstance(m, Attention):
                if m.attention_sink_bias is not None and m.attention_sink_bias.dtype != torch.float32:
                    m.attention_sink_bias.data = m.attention_sink_bias.data.float()
                ws = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]
                if m.qkv_fused is None and all(w.dtype == torch.bfloat16 for w in ws):
                    t = torch.cat([w.data for w in ws], dim=0)                       # (q | k | v, H), row blocks
                    lo = 0
                    for w in ws:
                        w.data = t[lo:lo + w.shape[0]]
                        lo += w.shape[0]
                    if panels:
                        m._qkv_panels = Panels(t)
                        m.qkv_fused = (t, functools.partial(_panels_matmul, m._qkv_panels))
                    else:
                        m.qkv_fused = (t, _w16_matmul)
                if m.qkv_fused is not None:                 # q/k/v run alone only if the fusion breaks: no panels
                    fused_parts.update(id(lin) for lin in (m.q_proj, m.k_proj, m.v_proj))
            elif isinstance(m, torch.nn.Embedding) and m.weight.dtype == torch.bfloat16:
                m.forward = functools.partial(_embed_as, m, torch.float32)
            elif isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16:
                if not m.weight.is_contiguous():
                    m.weight.data = m.weight.data.contiguous()
                m.forward = functools.partial(_w16_linear, m)
                if panels and id(m) not in fused_parts and not hasattr(m, "_panels"):
                    m._panels = Panels(m, "weight")
            elif (isinstance(m, Experts) and m.gate_proj.dtype == torch.bfloat16
                  and not hasattr(m, "_grouped_forward")):
                Fd = m.gate_proj.shape[1]
                gu = torch.cat([m.gate_proj.data, m.up_proj.data], dim=1)            # (E, 2F, D)
                m.gate_proj.data, m.up_proj.data = gu[:, :Fd], gu[:, Fd:]
                m.down_proj.data = m.down_proj.data.contiguous()                     # (E, D, F)
                m._gate_up = gu
                m._gate_up_list, m._down_list = list(gu.unbind(0)), list(m.down_proj.data.unbind(0))
                m._grouped_forward = m.forward
                m.forward = functools.partial(_w16_experts, m, m._grouped_forward)
        for m in model.modules():
            if isinstance(m, MoE) and not hasattr(m, "_torch_forward") and hasattr(m.experts, "_gate_up"):
                m._torch_forward = m.forward
                m.forward = functools.partial(_w16_moe, m, m._torch_forward)


# ---------------------------------------------------------------------------------------------- fp32 / bf16

def _cpu_experts(experts: Experts, fallback, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 weight_TK: torch.Tensor) -> torch.Tensor:
    """Same math as `Experts.forward`, on the CPU layout of `use_cpu_layout`: only the picked experts run, each as
    one fused gate|up matmul `x @ gate_up[e]` (D, 2F) and one `h @ down_t[e]` (F, D), both row-major right-hand
    sides (MKL's fast GEMV/GEMM case), mixed by `_mix_picked`."""
    gu, dn = experts._gate_up, experts._down_t
    if (x_TD.device.type != "cpu" or torch.is_grad_enabled() or experts.gate_proj.data_ptr() != gu.data_ptr()
            or experts.down_proj.data_ptr() != dn.data_ptr() or x_TD.dtype != gu.dtype):
        # training (the views carry no gradient), or moved / cast since the transform
        return fallback(x_TD, topk_idx_TK, weight_TK)
    Fd = dn.shape[1]
    gu, dn = experts._gate_up_list, experts._down_t_list          # per-expert views: no indexing op per call

    def swiglu(x_nD, e):                                          # row-major right-hand sides: MKL's fast case
        h = torch.mm(x_nD, gu[e])                                                      # (n, 2F)
        return torch.mm(F.silu(h[:, :Fd]) * h[:, Fd:], dn[e])
    w_TK = weight_TK if weight_TK.dtype == x_TD.dtype else weight_TK.to(x_TD.dtype)
    return _mix_picked(x_TD, topk_idx_TK, w_TK, len(gu), swiglu)


def _picked_experts(experts: Experts, fallback, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                    weight_TK: torch.Tensor) -> torch.Tensor:
    """Non-fp32 CPU experts: `Experts.forward`'s math running only the picked experts, for one or two tokens."""
    T, K = topk_idx_TK.shape
    if T > 2 or x_TD.device.type != "cpu" or torch.is_grad_enabled():
        return fallback(x_TD, topk_idx_TK, weight_TK)

    def swiglu(x_nD, e):
        return F.linear(F.silu(F.linear(x_nD, experts.gate_proj[e])) * F.linear(x_nD, experts.up_proj[e]),
                        experts.down_proj[e])
    return _mix_picked(x_TD, topk_idx_TK, weight_TK.to(x_TD.dtype), experts.gate_proj.shape[0], swiglu)


def _is_fp32(m: torch.nn.Module) -> bool:
    p = next(m.parameters(), None)
    return p is None or p.dtype == torch.float32


def use_cpu_layout(model: torch.nn.Module, compute_dtype: torch.dtype | None = None, panels: bool = True) -> None:
    """The runner's entry point. compute_dtype None = the matmul weights' dtype. fp32 compute on bf16 weights:
    `use_bf16_weights` (with `panels`); otherwise `_same_dtype_layout`."""
    wdt = matmul_weight_dtype(model)
    if compute_dtype is None:
        compute_dtype = wdt
    if compute_dtype == torch.float32 and wdt == torch.bfloat16:
        use_bf16_weights(model, panels=panels and kernels.available())
    elif compute_dtype != wdt:
        raise ValueError(f"compute dtype {compute_dtype} with {wdt} weights is not supported (fp32 compute on bf16 "
                         "weights is; otherwise cast the model)")
    else:
        _same_dtype_layout(model)
    if compute_dtype == torch.float32 and kernels.available():
        _fast_fp32_ops(model)


def use_huge_pages(model: torch.nn.Module) -> int:
    """Move the model's large CPU tensors onto huge pages (engine/hugepages.py): parameters, buffers, the tensors
    this layout keeps on modules (fused q|k|v, expert gate|up) and the packed panels. Values, views and aliasing are
    kept, so a panel copy that was current stays current (re-stamped, not repacked). Call before building anything
    that holds raw pointers (FusedDecoder). -> bytes moved."""
    tensors, panels = list(model.parameters()) + list(model.buffers()), []
    for mod in model.modules():
        for v in vars(mod).values():
            for x in (v if isinstance(v, (list, tuple)) else (v,)):     # qkv_fused, the experts' per-expert views
                if isinstance(x, torch.Tensor):
                    tensors.append(x)
                elif isinstance(x, Panels):
                    panels.append(x)
    current = [p for p in panels if p._stamp == (p.weight().data_ptr(), p.weight()._version)]
    moved = hugepages.rehome(tensors + [p.wp for p in panels])
    for p in current:
        p._stamp = (p.weight().data_ptr(), p.weight()._version)
    return moved


def matmul_weight_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's nn.Linear weights (the router and norms may differ)."""
    lin = next((m for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
    return lin.weight.dtype if lin is not None else next(model.parameters()).dtype


def _same_dtype_layout(model: torch.nn.Module) -> None:
    """fp32: column-major wide linears, fused q|k|v (H, q|k|v), fused (E, D, 2F) experts; bf16: picked experts."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Experts) and m.gate_proj.dtype != torch.float32 and not hasattr(m, "_grouped_forward"):
                m._grouped_forward = m.forward                 # bf16: layouts stay (see above), picked experts only
                m.forward = functools.partial(_picked_experts, m, m._grouped_forward)
            if not _is_fp32(m):
                continue
            if isinstance(m, Attention) and m.qkv_fused is None:
                ws = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]
                t = torch.cat([w.data.t() for w in ws], dim=1).contiguous()      # (H, q | k | v)
                lo = 0
                for w in ws:
                    w.data = t[:, lo:lo + w.shape[0]].t()
                    lo += w.shape[0]
                m.qkv_fused = (t, torch.matmul)
        for m in model.modules():
            if not _is_fp32(m):
                continue
            if isinstance(m, torch.nn.Linear) and m.out_features > m.in_features and m.weight.is_contiguous():
                m.weight.data = m.weight.data.t().contiguous().t()
            elif isinstance(m, Experts) and not hasattr(m, "_grouped_forward"):
                E, Fd, D = m.gate_proj.shape
                gu = torch.empty(E, D, 2 * Fd, dtype=m.gate_proj.dtype, device=m.gate_proj.device)
                gu[:, :, :Fd].copy_(m.gate_proj.data.transpose(1, 2))
                gu[:, :, Fd:].copy_(m.up_proj.data.transpose(1, 2))
                dn = m.down_proj.data.transpose(1, 2).contiguous()                # (E, F, D)
                m.gate_proj.data = gu[:, :, :Fd].transpose(1, 2)
                m.up_proj.data = gu[:, :, Fd:].transpose(1, 2)
                m.down_proj.data = dn.transpose(1, 2)
                m._gate_up, m._down_t = gu, dn
                m._gate_up_list, m._down_t_list = list(gu.unbind(0)), list(dn.unbind(0))
                m._grouped_forward = m.forward
                m.forward = functools.partial(_cpu_experts, m, m._grouped_forward)


