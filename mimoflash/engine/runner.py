"""Model runner: turns a scheduled `Batch` into tensors, runs one forward over all its sequences, returns logits.

No policy lives here (who runs, how many tokens: the scheduler decided). The runner
  1. flattens the batch's token slices into `input_ids (1, N)` and per-token `positions (1, N)` (ragged: sequence b
     contributes `n_b` tokens starting at position `s_b`; N = sum n_b),
  2. builds one `AttnMeta` per step (gather indices, write slots, additive masks) so no layer repeats that work,
  3. runs `model.model(input_ids, positions, backend)`; each attention layer calls `PagedAttention.attend`,
  4. applies norm + lm_head only to the rows that are sampled (the last token of each finished slice; every token of
     a slice that verifies speculative drafts), and keeps the step's final hidden states (`last_hidden`) for the MTP
     drafter; `execute_mtp` runs one MTP block over rows the same way, `draft_chain` a step's greedy draft passes
     in one C call (engine/speculative.py, kernels/draft.c, docs/MTP.md).

General path (prefill chunks, mixed batches), per layer and for both kinds alike:
    keys(b) = [sink] + cached keys of sequence b + the step's new keys of sequence b
GA layers gather positions 0..s_b-1 through the block table; SWA layers gather their ring (R slots, positions
s_b-R..s_b-1; stale or empty slots are masked by position). Sequences are padded to (B, Tmax) queries and (B, K)
keys, the mask comes from positions alone (causal, window `swa_keys`, key position < 0 = empty), and one fused SDPA
call runs the whole batch. The sink is a zero key/value in column 0 (joining the concatenation that happens
anyway) whose additive mask entry is the sink logit: its score is sink_h and it adds no value. The new K/V are
stored only after attending, because the ring slots they overwrite may hold keys this step still reads.

Rows path (one-token decode, the verification of k drafts, MTP draft rows: every sequence feeds at most
1 + max_draft tokens; the common case, so it is lean). A step is a set of rows (sequence, position, token); a
sequence with several rows repeats its block table / ring id per row and each row gets its own mask, so each row
attends to its own sequence's keys up to its own position. The rows' K/V are stored first (the ring has
swa_keys + max_draft slots, so storing 1 + max_draft tokens never evicts a key a row needs), then whole blocks / whole
rings are copied out with one `index_select` each (contiguous chunks, not per-slot gathers), and the query heads
that share a kv head attend in one matmul (no GQA expansion). The sink is a column concatenated to the (tiny)
score matrix.

On CPU with fp32 compute the decode path calls `kernels.attn_decode_paged`, which reads the blocks / rings in place
through the chunk table (no gather); with bf16 weights, whole decode steps go to `FusedDecoder` (engine/fused_decode.py,
one C call per layer). The torch decode path above stays, used without the kernels and tested against them.

`impl="reference"` gathers per sequence and calls `model.attention.attend_reference` (explicit scores and sink
column, the spec transcription); `tests/test_kv_cache.py` checks that all paths agree with a full recompute.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..model.attention import attend_reference
from ..model.mimo import MiMoForCausalLM
from .. import kernels
from ..kernels import prefill as prefill_kernels
from .cpu_layout import matmul_weight_dtype, use_cpu_layout, use_huge_pages
from .fused_decode import FusedDecoder, FusedMTPLayer
from .kv_cache import KVCache
from .request import Request
from .scheduler import Batch

NEG_INF = float("-inf")


@dataclass
class KindMeta:
    """Per-step metadata for one attention kind (global or sliding)."""
    read_slots: torch.Tensor          # (B, P) long: slots of cached keys (0 where empty: masked anyway)
    write_src: torch.Tensor | None    # (M,) flat token indices to store (None = all N tokens)
    write_dst: torch.Tensor           # (M,) slots they go to
    bias: torch.Tensor                # (B, 1, Tmax, 1 + P + Tmax) additive mask, column 0 = sink (-inf here)
    k_pos: torch.Tensor               # (B, 1 + P + Tmax) key positions, -1 = not a key (reference path)
    bias_heads: torch.Tensor | None = None   # (B, nq, Tmax, K) copy for layers with sinks, made on first use
    query_blocks: list | None = None         # _query_blocks(bias), made on first use


@dataclass
class DecodeKindMeta:
    """Per-step metadata of one attention kind on the decode path."""
    chunks: torch.Tensor              # (B, n) long: block ids (GA) or the ring id (SWA, n = 1) of each sequence
    chunk: int                        # slots per chunk: block_size or ring_slots
    write_dst: torch.Tensor           # (B,) slot of each sequence's new token
    bias: torch.Tensor | None         # (B, 1, 1, keys) additive mask over the first `keys` gathered slots; None = all
    keys: int                         # only the first `keys` gathered slots can hold keys (<= n * chunk)

    @functools.cached_property
    def first(self) -> int | None:
        """c0 when chunks.view(-1) == c0 + arange(B * n) (the torch path then reads a view and copies nothing);
        computed only by the path that needs it, once per step."""
        return _first_if_consecutive(self.chunks)


@dataclass
class AttnMeta:
    B: int
    Tmax: int
    decode: bool                      # one token per sequence, fast impl: the DecodeKindMeta path
    q_pos: torch.Tensor               # (B, Tmax) query positions (padding repeats the last real one)
    flat_of_pad: torch.Tensor         # (B, Tmax) index into the N flat tokens
    pad_of_flat: torch.Tensor         # (N,) index into the B*Tmax padded rows
    seq_ranges: list[tuple[int, int]]  # flat [begin, end) of each sequence (reference path)
    kinds: dict                       # sliding (bool) -> KindMeta, or DecodeKindMeta when decode


@dataclass
class Slice:
    """What one sequence feeds in a step: `tokens` at positions start, start + 1, ...; rows: which rows' outputs
    are wanted ("last", "all" for a verification, "none" for a prefill chunk that does not reach the end)."""
    request: Request                  # only its cache is read: block_ids, ring_id
    start: int
    tokens: list[int]
    rows: str = "last"
    key_from: int = 0                 # sliding kinds: ring keys at earlier positions are masked (an MTP ring whose
    #                                   older entries are stale after a stretch without drafting, speculative.py)


@dataclass
class StepInputs:
    input_ids: torch.Tensor           # (1, N)
    positions: torch.Tensor           # (1, N)
    meta: AttnMeta
    sample_rows: torch.Tensor         # (R,) flat indices whose logits are sampled
    all_rows: bool = False            # sample_rows == 0..N-1: every row, in order (decode steps)


class PagedAttention:
    """The `AttentionBackend` the engine passes to the model for one step."""

    def __init__(self, cache: KVCache, meta: AttnMeta, impl: str = "fast", buffers: dict | None = None,
                 use_kernels: bool = False):
        self.cache, self.meta, self.impl = cache, meta, impl
        self.use_kernels = use_kernels                      # fp32 decode through kernels.attn_decode_paged
        self.buffers = {} if buffers is None else buffers   # gather outputs, reused by every layer (and step)

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, N, nq, d), k (1, N, h, d), v (1, N, h, dv) -> (1, N, nq, dv)."""
        sliding, k_pool, v_pool = self.cache.pools(layer.layer_idx)
        km = self.meta.kinds[sliding]
        q, k, v = q[0], k[0], v[0]                                                  # (N, heads, dim)
        if k.dtype != k_pool.dtype:                   # (a no-op .to() is still a dispatch: ~5 us on a busy CPU)
            k, v = k.to(k_pool.dtype), v.to(v_pool.dtype)
        if self.meta.decode:
            k_pool.index_copy_(1, km.write_dst, k.transpose(0, 1))
            v_pool.index_copy_(1, km.write_dst, v.transpose(0, 1))
            return self._decode(layer, km, k_pool, v_pool, q).unsqueeze(0)
        if self.impl == "reference":
            o = self._reference(layer, km, k_pool, v_pool, q, k, v)
        else:
            o = self._fast(layer, km, k_pool, v_pool, q, k, v)
        # Store after reading: the ring slots being written may still hold keys this step needed.
        if km.write_src is not None:
            k, v = k[km.write_src], v[km.write_src]
        k_pool.index_copy_(1, km.write_dst, k.transpose(0, 1))
        v_pool.index_copy_(1, km.write_dst, v.transpose(0, 1))
        return o.unsqueeze(0)

    def _bias(self, layer, km: KindMeta, nq: int) -> torch.Tensor:
        """The step's mask, with the layer's sink logits in column 0 when it has sinks (else -inf there)."""
        sinks = layer.attention_sink_bias
        if sinks is None:
            return km.bias
        if km.bias_heads is None or km.bias_heads.shape[1] != nq:
            B, _, T, K = km.bias.shape
            km.bias_heads = km.bias.expand(B, nq, T, K).contiguous()
        km.bias_heads[:, :, :, 0] = sinks.to(km.bias_heads.dtype).view(1, nq, 1)
        return km.bias_heads

    def _decode(self, layer, dm: DecodeKindMeta, k_pool, v_pool, q) -> torch.Tensor:
        """q (B, nq, d) -> (B, nq, dv): one matmul per kv-head group, the sink as an extra score column."""
        if (self.use_kernels and q.dtype == torch.float32                     # reads the blocks/rings in place
                and k_pool.dtype in (torch.float32, torch.bfloat16)):
            return kernels.attn_decode_paged(q, k_pool, v_pool, dm.chunks, dm.chunk, dm.keys, dm.bias,
                                             layer.attention_sink_bias, layer.scale)
        B, nq, d = q.shape
        h, dv = k_pool.shape[0], v_pool.shape[2]
        G = nq // h
        keys = self._chunks(dm, k_pool.view(h, -1, dm.chunk, d), "k").view(h, B, -1, d)      # (h, B, K, d)
        vals = self._chunks(dm, v_pool.view(h, -1, dm.chunk, dv), "v").view(h, B, -1, dv)   # (h, B, K, dv)
        if dm.keys < keys.shape[2]:
            keys, vals = keys[:, :, :dm.keys], vals[:, :, :dm.keys]
        K = keys.shape[2]
        if keys.dtype != q.dtype:
            keys, vals = keys.to(q.dtype), vals.to(q.dtype)
        qg = q.view(B, h, G, d).transpose(0, 1)                                    # (h, B, G, d); head j -> j // G
        s = torch.matmul(qg, keys.transpose(2, 3))                                 # (h, B, G, K)
        if s.dtype != torch.float32:
            s = s.float()
        s = s * layer.scale
        if dm.bias is not None:
            s = s + dm.bias.view(1, B, 1, K)
        sinks = layer.attention_sink_bias
        if sinks is not None:
            key = ("sink", layer.layer_idx, B)                 # the fp32 column is a view: kept across steps
            sink = self.buffers.get(key)
            if sink is None or sink.data_ptr() != sinks.data_ptr():
                sink = self.buffers[key] = sinks.float().view(h, 1, G, 1).expand(h, B, G, 1)
            p = torch.softmax(torch.cat([sink, s], dim=-1), dim=-1)[..., 1:]
        else:
            p = torch.softmax(s, dim=-1)
        o = torch.matmul(p if p.dtype == q.dtype else p.to(q.dtype), vals)          # (h, B, G, dv)
        return o.transpose(0, 1).reshape(B, nq, dv)

    def _chunks(self, dm: DecodeKindMeta, pool: torch.Tensor, tag: str) -> torch.Tensor:
        """pool (h, C, chunk, dim) -> (h, B * n, chunk, dim): the step's chunks, a view when they are consecutive
        (one request with blocks in order, or rings handed out in order), else copied into a buffer that is
        allocated once per shape (a fresh multi-MB tensor per layer cost page faults: up to 10x the copy)."""
        if dm.first is not None:
            return pool.narrow(1, dm.first, dm.chunks.numel())
        idx = dm.chunks.view(-1)
        shape = (pool.shape[0], idx.numel()) + tuple(pool.shape[2:])
        key = (tag, shape, pool.dtype)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = pool.new_empty(shape)
        return torch.index_select(pool, 1, idx, out=buf)

    def _fast(self, layer, km: KindMeta, k_pool, v_pool, q, k, v) -> torch.Tensor:
        m = self.meta
        if (self.use_kernels and q.dtype == torch.float32 and k_pool.dtype in (torch.float32, torch.bfloat16)
                and prefill_kernels.fast()):
            return self._prefill_kernel(layer, km, k_pool, v_pool, q, k, v)
        B, Tmax = m.B, m.Tmax
        N, nq, d = q.shape
        h, dv = k.shape[1], v.shape[2]
        P = km.read_slots.shape[1]
        k_past = k_pool.index_select(1, km.read_slots.view(-1)).view(h, B, P, d).transpose(0, 1)    # (B, h, P, d)
        v_past = v_pool.index_select(1, km.read_slots.view(-1)).view(h, B, P, dv).transpose(0, 1)
        idx = m.flat_of_pad.view(-1)
        qp, kn, vn = q[idx].view(B, Tmax, nq, d), k[idx].view(B, Tmax, h, d), v[idx].view(B, Tmax, h, dv)
        zk, zv = k_past.new_zeros(B, h, 1, d), v_past.new_zeros(B, h, 1, dv)       # the sink column
        keys = torch.cat([zk, k_past, kn.transpose(1, 2).to(k_past.dtype)], dim=2)  # (B, h, 1 + P + Tmax, d)
        vals = torch.cat([zv, v_past, vn.transpose(1, 2).to(v_past.dtype)], dim=2)  # (B, h, 1 + P + Tmax, dv)
        bias = self._bias(layer, km, nq).to(q.dtype)
        if dv < d:     # V zero-padded to K's width: torch's CPU flash kernel needs equal widths (else its math path)
            vals = F.pad(vals, (0, d - dv))
        qh, keys, vals = qp.transpose(1, 2), keys.to(q.dtype), vals.to(q.dtype)
        if km.query_blocks is None:
            km.query_blocks = list(_query_blocks(km.bias))
        outs = []
        for lo, hi, c0, c1 in km.query_blocks:
            kb, vb, mb = keys[:, :, :c1], vals[:, :, :c1], bias[:, :, lo:hi, :c1]
            if c0 > 1:                                     # the sink column, then the block's span
                kb = torch.cat([keys[:, :, :1], keys[:, :, c0:c1]], 2)
                vb = torch.cat([vals[:, :, :1], vals[:, :, c0:c1]], 2)
                mb = torch.cat([bias[:, :, lo:hi, :1], bias[:, :, lo:hi, c0:c1]], 3)
            outs.append(F.scaled_dot_product_attention(qh[:, :, lo:hi], kb, vb, attn_mask=mb, scale=layer.scale,
                                                       enable_gqa=True))
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        o = o[..., :dv].transpose(1, 2)                                              # (B, Tmax, nq, dv)
        return o.reshape(B * Tmax, nq, dv)[m.pad_of_flat]                            # (N, nq, dv)

    def _prefill_kernel(self, layer, km: KindMeta, k_pool, v_pool, q, k, v) -> torch.Tensor:
        """fp32 activations, fp32 or bf16 cache: kernels.prefill.attention, one call for all sequences and heads (the
        keys each block of query rows may see, read in place from the pool and the new rows, which a bf16 cache sees
        rounded, as the other paths do; the mask from positions, as km.bias has it). Its integers are made once per
        step and kind, by the kind's first layer (this backend lives for one step)."""
        m = self.meta
        made = self.__dict__.setdefault("_prefill_args", {})
        args = made.get(id(km))
        if args is None:
            P = km.read_slots.shape[1]
            seq_lo = torch.tensor([0] + [hi for _, hi in m.seq_ranges])
            args = made[id(km)] = (m.q_pos.reshape(-1)[m.pad_of_flat], seq_lo, km.read_slots.contiguous(),
                                   km.k_pos[:, 1:1 + P].contiguous())
        if k.dtype != q.dtype:                              # rounded to the bf16 cache's values by attend()
            k, v = k.to(q.dtype), v.to(q.dtype)
        return prefill_kernels.attention(q, k, v, *args[:2], k_pool, v_pool, *args[2:], layer.window_keys,
                                         layer.attention_sink_bias, layer.scale)

    def _reference(self, layer, km: KindMeta, k_pool, v_pool, q, k, v) -> torch.Tensor:
        m = self.meta
        out = []
        P1 = 1 + km.read_slots.shape[1]                                             # k_pos column 0 = sink
        for b, (lo, hi) in enumerate(m.seq_ranges):
            n = hi - lo
            keep = km.k_pos[b, 1:P1] >= 0                                           # drop empty past slots
            slots = km.read_slots[b][keep]
            kk = torch.cat([k_pool[:, slots].transpose(0, 1), k[lo:hi]])[None].to(q.dtype)   # (1, Kb, h, d)
            vv = torch.cat([v_pool[:, slots].transpose(0, 1), v[lo:hi]])[None].to(q.dtype)
            kpos = torch.cat([km.k_pos[b, 1:P1][keep], km.k_pos[b, P1:P1 + n]])[None]
            qpos = m.q_pos[b, :n][None]
            out.append(attend_reference(q[None, lo:hi], kk, vv, qpos, kpos, layer.window_keys,
                                        layer.attention_sink_bias, layer.scale)[0])
        return torch.cat(out)


