"""The CPU fast path as explicit module classes: the runner swaps them into its model, so `print(model)` shows what
runs. Each class subclasses the model's own module, keeps its parameter names, shapes and values (`state_dict` is
unchanged; the saver and the checkpoint round trip rely on it), runs the fast path in `forward`, and falls back to
the parent's math (its reference) under autograd or after a cast or `.to()` that broke the layout it built.

`use_cpu_layout(model, compute_dtype)` picks one of three modes:

* **bf16 weights, fp32 compute** (`use_bf16_weights`; the CPU default for bf16/FP8 checkpoints). Decode reads every
  weight it touches once per token, so bytes per token set the speed; official checkpoints are bf16, and keeping
  them bf16 halves the bytes of an fp32 copy. Activations, norms, attention, the KV cache and accumulation stay fp32
  (bf16 -> fp32 is exact), so the result is the fp32 model's up to summation order. The products go through
  `mimoflash.kernels` (AVX2: torch has no fast bf16-weight x fp32-activation GEMV on CPUs without native bf16). With
  `panels=True` (the default) the dense linears and the fused q|k|v also keep a copy packed in 16-row k-major
  panels (`Panels`, kernels/panels.c), which every row count multiplies against: an outer-product tile that runs
  the many-row products of batched decoding and prefill 1.2-1.3x faster than the row-major kernel
  (benchmarks/bench_kernels.py) and streams one or two rows at the memory rate. The cost is a second copy of those
  weights (not the experts): +54 MB (+21%) on the 126M-parameter benchmark model. The copy follows the weight:
  replaced (`.data =`) or changed in place under no_grad, it is repacked before the next use.
* **fp32 weights and compute** (`_same_dtype_layout`): wide linears column-major, q/k/v one (H, q|k|v) tensor,
  experts one (E, D, 2F) gate|up tensor, as MKL is fastest there for one or two rows.
* **bf16 compute** (`_same_dtype_layout`): layouts stay (these layouts sent oneDNN/MKL to paths 4x slower in bf16
  here); the experts of one or two tokens run only the picked experts.

With fp32 compute and the kernels, RMSNorm and RoPE + value scale go through fused kernels too; with bf16 weights,
decode steps go further, one C call per layer (engine/fused_decode.py, which reads the tensors these classes keep).

What runs when (reference = the model's own class, which the fast class falls back to and is tested against):

| class (replaces)              | mode                  | runs                                                             |
|-------------------------------|-----------------------|------------------------------------------------------------------|
| `Bf16Linear` (nn.Linear)      | bf16 weights          | panels kernel (any rows; above KERNEL_MAX_ROWS split by rows and |
|                               |                       | panels, kernels.prefill.panels); without panels the row-major    |
|                               |                       | kernel up to KERNEL_MAX_ROWS rows, MKL on the upcast weight above|
| `Bf16Embedding` (nn.Embedding)| bf16 weights          | bf16 table, fp32 rows out                                        |
| `FastRMSNorm` (RMSNorm)       | fp32 compute+kernels  | kernels.rms_norm                                                 |
| `FastAttention` (Attention)   | fp32 compute          | one q|k|v product (bf16: panels / row-major kernel; fp32: MKL on  |
|                               |                       | the (H, q|k|v) tensor); with a cache backend and the kernels,    |
|                               |                       | RoPE + value scale in one in-place kernel, else torch RoPE       |
| `Bf16Experts` (Experts)       | bf16 weights          | picked experts only: 1 token: expert by expert (row-major       |
|                               |                       | kernel); <= KERNEL_MAX_ROWS rows per expert: all experts in one  |
|                               |                       | kernels.experts_bf16 call; more than KERNEL_MAX_ROWS tokens on   |
|                               |                       | AVX-512F: kernels.prefill.experts, the layer in one call (pool   |
|                               |                       | tasks of expert x 64 tokens); else expert by expert, MKL on      |
|                               |                       | the upcast weights                                               |
| `KernelMoE` (MoE)             | bf16 weights          | one token, plain top-k routing: router + experts in one call     |
|                               |                       | (kernels.moe_token_bf16, the same C the fused decode step runs   |
|                               |                       | for one sequence); else MoE.forward -> Bf16Experts               |
| `Fp32Experts` (Experts)       | fp32 weights          | picked experts only, MKL on the fused (E, D, 2F) layout          |
| `PickedExperts` (Experts)     | bf16 compute          | one or two tokens: picked experts only; more: Experts.forward    |

Expert dispatch, every path: `MoE.forward_dense_reference` (every expert on every token: the reference all others
are tested against); `Experts.forward` (grouped `torch._grouped_mm`; a loop over experts for dtypes it lacks):
training, and the fallback of the classes above; the three branches of `Bf16Experts`, `KernelMoE`, `Fp32Experts`,
`PickedExperts` (table); the fused decode step's MoE (kernels/decode.c: the token kernel for one sequence, the
batch's rows grouped by expert for more; tested against the module path); `FP8Experts` for FP8 checkpoints
(engine/fp8_layout.py). Sink attention: the table in model/attention.py.

The transforms are idempotent and change the model they are given (the runner's model). `LLM(model)` hands them
`engine_copy(model)`, so a caller's model object stays as it was. The saver copies each tensor, so saving after a
transform works, and a transformed model pickles (no closures).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import prefill as prefill_kernels
from . import hugepages
from ..model.attention import Attention
from ..model.layers import RMSNorm, apply_partial_rope
from ..model.moe import Experts, MoE

KERNEL_MAX_ROWS = 32        # above this many rows MKL on an upcast weight catches up with the bf16-weight kernel


# ---------------------------------------------------------------------------------------------- products


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


def _on_panels(x: torch.Tensor, wp: torch.Tensor, N: int) -> torch.Tensor:
    """x @ w.T on w's panels: the panel kernel split by rows too for many rows (prefill; the same values)."""
    if x.numel() > KERNEL_MAX_ROWS * x.shape[-1]:
        return prefill_kernels.panels(x, wp, N)
    return kernels.linear_panels(x, wp, N)


