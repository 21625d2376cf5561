"""CPU kernels that torch lacks, compiled on first use with the system C compiler and loaded with ctypes.

* `linear_bf16w(x, w)`: y = x @ w.T with x fp32 and w stored as bfloat16 (wgemm.c says why);
* `pack_panels(w)` / `linear_panels(x, wp, N)`: the same product on the weight repacked in 16-row k-major panels,
  an outer-product layout that runs many-row products (batched decode, prefill) faster (panels.c);
* a persistent thread pool (pool.c) that splits the GEMMs, attention and experts over `set_num_threads` threads;
* `decode_layer` (decode.c): a whole decoder layer for one decoded token in one call (`LayerArgs` holds its
  weights' pointers); used by `engine/fused_decode.py`;
* fused fp32 decode ops (ops.c): `rms_norm`, `qkv_rope_` (RoPE on q|k and the value scale, in place),
  `silu_mul`, `argmax_rows` (greedy sampling), `attn_decode_paged` (one query per sequence read against the paged
  cache in place, GQA, optional sink and mask), `moe_token_bf16` and `experts_bf16` (a layer's routed experts in
  one call).

These take raw pointers, so the wrappers check dtypes, shapes and strides and raise ValueError otherwise. The
shared library is built from the C files into a per-source-hash cache directory (`$MIMOFLASH_CACHE`, default
`~/.cache/mimoflash/kernels`) in about a second, atomically (concurrent processes may race to build it), and reused
afterwards. Without a compiler, or with `MIMOFLASH_NO_KERNELS=1`, `available()` is False and callers keep weights
in fp32 instead; `linear_bf16w_reference` is the slow torch path the tests compare against.

No torch headers are involved (the kernel takes raw pointers), so building needs only `cc`, not a torch build
toolchain; ctypes releases the GIL during the call.

The C interface is declared once, in mimoflash_kernels.h, which every .c file includes (so the compiler holds each
definition to its prototype). Loading the library checks `_SIGNATURES`, the ctypes side, against the header's
Python section and `LayerArgs` against the header's `mf_layer` (field names in order; offsets and size as the
compiler laid them out, from `mf_layer_abi`): a difference raises `KernelABIError` naming it, instead of a call
that passes arguments or reads struct fields at the wrong place.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(n) for n in ("wgemm.c", "panels.c", "ops.c", "decode.c", "pool.c", "fp8.c",
                                                  "prefill.c", "steps.c", "draft.c", "speculate.c",
                                                  "abi.c")]
_HEADER = Path(__file__).with_name("mimoflash_kernels.h")
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=gnu11", "-fopenmp-simd", "-pthread"]
_lib: ctypes.CDLL | None = None
_tried = False


def _compiler() -> str | None:
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cache_dir() -> Path:
    return Path(os.environ.get("MIMOFLASH_CACHE", Path.home() / ".cache" / "mimoflash")) / "kernels"


def build(force: bool = False) -> Path:
    """Compile the kernels (if not cached) -> path of the shared library. Raises RuntimeError naming what failed."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC); mimoflash runs without its CPU kernels")
    src = b"".join(p.read_bytes() for p in _SOURCES + [_HEADER])
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + platform.machine().encode()).hexdigest()[:16]
    out = _cache_dir() / f"libmimoflash_cpu_{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *_FLAGS, "-o", tmp, *map(str, _SOURCES), "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {', '.join(p.name for p in _SOURCES)} with {cc} failed:\n{r.stderr.strip()}")
        os.replace(tmp, out)                      # atomic: a concurrent builder sees all or nothing
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _abi_error
    if _abi_error is not None:
        raise _abi_error
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
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    try:
        check_abi(lib)
    except KernelABIError as e:         # not a reason to run without the kernels: a bug, raised on every use
        _abi_error = e
        raise
    _lib = lib
    return lib


# The ctypes side of mimoflash_kernels.h's Python section: name -> (restype, argtypes). Pointers are addresses.
_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
_SIGNATURES: dict[str, tuple] = {
    "mf_gemm_bf16w": (None, [_P, _L, _P, _P, _L, _L, _L, _L]),
    "mf_gemm_bf16p": (None, [_P, _L, _P, _P, _L, _L, _L, _L]),
    "mf_simd_level": (_I, []),
    "mf_rms_norm": (None, [_P, _L, _P, _P, _L, _L, _L, _F]),
    "mf_qkv_rope": (None, [_P, _L, _L, _L, _L, _L, _P, _P, _L, _L, _F]),
    "mf_embed_bf16": (_I, [_P, _L, _P, _L, _L, _P]),
    "mf_silu_mul": (None, [_P, _L, _P, _L, _L, _L]),
    "mf_attn_decode": (_I, [_P, _L, _P, _L, _P, _L, _P, _P, _P, _L, _L, _L, _L, _L, _L, _F, _P, _P, _L, _L, _L, _I]),
    "mf_moe_token_bf16": (_I, [_P, _L, _P, _P, _L, _L, _I, _F, _P, _P, _L, _P, _P]),
    "mf_experts_bf16": (_I, [_P, _L, _P, _L, _L, _L, _P, _P, _P, _P]),
    "mf_argmax_rows": (None, [_P, _L, _L, _L, _P]),
    "mf_read_sum": (ctypes.c_int64, [_P, _L]),
    "mf_decode_layer": (_I, [_P, _P, _L, _P, _P, _P, _P, _L, _L, _L, _P, _P, _P]),
    "mf_decode_timing": (None, [_I, _P]),
    "mf_decode_attn": (_I, [_P, _P, _L, _P, _P, _P, _P, _L, _L, _L, _P, _P, _P]),
    "mf_decode_ffn": (_I, [_P, _P, _L, _P, _P, _L, _L]),
    "mf_gemm_fp8w": (_I, [_P, _L, _P, _P, _L, _P, _L, _L, _L, _L, _L, _L]),
    "mf_experts_fp8": (_I, [_P, _L, _L, _L, _L, _P, _P, _L, _L, _P, _L]),
    "mf_prefill_experts": (_I, [_P, _L, _L, _P, _P, _L, _L, _L, _P, _P, _P, _P]),
    "mf_prefill_attn": (_I, [_P, _L, _P, _L, _P, _L, _P, _P, _L, _P, _P, _L, _I, _P, _P, _L, _L, _L, _L, _L, _L, _P,
                             _F, _P]),
    "mf_prefill_panels": (None, [_P, _L, _P, _P, _L, _L, _L, _L]),
    "mf_prefill_simd": (_I, []),
    "mf_decode_steps": (_L, [_L, _L, _L, _P, _P, _P, _P, _P, _L, _L, _P, _F, _P, _I, _P, _L, _L, _P, _P, _P, _P, _P,
                             _P, _P]),
    "mf_mtp_pass": (_L, [_P, _L, _P, _P, _L, _P, _L, _P, _F, _P, _F, _P, _I, _P, _P, _L, _P, _P, _F, _P, _I, _L, _P, _P,
                         _P]),
    "mf_mtp_chain": (_L, [_L, _P, _P, _P, _P, _L, _L, _P, _P, _L, _L, _P, _I, _L, _P, _P, _P, _P]),
    "mf_spec_cycles": (_L, [_L, _P, _P, _P, _P, _P, _L, _L, _P, _P]),
    "mf_set_num_threads": (None, [_I]),
    "mf_pool_probe": (_L, [_L, _L]),
    "mf_layer_abi": (_L, [_P, _L]),
}
_abi_error: Exception | None = None


