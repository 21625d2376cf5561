"""Model runner: turns a scheduled `Batch` into tensors, runs one forward over all its sequences, returns logits.

No policy lives here (who runs, how many tokens: the scheduler decided). The runner
  1. flattens the batch's token slices into `input_ids (1, N)` and per-token `positions (1, N)` (ragged: sequence b
     contributes `n_b` tokens starting at position `s_b`; N = sum n_b),
  2. builds one `AttnMeta` per step (slot indices, key positions, additive masks) so that no layer repeats that work,
  3. runs `model.model(input_ids, positions, backend)`; each attention layer calls `PagedAttention.attend`,
  4. applies norm + lm_head only to the rows that are sampled (the last token of each finished slice).

Attention over the cache (per layer, both kinds the same way):
    keys(b) = [sink slot] + past keys of sequence b gathered from the cache + the step's new keys of sequence b
GA layers gather positions 0..s_b-1 from the block table; SWA layers gather their whole ring (R slots, positions
s_b-R..s_b-1, stale or empty slots are masked by position). Sequences are padded to (B, Tmax) queries and (B, K)
keys, the mask comes from positions alone (causal, window `swa_keys`, key position < 0 = empty), and one fused SDPA
call runs the whole batch. Slot 0 of each pool is a zero key/value: with an additive mask entry equal to the sink
logit it *is* the sink column (score = sink_h, contributes no value), so sinks cost no concatenation. Only after
attending are the new K/V written (the ring must be read before it is overwritten).

`impl="reference"` runs the same gather per sequence and calls `model.attention.attend_reference` (explicit scores
and sink column, the spec transcription); `tests/test_kv_cache.py` checks that both paths agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.attention import attend_reference
from ..model.mimo import MiMoForCausalLM
from .kv_cache import KVCache
from .scheduler import Batch

NEG_INF = float("-inf")


@dataclass
class KindMeta:
    """Per-step metadata for one attention kind (global or sliding)."""
    read_slots: torch.Tensor          # (B, 1 + P) long: slot 0 = sink/zero slot, then past keys (0 where empty)
    write_src: torch.Tensor | None    # (M,) flat token indices to store (None = all N tokens)
    write_dst: torch.Tensor           # (M,) slots they go to
    bias: torch.Tensor                # (B, 1, Tmax, 1 + P + Tmax) additive mask, column 0 = sink (-inf here)
    k_pos: torch.Tensor               # (B, 1 + P + Tmax) key positions, -1 = not a key (reference path)
    bias_heads: torch.Tensor | None = None   # (B, nq, Tmax, K) copy for layers with sinks, made on first use


@dataclass
class AttnMeta:
    B: int
    Tmax: int
    decode: bool                      # every sequence feeds exactly one token: no padding gathers needed
    q_pos: torch.Tensor               # (B, Tmax) query positions (padding repeats the last real one)
    flat_of_pad: torch.Tensor         # (B, Tmax) index into the N flat tokens
    pad_of_flat: torch.Tensor         # (N,) index into the B*Tmax padded rows
    seq_ranges: list[tuple[int, int]]  # flat [begin, end) of each sequence (reference path)
    kinds: dict[bool, KindMeta]       # sliding -> metadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor           # (1, N)
    positions: torch.Tensor           # (1, N)
    meta: AttnMeta
    sample_rows: torch.Tensor         # (R,) flat indices whose logits are sampled


class PagedAttention:
    """The `AttentionBackend` the engine passes to the model for one step."""

    def __init__(self, cache: KVCache, meta: AttnMeta, impl: str = "fast"):
        self.cache, self.meta, self.impl = cache, meta, impl

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, N, nq, d), k (1, N, h, d), v (1, N, h, dv) -> (1, N, nq, dv)."""
        sliding, k_pool, v_pool = self.cache.pools(layer.layer_idx)
        km = self.meta.kinds[sliding]
        q, k, v = q[0], k[0].to(k_pool.dtype), v[0].to(v_pool.dtype)              # (N, heads, dim)
        if self.impl == "reference":
            o = self._reference(layer, km, k_pool, v_pool, q, k, v)
        else:
            o = self._fast(layer, km, k_pool, v_pool, q, k, v)
        # Store after reading: the ring slots being written may still hold keys this step needed.
        if km.write_src is None:
            k_pool.index_copy_(0, km.write_dst, k)
            v_pool.index_copy_(0, km.write_dst, v)
        else:
            k_pool.index_copy_(0, km.write_dst, k[km.write_src])
            v_pool.index_copy_(0, km.write_dst, v[km.write_src])
        return o.unsqueeze(0)

    def _fast(self, layer, km: KindMeta, k_pool, v_pool, q, k, v) -> torch.Tensor:
        m = self.meta
        B, Tmax = m.B, m.Tmax
        N, nq, d = q.shape
        h, dv = k.shape[1], v.shape[2]
        P1 = km.read_slots.shape[1]
        k_past = k_pool[km.read_slots.view(-1)].view(B, P1, h, d)
        v_past = v_pool[km.read_slots.view(-1)].view(B, P1, h, dv)
        if m.decode:
            qp, kn, vn = q.view(B, 1, nq, d), k.view(B, 1, h, d), v.view(B, 1, h, dv)
        else:
            idx = m.flat_of_pad.view(-1)
            qp, kn, vn = q[idx].view(B, Tmax, nq, d), k[idx].view(B, Tmax, h, d), v[idx].view(B, Tmax, h, dv)
        keys = torch.cat([k_past, kn.to(k_past.dtype)], dim=1).transpose(1, 2)      # (B, h, K, d)
        vals = torch.cat([v_past, vn.to(v_past.dtype)], dim=1).transpose(1, 2)      # (B, h, K, dv)
        bias = km.bias
        sinks = layer.attention_sink_bias
        if sinks is not None:
            if km.bias_heads is None or km.bias_heads.shape[1] != nq:
                km.bias_heads = km.bias.expand(B, nq, Tmax, km.bias.shape[-1]).contiguous()
            km.bias_heads[:, :, :, 0] = sinks.to(km.bias_heads.dtype).view(1, nq, 1)
            bias = km.bias_heads
        o = F.scaled_dot_product_attention(qp.transpose(1, 2), keys.to(q.dtype), vals.to(q.dtype),
                                           attn_mask=bias.to(q.dtype), scale=layer.scale, enable_gqa=True)
        o = o.transpose(1, 2)                                                        # (B, Tmax, nq, dv)
        if m.decode:
            return o.reshape(N, nq, dv)
        return o.reshape(B * Tmax, nq, dv)[m.pad_of_flat]                            # (N, nq, dv)

    def _reference(self, layer, km: KindMeta, k_pool, v_pool, q, k, v) -> torch.Tensor:
        m = self.meta
        out = []
        P1 = km.read_slots.shape[1]
        for b, (lo, hi) in enumerate(m.seq_ranges):
            n = hi - lo
            keep = km.k_pos[b, 1:P1] >= 0                                           # drop empty past slots
            slots = km.read_slots[b, 1:P1][keep]
            kk = torch.cat([k_pool[slots], k[lo:hi].to(k_pool.dtype)])[None].to(q.dtype)   # (1, Kb, h, d)
            vv = torch.cat([v_pool[slots], v[lo:hi].to(v_pool.dtype)])[None].to(q.dtype)
            kpos = torch.cat([km.k_pos[b, 1:P1][keep], km.k_pos[b, P1:P1 + n]])[None]
            qpos = m.q_pos[b, :n][None]
            out.append(attend_reference(q[None, lo:hi], kk, vv, qpos, kpos, layer.window_keys,
                                        layer.attention_sink_bias, layer.scale)[0])
        return torch.cat(out)