def _panels_matmul(panels: Panels, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for the fused q|k|v tensor w (contiguous: it is ours) on its panels, or row-major if w changed shape."""
    wp = panels.get()
    if wp is None:
        return _w16_matmul(x, w)
    return _on_panels(x, wp, panels.N)


# ---------------------------------------------------------------------------------------------- the classes


def _adopt(cls, m: nn.Module):
    """A new `cls` module holding m's state: the same parameter, buffer and child objects (so names, values and ties
    stay), hooks and flags. m itself is left as it was; the caller puts the new module in m's place."""
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    for k in ("_parameters", "_buffers", "_modules"):
        new.__dict__[k] = dict(m.__dict__[k])
    new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    return new


class Bf16Linear(nn.Linear):
    """nn.Linear with a bf16 weight and fp32 activations: on the weight's panels when it has them (any row count,
    prefill included: no upcast copy for MKL), else the row-major kernel for few rows and MKL on the upcast weight
    for many (`_w16_matmul`). `_panels` is None without panels or for q/k/v, which FastAttention multiplies fused."""

    _panels: Panels | None

    @classmethod
    def adopt(cls, lin: nn.Linear, panels: bool) -> "Bf16Linear":
        new = _adopt(cls, lin)
        if not new.weight.is_contiguous():
            new.weight.data = new.weight.data.contiguous()
        new._panels = Panels(new, "weight") if panels else None
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == torch.float32 and w.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            wp = self._panels.get() if self._panels is not None else None
            if wp is not None:
                return _on_panels(x, wp, self._panels.N)
            if w.is_contiguous():               # no panels, or the weight stopped being what was packed
                return _w16_matmul(x, w)
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight={self.weight.dtype}, panels={self._panels is not None}"


class Bf16Embedding(nn.Embedding):
    """A bf16 table whose rows come out fp32 (exact), the activations' dtype."""

    @classmethod
    def adopt(cls, emb: nn.Embedding) -> "Bf16Embedding":
        return _adopt(cls, emb)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(torch.float32)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight={self.weight.dtype}, out=float32"