class KernelABIError(RuntimeError):
    """The ctypes declarations disagree with mimoflash_kernels.h (a signature or the mf_layer struct)."""


_C_SCALARS = {"long": ctypes.c_long, "int": ctypes.c_int, "float": ctypes.c_float, "double": ctypes.c_double,
              "size_t": ctypes.c_size_t, "int64_t": ctypes.c_int64, "void": None}


def _c_to_ctypes(decl: str):
    """A parameter or return declaration ('const float *x', 'long', 'void') -> its ctypes type (pointers: c_void_p)."""
    if "*" in decl:
        return ctypes.c_void_p
    words = [w for w in decl.replace("const", " ").split() if w]
    if not words or words[0] not in _C_SCALARS:
        raise KernelABIError(f"mimoflash_kernels.h: no ctypes equivalent for {decl.strip()!r}")
    return _C_SCALARS[words[0]]


def header_prototypes(text: str | None = None) -> dict[str, tuple]:
    """The Python section of mimoflash_kernels.h -> {name: (restype, argtypes)} in ctypes terms."""
    text = _HEADER.read_text() if text is None else text
    m = re.search(r"mimoflash-python-begin \*/(.*?)/\* mimoflash-python-end", text, re.S)
    if m is None:
        raise KernelABIError("mimoflash_kernels.h: the Python section markers are missing")
    body = re.sub(r"/\*.*?\*/", " ", m.group(1), flags=re.S)
    out = {}
    for ret, name, args in re.findall(r"([A-Za-z_][\w\s\*]*?)\b(mf_\w+)\s*\(([^)]*)\)\s*;", body):
        params = [a for a in args.split(",") if a.strip() and a.strip() != "void"]
        # a parameter's name is its last word; what is left (with any '*') is its type
        out[name] = (_c_to_ctypes(ret), [_c_to_ctypes(re.sub(r"\w+\s*$", "", a)) for a in params])
    return out


def header_struct_fields(name: str = "mf_layer", text: str | None = None) -> list[str]:
    """Field names, in order, of `typedef struct { ... } name;` in mimoflash_kernels.h."""
    text = _HEADER.read_text() if text is None else text
    m = re.search(r"typedef struct \{(.*?)\}\s*" + name + r"\s*;", text, re.S)
    if m is None:
        raise KernelABIError(f"mimoflash_kernels.h: struct {name} not found")
    body = re.sub(r"/\*.*?\*/", " ", m.group(1), flags=re.S)
    fields = []
    for decl in body.split(";"):
        if decl.strip():
            first, *rest = decl.split(",")                  # 'const float *a', ' *b', ' c'
            fields += [re.findall(r"\w+", part)[-1] for part in [first] + rest]
    return fields


def _ctypes_name(t) -> str:
    return "void" if t is None else t.__name__


def check_abi(lib: ctypes.CDLL | None = None, header: str | None = None) -> None:
    """Compare the loaded library's ctypes declarations (restype/argtypes as set now, by `_SIGNATURES` or by a
    wrapper module) and `LayerArgs` with mimoflash_kernels.h; raise KernelABIError listing every difference."""
    lib = _lib_or_raise() if lib is None else lib
    protos, errors = header_prototypes(header), []
    for name in sorted(set(protos) | set(_SIGNATURES)):
        if name not in protos:
            errors.append(f"{name}: declared for ctypes but not in the header's Python section")
            continue
        if name not in _SIGNATURES:
            errors.append(f"{name}: in the header's Python section but not in kernels._SIGNATURES")
            continue
        fn = getattr(lib, name)
        want_res, want_args = protos[name]
        have_args = list(fn.argtypes or [])
        if fn.restype is not want_res:
            errors.append(f"{name}: returns {_ctypes_name(want_res)} in the header, ctypes says "
                          f"{_ctypes_name(fn.restype)}")
        if have_args != want_args:
            errors.append(f"{name}: header ({', '.join(map(_ctypes_name, want_args))}) != ctypes "
                          f"({', '.join(map(_ctypes_name, have_args))})")
    names = header_struct_fields("mf_layer", header)
    py_names = [f for f, _ in LayerArgs._fields_]
    if names != py_names:
        errors.append(f"mf_layer fields {names} != LayerArgs fields {py_names}")
    else:
        out = (ctypes.c_long * (len(names) + 1))()
        n = lib.mf_layer_abi(out, len(out))
        c = list(out)[:n]
        py = [ctypes.sizeof(LayerArgs)] + [getattr(LayerArgs, f).offset for f in py_names]
        if n != len(py) or c != py:
            errors.append(f"mf_layer size/offsets from the compiler {c} != LayerArgs {py} (abi.c lists every field)")
    if errors:
        raise KernelABIError("mimoflash kernels: the ctypes side disagrees with mimoflash_kernels.h:\n  "
                             + "\n  ".join(errors))


