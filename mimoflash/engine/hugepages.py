"""Large CPU tensors on transparent huge pages (2 MB instead of 4 KB).

Why: a decode step streams every weight it uses once (76 MB a token for one request of the benchmark model, 230 MB
for 16), and on 4 KB pages that is a TLB miss every 4 KB and a hardware prefetcher that stops at every page
boundary. On 2 MB pages one TLB entry covers 512 times as much and the prefetch streams run on. glibc and torch
map large allocations on 4 KB pages unless asked (Linux's usual THP mode is "madvise"), so with
`LLM(huge_pages=True)` the engine asks: it moves the weights, the packed copies of engine/cpu_layout.py and the KV
pools into anonymous mappings advised with MADV_HUGEPAGE and aligned to 2 MB. Measured
(`benchmarks/bench_decode.py`, "hugepages" variant): within noise of 4 KB pages on the 2-core benchmark machine,
whose kernels already prefetch across page boundaries in software, so it is off by default; it is kept for
machines where TLB reach matters more. Where the OS cannot (not Linux, THP "never", Python without MADV_HUGEPAGE) the
helpers fall back to ordinary tensors: the data and results are the same either way, only the speed differs.

Only anonymous memory is moved; a storage mapped from a file (a memory-mapped checkpoint) stays where it is, since
copying it would defeat the mapping.
"""

from __future__ import annotations

import bisect
import math
import mmap
import sys
import weakref

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 1 << 20          # smaller storages are not worth a mapping of their own (tests lower it)
_OURS: set[int] = set()      # live mappings of empty_bytes (addresses): rehome() does not copy them again


def supported() -> bool:
    """True where advising huge pages can take effect: Linux, a Python with MADV_HUGEPAGE, THP not "never"."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def empty_bytes(nbytes: int) -> torch.Tensor:
    """-> (nbytes,) uint8, zero-filled, 2 MB-aligned on huge-page-advised anonymous memory when `supported()`, else
    `torch.zeros`. The mapping lives as long as the tensor (and its views) do."""
    if nbytes <= 0 or not supported():
        return torch.zeros(max(nbytes, 0), dtype=torch.uint8)
    try:
        m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:                  # a kernel built without THP (EINVAL), or no address space left: plain memory
        return torch.zeros(nbytes, dtype=torch.uint8)
    t = torch.frombuffer(m, dtype=torch.uint8)                   # holds a reference to m: unmapped with the tensor
    _OURS.add(t.data_ptr())
    weakref.finalize(m, _OURS.discard, t.data_ptr())             # the address may be reused once unmapped
    off = (-t.data_ptr()) % HUGE_PAGE                             # a multiple of the 4 KB page size
    t = t[off:off + nbytes]
    t.zero_()        # fault the pages in now, as torch.zeros does: a KV block first written mid-request would
    return t         # otherwise stall that step while the kernel zeroes its 2 MB page (measured: TTFT +20%)


def zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype) on huge pages (see `empty_bytes`)."""
    return empty_bytes(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


def _file_mappings() -> list[tuple[int, int]]:
    """Sorted (start, end) address ranges of this process's file-backed mappings (Linux; [] elsewhere)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip().startswith("/"):
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return sorted(out)


@torch.no_grad()
def rehome(tensors) -> int:
    """Move the CPU storages of `tensors` of >= MIN_BYTES onto huge pages, in place: every tensor keeps its shape,
    strides, offset and values, and tensors that shared a storage (views, the fused q|k|v and its slices) share the
    new one. Each storage is copied once; its old memory is freed when nothing else references it. -> bytes moved
    (0 where not `supported()`)."""
    if not supported():
        return 0
    files = _file_mappings()
    starts = [lo for lo, _ in files]

    def file_backed(ptr: int) -> bool:
        i = bisect.bisect_right(starts, ptr) - 1
        return i >= 0 and ptr < files[i][1]

    groups: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        if t.device.type != "cpu" or t.is_sparse:
            continue
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if s.nbytes() < MIN_BYTES or ptr in _OURS or file_backed(ptr):
            continue
        groups.setdefault(ptr, []).append(t)
    moved = 0
    for ts in groups.values():
        old = ts[0].untyped_storage()
        new = empty_bytes(old.nbytes())
        new.copy_(torch.empty(0, dtype=torch.uint8).set_(old))
        store = new.untyped_storage()
        seen = set()
        for t in ts:
            if id(t) in seen:
                continue
            seen.add(id(t))
            es = t.element_size()                 # set_ takes the offset in elements; `new` starts `off` bytes in
            offset = (new.storage_offset() + t.storage_offset() * es) // es
            t.data = torch.empty(0, dtype=t.dtype).set_(store, offset, t.shape, t.stride())
        moved += old.nbytes()
    return moved