class _StoreOnly:
    """An attention backend that stores the rows' K/V at `dst` and attends to nothing (zeros out): MTP catch-up."""

    def __init__(self, cache: KVCache, dst: torch.Tensor):
        self.cache, self.dst = cache, dst

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _, k_pool, v_pool = self.cache.pools(layer.layer_idx)
        k_pool.index_copy_(1, self.dst, k[0].to(k_pool.dtype).transpose(0, 1))
        v_pool.index_copy_(1, self.dst, v[0].to(v_pool.dtype).transpose(0, 1))
        return q.new_zeros(q.shape[:3] + (v.shape[-1],))


QUERY_BLOCK = 128     # long prefill slices attend in blocks of this many query rows


def _query_blocks(bias: torch.Tensor):
    """bias (B, 1, T, 1 + P + T) -> (lo, hi, c0, c1) per block of QUERY_BLOCK query rows: the block attends to the
    sink column 0 and to key columns [c0, c1), the span some row of the block may see (a causal block sees no later
    keys, a sliding window's block no older ones). The columns left out are -inf for every row of the block, so
    dropping them changes no softmax; it halves the work of a long causal prefill and leaves a window's block about
    2 x window keys. T <= QUERY_BLOCK, or a block seeing nothing (padding): all columns, (lo, hi, 1, K)."""
    T, K = bias.shape[2], bias.shape[3]
    if T <= QUERY_BLOCK:
        yield 0, T, 1, K
        return
    seen = (bias[:, 0, :, 1:] > float("-inf")).any(dim=0)                       # (T, K - 1)
    for lo in range(0, T, QUERY_BLOCK):
        hi = min(T, lo + QUERY_BLOCK)
        nz = seen[lo:hi].any(dim=0).nonzero()
        yield (lo, hi, 1, K) if nz.numel() == 0 else (lo, hi, int(nz[0]) + 1, int(nz[-1]) + 2)