class ModelRunner:
    def __init__(self, model: MiMoForCausalLM, cache: KVCache, impl: str = "fast"):
        if impl not in ("fast", "reference"):
            raise ValueError(f"attention impl must be 'fast' or 'reference', got {impl!r}")
        self.model, self.cache, self.impl = model, cache, impl
        self.layout = cache.layout
        self.device = cache.device

    # ------------------------------------------------------------------ metadata
    def prepare(self, batch: Batch) -> StepInputs:
        items = batch.items
        B = len(items)
        lens = [it.num_tokens for it in items]
        starts = [it.start for it in items]
        Tmax, N = max(lens), sum(lens)
        ids, pos, ranges, sample_rows = [], [], [], []
        for it in items:
            lo = len(ids)
            ids.extend(it.request.token_slice(it.start, it.start + it.num_tokens))
            pos.extend(range(it.start, it.start + it.num_tokens))
            ranges.append((lo, lo + it.num_tokens))
            if it.sample:
                sample_rows.append(lo + it.num_tokens - 1)
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

        kinds = {}
        lay = self.layout
        if lay.global_layers:
            bs = lay.block_size
            P = max(starts)
            p = torch.arange(P)
            nb = max(1, max(len(it.request.block_ids) for it in items))
            table = torch.tensor([it.request.block_ids + [0] * (nb - len(it.request.block_ids)) for it in items])
            past_ok = p[None, :] < starts_t[:, None]                                   # (B, P)
            blk = table.gather(1, (p // bs).clamp(max=nb - 1).expand(B, P))
            slots = torch.where(past_ok, 1 + blk * bs + p % bs, 0)
            read = torch.cat([torch.zeros(B, 1, dtype=torch.long), slots], 1)
            kpos = torch.cat([torch.full((B, 1), -1), torch.where(past_ok, p.expand(B, P), -1), new_kpos], 1)
            fpos = torch.tensor(pos)
            fseq = torch.repeat_interleave(torch.arange(B), lens_t)
            dst = 1 + table[fseq, fpos // bs] * bs + fpos % bs
            kinds[False] = self._kind(read, kpos, q_pos, None, dst, None)
        if lay.sliding_layers:
            R = lay.ring_slots
            rings = torch.tensor([it.request.ring_id for it in items])
            p = starts_t[:, None] - R + torch.arange(R)[None, :]                       # (B, R) past positions
            read = torch.cat([torch.zeros(B, 1, dtype=torch.long),
                              torch.where(p >= 0, 1 + rings[:, None] * R + p % R, 0)], 1)
            kpos = torch.cat([torch.full((B, 1), -1), torch.where(p >= 0, p, -1), new_kpos], 1)
            # Only the last R tokens of a long chunk survive in the ring; writing the others would collide.
            keep = valid & (t[None, :] >= lens_t[:, None] - R)
            src = flat_of_pad[keep]
            dst = 1 + rings[:, None].expand(B, Tmax)[keep] * R + q_pos[keep] % R
            kinds[True] = self._kind(read, kpos, q_pos, lay.swa_keys,
                                     dst, None if bool(keep.sum() == N) else src)
        meta = AttnMeta(B, Tmax, Tmax == 1, q_pos.to(self.device), flat_of_pad.to(self.device),
                        pad_of_flat.to(self.device), ranges, kinds)
        return StepInputs(torch.tensor([ids], device=self.device), torch.tensor([pos], device=self.device), meta,
                          torch.tensor(sample_rows, dtype=torch.long, device=self.device))

    def _kind(self, read, kpos, q_pos, window, dst, src) -> KindMeta:
        qp, kp = q_pos[:, :, None], kpos[:, None, :]
        ok = (kp >= 0) & (kp <= qp)
        if window is not None:
            ok &= (qp - kp) < window
        bias = torch.zeros(ok.shape, dtype=torch.float32).masked_fill_(~ok, NEG_INF)[:, None]   # (B, 1, Tmax, K)
        dev = self.device
        return KindMeta(read.to(dev), None if src is None else src.to(dev), dst.to(dev),
                        bias.to(device=dev, dtype=self.layout.dtype), kpos.to(dev))

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def execute(self, batch: Batch) -> torch.Tensor:
        """Run the batch; -> logits (R, V) fp32 for the sampled items, in batch order."""
        step = self.prepare(batch)
        backend = PagedAttention(self.cache, step.meta, self.impl)
        hidden = self.model.model(step.input_ids, step.positions, backend)               # (1, N, D)
        if step.sample_rows.numel() == 0:
            return hidden.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32)
        return self.model.logits(hidden[0, step.sample_rows]).float()                    # (R, V)
