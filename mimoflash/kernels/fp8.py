"""Python side of kernels/fp8.c: products against block-FP8 weights kept as shipped (E4M3 bytes + fp32 tile scales).

* `linear_fp8(x, w, s, block)`: y = x @ dequant(w, s).T with x fp32. Up to `KERNEL_MAX_ROWS` rows (decode) run in
  the C kernel, which dequantises inside the product; more rows (prefill) dequantise `_CHUNK_BYTES` of weight rows at
  a time to fp32 and hand them to torch's GEMM, so no whole fp32 copy of the weight ever exists.
* `experts_fp8(x_PD, counts, ptrs, ...)`: routed experts over tokens grouped by expert, one C call for a layer.
* `linear_fp8_reference`: the slow path the tests compare against (the exact fp32 dequantisation, then F.linear).

The result equals the fp32-dequantised weight's product up to rounding order (fp8.c says why).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from ..checkpoint.fp8 import dequantize_fp8_block
from . import _load

KERNEL_MAX_ROWS = 32            # above this, chunks of dequantised weight rows through torch's GEMM are faster
_CHUNK_BYTES = 16 << 20         # fp32 bytes of weight rows dequantised at a time on the many-row path


def _lib() -> ctypes.CDLL | None:
    """The kernels' library (its ctypes signatures are set and checked against the header by kernels._load)."""
    return _load()


def linear_fp8_reference(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The exact fp32 dequantisation, then F.linear."""
    return F.linear(x, dequantize_fp8_block(w, s, block, torch.float32))


def _chunked(x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Many rows: weight rows dequantised a whole number of block rows at a time, each chunk through torch's GEMM."""
    N, K = w.shape
    br = block[0]
    rows = max(br, (_CHUNK_BYTES // (4 * K)) // br * br)
    y = torch.empty(x2.shape[0], N, dtype=torch.float32)
    for lo in range(0, N, rows):
        hi = min(N, lo + rows)
        wf = dequantize_fp8_block(w[lo:hi], s[lo // br:-(-hi // br)], block, torch.float32)
        y[:, lo:hi] = x2 @ wf.t()
    return y


def linear_fp8(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x (..., K) fp32, w (N, K) float8_e4m3fn, s its fp32 scale grid -> (..., N) fp32 = x @ dequant(w, s).T."""
    K = x.shape[-1]
    if x.dtype != torch.float32 or w.shape[-1] != K:
        raise ValueError(f"linear_fp8 wants x (..., {w.shape[-1]}) float32, got {tuple(x.shape)} {x.dtype}")
    x2 = x.reshape(-1, K)
    lib = _lib()
    if lib is None or x.device.type != "cpu":
        y = linear_fp8_reference(x2, w, s, block)
    elif x2.shape[0] > KERNEL_MAX_ROWS:
        y = _chunked(x2, w, s, block)
    else:
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        M, N = x2.shape[0], w.shape[0]
        y = torch.empty(M, N, dtype=torch.float32)
        if M and lib.mf_gemm_fp8w(x2.data_ptr(), x2.stride(0), w.data_ptr(), s.data_ptr(), s.shape[1], y.data_ptr(),
                                  N, M, N, K, block[0], block[1]):
            raise MemoryError("linear_fp8: could not allocate the kernel's scratch buffer")
    return y.view(*x.shape[:-1], w.shape[0])


def experts_fp8(x_PD: torch.Tensor, counts: list[int], ptrs: torch.Tensor, D: int, Fd: int,
                block: tuple[int, int]) -> torch.Tensor:
    """x_PD (P, D) fp32 rows sorted by expert, counts[i] rows for the i-th expert listed in ptrs (n, 6) int64 (its
    gate, gate scale, up, up scale, down, down scale addresses, checked by the caller) -> (P, D) unweighted SwiGLU
    outputs. Needs the library (callers check `available()`)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("experts_fp8 needs the CPU kernels")
    x_PD = x_PD.contiguous()
    y = torch.empty_like(x_PD)
    rows = torch.tensor(counts, dtype=torch.long)
    if lib.mf_experts_fp8(x_PD.data_ptr(), x_PD.stride(0), D, Fd, len(counts), rows.data_ptr(), ptrs.data_ptr(),
                          block[0], block[1], y.data_ptr(), y.stride(0)):
        raise MemoryError("experts_fp8: out of memory for the experts' intermediate rows")
    return y


def available() -> bool:
    return _lib() is not None
