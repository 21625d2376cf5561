"""Python side of kernels/prefill.c: a layer's routed experts over many tokens and sink attention over long slices,
each one C call split into coarse tasks over the kernels' thread pool (prefill.c says why).

* `experts(x_TD, topk_idx_TK, weight_TK, gate_up, down)`: the routed experts of `Experts.forward` (bf16 weights,
  fp32 activations), mixing included;
* `panels(x, wp, N)`: a dense product on packed panels for many rows, split by rows and panels over the pool;
* `attention(...)`: sink attention of a step's new rows against their cached keys and each other (the general
  path of `engine.runner.PagedAttention`), from positions alone;
* `fast()`: True where the kernels run vectorized (AVX-512F); elsewhere they run portable C, correct but slower
  than torch, so the callers keep torch's path.

Tested against the torch references in tests/test_prefill_kernels.py.
"""

from __future__ import annotations

import torch

from . import _gemm, _load


def _lib():
    lib = _load()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available")
    return lib


def fast() -> bool:
    """The prefill kernels are compiled for and run on AVX-512F here (and MIMOFLASH_PREFILL_PORTABLE is unset)."""
    lib = _load()
    return lib is not None and lib.mf_prefill_simd() == 512


def _rows(t: torch.Tensor, name: str, inner: int) -> None:
    """t: fp32 CPU, the last dims contiguous (row stride free), `inner` values per row."""
    if (t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1
            or (t.dim() == 3 and t.stride(1) != t.shape[2]) or t[0].numel() != inner):
        raise ValueError(f"prefill kernels: {name} must be fp32 rows with contiguous heads, got {tuple(t.shape)} "
                         f"strides {t.stride()} {t.dtype}")


def experts(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """x_TD (T, D) fp32; topk_idx_TK (T, K) int64; weight_TK (T, K) fp32; gate_up (E, 2F, D) and down (E, D, F)
    bf16, contiguous -> (T, D) fp32 = sum_k weight[t, k] * down_e @ (silu(gate_e @ x_t) * (up_e @ x_t))."""
    T, D = x_TD.shape
    E, F2, D2 = gate_up.shape
    K = topk_idx_TK.shape[1]
    if (x_TD.dtype != torch.float32 or not x_TD.is_contiguous() or D2 != D or down.shape != (E, D, F2 // 2)
            or gate_up.dtype != torch.bfloat16 or down.dtype != torch.bfloat16 or not gate_up.is_contiguous()
            or not down.is_contiguous() or topk_idx_TK.shape != (T, K) or weight_TK.shape != (T, K)):
        raise ValueError("prefill kernels: experts got unexpected shapes, dtypes or layouts")
    idx = topk_idx_TK.to(torch.int64).contiguous()
    w = weight_TK.to(torch.float32).contiguous()
    y_PD = torch.empty(T * K, D, dtype=torch.float32)
    out = torch.empty(T, D, dtype=torch.float32)
    rc = _lib().mf_prefill_experts(x_TD.data_ptr(), T, D, idx.data_ptr(), w.data_ptr(), K, E, F2 // 2,
                                   gate_up.data_ptr(), down.data_ptr(), y_PD.data_ptr(), out.data_ptr())
    if rc == -1:
        raise MemoryError("prefill kernels: experts out of memory")
    if rc:
        raise ValueError("prefill kernels: expert ids out of range or too many experts per token")
    return out


def panels(x: torch.Tensor, wp: torch.Tensor, N: int) -> torch.Tensor:
    """kernels.linear_panels(x, wp, N) for many rows, the same values: its kernel on tasks of 32 rows x 8 panels
    (it splits a product by panels only, and not one of fewer than 2^16 weights)."""
    K = x.shape[-1]
    if (x.dtype != torch.float32 or wp.dtype != torch.bfloat16 or wp.dim() != 3 or wp.shape[1] != K
            or not wp.is_contiguous() or not (wp.shape[0] - 1) * 16 < N <= wp.shape[0] * 16):
        raise ValueError("prefill kernels: panels got unexpected shapes, dtypes or layouts")
    return _gemm(_lib().mf_prefill_panels, x, wp, N)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, seq_lo: torch.Tensor,
              k_pool: torch.Tensor, v_pool: torch.Tensor, read_slots: torch.Tensor, past_pos: torch.Tensor,
              window: int | None, sinks: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Sink attention of N new rows in B sequences -> (N, nq, dv).

    q (N, nq, d), k (N, h, d), v (N, h, dv): fp32, heads contiguous, any row stride; pos (N,) their positions;
    seq_lo (B + 1,) the flat row range of each sequence. Cached keys: k_pool (h, S, d), v_pool (h, S, dv), both fp32
    or both bf16 (read exactly as fp32), contiguous, read at read_slots (B, P) whose positions are past_pos (B, P)
    (-1: not a key). Row i of sequence b
    sees b's keys at positions p <= pos[i] (and pos[i] - p < window), its own new rows included, plus the sink
    logit sinks[head] in the softmax's denominator."""
    N, nq, d = q.shape
    h, dv = k.shape[1], v.shape[2]
    _rows(q, "q", nq * d), _rows(k, "k", h * d), _rows(v, "v", h * dv)
    B, P = read_slots.shape
    if (k_pool.dtype not in (torch.float32, torch.bfloat16) or v_pool.dtype != k_pool.dtype
            or not k_pool.is_contiguous() or not v_pool.is_contiguous() or k_pool.shape[0] != h or k_pool.shape[2] != d
            or v_pool.shape != (h, k_pool.shape[1], dv) or past_pos.shape != (B, P) or seq_lo.shape != (B + 1,)
            or pos.shape != (N,) or (sinks is not None and sinks.shape != (nq,))):
        raise ValueError("prefill kernels: attention got unexpected shapes, dtypes or layouts")
    longs = [t.to(torch.int64).contiguous() for t in (pos, seq_lo, read_slots, past_pos)]
    snk = sinks.to(torch.float32).contiguous() if sinks is not None else None
    out = torch.empty(N, nq, dv, dtype=torch.float32)
    rc = _lib().mf_prefill_attn(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                longs[0].data_ptr(), longs[1].data_ptr(), B, k_pool.data_ptr(), v_pool.data_ptr(),
                                k_pool.shape[1], int(k_pool.dtype == torch.bfloat16), longs[2].data_ptr(), longs[3].data_ptr(), P, nq, h, d, dv,
                                window or 0, snk.data_ptr() if snk is not None else None, scale, out.data_ptr())
    if rc == -1:
        raise MemoryError("prefill kernels: attention out of memory")
    if rc:
        raise ValueError("prefill kernels: attention got inconsistent sequence ranges or head counts")
    return out