def _first_if_consecutive(chunks: torch.Tensor) -> int | None:
    """chunks (host tensor) -> c0 when chunks.view(-1) == c0, c0 + 1, ..., else None."""
    flat = chunks.reshape(-1).tolist()
    return flat[0] if flat == list(range(flat[0], flat[0] + len(flat))) else None


class ModelRunner:
    def __init__(self, model: MiMoForCausalLM, cache: KVCache, impl: str = "fast",
                 compute_dtype: torch.dtype | None = None, weight_panels: bool = True, huge_pages: bool = False):
        if impl not in ("fast", "reference"):
            raise ValueError(f"attention impl must be 'fast' or 'reference', got {impl!r}")
        self.model, self.cache, self.impl = model, cache, impl
        self.layout = cache.layout
        self.device = cache.device
        # masks (and the sink logits written into them) in the compute dtype, not the cache's: a bf16 cache under
        # fp32 compute must not round the sinks
        self.bias_dtype = compute_dtype if compute_dtype is not None else matmul_weight_dtype(model)
        self._buffers: dict = {}
        self._aranges: dict[int, torch.Tensor] = {}     # batch size -> arange(B) for decode metadata
        self._mtp_step: tuple | None = None              # (rows key, StepInputs) of the last MTP draft pass
        self._main_rows: tuple | None = None             # (rows key, StepInputs) of the last rows-path main step
        self.use_kernels = False
        self.fused: FusedDecoder | None = None       # one kernel call per layer for decode steps
        self.fused_mtp: list | None = None           # the same for each MTP block (build_mtp)
        self.mtp_pass = True                         # a fused draft pass in one C call (FusedMTPLayer.draft)
        self._spec_static: bool | None = None        # spec_ready's checks of what does not change
        self.last_hidden: torch.Tensor | None = None
        self.run_hidden: torch.Tensor | None = None      # (steps, B, H) of the last multi-step run, when kept
        # Most tokens one sequence may feed in a rows-path step: 1 + the rings' slack (kv_cache.py, "Ring size")
        self.max_rows = 1 + self.layout.ring_slots - self.layout.swa_keys
        if self.device.type == "cpu":
            use_cpu_layout(model, compute_dtype, panels=weight_panels)
            if huge_pages:
                use_huge_pages(model)                # before FusedDecoder takes raw pointers
            self.use_kernels = kernels.available()
            kernels.set_num_threads(torch.get_num_threads())
            if self.use_kernels and impl == "fast":
                self.fused = FusedDecoder.build(model, cache)
                if self.fused is not None and any(i >= model.config.num_hidden_layers
                                                  for i in self.layout.sliding_layers):
                    self.fused_mtp = FusedMTPLayer.build(model, cache)

    # ------------------------------------------------------------------ metadata
    def prepare(self, batch: Batch) -> StepInputs:
        """The batch as slices: each item's tokens; its last row sampled, or every row when it verifies drafts."""
        return self.prepare_slices([Slice(it.request, it.start, it.request.token_slice(it.start, it.start + it.num_tokens),
                                          "all" if it.num_draft else ("last" if it.sample else "none"))
                                    for it in batch.items])

    def prepare_slices(self, slices: list[Slice], kinds: tuple[bool, ...] = (False, True)) -> StepInputs:
        """One step's rows, slice by slice. A step where no sequence feeds more than `max_rows` tokens (decode, a
        verification of drafts, an MTP layer's draft rows) takes the rows path; longer slices (prefill chunks)
        the general path. `kinds`: the attention kinds the step's layers have (MTP blocks are all sliding)."""
        if max(len(s.tokens) for s in slices) <= self.max_rows and self.impl == "fast":
            return self._prepare_rows(slices, kinds)
        B = len(slices)
        lens = [len(s.tokens) for s in slices]
        starts = [s.start for s in slices]
        Tmax, N = max(lens), sum(lens)
        ids, pos, ranges, sample_rows = [], [], [], []
        for s in slices:
            lo = len(ids)
            ids.extend(s.tokens)
            pos.extend(range(s.start, s.start + len(s.tokens)))
            ranges.append((lo, len(ids)))
            if s.rows == "all":
                sample_rows.extend(range(lo, len(ids)))
            elif s.rows == "last":
                sample_rows.append(len(ids) - 1)
        lens_t = torch.tensor(lens)
        starts_t = torch.tensor(starts)
        lo_t = torch.tensor([r[0] for r in ranges])
        t = torch.arange(Tmax)
        t_clamped = torch.minimum(t[None, :], lens_t[:, None] - 1)                    # (B, Tmax)
        q_pos = starts_t[:, None] + t_clamped
        flat_of_pad = lo_t[:, None] + t_clamped
        valid = t[None, :] < lens_t[:, None]
        pad_of_flat = (torch.arange(B)[:, None] * Tmax + t[None, :])[valid]            # row-major = flat order
        new_kpos = torch.where(valid, q_pos, -1)                                       # (B, Tmax)
        minus1 = torch.full((B, 1), -1)
        kind_meta = {}
        lay = self.layout
        if lay.global_layers and False in kinds:
            bs = lay.block_size
            P = max(starts)
            p = torch.arange(P)
            table = self._block_table(slices)
            past_ok = p[None, :] < starts_t[:, None]                                   # (B, P)
            blk = table.gather(1, (p // bs).clamp(max=table.shape[1] - 1).expand(B, P))
            read = torch.where(past_ok, blk * bs + p % bs, 0)
            kpos = torch.cat([minus1, torch.where(past_ok, p.expand(B, P), -1), new_kpos], 1)
            fpos = torch.tensor(pos)
            fseq = torch.repeat_interleave(torch.arange(B), lens_t)
            dst = table[fseq, fpos // bs] * bs + fpos % bs
            kind_meta[False] = self._kind(read, kpos, q_pos, None, dst, None)
        if lay.sliding_layers and True in kinds:
            R = lay.ring_slots
            rings = torch.tensor([s.request.ring_id for s in slices])
            p = starts_t[:, None] - R + torch.arange(R)[None, :]                       # (B, R) cached positions
            read = torch.where(p >= 0, rings[:, None] * R + p % R, 0)
            first = torch.tensor([max(0, s.key_from) for s in slices])[:, None]
            kpos = torch.cat([minus1, torch.where(p >= first, p, -1), new_kpos], 1)
            # Only the last R tokens of a long chunk survive in the ring; writing the others would collide.
            keep = valid & (t[None, :] >= lens_t[:, None] - R)
            src = flat_of_pad[keep]
            dst = rings[:, None].expand(B, Tmax)[keep] * R + q_pos[keep] % R
            kind_meta[True] = self._kind(read, kpos, q_pos, lay.swa_keys, dst, None if bool(keep.sum() == N) else src)
        dev = self.device
        meta = AttnMeta(B, Tmax, False, q_pos.to(dev), flat_of_pad.to(dev), pad_of_flat.to(dev), ranges, kind_meta)
        return StepInputs(torch.tensor([ids], device=dev), torch.tensor([pos], device=dev), meta,
                          torch.tensor(sample_rows, dtype=torch.long, device=dev))

    @staticmethod
    def _block_table(slices) -> torch.Tensor:
        nb = max(1, max(len(s.request.block_ids) for s in slices))
        return torch.tensor([s.request.block_ids + [0] * (nb - len(s.request.block_ids)) for s in slices])

    def _prepare_rows(self, slices: list[Slice], kinds: tuple[bool, ...]) -> StepInputs:
        """The rows path: one row per (sequence, position, token); every row's K/V is stored first, then each row
        attends to its own sequence's keys up to its own position. A sequence with several rows (a verification
        of drafts) repeats its block table / ring id once per row, and each row gets its own mask. Storing a slice
        of up to `max_rows` = 1 + ring slack tokens before reading never overwrites a key that one of its rows
        still needs (kv_cache.py, "Ring size").

        The gathered chunks of a GA layer hold positions 0, 1, ... in order, and so does a ring that has not wrapped
        (top position < R): there the key axis is cut to the top position + 1 and, with one row whose window
        reaches position 0, no mask is needed at all (a ring with draft slack has R > swa_keys slots, so a row at
        swa_keys <= p < R needs its window masked). A wrapped ring with R == swa_keys (no draft slack, so one row per sequence) is all valid keys: no
        mask either.

        The integers and masks are built in numpy and handed to torch without a copy (`torch.from_numpy`): on a
        few rows a numpy op costs ~1 us where a torch op costs ~5-10 us, and a small model's decode step (or an MTP
        draft pass) is short enough for that to show."""
        B = sum(len(s.tokens) for s in slices)                                   # rows
        if len(slices) == B:                                                     # one row per sequence (decode)
            owner = slices
            pos_l = [s.start for s in slices]
            ids_l = [s.tokens[0] for s in slices]
        else:
            owner = [s for s in slices for _ in s.tokens]
            pos_l = [p for s in slices for p in range(s.start, s.start + len(s.tokens))]
            ids_l = [t for s in slices for t in s.tokens]
        pos = np.array(pos_l, dtype=np.int64)
        top = max(pos_l)
        lay, dev, kinds_meta = self.layout, self.device, {}
        host = self._host
        causal: dict[int, np.ndarray] = {}

        def causal_bias(keys: int) -> np.ndarray:                 # (B, keys): key j valid iff j <= row's position
            if keys not in causal:
                causal[keys] = np.where(np.arange(keys)[None, :] > pos[:, None], NEG_INF, 0.0).astype(np.float32)
            return causal[keys]

        if lay.global_layers and False in kinds:
            bs = lay.block_size
            nb = max(1, max(len(s.request.block_ids) for s in slices))
            dst = [s.request.block_ids[p // bs] * bs + p % bs for s, p in zip(owner, pos_l)]
            table = np.zeros((B, nb), dtype=np.int64)
            r = 0
            for s in slices:
                n, ids = len(s.tokens), s.request.block_ids
                table[r:r + n, :len(ids)] = ids
                r += n
            keys = top + 1                                                              # <= nb * bs
            kinds_meta[False] = DecodeKindMeta(host(table), bs, host(np.array(dst, dtype=np.int64)),
                                               host(causal_bias(keys)).view(B, 1, 1, keys) if B > 1 else None, keys)
        if lay.sliding_layers and True in kinds:
            rings = np.array([s.request.ring_id for s in owner], dtype=np.int64)
            key_from = (np.array([s.key_from for s in owner], dtype=np.int64)
                        if any(s.key_from > 0 for s in slices) else None)
            dst, bias, keys = self._ring_rows(pos, top, rings, key_from, causal_bias)
            kinds_meta[True] = DecodeKindMeta(host(rings).view(B, 1), lay.ring_slots, host(dst),
                                              None if bias is None else host(bias).view(B, 1, 1, keys), keys)
        ar = self._aranges.get(B)
        if ar is None:                                  # read-only, so kept per batch size
            ar = self._aranges[B] = torch.arange(B, device=dev)
        pos_t = host(pos)
        meta = AttnMeta(B, 1, True, pos_t[:, None], ar[:, None], ar, [(b, b + 1) for b in range(B)], kinds_meta)
        if all(s.rows == "last" and len(s.tokens) == 1 or s.rows == "all" for s in slices):
            rows_t, every = ar, True
        else:
            rows, lo = [], 0
            for s in slices:
                n = len(s.tokens)
                if s.rows == "all":
                    rows.extend(range(lo, lo + n))
                elif s.rows == "last":
                    rows.append(lo + n - 1)
                lo += n
            every = len(rows) == B
            rows_t = ar if every else host(np.array(rows, dtype=np.int64))
        return StepInputs(host(np.array(ids_l, dtype=np.int64)).view(1, B), pos_t[None], meta, rows_t, every)

    def _ring_rows(self, pos: np.ndarray, top: int, rings: np.ndarray, key_from: np.ndarray | None, causal_bias
                   ) -> tuple[np.ndarray, np.ndarray | None, int]:
        """The sliding kind's rows-path metadata for rows at positions pos (B,) (top = their max) in rings (B,),
        key_from (B,) or None -> (write slots (B,), mask (B, keys) or None, keys). causal_bias(keys) -> the (B, keys)
        causal mask (shared with the global kind when its keys agree)."""
        lay = self.layout
        R, B = lay.ring_slots, len(pos)
        dst = rings * R + pos % R
        bias = None
        if top < R:                                                                 # no ring has wrapped
            keys = top + 1
            if key_from is not None or top >= lay.swa_keys:
                # slot j holds position j: valid iff j <= p, within p's window (a ring with draft slack is
                # longer than the window: a row at p >= swa_keys must not see position p - swa_keys) and not
                # before key_from
                j = np.arange(keys)[None, :]
                lo = pos[:, None] - (lay.swa_keys - 1)
                if key_from is not None:
                    lo = np.maximum(lo, key_from[:, None])
                ok = (j <= pos[:, None]) & (j >= lo)
                bias = np.where(ok, 0.0, NEG_INF).astype(np.float32)
            elif B > 1:
                bias = causal_bias(keys)
        else:
            keys = R
            if R != lay.swa_keys or int(pos.min()) < R - 1 or key_from is not None:
                # slot j holds, for a row at position p, the newest position <= p that maps to it; slots that
                # hold a later one (this step's later rows, rolled-back drafts) are outside p's window
                j = np.arange(R)[None, :]
                slot_pos = pos[:, None] - (pos[:, None] - j) % R
                ok = (slot_pos >= 0) & (pos[:, None] - slot_pos < lay.swa_keys)
                if key_from is not None:
                    ok &= slot_pos >= key_from[:, None]
                bias = np.where(ok, 0.0, NEG_INF).astype(np.float32)
        return dst, bias, keys

    def _host(self, a: np.ndarray) -> torch.Tensor:
        """A numpy array as a tensor on the runner's device (on CPU the same memory, no copy)."""
        t = torch.from_numpy(a)
        return t if self.device.type == "cpu" else t.to(self.device)

    def _kind(self, read, kpos, q_pos, window, dst, src) -> KindMeta:
        qp, kp = q_pos[:, :, None], kpos[:, None, :]
        ok = (kp >= 0) & (kp <= qp)
        if window is not None:
            ok &= (qp - kp) < window
        bias = torch.zeros(ok.shape, dtype=torch.float32).masked_fill_(~ok, NEG_INF)[:, None]   # (B, 1, Tmax, K)
        dev = self.device
        return KindMeta(read.to(dev), None if src is None else src.to(dev), dst.to(dev),
                        bias.to(device=dev, dtype=self.bias_dtype), kpos.to(dev))

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def execute(self, batch: Batch) -> torch.Tensor:
        """Run the batch; -> logits (R, V) fp32 for the sampled items, in batch order."""
        step = self.prepare(batch)
        # A verification whose drafts are all accepted leaves the next MTP pass the same rows (positions, ring,
        # mask): execute_mtp reuses this step's sliding metadata for them (the MTP blocks' rings share the layout).
        self._main_rows = ((tuple((it.request.ring_id, it.start, it.num_tokens, 0) for it in batch.items), step)
                           if step.meta.decode and True in step.meta.kinds else None)
        return self._forward(step)

    def _forward(self, step: StepInputs, fused_args=None) -> torch.Tensor:
        """One step's forward -> logits (R, V) fp32 of its sampled rows; `fused_args`: the step's
        `FusedDecoder.step_args`, when a multi-step run made them beforehand."""
        if self.fused is not None and step.meta.decode:
            hidden = (self.fused.forward(step.input_ids, step.positions, step.meta.kinds) if fused_args is None
                      else self.fused.layers_forward(step.input_ids, *fused_args))              # (1, B, D)
        else:
            backend = PagedAttention(self.cache, step.meta, self.impl, self._buffers, self.use_kernels)
            hidden = self.model.model(step.input_ids, step.positions, backend)           # (1, N, D)
        self.last_hidden = hidden[0]               # (N, D) every row, slice order: what MTP drafting reads
        if step.sample_rows.numel() == 0:
            return hidden.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32)
        # Every row of a decode step is sampled: the view, not a gather. hidden[0, rows] (advanced indexing) opened
        # an OpenMP region from ~8k elements on, ~0.3 ms a step at 16 rows here with OMP_WAIT_POLICY=PASSIVE.
        picked = hidden[0] if step.all_rows else hidden[0].index_select(0, step.sample_rows)
        return self.model.logits(picked).float()                                       # (R, V)

    @torch.inference_mode()
    def execute_steps(self, batch: Batch, choose, keep_hidden: bool = False) -> int:
        """A multi-step run (Scheduler.reserve_steps): up to `batch.num_steps` decode steps of the batch's one-token
        items, each step's sampled tokens fed to the next without leaving this loop. `choose(logits (B, V))` ->
        (the B tokens, whether the run ends after this step). -> the number of steps run. With `keep_hidden`, each
        step's final hidden states are kept in `run_hidden` (steps run, B, H), what MTP drafting reads (a single step
        leaves them in `last_hidden`).

        Every step's metadata is made before the first forward, by the same `prepare_slices` a one-step batch gets
        (so each step computes exactly what that step alone would: the fed token ids are its only unknowns, put in
        per step). Made back to back, that Python runs with warm caches; interleaved with the steps, each of which
        streams all the weights through the caches first, the same work costs several times more (docs/ENGINE.md,
        "Where a batch-1 step's time goes"). Where the C loop can make the steps (`_c_loop_args`), each step's
        forward is one kernels.decode_steps call instead."""
        args = self._c_loop_args(batch)
        hidden = self._run_hidden_buffer(batch, keep_hidden)
        if args is not None:
            return self._c_steps(batch, args, choose, hidden)
        B = len(batch.items)
        ids = self._fed_ids(batch)
        steps, fused = self._plan_steps(batch)
        done = 0
        for st, args in zip(steps, fused or [None] * len(steps)):
            st.input_ids = self._host(np.array(ids, dtype=np.int64)).view(1, B)
            ids, stop = choose(self._forward(st, args))
            if hidden is not None:
                hidden[done].copy_(self.last_hidden)
            done += 1
            if stop:
                break
        self.run_hidden = None if hidden is None else hidden[:done]
        return done

    def _run_hidden_buffer(self, batch: Batch, keep: bool) -> torch.Tensor | None:
        """(num_steps, B, H) for a run's final hidden states when `keep`, else None (and `run_hidden` cleared)."""
        self.run_hidden = None
        if not keep:
            return None
        return torch.empty(batch.num_steps, len(batch.items), self.model.config.hidden_size)

    @staticmethod
    def _fed_ids(batch: Batch) -> list[int]:
        return [it.request.token_slice(it.start, it.start + 1)[0] for it in batch.items]

    def _plan_steps(self, batch: Batch) -> tuple[list[StepInputs], list | None]:
        """A run's steps: each step's StepInputs (token ids left to fill) and, on the fused path, its
        `FusedDecoder.step_args` (the panels refreshed once, for the first)."""
        items = batch.items
        steps = [self.prepare_slices([Slice(it.request, it.start + i, [0]) for it in items])
                 for i in range(batch.num_steps)]
        self._main_rows = None                                   # no MTP pass follows a run (the engine's rule)
        if self.fused is None or not steps[0].meta.decode:
            return steps, None
        return steps, [self.fused.step_args(st.positions, st.meta.kinds, len(items), refresh=i == 0)
                       for i, st in enumerate(steps)]

    def _decode_run_args(self, batch: Batch) -> tuple[np.ndarray, list] | None:
        """The C loop's per-step arguments for a run of `batch.num_steps` one-token decode steps -> ((n, 2, 9) int64
        rows as kernels.decode_steps takes them, the arrays they point into), or None past the RoPE tables.

        The values are those `prepare_slices` + `FusedDecoder.step_args` give each step (the reference: a test
        compares them, step by step, across block boundaries, ring wraps and batch sizes), made for all the steps
        at once: per step the write slots, the key count and, where `_prepare_rows` has one, the mask. Made one step
        at a time from Python objects, the same arguments cost ~40 us a step; here a few numpy operations a run."""
        items, lay = batch.items, self.layout
        n, B = batch.num_steps, len(items)
        P = np.array([it.start for it in items], dtype=np.int64)[None, :] + np.arange(n, dtype=np.int64)[:, None]
        top = P.max(axis=1)                                                         # (n,)
        rotary = self.model.model.rotary
        rows = np.zeros((n, 2, 9), dtype=np.int64)
        keep: list = [P]
        rows[:, :, 2] = P.ctypes.data + 8 * B * np.arange(n)[:, None]             # each step's positions
        causal = np.arange(int(top[-1]) + 1)[None, None, :] > P[:, :, None]        # (n, B, keys): j > p
        for sliding in (False, True):
            if not (lay.sliding_layers if sliding else lay.global_layers):
                continue
            tabs = rotary["sliding" if sliding else "full"].tables(int(top[-1]))
            if tabs is None:
                return None
            if sliding:
                R, w = lay.ring_slots, lay.swa_keys
                table = np.array([[it.request.ring_id] for it in items], dtype=np.int64)
                dst = table[:, 0][None, :] * R + P % R
                keys = np.minimum(top + 1, R)
            else:
                bs = lay.block_size
                table = np.zeros((B, max(1, max(len(it.request.block_ids) for it in items))), dtype=np.int64)
                for b, it in enumerate(items):
                    table[b, :len(it.request.block_ids)] = it.request.block_ids
                dst = table[np.arange(B)[None, :], P // bs] * bs + P % bs
                keys = top + 1
            bias_ptr = np.zeros(n, dtype=np.int64)
            # one sequence and a ring of the window's size: every key a step gathers is valid, no step has a mask
            for i in range(n if B > 1 or (sliding and R != w) else 0):
                K, p = int(keys[i]), P[i]
                if not sliding:
                    masked = causal[i, :, :K] if B > 1 else None
                elif top[i] < R:                                    # the ring has not wrapped: slot j = position j
                    j = np.arange(K)[None, :]
                    masked = (~((j <= p[:, None]) & (j >= p[:, None] - (w - 1))) if top[i] >= w
                              else causal[i, :, :K] if B > 1 else None)
                elif R != w or int(p.min()) < R - 1:                # slot j holds the newest position <= p there
                    slot_pos = p[:, None] - (p[:, None] - np.arange(R)[None, :]) % R
                    masked = ~((slot_pos >= 0) & (p[:, None] - slot_pos < w))
                else:
                    masked = None
                if masked is not None:
                    bias = np.where(masked, NEG_INF, 0.0).astype(np.float32)
                    keep.append(bias)
                    bias_ptr[i] = bias.ctypes.data
            keep += [tabs, table, dst]
            r = rows[:, int(sliding)]
            r[:, 0], r[:, 1], r[:, 3] = tabs[0].data_ptr(), tabs[1].data_ptr(), table.ctypes.data
            r[:, 4], r[:, 5], r[:, 6] = table.shape[1], (R if sliding else bs), keys
            r[:, 7], r[:, 8] = dst.ctypes.data + 8 * B * np.arange(n), bias_ptr
        return rows, keep

    def _c_loop_args(self, batch: Batch) -> tuple | None:
        """What kernels.decode_steps takes for this run besides the tokens: (per-step rows, the arrays they point
        into, layers, sliding, chosen (n, L), the fp8_layout.RunExperts chosen points into, final norm, lm_head
        weight or panels or E4M3 bytes, its layout as kernels.decode_steps takes it), or None when a
        part of the step is not one the C loop makes (the module path's Python then runs): no fused decoder, an
        lm_head or final norm other than the kernels' ones (a bf16 head's, or an FP8Linear head whose product is
        fp8.c's for these rows: fp8_layout.quantize_lm_head), a position past the RoPE tables, FP8 experts whose
        store has a bounded cache (it evicts between layers; the fused path never gets those:
        fp8_layout.fused_layer_args). FP8 experts of an unbounded store run here: their steps' statistics are
        counted after the run from the ids each step wrote (fp8_layout.RunExperts.account)."""
        fused = self.fused
        if fused is None or any(args.expert_layer[0].capacity is not None
                                for args, _, _ in fused.layers if hasattr(args, "expert_layer")):
            return None
        head = self._loop_head(len(batch.items))
        if head is None:
            return None
        plan = self._decode_run_args(batch)
        if plan is None:
            return None
        return (*plan, *fused.loop_args(len(batch.items), plan[0].shape[0]), *head)

    def _loop_head(self, B: int) -> tuple | None:
        """The final norm and lm_head as the C loops take them for B rows: (norm, the head's bf16 weight, its panels or
        its E4M3 bytes, its layout as kernels.decode_steps takes it), or None where the head's product for B rows is
        not one of the kernels' (a head other than Bf16Linear / FP8Linear, a norm other than FastRMSNorm)."""
        from ..kernels import fp8 as kfp8
        from .cpu_layout import KERNEL_MAX_ROWS, Bf16Linear, FastRMSNorm
        from .fp8_layout import FP8Linear
        head, norm = self.model.lm_head, self.model.model.norm
        if (type(head) not in (Bf16Linear, FP8Linear) or type(norm) is not FastRMSNorm
                or head.weight.shape != self.fused.emb.shape
                or norm.weight.dtype != torch.float32 or not norm.weight.is_contiguous()):
            return None
        if type(head) is FP8Linear:         # FP8Linear.forward's kernel product (linear_fp8) for up to its row bound
            s = head.weight_scale_inv
            if (B > kfp8.KERNEL_MAX_ROWS or not head.weight.is_contiguous() or s.dtype != torch.float32
                    or not s.is_contiguous()):
                return None
            return norm, head.weight, (s, head.block)
        if head.weight.dtype != torch.bfloat16:
            return None
        wp = head._panels.get() if head._panels is not None else None
        if wp is None and not (head.weight.is_contiguous() and B <= KERNEL_MAX_ROWS):
            return None
        return norm, wp if wp is not None else head.weight, wp is not None

    @torch.inference_mode()
    def execute_greedy_steps(self, batch: Batch, stops: list[frozenset], keep_hidden: bool = False
                             ) -> list[list[int]] | None:
        """A multi-step run of greedy rows in one C call (kernels.decode_steps, kernels/steps.c): per step the
        fused layers, the final norm, the lm_head and the argmax that the module path + `sample` run from Python,
        the same calls on the same arguments, so the same tokens; the run ends after the first step in which row b
        yields one of `stops[b]`. -> the tokens of each step run, or None (nothing run) where `_c_loop_args` says
        the C loop cannot make the step. `keep_hidden`: as for `execute_steps`."""
        args = self._c_loop_args(batch)
        hidden = self._run_hidden_buffer(batch, keep_hidden and args is not None)
        if args is None:
            return None
        rows, _keep, layers, sliding, chosen, experts, norm, head_w, layout = args   # _keep: what rows points into
        n, B = rows.shape[0], len(batch.items)
        tokens = np.zeros((n + 1, B), dtype=np.int64)
        tokens[0] = self._fed_ids(batch)
        stop_ids = np.array([t for s in stops for t in sorted(s)] or [0], dtype=np.int64)
        stop_off = np.cumsum([0] + [len(s) for s in stops], dtype=np.int64)
        done = kernels.decode_steps(n, layers, sliding, chosen, torch.from_numpy(rows), self.fused.emb, norm.weight,
                                    norm.eps, head_w, layout, torch.from_numpy(tokens), torch.from_numpy(stop_ids),
                                    torch.from_numpy(stop_off), hidden=hidden)
        self.last_hidden = None
        self.run_hidden = None if hidden is None else hidden[:done]
        experts.account(done)                    # FP8: the expert store's statistics of the steps run
        return tokens[1:done + 1].tolist()

    def _c_steps(self, batch: Batch, args: tuple, choose, hidden: torch.Tensor | None) -> int:
        """execute_steps through the C loop one step per call: its logits handed to `choose` (the sampler) between
        steps, instead of the fused layers and the lm_head called from Python; hidden: (steps, B, H) for each step's
        final hidden states, or None."""
        rows, _keep, layers, sliding, chosen, experts, norm, head_w, layout = args
        B = len(batch.items)
        tokens = np.zeros((2, B), dtype=np.int64)
        tokens[0] = self._fed_ids(batch)
        no_stop, zeros = torch.zeros(1, dtype=torch.int64), torch.zeros(B + 1, dtype=torch.int64)
        logits = torch.empty(B, self.fused.emb.shape[0])
        done = 0
        for i in range(rows.shape[0]):
            kernels.decode_steps(1, layers, sliding, chosen[i:i + 1], torch.from_numpy(rows[i:i + 1]), self.fused.emb,
                                 norm.weight, norm.eps, head_w, layout, torch.from_numpy(tokens), no_stop, zeros,
                                 logits=logits, hidden=None if hidden is None else hidden[i:i + 1])
            fed, stop = choose(logits)
            done += 1
            if stop:
                break
            tokens[0] = fed
        self.last_hidden = None
        self.run_hidden = None if hidden is None else hidden[:done]
        experts.account(done)                    # FP8: the expert store's statistics of the steps run
        return done

    @torch.inference_mode()
    def fill_mtp_kv(self, layer: int, slices: list[Slice], hidden: torch.Tensor) -> None:
        """Only the K/V of MTP block `layer` at the slices' rows, stored in its ring (a catch-up: no attention, MLP or
        head; a block's K/V at a position depends on that position's hidden state and token alone). One C call
        where the block's fused draft pass applies (`FusedMTPLayer.fill`), else the block's modules (the reference:
        tests/test_speculative.py compares them)."""
        mm = self.model.model
        blk = mm.mtp.layers[layer]
        R = self.layout.ring_slots
        ids = torch.tensor([[t for s in slices for t in s.tokens]], device=self.device)
        pos = [p for s in slices for p in range(s.start, s.start + len(s.tokens))]
        dst = torch.tensor([s.request.ring_id * R + p % R for s in slices for p in range(s.start, s.start + len(s.tokens))],
                           device=self.device)
        positions = torch.tensor([pos], device=self.device)
        if self.fused_mtp is not None and self.mtp_pass and self.impl == "fast":
            rings = torch.tensor([s.request.ring_id for s in slices for _ in s.tokens])
            if self.fused_mtp[layer].fill(ids.view(-1), positions.view(-1), rings, dst, hidden.contiguous(), R):
                return
        x = blk.eh_proj(torch.cat([blk.enorm(mm.embed(ids)), blk.hnorm(hidden[None])], dim=-1))
        rope = mm.rotary["sliding"](positions, x.dtype)
        blk.self_attn(blk.input_layernorm(x), positions, rope, _StoreOnly(self.cache, dst))

    def _mtp_rows_step(self, slices: list[Slice]) -> StepInputs:
        """The step inputs of an MTP draft pass (sliding kind only). The draft passes of one step mostly feed the
        same rows (positions, ring, mask) to different blocks, whose metadata does not depend on the block: the last
        pass's is reused when the rows match, only the tokens differ (the key holds everything `_prepare_rows`
        reads for sliding kinds). The first pass after a verification whose drafts were all accepted runs the
        verification's rows: its sliding metadata is reused, with the ring columns before a slice's `key_from`
        masked on top of it. Otherwise `prepare_slices`."""
        key = tuple((s.request.ring_id, s.start, len(s.tokens), s.key_from, s.rows) for s in slices)
        memo, main = self._mtp_step, self._main_rows
        ids = self._host(np.array([t for s in slices for t in s.tokens], dtype=np.int64)).view(1, -1)
        if memo is not None and memo[0] == key:
            return replace(memo[1], input_ids=ids)
        step = None
        if (main is not None and main[0] == tuple(k[:3] + (0,) for k in key)
                and all(s.rows == "last" for s in slices)):
            m = main[1].meta
            km = m.kinds[True]
            if any(s.key_from > 0 for s in slices):
                km = self._mask_key_from(km, slices, main[1].positions.view(-1).numpy())
            last = np.cumsum([len(s.tokens) for s in slices]) - 1
            every = len(last) == m.B
            step = StepInputs(ids, main[1].positions, replace(m, kinds={True: km}),
                              self._aranges[m.B] if every else self._host(last), every)
        if step is None:
            step = self.prepare_slices(slices, kinds=(True,))
        self._mtp_step = (key, step) if step.meta.decode else None
        return step

    def _mask_key_from(self, km: DecodeKindMeta, slices: list[Slice], pos: np.ndarray) -> DecodeKindMeta:
        """A rows-path sliding DecodeKindMeta with, in addition, each row's ring entries at positions before its
        slice's key_from masked (what `_prepare_rows` builds for those slices)."""
        B, keys, R = len(pos), km.keys, self.layout.ring_slots
        bias = (np.zeros((B, keys), dtype=np.float32) if km.bias is None
                else km.bias.reshape(B, keys).cpu().numpy().copy())
        kf = np.array([s.key_from for s in slices for _ in s.tokens], dtype=np.int64)[:, None]
        j = np.arange(keys)[None, :]
        slot_pos = j if keys < R or int(pos.max()) < R else pos[:, None] - (pos[:, None] - j) % R
        bias[np.broadcast_to(slot_pos < kf, bias.shape)] = NEG_INF
        return DecodeKindMeta(km.chunks, km.chunk, km.write_dst, self._host(bias).view(B, 1, 1, keys), keys)

    def execute_mtp(self, layer: int, slices: list[Slice], hidden: torch.Tensor,
                    head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """MTP block `layer` over the slices' rows: slice tokens = the token `layer + 1` ahead of each row's
        position, hidden (N, D) = the main model's hidden state at each row, in slice order -> logits (R, V) of the
        wanted rows (R, S with `head_weight` (S, D), a reduced draft vocabulary). Its K/V go to the block's ring."""
        return self._mtp(layer, slices, hidden, head_weight, False)[0]

    def draft_greedy(self, layer: int, slices: list[Slice], hidden: torch.Tensor,
                     head_weight: torch.Tensor | None = None) -> list[int]:
        """`execute_mtp`'s pass -> each wanted row's argmax (a column of `head_weight` when given), computed in the
        same C call as the pass where `FusedMTPLayer.draft` runs it."""
        logits, best = self._mtp(layer, slices, hidden, head_weight, True)
        return (best if best is not None else kernels.argmax_rows(logits)).tolist()

    def _mtp_head(self, head_weight: torch.Tensor | None) -> tuple[torch.Tensor, bool, int] | None:
        """The draft head as kernels.mtp_pass takes it ((S, D) bf16 weight or panels, whether panels, S), where its
        product is the C kernel the module path calls too (Bf16Linear's panels or row-major kernel), else None."""
        from .cpu_layout import Bf16Linear
        if head_weight is not None:
            ok = head_weight.dtype == torch.bfloat16 and head_weight.is_contiguous() and self.use_kernels
            return (head_weight, False, head_weight.shape[0]) if ok else None
        head = self.model.lm_head
        if type(head) is not Bf16Linear or head.weight.dtype != torch.bfloat16:
            return None
        wp = head._panels.get() if head._panels is not None else None
        if wp is not None:
            return wp, True, head._panels.N
        return (head.weight, False, head.weight.shape[0]) if head.weight.is_contiguous() else None

    @torch.inference_mode()
    def draft_chain(self, passes: list[tuple[int, list[Slice], torch.Tensor, list[int]]],
                    head_weight: torch.Tensor | None, vocab: torch.Tensor | None, size: int) -> list[int] | None:
        """Greedy draft passes in one C call (kernels.mtp_chain, kernels/draft.c). passes: (MTP block, slices (rows
        "last"), hidden (N, D) in slice order, each slice's output index); a slice token -(1 + i) stands for output
        i, an earlier pass's draft. Each pass computes what `draft_greedy` computes on the same slices with those
        drafts in place; its metadata is made in C from the slices, as `_ring_rows` makes it
        (tests/test_speculative.py compares the drafts and the rings). vocab: the head's rows' token ids (a reduced draft vocabulary) or None.
        -> the `size` outputs (token ids), or None (nothing run) where a pass is not one the chain makes (no fused MTP
        block or C pass, a head or eh_proj other than the kernels', more rows than the rows path takes, positions past
        the RoPE tables)."""
        from .cpu_layout import KERNEL_MAX_ROWS
        fused = self.fused_mtp
        head = self._mtp_head(head_weight) if fused is not None and self.mtp_pass and self.impl == "fast" else None
        if head is None:
            return None
        H, n = fused[0].emb.shape[1], len(passes)
        top = max(s.start + len(s.tokens) - 1 for _, slices, _, _ in passes for s in slices)
        tabs = self.model.model.rotary["sliding"].tables(top)
        if tabs is None:
            return None
        fields, eps, rows, ids, most = [], [], [], [], 1         # (made as lists: one conversion each below)
        for layer, slices, hidden, at in passes:
            block = fused[layer].chain_block()
            N = sum(len(s.tokens) for s in slices)
            if (block is None or N > KERNEL_MAX_ROWS or max(len(s.tokens) for s in slices) > self.max_rows
                    or hidden.dtype != torch.float32 or hidden.shape != (N, H) or hidden.stride(1) != 1):
                return None
            (la, en, hn, eh, ehp, fn), e = block
            tok = np.array([t for s in slices for t in s.tokens], dtype=np.int64)
            ids.append(tok)
            fields += (la, N, tok.ctypes.data, hidden.data_ptr(), hidden.stride(0), en, hn, eh, ehp,
                       fused[layer].chosen_for(N).data_ptr(), len(slices), len(rows) // kernels.MTP_SLICE_FIELDS, fn)
            eps += e
            for s, i in zip(slices, at):
                rows += (s.request.ring_id, s.start, len(s.tokens), s.key_from, i)
            most = max(most, len(slices))
        work = self._buffers.get("mtp_chain")
        if work is None:
            work = self._buffers["mtp_chain"] = torch.empty(kernels.MTP_CHAIN_ROWS * (4 * H + self.layout.ring_slots))
        out = torch.zeros(size, dtype=torch.int64)
        kernels.mtp_chain(torch.from_numpy(np.array(fields, dtype=np.int64).reshape(n, -1)),
                          torch.from_numpy(np.array(eps, dtype=np.float32).reshape(n, 3)),
                          torch.from_numpy(np.array(rows, dtype=np.int64).reshape(-1, kernels.MTP_SLICE_FIELDS)),
                          fused[0].emb, tabs[0], tabs[1], self.layout.ring_slots, self.layout.swa_keys, head[0],
                          head[1], head[2], vocab, work, torch.empty(most, head[2]), out)
        return out.tolist()

    def spec_ready(self, head_weight: torch.Tensor | None) -> bool:
        """Whether `spec_cycles` can run greedy speculative cycles here: the fused decoder (FP8 experts only from an
        unbounded store, as for `execute_greedy_steps`), a bf16 lm_head and fused MTP blocks that chain
        (kernels/speculate.c). What cannot change while the engine holds the model is checked once."""
        if self._spec_static is None:
            from .fp8_layout import FP8Linear
            fused, blocks = self.fused, self.fused_mtp
            self._spec_static = (fused is not None and blocks is not None and self.mtp_pass and self.impl == "fast"
                                 and len(blocks) <= kernels.SPEC_BLOCKS and type(self.model.lm_head) is not FP8Linear
                                 and not any(args.expert_layer[0].capacity is not None
                                             for args, _, _ in fused.layers if hasattr(args, "expert_layer")))
        return self._spec_static and self.mtp_pass and self._mtp_head(head_weight) is not None

    @torch.inference_mode()
    def spec_cycles(self, req: Request, n: int, state: np.ndarray, seq: np.ndarray, seq_base: int,
                    stops: frozenset, head_weight: torch.Tensor | None, vocab: torch.Tensor | None,
                    hidden: torch.Tensor, keep: int, catch_up: int) -> tuple[int, list[int], list[int]] | None:
        """Up to n greedy speculative cycles of `req` in one C call (kernels.spec_cycles, kernels/speculate.c): each
        verifies the request's drafts as `execute` does, accepts as MTPDrafter.verify does and drafts the next
        cycle's as MTPDrafter.propose does (its passes as `draft_chain` runs them), with the cache reserved for every
        cycle beforehand (its block table read once). state: kernels.SPEC_STATE int64 values (position, drafts,
        tokens left, the drafter's state), written back; seq: the tokens from position seq_base on, room for the
        run's; hidden / keep / catch_up: the drafter's buffer of final hidden states, its rows per ring, its
        catch-up bound. -> (cycles run, their tokens, tokens per cycle), or None (nothing run) where the run is not
        one the C loop makes (`spec_ready`, an lm_head or final norm other than the C loops', positions past the
        RoPE tables). The panels of weights edited in place are repacked first, as before a multi-step run."""
        mhead = self._mtp_head(head_weight) if self.spec_ready(head_weight) else None
        if mhead is None:
            return None
        fused, blocks, lay = self.fused, self.fused_mtp, self.layout
        k = int(state[kernels.SPEC_DEPTH])
        top = int(state[kernels.SPEC_POS]) + n * (k + 1) + k + len(blocks)        # the furthest row a pass can reach
        rot = self.model.model.rotary
        tabs_g, tabs_s = rot["full"].tables(top), rot["sliding"].tables(top)
        chain = [b.chain_block() for b in blocks]
        head = self._loop_head(k + 1)
        if (tabs_g is None or tabs_s is None or None in chain or head is None or hidden.dtype != torch.float32
                or not hidden.is_contiguous()):
            return None
        norm, head_w, panels = head
        fused.refresh()
        layers, sliding, chosen, experts = fused.loop_args(k + 1, n)
        table = np.array(req.block_ids, dtype=np.int64)
        stop = np.array(sorted(stops) or [0], dtype=np.int64)
        main = np.array([len(fused.layers), layers.data_ptr(), sliding.data_ptr(), chosen.data_ptr(),
                         fused.emb.data_ptr(), fused.emb.shape[0], fused.emb.shape[1], norm.weight.data_ptr(),
                         head_w.data_ptr(), int(panels), tabs_g[0].data_ptr(), tabs_g[1].data_ptr(),
                         tabs_s[0].data_ptr(), tabs_s[1].data_ptr(), table.ctypes.data, len(table), lay.block_size,
                         req.ring_id, lay.ring_slots, lay.swa_keys, stop.ctypes.data, len(stops)], dtype=np.int64)
        fields = np.array([c[0] for c in chain], dtype=np.int64)                    # (blocks, SPEC_BLOCK)
        mtp = np.array([len(blocks), fields.ctypes.data, mhead[0].data_ptr(), int(mhead[1]), mhead[2],
                        0 if vocab is None else vocab.data_ptr(), hidden.data_ptr(), keep, req.ring_id * keep,
                        catch_up, self.max_rows], dtype=np.int64)
        eps = np.array([norm.eps] + [e for c in chain for e in c[1]], dtype=np.float32)
        out, counts = np.zeros(n * (k + 1), dtype=np.int64), np.zeros(n, dtype=np.int64)
        ran = kernels.spec_cycles(n, main, mtp, eps, state, seq, seq_base, out, counts)
        self.last_hidden = None
        self._main_rows = self._mtp_step = None
        experts.account(ran)                     # FP8: the expert store's statistics of the cycles' verifications
        c = counts[:ran].tolist()
        return ran, out[:sum(c)].tolist(), c

    @torch.inference_mode()
    def _mtp(self, layer: int, slices: list[Slice], hidden: torch.Tensor, head_weight: torch.Tensor | None,
             argmax: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """execute_mtp -> (logits, the rows' argmax when `argmax` and the pass was one C call (FusedMTPLayer.draft,
        unless `mtp_pass` is off: the tests' reference), else None)."""
        step = self._mtp_rows_step(slices)
        fused = self.fused_mtp[layer] if self.fused_mtp is not None else None
        if fused is not None and step.meta.decode and self.mtp_pass:
            head = self._mtp_head(head_weight)
            got = None if head is None else fused.draft(step.input_ids, step.positions, step.meta.kinds, hidden,
                                                        None if step.all_rows else step.sample_rows, head, argmax)
            if got is not None:
                return got
        if fused is not None and step.meta.decode:                   # only the wanted rows are normed
            picked = fused.forward(step.input_ids, step.positions, step.meta.kinds, hidden,
                                   None if step.all_rows else step.sample_rows)          # (R, D)
        else:
            mm = self.model.model
            backend = PagedAttention(self.cache, step.meta, self.impl, self._buffers, self.use_kernels)
            rope = mm.rotary["sliding"](step.positions, hidden.dtype)
            out = mm.mtp.layers[layer](mm.embed_tokens(step.input_ids), hidden[None], step.positions, rope,
                                       backend)[0]
            picked = out if step.all_rows else out.index_select(0, step.sample_rows)
        if head_weight is None:
            return self.model.lm_head(picked).float(), None
        if head_weight.dtype == torch.bfloat16 and picked.dtype == torch.float32 and self.use_kernels:
            return kernels.linear_bf16w(picked.contiguous(), head_weight), None
        return F.linear(picked, head_weight.to(picked.dtype)).float(), None