def set_num_threads(n: int) -> None:
    """Threads of the kernels' pool (pool.c): bf16-weight GEMMs of >= 2^16 weights split by rows, decode attention
    by (sequence, kv head), routed experts by expert. The engine passes torch.get_num_threads() so that `--threads`
    / torch.set_num_threads govern both. Results do not depend on the count."""
    lib = _load()
    if lib is not None:
        lib.mf_set_num_threads(int(n))


def pool_threads_used(n_tasks: int, spin_us: int) -> int:
    """For tests: run n_tasks tasks of ~spin_us microseconds each on the pool; -> how many threads ran them."""
    return int(_lib_or_raise().mf_pool_probe(int(n_tasks), int(spin_us)))


def available() -> bool:
    return _load() is not None


def simd_level() -> int:
    """2 = AVX2+FMA path, 0 = portable loop, -1 = not built."""
    lib = _load()
    return -1 if lib is None else int(lib.mf_simd_level())


def linear_bf16w_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same product in torch: the weight upcast (exactly) and an fp32 matmul."""
    return F.linear(x, w.float())


def linear_bf16w(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) fp32, w (N, K) bf16 contiguous -> (..., N) fp32. Falls back to the reference without the library.
    On the decode path (lm_head, module-path linears), so the common case (x 2-d, unit last stride) is the shortest."""
    lib = _lib if _lib is not None else _load()
    if lib is None or x.device.type != "cpu":
        return linear_bf16w_reference(x, w)
    K = x.shape[-1]
    if x.dtype != torch.float32 or w.dtype != torch.bfloat16 or w.dim() != 2 or w.shape[1] != K:
        raise ValueError(f"linear_bf16w wants x (..., K) float32 and w (N, K) bfloat16, got x {tuple(x.shape)} "
                         f"{x.dtype}, w {tuple(w.shape)} {w.dtype}")
    if not w.is_contiguous():
        raise ValueError("linear_bf16w wants a contiguous (row-major) weight")
    return _gemm(lib.mf_gemm_bf16w, x, w, w.shape[0])


def _gemm(fn, x: torch.Tensor, w: torch.Tensor, N: int) -> torch.Tensor:
    """The C product fn on x (..., K) rows (copied if their last stride is not 1) -> (..., N) fp32."""
    K = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    if M:
        fn(x2.data_ptr(), x2.stride(0), w.data_ptr(), y.data_ptr(), N, M, N, K)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], N)