class FastRMSNorm(RMSNorm):
    """RMSNorm through kernels.rms_norm for fp32 activations and weight (tests/test_kernels.py compares them)."""

    @classmethod
    def adopt(cls, norm: RMSNorm) -> "FastRMSNorm":
        return _adopt(cls, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            return kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class FastAttention(Attention):
    """Attention with q|k|v as one product: `qkv_fused` = (t, matmul), where q_proj/k_proj/v_proj's weights are views
    of blocks of t and matmul(x, t) -> (..., nq*d + nkv*d + nkv*dv). bf16 weights: t is (q|k|v, H) row-major,
    multiplied on its panels (`_qkv_panels`) or by the row-major kernel; fp32: t is (H, q|k|v), torch.matmul. With a
    cache backend, fp32 activations and `rope_kernel`, RoPE on q|k and the value scale run as one in-place kernel
    (instead of ~15 slicing/cat/mul calls); otherwise torch RoPE on the fused product. Falls back to the three
    projections when the views broke (a cast, `.to()`) or a gradient is wanted (t is not a parameter)."""

    qkv_fused: tuple[torch.Tensor, object]
    _qkv_panels: Panels | None
    rope_kernel: bool

    @classmethod
    def adopt(cls, attn: Attention, t: torch.Tensor, matmul, panels: Panels | None) -> "FastAttention":
        new = _adopt(cls, attn)
        new.qkv_fused, new._qkv_panels, new.rope_kernel = (t, matmul), panels, False
        return new

    def fused_qkv(self) -> tuple[torch.Tensor, object] | None:
        """`qkv_fused` if the three projection weights are still views of its tensor and no gradient is wanted."""
        if torch.is_grad_enabled():
            return None
        t = self.qkv_fused[0]
        base = t.untyped_storage().data_ptr()
        ok = all(lin.weight.untyped_storage().data_ptr() == base and lin.weight.dtype == t.dtype
                 for lin in (self.q_proj, self.k_proj, self.v_proj))
        return self.qkv_fused if ok else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                backend=None) -> torch.Tensor:
        fused = self.fused_qkv()
        if fused is None:
            return super().forward(x, positions, rope, backend)
        B, T, H = x.shape
        nq, nkv, d, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        if self.rope_kernel and backend is not None and x.dtype == torch.float32:
            qkv = fused[1](x.reshape(B * T, H), fused[0])                    # (BT, (nq + nkv) * d + nkv * dv)
            if not qkv.is_contiguous():
                qkv = qkv.contiguous()
            kernels.qkv_rope_(qkv, nq + nkv, d, rope[0], rope[1], (nq + nkv) * d, self.value_scale)
            q = qkv[:, :nq * d].view(B, T, nq, d)
            k = qkv[:, nq * d:(nq + nkv) * d].view(B, T, nkv, d)
            v = qkv[:, (nq + nkv) * d:].view(B, T, nkv, dv)
        else:
            cos, sin = rope
            qkv = fused[1](x, fused[0])                                      # (B, T, (nq + nkv) * d + nkv * dv)
            qk = apply_partial_rope(qkv[..., :(nq + nkv) * d].view(B, T, nq + nkv, d), cos, sin)
            q, k = qk[:, :, :nq], qk[:, :, nq:]
            v = qkv[..., (nq + nkv) * d:].reshape(B, T, nkv, dv) * self.value_scale
        return self.attend_project(q, k, v, positions, backend)

    def extra_repr(self) -> str:
        t = self.qkv_fused[0]
        if self._qkv_panels is not None:
            how = "panels"
        elif t.dtype == torch.bfloat16:
            how = "row-major kernel"
        elif t.dtype == torch.float32:
            how = "torch.matmul"
        else:                                      # e.g. FP8 bytes with their tile scales (fp8_layout.fuse_fp8_qkv)
            how = "the FP8 kernel"
        return (f"qkv_fused={tuple(t.shape)} {t.dtype} on {how}, "
                f"rope={'kernel' if self.rope_kernel else 'torch'}")


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


