"""CPU kernels that torch lacks, compiled on first use with the system C compiler and loaded with ctypes.

One kernel today: `linear_bf16w(x, w)`, y = x @ w.T with x fp32 and w stored as bfloat16 (wgemm.c says why). The
shared library is built from `wgemm.c` into a per-source-hash cache directory (`$MIMOFLASH_CACHE`, default
`~/.cache/mimoflash/kernels`) in about a second, atomically (concurrent processes may race to build it), and reused
afterwards. Without a compiler, or with `MIMOFLASH_NO_KERNELS=1`, `available()` is False and callers keep weights
in fp32 instead; `linear_bf16w_reference` is the slow torch path the tests compare against.

No torch headers are involved (the kernel takes raw pointers), so building needs only `cc`, not a torch build
toolchain; ctypes releases the GIL during the call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("wgemm.c")
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=c11"]
_lib: ctypes.CDLL | None = None
_tried = False


def _compiler() -> str | None:
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cache_dir() -> Path:
    return Path(os.environ.get("MIMOFLASH_CACHE", Path.home() / ".cache" / "mimoflash")) / "kernels"


def build(force: bool = False) -> Path:
    """Compile wgemm.c (if not cached) -> path of the shared library. Raises RuntimeError naming what failed."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC); mimoflash runs without its CPU kernels")
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + platform.machine().encode()).hexdigest()[:16]
    out = _cache_dir() / f"libmimoflash_cpu_{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE.name} with {cc} failed:\n{r.stderr.strip()}")
        os.replace(tmp, out)                      # atomic: a concurrent builder sees all or nothing
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("MIMOFLASH_NO_KERNELS", "") not in ("", "0"):
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        log.warning("CPU kernels unavailable, bf16 weights will be upcast to fp32: %s", e)
        return None
    c_long, c_void = ctypes.c_long, ctypes.c_void_p
    lib.mf_gemm_bf16w.argtypes = [c_void, c_long, c_void, c_void, c_long, c_long, c_long, c_long]
    lib.mf_gemm_bf16w.restype = ctypes.c_int
    lib.mf_simd_level.restype = ctypes.c_int
    _lib = lib
    return lib


def available() -> bool:
    return _load() is not None


def simd_level() -> int:
    """2 = AVX2+FMA path, 0 = portable loop, -1 = not built."""
    lib = _load()
    return -1 if lib is None else int(lib.mf_simd_level())


def linear_bf16w_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same product in torch: the weight upcast (exactly) and an fp32 matmul."""
    return F.linear(x, w.float())


def linear_bf16w(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) fp32, w (N, K) bf16 contiguous -> (..., N) fp32. Falls back to the reference without the library."""
    lib = _load()
    K = x.shape[-1]
    if lib is None or x.device.type != "cpu":
        return linear_bf16w_reference(x, w)
    if x.dtype != torch.float32 or w.dtype != torch.bfloat16 or w.dim() != 2 or w.shape[1] != K:
        raise ValueError(f"linear_bf16w wants x (..., K) float32 and w (N, K) bfloat16, got x {tuple(x.shape)} "
                         f"{x.dtype}, w {tuple(w.shape)} {w.dtype}")
    if not w.is_contiguous():
        raise ValueError("linear_bf16w wants a contiguous (row-major) weight")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], w.shape[0]
    y = torch.empty(M, N, dtype=torch.float32) if out is None else out
    if M:
        rc = lib.mf_gemm_bf16w(x2.data_ptr(), x2.stride(0), w.data_ptr(), y.data_ptr(), y.stride(0), M, N, K)
        if rc != 0:
            raise MemoryError("linear_bf16w: could not allocate the kernel's scratch buffer")
    return y.view(*lead, N)