PANEL = 16                          # output rows per panel (panels.c)


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """w (N, K) bf16 -> (ceil(N / 16), K, 16) bf16 panels (panels.c): panel p holds rows 16p..16p+15 k-major, and
    within a k-row, 32-bit word j holds row j in its low half and row j + 8 in its high half. N is padded with zero
    rows. A copy: it does not follow later in-place changes of w (cpu_layout.Panels checks for them)."""
    if w.dim() != 2 or w.dtype != torch.bfloat16:
        raise ValueError(f"pack_panels wants a (N, K) bfloat16 weight, got {tuple(w.shape)} {w.dtype}")
    N, K = w.shape
    P = -(-N // PANEL)
    padded = w.new_zeros(P * PANEL, K)
    padded[:N] = w
    return padded.view(P, 2, PANEL // 2, K).permute(0, 3, 2, 1).contiguous().view(P, K, PANEL)


def unpack_panels(wp: torch.Tensor, N: int) -> torch.Tensor:
    """The inverse of pack_panels: (P, K, 16) -> (N, K) (tests, and the slow paths that want the plain weight)."""
    P, K, _ = wp.shape
    return wp.view(P, K, PANEL // 2, 2).permute(0, 3, 2, 1).reshape(P * PANEL, K)[:N]


def linear_panels(x: torch.Tensor, wp: torch.Tensor, N: int) -> torch.Tensor:
    """x (..., K) fp32 @ w.T for w = unpack_panels(wp, N) -> (..., N) fp32, any number of rows. Without the library:
    the reference on the unpacked weight."""
    lib = _lib if _lib is not None else _load()
    K = x.shape[-1]
    if (x.dtype != torch.float32 or wp.dtype != torch.bfloat16 or wp.dim() != 3 or wp.shape[1:] != (K, PANEL)
            or not 0 < N <= wp.shape[0] * PANEL or N <= (wp.shape[0] - 1) * PANEL or not wp.is_contiguous()):
        raise ValueError(f"linear_panels wants x (..., K) float32 and contiguous (ceil(N/16), K, 16) bfloat16 "
                         f"panels, got x {tuple(x.shape)} {x.dtype}, panels {tuple(wp.shape)} {wp.dtype}, N {N}")
    if lib is None or x.device.type != "cpu":
        return F.linear(x, unpack_panels(wp, N).float())
    return _gemm(lib.mf_gemm_bf16p, x, wp, N)


def _lib_or_raise() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError("mimoflash CPU kernels are not available (see the warning logged when building them)")
    return lib


def _check(t: torch.Tensor, name: str, dim: int) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != dim or t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a {dim}-d float32 CPU tensor with unit last stride, got "
                         f"{tuple(t.shape)} {t.dtype} strides {t.stride()}")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) fp32 -> w * x / sqrt(mean(x^2) + eps), as `model.layers.RMSNorm` for fp32."""
    lib = _lib if _lib is not None else _lib_or_raise()
    D = x.shape[-1]
    if x.dtype != torch.float32 or w.dtype != torch.float32 or not x.is_contiguous() or w.shape != (D,):
        raise ValueError(f"rms_norm: wants contiguous float32 x (..., D) and w (D,), got {tuple(x.shape)} {x.dtype}, "
                         f"{tuple(w.shape)} {w.dtype}")
    y = torch.empty_like(x)
    lib.mf_rms_norm(x.data_ptr(), D, w.data_ptr(), y.data_ptr(), D, x.numel() // D, D, eps)
    return y


def qkv_rope_(qkv: torch.Tensor, heads: int, d: int, cos: torch.Tensor, sin: torch.Tensor, v_off: int,
              v_scale: float) -> torch.Tensor:
    """In place on qkv (N, W): rotate-half RoPE on the first cos.shape[-1] dims of each of the first `heads` heads
    of width d, then qkv[:, v_off:] *= v_scale. cos/sin (N, rd) fp32 with equal halves."""
    lib = _lib_or_raise()
    _check(qkv, "qkv", 2)
    N, W = qkv.shape
    rd = cos.shape[-1]
    cos, sin = cos.reshape(-1, rd).contiguous(), sin.reshape(-1, rd).contiguous()
    if cos.shape[0] != N or sin.shape != cos.shape or rd > d or heads * d > v_off or v_off > W:
        raise ValueError(f"qkv_rope_: inconsistent shapes qkv {tuple(qkv.shape)} cos {tuple(cos.shape)} heads {heads} "
                         f"d {d} v_off {v_off}")
    _check(cos, "cos", 2)
    _check(sin, "sin", 2)
    lib.mf_qkv_rope(qkv.data_ptr(), qkv.stride(0), N, heads, d, rd, cos.data_ptr(), sin.data_ptr(), v_off, W - v_off,
                    v_scale)
    return qkv


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x (R, V) float32 with unit last stride -> (R,) int64, equal to x.argmax(-1) (first index of the maximum; the
    first NaN if a row has one). Falls back to torch without the library or off the CPU."""
    lib = _lib if _lib is not None else _load()
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1:
        return x.argmax(dim=-1)
    R, V = x.shape
    out = torch.empty(R, dtype=torch.int64)
    if R and V:
        lib.mf_argmax_rows(x.data_ptr(), x.stride(0), R, V, out.data_ptr())
    elif R:
        return x.argmax(dim=-1)                   # torch's error for an empty row
    return out


def read_sum(t: torch.Tensor) -> int:
    """The 64-bit words of a contiguous CPU tensor's bytes summed (wrapping, as a signed int64), read by the pool's
    threads (set_num_threads) with vector loads: what the decode benchmarks time to measure the read bandwidth a
    weight-streaming kernel can reach. Raises RuntimeError without the library."""
    lib = _lib_or_raise()
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("read_sum needs a contiguous CPU tensor")
    return int(lib.mf_read_sum(t.data_ptr(), t.numel() * t.element_size()))


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """h (M, 2F) fp32 -> silu(h[:, :F]) * h[:, F:] (M, F)."""
    lib = _lib_or_raise()
    _check(h, "silu_mul h", 2)
    M, F2 = h.shape
    out = torch.empty(M, F2 // 2, dtype=torch.float32)
    lib.mf_silu_mul(h.data_ptr(), h.stride(0), out.data_ptr(), F2 // 2, M, F2 // 2)
    return out


def attn_decode_paged(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, chunk: int,
                      K: int, bias: torch.Tensor | None, sinks: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Decode attention reading the KV cache in place: q (B, nq, d) one query per sequence, k_pool (h, S, d) and
    v_pool (h, S, dv) contiguous, table (B, n) int64 chunk ids (blocks or rings of `chunk` slots): sequence b's key k
    is slot table[b, k // chunk] * chunk + k % chunk, for k < K <= n * chunk. bias (B, K) additive or None, sinks
    (nq,) or None -> (B, nq, dv) = softmax(scale * q.k + bias) @ v with the sink in the denominator only; query head
    j reads kv head j // (nq / h). The pools may be bfloat16 (kv_cache_dtype="bfloat16"; read as fp32, exactly)."""
    lib = _lib if _lib is not None else _lib_or_raise()
    B, nq, d = q.shape
    h, S, dk = k_pool.shape
    dv = v_pool.shape[2]
    n = table.shape[1]
    if (table.dim() != 2 or table.shape[0] != B or table.dtype != torch.int64 or not table.is_contiguous()
            or dk != d or v_pool.shape[:2] != (h, S) or nq % h or K > n * chunk or S % chunk):
        raise ValueError(f"attn_decode_paged: q {tuple(q.shape)} pools {tuple(k_pool.shape)} {tuple(v_pool.shape)} "
                         f"table {tuple(table.shape)} chunk {chunk} K {K}")
    if not (q.dtype == torch.float32 and k_pool.dtype == v_pool.dtype in (torch.float32, torch.bfloat16)
            and q.stride()[1:] == (d, 1) and k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("attn_decode_paged: q (contiguous heads) must be float32 and the pools (contiguous) both "
                         "float32 or both bfloat16")
    if bias is not None and (bias.numel() != B * K or not bias.is_contiguous() or bias.dtype != torch.float32):
        raise ValueError(f"attn_decode_paged: bias must be a contiguous float32 (B, K) = ({B}, {K}) mask")
    if sinks is not None and (sinks.dtype != torch.float32 or not sinks.is_contiguous()):
        sinks = sinks.float().contiguous()
    scratch = getattr(_local, "scratch", None)
    if scratch is None or scratch.numel() < K:
        scratch = _local.scratch = torch.empty(max(K, 4096), dtype=torch.float32)
    out = torch.empty(B, nq, dv, dtype=torch.float32)
    rc = lib.mf_attn_decode(q.data_ptr(), q.stride(0), k_pool.data_ptr(), k_pool.stride(0), v_pool.data_ptr(),
                            v_pool.stride(0), None if bias is None else bias.data_ptr(),
                            None if sinks is None else sinks.data_ptr(), out.data_ptr(), B, nq, h, K, d, dv, scale,
                            scratch.data_ptr(), table.data_ptr(), n, chunk, S // chunk,
                            int(k_pool.dtype == torch.bfloat16))
    if rc == -2:
        raise MemoryError("attn_decode_paged: could not allocate the kernel's row pointers")
    if rc:
        raise ValueError(f"attn_decode_paged: a chunk id in the table is outside [0, {S // chunk})")
    return out


_local = threading.local()          # attn_decode's score row per thread (ctypes releases the GIL), grown on demand


def moe_token_bf16(x: torch.Tensor, router_w: torch.Tensor, bias: torch.Tensor, top_k: int, norm_topk: bool,
                   scaling: float, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token (1, D) fp32 through a routed MoE: router_w (E, D) fp32, bias (E,) fp32, gate_up (E, 2F, D) and
    down (E, D, F) contiguous bf16 -> (y (1, D) fp32, chosen expert ids (1, top_k) int64). No group-limited routing."""
    lib = _lib_or_raise()
    E, D = router_w.shape
    F2 = gate_up.shape[1]
    if (x.shape != (1, D) or x.dtype != torch.float32 or not x.is_contiguous() or router_w.dtype != torch.float32
            or not router_w.is_contiguous() or bias.dtype != torch.float32 or gate_up.shape != (E, F2, D)
            or down.shape != (E, D, F2 // 2) or gate_up.dtype != torch.bfloat16 or down.dtype != torch.bfloat16
            or not gate_up.is_contiguous() or not down.is_contiguous() or not 0 < top_k <= min(E, 64)):
        raise ValueError("moe_token_bf16: unexpected shapes, dtypes or layouts")
    y = torch.empty(1, D, dtype=torch.float32)
    chosen = torch.empty(1, top_k, dtype=torch.int64)
    if lib.mf_moe_token_bf16(x.data_ptr(), D, router_w.data_ptr(), bias.data_ptr(), E, top_k, int(norm_topk),
                             scaling, gate_up.data_ptr(), down.data_ptr(), F2 // 2, y.data_ptr(), chosen.data_ptr()):
        raise MemoryError("moe_token_bf16: out of memory")
    return y, chosen


def experts_bf16(x_PD: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Expert-sorted rows x_PD (P, D) fp32, counts (E,) int64 summing to P, gate_up (E, 2F, D) and down (E, D, F)
    contiguous bf16 -> (P, D): each row through its expert's SwiGLU, unweighted."""
    lib = _lib if _lib is not None else _lib_or_raise()
    E, F2, D = gate_up.shape
    P = x_PD.shape[0]
    if (x_PD.dtype != torch.float32 or not x_PD.is_contiguous() or x_PD.shape[1] != D or counts.shape != (E,)
            or counts.dtype != torch.int64 or down.shape != (E, D, F2 // 2) or gate_up.dtype != torch.bfloat16
            or down.dtype != torch.bfloat16 or not gate_up.is_contiguous() or not down.is_contiguous()):
        raise ValueError("experts_bf16: unexpected shapes, dtypes or layouts")
    counts = counts.contiguous()
    y = torch.empty(P, D, dtype=torch.float32)
    scratch = torch.empty(max(1, 3 * (F2 // 2) * P), dtype=torch.float32)
    rc = lib.mf_experts_bf16(x_PD.data_ptr(), P, counts.data_ptr(), E, D, F2 // 2, gate_up.data_ptr(),
                             down.data_ptr(), y.data_ptr(), scratch.data_ptr())
    if rc == -2:
        raise ValueError(f"experts_bf16: counts must be >= 0 and sum to the {P} rows")
    if rc:
        raise MemoryError("experts_bf16: could not allocate the experts' row offsets")
    return y


class LayerArgs(ctypes.Structure):
    """`mf_layer` of mimoflash_kernels.h: one decoder layer's dimensions and weight / cache pointers (field order
    matters; `check_abi` compares it with the header and the compiler's layout when the library loads).
    The tensors must outlive it: `engine/fused_decode.py` keeps them referenced."""
    _fields_ = [("H", ctypes.c_long), ("nq", ctypes.c_long), ("nkv", ctypes.c_long), ("d", ctypes.c_long),
                ("dv", ctypes.c_long), ("rd", ctypes.c_long), ("eps_in", ctypes.c_float),
                ("eps_post", ctypes.c_float), ("scale", ctypes.c_float), ("v_scale", ctypes.c_float),
                ("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("sinks", ctypes.c_void_p),
                ("qkv_w", ctypes.c_void_p), ("o_w", ctypes.c_void_p), ("k_pool", ctypes.c_void_p),
                ("v_pool", ctypes.c_void_p), ("pool_slots", ctypes.c_long), ("moe", ctypes.c_int),
                ("gate_w", ctypes.c_void_p), ("up_w", ctypes.c_void_p), ("down_w", ctypes.c_void_p),
                ("F_dense", ctypes.c_long), ("router_w", ctypes.c_void_p), ("router_bias", ctypes.c_void_p),
                ("E", ctypes.c_long), ("top_k", ctypes.c_long), ("norm_topk", ctypes.c_int),
                ("scaling", ctypes.c_float), ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("F_moe", ctypes.c_long), ("kv_bf16", ctypes.c_int), ("panels", ctypes.c_int),
                ("fp8_br", ctypes.c_long), ("fp8_bc", ctypes.c_long), ("qkv_br", ctypes.c_long),
                ("qkv_s", ctypes.c_void_p), ("o_s", ctypes.c_void_p), ("gate_s", ctypes.c_void_p),
                ("up_s", ctypes.c_void_p), ("down_s", ctypes.c_void_p), ("experts_fp8", ctypes.c_void_p)]


def decode_layer(args: LayerArgs, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, table: torch.Tensor,
                 chunk: int, K: int, slots: torch.Tensor, bias: torch.Tensor | None, chosen: torch.Tensor,
                 rope_rows: torch.Tensor | None = None) -> None:
    """One decoded token for each of B sequences through one layer. x (B, H) fp32 contiguous, updated in place;
    cos/sin (B, rd) fp32 of the tokens' positions, or with rope_rows (B,) int64, (n, rd) tables whose row
    rope_rows[b] is token b's (every row < n: the caller checks); table (B, n) int64 chunk ids, K keys per sequence;
    slots (B,) int64 = where each token's K/V go; bias (B, K) or None; chosen (B, top_k) int64 out (MoE). The caller
    (engine/fused_decode.py) builds these contiguous; no copies are made here."""
    lib = _lib if _lib is not None else _lib_or_raise()
    B = x.shape[0]
    rc = lib.mf_decode_layer(ctypes.addressof(args), x.data_ptr(), B, cos.data_ptr(), sin.data_ptr(),
                             None if rope_rows is None else rope_rows.data_ptr(), table.data_ptr(), table.shape[-1],
                             chunk, K, slots.data_ptr(), None if bias is None else bias.data_ptr(), chosen.data_ptr())
    if rc == -1:
        raise ValueError("decode_layer: a cache slot or a chunk id of the table is out of range")
    if rc:
        raise MemoryError("decode_layer: out of memory")


def decode_attn(args: LayerArgs, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, table: torch.Tensor,
                chunk: int, K: int, slots: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                rope_rows: torch.Tensor | None = None) -> None:
    """decode_layer's attention half (same arguments): x is read, not updated; y (B, H) fp32 contiguous receives
    o_proj's output before the residual add (a rank's partial sum under tensor parallelism, parallel/fused.py)."""
    lib = _lib if _lib is not None else _lib_or_raise()
    rc = lib.mf_decode_attn(ctypes.addressof(args), x.data_ptr(), x.shape[0], cos.data_ptr(), sin.data_ptr(),
                            None if rope_rows is None else rope_rows.data_ptr(), table.data_ptr(), table.shape[-1],
                            chunk, K, slots.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr())
    if rc == -1:
        raise ValueError("decode_attn: a cache slot or a chunk id of the table is out of range")
    if rc:
        raise MemoryError("decode_attn: out of memory")


def decode_ffn(args: LayerArgs, x: torch.Tensor, y: torch.Tensor, chosen: torch.Tensor,
               experts: tuple[int, int] | None = None) -> None:
    """decode_layer's FFN half: x (B, H) fp32 is read, y (B, H) receives the dense or routed MLP's output before the
    residual add; chosen (B, top_k) expert ids out (MoE). experts = (lo, hi): the layer's expert weights hold experts
    [lo, hi) of the router's args.E (a rank's share under expert parallelism; y is then that share); None = all."""
    lib = _lib if _lib is not None else _lib_or_raise()
    lo, hi = (0, args.E) if experts is None else experts
    rc = lib.mf_decode_ffn(ctypes.addressof(args), x.data_ptr(), x.shape[0], y.data_ptr(), chosen.data_ptr(), lo, hi)
    if rc == -1:
        raise ValueError(f"decode_ffn: expert range {experts} outside the router's {args.E} experts")
    if rc:
        raise MemoryError("decode_ffn: out of memory")


def embed_bf16(ids: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """ids (B,) int64 contiguous, emb (V, H) bf16 contiguous -> (B, H) fp32 = F.embedding(ids, emb).float() in one
    call (a decode step's two torch ops cost ~40 us here). Raises ValueError for an id outside [0, V)."""
    lib = _lib if _lib is not None else _lib_or_raise()
    if (ids.dtype != torch.int64 or ids.dim() != 1 or not ids.is_contiguous() or emb.dtype != torch.bfloat16
            or emb.dim() != 2 or not emb.is_contiguous()):
        raise ValueError(f"embed_bf16 wants ids (B,) int64 and emb (V, H) bfloat16, both contiguous, got ids "
                         f"{tuple(ids.shape)} {ids.dtype}, emb {tuple(emb.shape)} {emb.dtype}")
    V, H = emb.shape
    x = torch.empty(ids.shape[0], H, dtype=torch.float32)
    if lib.mf_embed_bf16(ids.data_ptr(), ids.shape[0], emb.data_ptr(), V, H, x.data_ptr()):
        raise ValueError(f"embed_bf16: a token id is outside [0, {V})")
    return x


def decode_steps(n: int, layers: torch.Tensor, sliding: torch.Tensor, chosen: torch.Tensor, step_args: torch.Tensor,
                 emb: torch.Tensor, norm_w: torch.Tensor, eps: float, head_w: torch.Tensor, head_layout: bool | tuple,
                 tokens: torch.Tensor, stop_ids: torch.Tensor, stop_off: torch.Tensor,
                 logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> int:
    """Up to n greedy decode steps of B sequences in one call (steps.c; engine/runner.py builds the arguments):
    layers (L,) int64 addresses of each layer's LayerArgs, chosen (n, L) int64 addresses of step i's layer l's
    (B, top_k) expert-id buffer (each step its own: an expert store counts them after the run), sliding (L,) int64,
    step_args (n, 2, 9) int64 per step and attention kind, emb (V, H) bf16, head_w the lm_head's (V, H) bf16 weight
    (head_layout False) or its panels (True), or a block-FP8 head's (V, H) E4M3 bytes (head_layout = (its fp32 scale
    grid, (br, bc)): fp8.c's product, as its FP8Linear runs it), tokens (n + 1, B) int64 (row 0 = the fed ids; row
    i + 1 receives step i's argmax), stop_ids / stop_off: row b's stop ids are stop_ids[stop_off[b]:stop_off[b + 1]];
    logits: a (B, V) float32 buffer that keeps the last step's logits (a sampler reads them), or None; hidden: an
    (n, B, H) float32 buffer that receives each step's final hidden states (before the final norm), or None.
    -> the steps run (the first step that yields a stop id is the last)."""
    lib = _lib if _lib is not None else _lib_or_raise()
    (V, H), B = emb.shape, tokens.shape[1]               # the lm_head's outputs: V (the caller checks)
    if (layers.dim() != 1 or chosen.shape != (n, layers.shape[0]) or step_args.shape != (n, 2, 9)
            or tokens.shape[0] < n + 1
            or not all(t.dtype == torch.int64 and t.is_contiguous() for t in (layers, sliding, chosen, step_args,
                                                                               tokens, stop_ids, stop_off))):
        raise ValueError("decode_steps: layers / sliding (L,), chosen (n, L), step_args (n, 2, 9), tokens (n + 1, B), "
                         "stop_ids and stop_off must be contiguous int64 tensors")
    x, xn = torch.empty(B, H), torch.empty(B, H)
    if logits is None:
        logits = torch.empty(B, V)
    elif logits.shape != (B, V) or logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError(f"decode_steps: logits must be a contiguous ({B}, {V}) float32 buffer")
    if hidden is not None and (hidden.shape != (n, B, H) or hidden.dtype != torch.float32
                               or not hidden.is_contiguous()):
        raise ValueError(f"decode_steps: hidden must be a contiguous ({n}, {B}, {H}) float32 buffer")
    kind, scale, (br, bc) = (1 if head_layout else 0), None, (0, 0)            # mf_product's MF_PANELS, MF_BF16
    if isinstance(head_layout, tuple):
        scale, (br, bc) = head_layout
        if (head_w.dtype != torch.float8_e4m3fn or head_w.shape != (V, H)
                or not head_w.is_contiguous() or scale.dtype != torch.float32 or not scale.is_contiguous()
                or scale.shape != (-(-V // br), -(-H // bc))):
            raise ValueError(f"decode_steps: an FP8 head is a contiguous ({V}, {H}) float8_e4m3fn weight with its "
                             f"contiguous float32 ({br} x {bc})-block scale grid")
        kind = 2                                                                # MF_FP8
    rc = lib.mf_decode_steps(n, B, layers.shape[0], layers.data_ptr(), sliding.data_ptr(), chosen.data_ptr(),
                             step_args.data_ptr(), emb.data_ptr(), V, H, norm_w.data_ptr(), eps,
                             head_w.data_ptr(), kind, None if scale is None else scale.data_ptr(), br, bc,
                             x.data_ptr(), xn.data_ptr(), logits.data_ptr(), tokens.data_ptr(), stop_ids.data_ptr(),
                             stop_off.data_ptr(), None if hidden is None else hidden.data_ptr())
    if rc == -1:
        raise ValueError("decode_steps: a token id is outside the vocabulary")
    if rc == -2:
        raise ValueError("decode_steps: a cache slot or a chunk id of a table is out of range")
    if rc == -4:
        raise ValueError("decode_steps: the lm_head's kind or its FP8 block is not one steps.c reads")
    if rc < 0:
        raise MemoryError("decode_steps: out of memory")
    return rc


def mtp_pass(args: LayerArgs, block: tuple, ids: torch.Tensor, hidden: torch.Tensor, attn: torch.Tensor,
             chosen: torch.Tensor, rows: torch.Tensor | None, head_w: torch.Tensor, head_panels: bool, S: int,
             work: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """An MTP block's draft pass for N rows in one call (draft.c; engine/fused_decode.py's FusedMTPLayer.draft
    builds the arguments): block = (emb (V, H) bf16, enorm weight, its eps, hnorm weight, its eps, eh_proj's (H, 2H)
    bf16 weight or its panels, whether panels, final_layernorm weight, its eps); ids (N,) int64; hidden (N, H) fp32
    rows of unit stride; attn (9,) int64 the block's attention metadata (as steps.c's per-kind fields); chosen (N, 1)
    int64; rows (R,) int64 the wanted rows or None for all; head_w the head's (S, H) bf16 weight or its panels; work
    >= N * 3H + R * H float32; tokens (R,) int64 receives each row's argmax, or None.
    -> logits (R, S) float32 of the wanted rows after final_layernorm."""
    lib = _lib if _lib is not None else _lib_or_raise()
    emb, enorm_w, enorm_eps, hnorm_w, hnorm_eps, eh_w, eh_panels, final_w, final_eps = block
    (V, H), N = emb.shape, ids.shape[0]
    R = N if rows is None else rows.shape[0]
    if (ids.dtype != torch.int64 or not ids.is_contiguous() or hidden.shape != (N, H) or hidden.stride(1) != 1
            or hidden.dtype != torch.float32 or attn.shape != (9,) or attn.dtype != torch.int64
            or chosen.shape != (N, 1) or chosen.dtype != torch.int64 or not chosen.is_contiguous()
            or (rows is not None and (rows.dtype != torch.int64 or not rows.is_contiguous()))
            or work.dtype != torch.float32 or work.numel() < N * 3 * H + R * H or not work.is_contiguous()
            or (tokens is not None and (tokens.shape != (R,) or tokens.dtype != torch.int64))):
        raise ValueError("mtp_pass: ids (N,) int64, hidden (N, H) float32, attn (9,) int64, chosen (N, 1) int64, "
                         "rows (R,) int64 or None, work float32 of N * 3H + R * H, tokens (R,) int64 or None")
    logits = torch.empty(R, S, dtype=torch.float32)
    rc = lib.mf_mtp_pass(ctypes.addressof(args), N, ids.data_ptr(), hidden.data_ptr(), hidden.stride(0),
                         emb.data_ptr(), V, enorm_w.data_ptr(), enorm_eps, hnorm_w.data_ptr(), hnorm_eps,
                         eh_w.data_ptr(), int(eh_panels), attn.data_ptr(), chosen.data_ptr(), R,
                         None if rows is None else rows.data_ptr(), final_w.data_ptr(), final_eps, head_w.data_ptr(),
                         int(head_panels), S, work.data_ptr(), logits.data_ptr(),
                         None if tokens is None else tokens.data_ptr())
    if rc == -1:
        raise ValueError(f"mtp_pass: a token id is outside [0, {V})")
    if rc == -2:
        raise ValueError("mtp_pass: a cache slot, a chunk id of the table or a wanted row is out of range")
    if rc:
        raise MemoryError("mtp_pass: out of memory")
    return logits


MTP_PASS_FIELDS, MTP_SLICE_FIELDS, MTP_CHAIN_ROWS = 13, 5, 64      # mf_mtp_chain's layout (draft.c)


def mtp_chain(passes: torch.Tensor, eps: torch.Tensor, slices: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, ring_slots: int, window: int, head_w: torch.Tensor, head_panels: bool, S: int,
              vocab: torch.Tensor | None, work: torch.Tensor, logits: torch.Tensor, out: torch.Tensor) -> None:
    """A greedy cycle's draft passes in one call (draft.c; engine/runner.py's draft_chain builds the arguments):
    passes (n, MTP_PASS_FIELDS) int64 (each pass's pointers and sizes, as mf_mtp_chain lists them), eps (n, 3)
    float32, slices (m, MTP_SLICE_FIELDS) int64 (ring id, first position, rows, key_from, output index), emb (V, H)
    bf16, cos / sin the sliding RoPE tables (covering every position), head_w the head's (S, H) bf16 weight or its
    panels, vocab (S,) int64 token ids of the head's rows or None, work >= MTP_CHAIN_ROWS * (4H + ring_slots) and
    logits >= (most slices of a pass) * S float32, out int64: the drafts, written at each slice's output index and
    read back by later passes' ids of -(1 + index)."""
    lib = _lib if _lib is not None else _lib_or_raise()
    n, (V, H) = passes.shape[0], emb.shape
    if (passes.shape != (n, MTP_PASS_FIELDS) or eps.shape != (n, 3) or slices.shape[1:] != (MTP_SLICE_FIELDS,)
            or not all(t.dtype == torch.int64 and t.is_contiguous() for t in (passes, slices, out))
            or eps.dtype != torch.float32 or work.dtype != torch.float32 or logits.dtype != torch.float32
            or work.numel() < MTP_CHAIN_ROWS * (4 * H + ring_slots)
            or (vocab is not None and (vocab.shape != (S,) or vocab.dtype != torch.int64))):
        raise ValueError("mtp_chain: passes (n, MTP_PASS_FIELDS) / slices (m, MTP_SLICE_FIELDS) / out int64, eps "
                         "(n, 3) float32, vocab (S,) int64 or None, float32 buffers")
    rc = lib.mf_mtp_chain(n, passes.data_ptr(), eps.data_ptr(), slices.data_ptr(), emb.data_ptr(), V, H,
                          cos.data_ptr(), sin.data_ptr(), ring_slots, window, head_w.data_ptr(), int(head_panels), S,
                          None if vocab is None else vocab.data_ptr(), work.data_ptr(), logits.data_ptr(),
                          out.data_ptr())
    if rc == -1:
        raise ValueError(f"mtp_chain: a token id is outside [0, {V})")
    if rc == -2:
        raise ValueError("mtp_chain: a cache slot, a chunk id or a pass's rows out of range")
    if rc:
        raise MemoryError("mtp_chain: out of memory")


# mf_spec_cycles's layout (speculate.c): its main / mtp / block field counts, most MTP blocks, most drafts + 1, and
# the state's fields (tests/test_spec_cycles.py reads speculate.c's enums and compares)
SPEC_MAIN, SPEC_MTP, SPEC_BLOCK, SPEC_BLOCKS, SPEC_DRAFTS = 22, 11, 6, 4, 16
(SPEC_POS, SPEC_DEPTH, SPEC_OUT_LEFT, SPEC_LEN_LEFT, SPEC_H0, SPEC_END, SPEC_DRAFTS_AT) = range(7)
SPEC_DONE = SPEC_DRAFTS_AT + SPEC_DRAFTS
SPEC_KEY_FROM, SPEC_TENT_LO, SPEC_TENT_N, SPEC_TENT = (SPEC_DONE + i * SPEC_BLOCKS for i in range(1, 5))
SPEC_STATE = SPEC_TENT + SPEC_BLOCKS * SPEC_DRAFTS


def spec_cycles(n: int, main: np.ndarray, mtp: np.ndarray, eps: np.ndarray, state: np.ndarray, seq: np.ndarray,
                seq_base: int, out: np.ndarray, counts: np.ndarray) -> int:
    """Up to n greedy MTP speculative cycles of one sequence in one call (speculate.c; engine/runner.py's
    spec_cycles builds the arguments, numpy arrays like the rows path's metadata): main (SPEC_MAIN,) / mtp
    (SPEC_MTP,) int64 fields as speculate.c lists them, eps float32 (the final norm's, then three per MTP block),
    state (SPEC_STATE,) int64 read and written back, seq int64 the tokens from position seq_base on (the run appends
    its own), out >= n * (k + 1) and counts >= n int64: the cycles' tokens in order and how many each kept.
    -> the cycles run."""
    lib = _lib if _lib is not None else _lib_or_raise()
    i64 = np.dtype(np.int64)
    if (main.shape != (SPEC_MAIN,) or mtp.shape != (SPEC_MTP,) or state.shape != (SPEC_STATE,)
            or not all(a.dtype == i64 and a.flags.c_contiguous for a in (main, mtp, state, seq, out, counts))
            or eps.dtype != np.float32 or not eps.flags.c_contiguous or counts.size < n
            or out.size < n * (int(state[SPEC_DEPTH]) + 1)):
        raise ValueError("spec_cycles: main (SPEC_MAIN,), mtp (SPEC_MTP,), state (SPEC_STATE,), seq, out and counts "
                         "contiguous int64 numpy arrays (out n * (k + 1), counts n), eps float32")
    rc = lib.mf_spec_cycles(n, main.ctypes.data, mtp.ctypes.data, eps.ctypes.data, state.ctypes.data,
                            seq.ctypes.data, seq_base, seq.size, out.ctypes.data, counts.ctypes.data)
    if rc == -1:
        raise ValueError("spec_cycles: a token id is outside the vocabulary")
    if rc == -2:
        raise ValueError("spec_cycles: a cache slot, a block, a position or a token index is out of range")
    if rc == -4:
        raise ValueError("spec_cycles: a head kind, depth or number of MTP blocks speculate.c does not take")
    if rc < 0:
        raise MemoryError("spec_cycles: out of memory")
    return rc


DECODE_PHASES = ("q|k|v product", "RoPE + K/V store", "attention", "o product + norm", "routed experts", "dense MLP")


def decode_phase_timing(on: bool) -> dict[str, float]:
    """Phase timers inside `decode_layer` (kernels/decode.c), for benchmarks/profile_decode_step.py: on=True zeroes
    and starts them, on=False stops them. Returns the seconds summed per phase (DECODE_PHASES) since they were
    last started. Off by default; not for concurrent callers."""
    lib = _lib_or_raise()
    out = (ctypes.c_double * len(DECODE_PHASES))()
    lib.mf_decode_timing(int(bool(on)), out)
    return dict(zip(DECODE_PHASES, out))