class Bf16Experts(Experts):
    """bf16 experts with fp32 activations, running only the picked experts: gate_proj/up_proj are the two halves of
    one (E, 2F, D) tensor `_gate_up`, so each expert is one fused gate|up product against `_gate_up[e]` and one
    against `down_proj[e]` (D, F), mixed by `_mix_picked`; rows grouped by expert go to kernels.experts_bf16 in one
    call while no expert has more than KERNEL_MAX_ROWS of them. More than KERNEL_MAX_ROWS tokens (prefill) on an
    AVX-512F machine: kernels.prefill.experts, routing groups, products and mixing in one C call whose tasks (one
    expert x 64 tokens each) the pool's threads share, where torch's MKL products split each small product over
    the threads and pay their wake-up per op (kernels/prefill.c)."""

    @classmethod
    def adopt(cls, ex: Experts) -> "Bf16Experts":
        new = _adopt(cls, ex)
        Fd = new.gate_proj.shape[1]
        gu = torch.cat([new.gate_proj.data, new.up_proj.data], dim=1)            # (E, 2F, D)
        new.gate_proj.data, new.up_proj.data = gu[:, :Fd], gu[:, Fd:]
        new.down_proj.data = new.down_proj.data.contiguous()                       # (E, D, F)
        new._gate_up = gu
        new._gate_up_list, new._down_list = list(gu.unbind(0)), list(new.down_proj.data.unbind(0))
        return new

    def layout_ok(self) -> bool:
        """gate_proj is still a view of `_gate_up` and both are bf16 (a cast or `.to()` breaks that)."""
        return (self.gate_proj.data_ptr() == self._gate_up.data_ptr() and self._gate_up.dtype == torch.bfloat16
                and self.down_proj.dtype == torch.bfloat16)

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        if x_TD.device.type != "cpu" or torch.is_grad_enabled() or not self.layout_ok():
            dt = self.gate_proj.dtype
            return super().forward(x_TD.to(dt), topk_idx_TK, weight_TK).to(x_TD.dtype)
        gu, gu_list, dn_list = self._gate_up, self._gate_up_list, self._down_list

        def swiglu(x_nD, e):                                  # (n, D) -> (n, D), unweighted
            return _w16_matmul(kernels.silu_mul(_w16_matmul(x_nD, gu_list[e])), dn_list[e])

        if x_TD.shape[0] > KERNEL_MAX_ROWS and prefill_kernels.fast() and self.down_proj.is_contiguous():
            return prefill_kernels.experts(x_TD.contiguous(), topk_idx_TK, weight_TK, gu, self.down_proj)

        def grouped(x_PD, counts_E):
            if int(counts_E.max()) > KERNEL_MAX_ROWS:        # prefill: expert by expert, MKL on upcast weights
                return None
            return kernels.experts_bf16(x_PD, counts_E, gu, self.down_proj)      # decode: all in one kernel call
        return _mix_picked(x_TD, topk_idx_TK, weight_TK.float(), len(gu_list), swiglu, grouped)

    def extra_repr(self) -> str:
        return f"gate_up={tuple(self._gate_up.shape)} {self._gate_up.dtype}, picked experts on the bf16 kernels"


class KernelMoE(MoE):
    """One token with fp32 activations and plain (not group-limited) top-k routing: router and picked experts in one
    kernel call (kernels.moe_token_bf16, the call the fused decode step makes for one sequence, so the two paths
    agree bit for bit). Anything else: `MoE.forward` (the torch router, then `Bf16Experts`)."""

    @classmethod
    def adopt(cls, moe: MoE) -> "KernelMoE":
        return _adopt(cls, moe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ex, r = self.experts, self.gate
        if (x.numel() != x.shape[-1] or x.dtype != torch.float32 or torch.is_grad_enabled() or r.n_group > 1
                or not isinstance(ex, Bf16Experts) or not ex.layout_ok() or not ex.down_proj.is_contiguous()):
            return super().forward(x)
        y, self.last_topk_idx = kernels.moe_token_bf16(x.reshape(1, -1), r.weight, r.e_score_correction_bias,
                                                       r.top_k, r.norm_topk_prob, r.routed_scaling_factor,
                                                       ex._gate_up, ex.down_proj)
        return y.view(x.shape)

    def extra_repr(self) -> str:
        return "one token: router + experts in one kernel call"


class Fp32Experts(Experts):
    """fp32 experts running only the picked experts, each as one fused gate|up matmul `x @ _gate_up[e]` (D, 2F) and
    one `h @ _down_t[e]` (F, D), both row-major right-hand sides (MKL's fast GEMV/GEMM case), mixed by `_mix_picked`;
    gate_proj/up_proj/down_proj are transposed views of those tensors."""

    @classmethod
    def adopt(cls, ex: Experts) -> "Fp32Experts":
        new = _adopt(cls, ex)
        E, Fd, D = new.gate_proj.shape
        gu = torch.empty(E, D, 2 * Fd, dtype=new.gate_proj.dtype, device=new.gate_proj.device)
        gu[:, :, :Fd].copy_(new.gate_proj.data.transpose(1, 2))
        gu[:, :, Fd:].copy_(new.up_proj.data.transpose(1, 2))
        dn = new.down_proj.data.transpose(1, 2).contiguous()                # (E, F, D)
        new.gate_proj.data = gu[:, :, :Fd].transpose(1, 2)
        new.up_proj.data = gu[:, :, Fd:].transpose(1, 2)
        new.down_proj.data = dn.transpose(1, 2)
        new._gate_up, new._down_t = gu, dn
        new._gate_up_list, new._down_t_list = list(gu.unbind(0)), list(dn.unbind(0))
        return new

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        gu, dn = self._gate_up, self._down_t
        if (x_TD.device.type != "cpu" or torch.is_grad_enabled() or self.gate_proj.data_ptr() != gu.data_ptr()
                or self.down_proj.data_ptr() != dn.data_ptr() or x_TD.dtype != gu.dtype):
            # training (the views carry no gradient), or moved / cast since the transform
            return super().forward(x_TD, topk_idx_TK, weight_TK)
        Fd = dn.shape[1]
        gu, dn = self._gate_up_list, self._down_t_list             # per-expert views: no indexing op per call

        def swiglu(x_nD, e):                                          # row-major right-hand sides: MKL's fast case
            h = torch.mm(x_nD, gu[e])                                                      # (n, 2F)
            return torch.mm(F.silu(h[:, :Fd]) * h[:, Fd:], dn[e])
        w_TK = weight_TK if weight_TK.dtype == x_TD.dtype else weight_TK.to(x_TD.dtype)
        return _mix_picked(x_TD, topk_idx_TK, w_TK, len(gu), swiglu)

    def extra_repr(self) -> str:
        return f"gate_up={tuple(self._gate_up.shape)} {self._gate_up.dtype}, picked experts on MKL"


class PickedExperts(Experts):
    """Experts in a non-fp32 compute dtype (bf16 on CPU): one or two tokens run only their picked experts (the
    stacked layout stays: transposed layouts sent oneDNN/MKL to paths 4x slower in bf16 here); more tokens take
    `Experts.forward`."""

    @classmethod
    def adopt(cls, ex: Experts) -> "PickedExperts":
        return _adopt(cls, ex)

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        T, K = topk_idx_TK.shape
        if T > 2 or x_TD.device.type != "cpu" or torch.is_grad_enabled():
            return super().forward(x_TD, topk_idx_TK, weight_TK)

        def swiglu(x_nD, e):
            return F.linear(F.silu(F.linear(x_nD, self.gate_proj[e])) * F.linear(x_nD, self.up_proj[e]),
                            self.down_proj[e])
        return _mix_picked(x_TD, topk_idx_TK, weight_TK.to(x_TD.dtype), self.gate_proj.shape[0], swiglu)

    def extra_repr(self) -> str:
        return "picked experts for <= 2 tokens, else Experts.forward"


# ---------------------------------------------------------------------------------------------- transforms


def _swap(model: nn.Module, new_of) -> None:
    """Replace, bottom-up, every submodule m of model for which new_of(m) returns a module (None: keep m). Children
    are replaced before their parent is adopted, so the parent's copy holds the new children; a module reachable
    under several names is replaced by one new module everywhere."""
    done: dict[int, nn.Module] = {}

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                visit(child)
                done[id(child)] = new_of(child) or child
            parent._modules[name] = done[id(child)]
    visit(model)


def engine_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree for the engine to transform, leaving `model` as it was: new module and parameter
    objects (ties kept) over the same storages, and fresh hook dicts; other attributes (the config, an FP8 expert
    store) are shared, not copied, so no weight is copied here. The transforms replace what they re-lay out
    (`.data =`), so those new tensors are the copy's alone; tensors they keep stay shared with `model`, so editing
    model's weights in place afterwards would reach the engine only partly: build a new engine instead."""
    modules: dict[int, nn.Module] = {}
    params: dict[int, nn.Parameter] = {}

    def copy_of(m: nn.Module) -> nn.Module:
        if id(m) in modules:
            return modules[id(m)]
        new = modules[id(m)] = _adopt(type(m), m)
        for k, v in vars(new).items():
            if isinstance(v, dict) and "hook" in k:
                setattr(new, k, type(v)(v))
        for k, p in new._parameters.items():
            if p is not None:
                if id(p) not in params:
                    params[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                new._parameters[k] = params[id(p)]
        for k, b in new._buffers.items():
            if b is not None:
                new._buffers[k] = b.detach()
        for k, c in new._modules.items():
            if c is not None:
                new._modules[k] = copy_of(c)
        return new
    return copy_of(model)


def use_bf16_weights(model: nn.Module, panels: bool = True) -> None:
    """bf16 matmul weights, fp32 everything else (module docstring). The model arrives cast to bf16 (router in
    fp32, as `MiMoForCausalLM.cast` leaves it); norms and sinks go back to fp32 (exact: they were bf16 values).
    panels: also pack the dense linears and the fused q|k|v (`Panels`)."""
    fused: dict[int, tuple] = {}            # id(Attention) -> (t, matmul, panels)
    fused_parts: set[int] = set()           # q/k/v linears: multiplied fused, so no panels of their own
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm) and m.weight.dtype != torch.float32:
                m.weight.data = m.weight.data.float()
            elif isinstance(m, Attention):
                if m.attention_sink_bias is not None and m.attention_sink_bias.dtype != torch.float32:
                    m.attention_sink_bias.data = m.attention_sink_bias.data.float()
                ws = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]
                if not isinstance(m, FastAttention) and all(w.dtype == torch.bfloat16 for w in ws):
                    t = torch.cat([w.data for w in ws], dim=0)                       # (q | k | v, H), row blocks
                    lo = 0
                    for w in ws:
                        w.data = t[lo:lo + w.shape[0]]
                        lo += w.shape[0]
                    p = Panels(t) if panels else None
                    fused[id(m)] = (t, _w16_matmul if p is None else functools.partial(_panels_matmul, p), p)
                if id(m) in fused or isinstance(m, FastAttention):
                    fused_parts.update(id(lin) for lin in (m.q_proj, m.k_proj, m.v_proj))

        def new_of(m: nn.Module) -> nn.Module | None:
            if isinstance(m, Attention) and id(m) in fused:
                return FastAttention.adopt(m, *fused[id(m)])
            if type(m) is nn.Embedding and m.weight.dtype == torch.bfloat16:
                return Bf16Embedding.adopt(m)
            if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16:
                return Bf16Linear.adopt(m, panels and id(m) not in fused_parts)
            if type(m) is Experts and m.gate_proj.dtype == torch.bfloat16:
                return Bf16Experts.adopt(m)
            if type(m) is MoE and isinstance(m.experts, Bf16Experts):      # children are swapped first
                return KernelMoE.adopt(m)
            return None
        _swap(model, new_of)


def _is_fp32(m: nn.Module) -> bool:
    p = next(m.parameters(), None)
    return p is None or p.dtype == torch.float32


def _same_dtype_layout(model: nn.Module) -> None:
    """fp32: column-major wide linears, fused q|k|v (H, q|k|v), fused (E, D, 2F) experts; bf16: picked experts."""
    fused: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for m in model.modules():
            if type(m) is Attention and _is_fp32(m):
                ws = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]
                t = torch.cat([w.data.t() for w in ws], dim=1).contiguous()      # (H, q | k | v)
                lo = 0
                for w in ws:
                    w.data = t[:, lo:lo + w.shape[0]].t()
                    lo += w.shape[0]
                fused[id(m)] = t
        for m in model.modules():        # after the fusion: q/k/v are views of it now, not contiguous, so skipped
            if (isinstance(m, nn.Linear) and _is_fp32(m) and m.out_features > m.in_features
                    and m.weight.is_contiguous()):
                m.weight.data = m.weight.data.t().contiguous().t()

        def new_of(m: nn.Module) -> nn.Module | None:
            if id(m) in fused:
                return FastAttention.adopt(m, fused[id(m)], torch.matmul, None)
            if type(m) is Experts:
                return Fp32Experts.adopt(m) if m.gate_proj.dtype == torch.float32 else PickedExperts.adopt(m)
            return None
        _swap(model, new_of)


def _fast_fp32_ops(model: nn.Module) -> None:
    """fp32 compute on CPU with the kernels (either weight mode): RMSNorm and the attention's RoPE through them."""
    for m in model.modules():
        if isinstance(m, FastAttention):
            m.rope_kernel = True
    _swap(model, lambda m: FastRMSNorm.adopt(m) if type(m) is RMSNorm else None)


def use_cpu_layout(model: nn.Module, compute_dtype: torch.dtype | None = None, panels: bool = True) -> None:
    """The runner's entry point, in place on `model`. compute_dtype None = the matmul weights' dtype. fp32 compute
    on bf16 weights: `use_bf16_weights` (with `panels`); otherwise `_same_dtype_layout`."""
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


def use_huge_pages(model: nn.Module) -> int:
    """Move the model's large CPU tensors onto huge pages (engine/hugepages.py): parameters, buffers, the tensors
    the classes above keep (fused q|k|v, expert gate|up, their per-expert views) and the packed panels. Values, views
    and aliasing are kept, so a panel copy that was current stays current (re-stamped, not repacked). Call before
    building anything that holds raw pointers (FusedDecoder). -> bytes moved."""
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


def matmul_weight_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's nn.Linear weights (the router and norms may differ)."""
    lin = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    return lin.weight.dtype if lin is not None else next(model.parameters()).dtype
