"""Decode steps in one kernel call per layer (`kernels.decode_layer`, kernels/decode.c).

With each sequence decoding one token, a layer's arithmetic is a few small GEMMs over weights it must read anyway
(each weight read once for the whole batch; the experts grouped by expert); what the torch path adds on top is ~40
small calls per layer (norms, views, RoPE, cache writes, attention, router, experts) at ~3-15 us each, as much time as
the weight reads. This runner helper does the same math as the model's forward on the engine's CPU path
(engine/cpu_layout.py with bf16 weights and fp32 compute, runner.PagedAttention's decode path) in C: the model is
still the reference and `tests/test_kernels.py` checks both give the same logits and tokens. The model's modules are
read once, at build time (pointers to their tensors); the engine owns the model, so casting or moving it while an
engine holds it is not supported (as in the other engines). `MoE.last_topk_idx` is not updated on this path (only the
trainer reads it).

Used for every rows-path step (runner.py: one-token decoding, and the k + 1 rows of a sequence verifying speculative
drafts, each row with its own block table / ring, position and mask; any number of sequences) when every layer
qualifies (bf16 matmul weights after
`use_bf16_weights`, whose dense products read the packed panels when it made them, fp32 norms, an fp32 or bf16
cache, plain top-k routing with at most 64 experts per token); otherwise the runner uses the model. `FusedMTPLayer`
does the same for an MTP block's draft rows (docs/MTP.md).
"""

from __future__ import annotations

import ctypes

import torch

from .. import kernels
from . import fp8_layout
from ..model.layers import MLP
from ..model.mimo import MiMoForCausalLM
from ..model.moe import MoE


def _ok(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    return t is not None and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"


class FusedDecoder:
    def __init__(self, model, layers: list, keep: list, panels: list):
        self.model = model
        self._panels = panels           # cpu_layout.Panels the LayerArgs point into (refreshed each step)
        self.emb = model.model.embed_tokens.weight
        self.layers = layers            # [(LayerArgs, sliding, experts per token)]
        self._keep = keep               # tensors the LayerArgs point into
        self._chosen: dict[int, list[torch.Tensor]] = {}   # batch size -> per-layer (B, top_k) expert-id buffers
        self._loop: dict[int, tuple] = {}                  # batch size -> loop_args

    @classmethod
    def build(cls, model, cache) -> "FusedDecoder | None":
        """-> a FusedDecoder, or None when some layer does not qualify (the model path then runs)."""
        if (not isinstance(model, MiMoForCausalLM) or not kernels.available()
                or not _ok(model.model.embed_tokens.weight, torch.bfloat16)):
            return None
        layers, keep, panels = [], [], []
        with torch.no_grad():
            for layer in model.model.layers:
                got = _layer_args(model.config, layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm,
                                  layer.mlp, cache, keep, panels)
                if got is None:
                    return None
                layers.append(got)
        return cls(model, layers, keep, panels)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kinds: dict) -> torch.Tensor:
        """B sequences, one token each: input_ids / positions (1, B), kinds = AttnMeta.kinds (DecodeKindMeta per
        kind) -> residual stream (1, B, H) before the final norm, as `MiMoModel.forward` returns it."""
        return self.layers_forward(input_ids, *self.step_args(positions, kinds, input_ids.shape[1]))

    def layers_forward(self, input_ids: torch.Tensor, per_kind: dict, chosen: list[torch.Tensor]) -> torch.Tensor:
        """`forward` on arguments `step_args` made (a multi-step run makes every step's before the first)."""
        B = input_ids.shape[1]
        x = kernels.embed_bf16(input_ids.view(-1), self.emb)                         # (B, H) fp32, a fresh tensor
        for (args, sliding, _), ch in zip(self.layers, chosen):
            cos, sin, rows, table, chunk, K, slots, bias = per_kind[sliding]
            kernels.decode_layer(args, x, cos, sin, table, chunk, K, slots, bias, ch, rope_rows=rows)
        fp8_layout.account_fused_step(self.layers, chosen)        # FP8 experts: the expert store's statistics
        return x.view(1, B, -1)

    def refresh(self) -> None:
        """Repack the panels of weights edited in place since the last step (cpu_layout.Panels.get)."""
        for p in self._panels:
            p.get()

    def step_args(self, positions: torch.Tensor, kinds: dict, B: int, refresh: bool = True
                  ) -> tuple[dict, list[torch.Tensor]]:
        """What every layer's call takes besides x, for B rows -> ({sliding: (cos, sin, rope rows, table, chunk, K,
        slots, bias)}, per-layer (B, top_k) expert-id buffers). Refreshes the panels first (`refresh`; a multi-step
        run does it once: nothing edits the weights between its steps). Also used by the tensor-parallel rank's
        decoder (parallel/fused.py), which calls the layer's two halves instead."""
        for p in self._panels if refresh else ():    # a weight edited in place is repacked into its buffer
            p.get()
        pos = positions.view(-1)
        top = int(pos.max())
        rotary = self.model.model.rotary
        per_kind = {}
        for sliding, dm in kinds.items():
            bias = None if dm.bias is None else dm.bias.reshape(B, -1)
            # The kernel reads each token's cos/sin row from the tables by position: no torch op per step.
            rope = rotary["sliding" if sliding else "full"]
            tabs, rows = rope.tables(top), pos
            if tabs is None:                                       # past the tables: the rows computed
                cos, sin = rope.reference(pos, torch.float32)
                tabs, rows = (cos.contiguous(), sin.contiguous()), None
            per_kind[sliding] = (tabs[0], tabs[1], rows, dm.chunks.contiguous(), dm.chunk, dm.keys,
                                 dm.write_dst.contiguous(), bias)
        return per_kind, self._chosen_for(B)

    def _chosen_for(self, B: int) -> list[torch.Tensor]:
        """The per-layer (B, top_k) expert-id buffers the kernels write (made once per batch size)."""
        chosen = self._chosen.get(B)
        if chosen is None:
            chosen = self._chosen[B] = [torch.empty(B, k, dtype=torch.int64) for _, _, k in self.layers]
        return chosen

    def loop_args(self, B: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, "fp8_layout.RunExperts"]:
        """For kernels.decode_steps over n steps of B rows: (L,) int64 addresses of the layers' LayerArgs, whether
        each layer is sliding, the (n, L) addresses of step i's layer l's (B, top_k) expert-id buffer, and the
        fp8_layout.RunExperts those buffers belong to (each step writes its own: an FP8 model's expert store counts
        them after the run). Made once per batch size, grown when a run is longer."""
        got = self._loop.get(B)
        if got is None or got[3].table.shape[0] < n:
            run = fp8_layout.RunExperts(self.layers, B, max(n, 8))
            got = self._loop[B] = (torch.tensor([ctypes.addressof(a) for a, _, _ in self.layers]),
                                   torch.tensor([int(s) for _, s, _ in self.layers]), run.table, run)
        return got[0], got[1], got[2][:n], got[3]


def attention_args(cfg, attn, in_norm, post_norm, qkv_w: torch.Tensor, k_pool, v_pool, sliding: bool):
    """The kernel's LayerArgs with a block's attention fields (dimensions, norms, sinks, the fused q|k|v and o_proj
    weights, its KV pools) filled; bf16 and FP8 blocks (engine/fp8_layout.py) add their MLP fields to it."""
    sinks = attn.attention_sink_bias
    return kernels.LayerArgs(
        H=cfg.hidden_size, nq=attn.num_heads, nkv=attn.num_kv_heads, d=attn.head_dim, dv=attn.v_head_dim,
        rd=cfg.rotary_dim(sliding), eps_in=in_norm.eps, eps_post=post_norm.eps, scale=attn.scale,
        v_scale=attn.value_scale, in_norm=in_norm.weight.data_ptr(), post_norm=post_norm.weight.data_ptr(),
        sinks=None if sinks is None else sinks.data_ptr(), qkv_w=qkv_w.data_ptr(),
        o_w=attn.o_proj.weight.data_ptr(), k_pool=k_pool.data_ptr(), v_pool=v_pool.data_ptr(),
        pool_slots=k_pool.shape[1], kv_bf16=int(k_pool.dtype == torch.bfloat16))


def set_router(a, router) -> None:
    """The router's fields of LayerArgs `a` (its weight, bias correction, normalisation and scaling)."""
    a.router_w, a.router_bias = router.weight.data_ptr(), router.e_score_correction_bias.data_ptr()
    a.norm_topk, a.scaling = int(router.norm_topk_prob), router.routed_scaling_factor


def _layer_args(cfg, attn, in_norm, post_norm, mlp, cache, keep: list, panels: list):
    """One pre-norm block (attention, then a dense or routed MLP) as the kernel's LayerArgs -> (args, sliding,
    experts per token), or None when it does not qualify. Appends the tensors the args point into to `keep` and the
    Panels they read to `panels`."""
    if fp8_layout.is_fp8_block(attn, mlp):           # block-FP8 weights: the FP8 fields (engine/fp8_layout.py)
        return fp8_layout.fused_layer_args(cfg, attn, in_norm, post_norm, mlp, cache, keep, panels)
    fused = attn.fused_qkv()
    sinks = attn.attention_sink_bias
    sliding, k_pool, v_pool = cache.pools(attn.layer_idx)
    if (fused is None or not _ok(fused[0], torch.bfloat16) or not _ok(attn.o_proj.weight, torch.bfloat16)
            or not _ok(in_norm.weight, torch.float32) or not _ok(post_norm.weight, torch.float32)
            or (sinks is not None and not _ok(sinks, torch.float32))
            or k_pool.dtype not in (torch.float32, torch.bfloat16) or not _ok(k_pool, k_pool.dtype)
            or not _ok(v_pool, k_pool.dtype)):
        return None
    pq, po = getattr(attn, "_qkv_panels", None), getattr(attn.o_proj, "_panels", None)
    a = attention_args(cfg, attn, in_norm, post_norm, fused[0], k_pool, v_pool, sliding)
    keep += [fused[0], k_pool, v_pool]
    top_k = 1
    layer_panels = [pq, po]
    if isinstance(mlp, MLP):
        lins = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        ws = [lin.weight for lin in lins]
        if not all(_ok(w, torch.bfloat16) for w in ws):
            return None
        a.moe, a.F_dense = 0, ws[0].shape[0]
        a.gate_w, a.up_w, a.down_w = (w.data_ptr() for w in ws)
        keep += ws
        layer_panels += [getattr(lin, "_panels", None) for lin in lins]
    elif isinstance(mlp, MoE):
        ex, r = mlp.experts, mlp.gate
        gu = getattr(ex, "_gate_up", None)
        if (gu is None or not _ok(gu, torch.bfloat16) or ex.gate_proj.data_ptr() != gu.data_ptr()
                or not _ok(ex.down_proj, torch.bfloat16) or r.n_group > 1 or r.top_k > 64
                or not _ok(r.weight, torch.float32) or not _ok(r.e_score_correction_bias, torch.float32)):
            return None
        a.moe, a.F_moe, a.E, a.top_k = 1, ex.down_proj.shape[2], r.weight.shape[0], r.top_k
        set_router(a, r)
        a.gate_up, a.down = gu.data_ptr(), ex.down_proj.data_ptr()
        keep += [gu, ex.down_proj, r.weight, r.e_score_correction_bias]
        top_k = r.top_k
    else:
        return None
    if all(p is not None and p.get() is not None for p in layer_panels):   # the layer's products on panels
        a.panels = 1
        a.qkv_w, a.o_w = pq.wp.data_ptr(), po.wp.data_ptr()
        if not a.moe:
            a.gate_w, a.up_w, a.down_w = (p.wp.data_ptr() for p in layer_panels[2:])
        panels += layer_panels
    return a, sliding, top_k


def _rope_rows(rope, pos: torch.Tensor):
    """(cos table, sin table, rows) for the kernel: the tables and each token's row in them, or, past the tables,
    the tokens' own computed rows (rows None)."""
    tabs = rope.tables(int(pos.max()))
    if tabs is None:
        cos, sin = rope.reference(pos, torch.float32)
        return cos.contiguous(), sin.contiguous(), None
    return tabs[0], tabs[1], pos


class FusedMTPLayer:
    """An MTP block's rows in a few calls: the embedding and hidden-state norms and eh_proj in torch (three small
    products), then its attention + dense MLP block as one `kernels.decode_layer` call (the same C as a main
    decoder layer, reading the block's own ring), then final_layernorm. Same math as `MTPLayer.forward` on the
    module path, which stays the reference (tests/test_speculative.py compares them). `draft` runs the same calls,
    the head and the argmax as one C call (kernels/draft.c), and `chain_block` gives the block to the C loop that runs
    a step's greedy passes together (ModelRunner.draft_chain)."""

    def __init__(self, model, layer, args, keep: list, panels: list):
        self.model, self.layer, self.args = model, layer, args
        self._keep, self._panels = keep, panels
        self.emb = model.model.embed_tokens.weight
        self._chosen: dict[int, torch.Tensor] = {}
        self._work: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}     # row count -> draft's buffers
        self._chain: tuple | None = None                                  # (eh_proj's panels, chain_block())

    @classmethod
    def build(cls, model, cache) -> "list[FusedMTPLayer] | None":
        if (not isinstance(model, MiMoForCausalLM) or not kernels.available() or not model.mtp_layers()
                or not _ok(model.model.embed_tokens.weight, torch.bfloat16)):
            return None
        out = []
        with torch.no_grad():
            for layer in model.mtp_layers():
                keep, panels = [], []
                try:
                    got = _layer_args(model.config, layer.self_attn, layer.input_layernorm, layer.pre_mlp_layernorm,
                                      layer.mlp, cache, keep, panels)
                except KeyError:                            # no ring for the MTP blocks (include_mtp off)
                    return None
                if got is None or not got[1]:
                    return None
                out.append(cls(model, layer, got[0], keep, panels))
        return out

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(N,) ids -> (N, H) fp32 token embeddings (a tensor-parallel rank: its vocabulary slice, summed)."""
        return kernels.embed_bf16(ids, self.emb)

    def _block(self, x: torch.Tensor, attn_args: tuple, chosen: torch.Tensor, rope_rows) -> None:
        """The MTP block's attention and MLP on x (N, H) in place: one kernel call (a tensor-parallel rank: the two
        halves with a reduction after each)."""
        kernels.decode_layer(self.args, x, *attn_args, chosen, rope_rows=rope_rows)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kinds: dict, hidden: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """N rows: input_ids / positions (1, N), kinds[True] the rows' DecodeKindMeta, hidden (N, H) -> (N, H) after
        final_layernorm, or (R, H) for the R rows `rows` (the others only store their K/V: a draft pass wants the
        last row of each sequence)."""
        for p in self._panels:
            p.get()
        L = self.layer
        N = input_ids.shape[1]
        e = self._embed(input_ids.view(-1))                                          # (N, H) fp32
        h = hidden if hidden.is_contiguous() else hidden.contiguous()
        x = L.eh_proj(torch.cat([kernels.rms_norm(e, L.enorm.weight, L.enorm.eps),
                                 kernels.rms_norm(h, L.hnorm.weight, L.hnorm.eps)], dim=-1))
        x = x.contiguous()
        dm = kinds[True]
        cos, sin, rope_rows = _rope_rows(self.model.model.rotary["sliding"], positions.view(-1))
        chosen = self._chosen.get(N)
        if chosen is None:
            chosen = self._chosen[N] = torch.empty(N, 1, dtype=torch.int64)
        bias = None if dm.bias is None else dm.bias.reshape(N, -1)
        self._block(x, (cos, sin, dm.chunks.contiguous(), dm.chunk, dm.keys, dm.write_dst.contiguous(), bias),
                    chosen, rope_rows)
        if rows is not None:
            x = x[N - 1:] if rows.numel() == 1 and int(rows[0]) == N - 1 else x.index_select(0, rows)
        return kernels.rms_norm(x, L.final_layernorm.weight, L.final_layernorm.eps)

    def chain_block(self) -> tuple[list[int], list[float]] | None:
        """This block as a pass of kernels.mtp_chain takes it: the addresses of (its LayerArgs, enorm's weight,
        hnorm's, eh_proj's weight or panels, whether panels, final_layernorm's weight) and the three norms' eps, the
        panels refreshed first; None where `draft` would not run (the caller then runs the passes one by one)."""
        from .cpu_layout import Bf16Linear
        for p in self._panels:
            p.get()
        L = self.layer
        eh = L.eh_proj
        eh_w = eh._panels.get() if type(eh) is Bf16Linear and eh._panels is not None else None
        if self._chain is not None and self._chain[0] is eh_w:          # as the last call found it
            return self._chain[1]
        if (type(eh) is not Bf16Linear or eh.weight.dtype != torch.bfloat16
                or type(self)._embed is not FusedMTPLayer._embed or type(self)._block is not FusedMTPLayer._block
                or (eh_w is None and not eh.weight.is_contiguous())):
            return None
        w = eh.weight if eh_w is None else eh_w
        got = ([ctypes.addressof(self.args), L.enorm.weight.data_ptr(), L.hnorm.weight.data_ptr(), w.data_ptr(),
                int(eh_w is not None), L.final_layernorm.weight.data_ptr()],
               [L.enorm.eps, L.hnorm.eps, L.final_layernorm.eps])
        self._chain = (eh_w, got) if eh_w is not None else None     # norms: read once, as the LayerArgs are
        return got

    def chosen_for(self, N: int) -> torch.Tensor:
        """The (N, 1) expert-id buffer the block's layer call writes (no routed experts: untouched), one per N."""
        chosen = self._chosen.get(N)
        if chosen is None:
            chosen = self._chosen[N] = torch.empty(N, 1, dtype=torch.int64)
        return chosen

    def draft(self, input_ids: torch.Tensor, positions: torch.Tensor, kinds: dict, hidden: torch.Tensor,
              rows: torch.Tensor | None, head: tuple[torch.Tensor, bool, int], argmax: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """`forward`, then the head product and (`argmax`) each wanted row's argmax, in one C call
        (kernels.mtp_pass, kernels/draft.c: the same calls on the same arguments, so the same logits bit for bit;
        a pass of a dozen calls with torch between them cost as much again as its arithmetic). head = (the (S, H)
        bf16 weight or its panels, whether panels, S). -> (logits (R, S), argmax (R,) or None), or None where the
        pass is not one draft.c makes (eh_proj not a bf16 Bf16Linear, more rows than its kernel takes, a subclass
        with its own embedding or block): the caller then runs `forward` and the head."""
        L, N = self.layer, input_ids.shape[1]
        block = self._pass_block(N, hidden)
        if block is None:
            return None
        dm = kinds[True]
        cos, sin, rope_rows = _rope_rows(self.model.model.rotary["sliding"], positions.view(-1))
        chunks, dst = dm.chunks.contiguous(), dm.write_dst.contiguous()
        bias = None if dm.bias is None else dm.bias.reshape(N, -1)
        attn = torch.tensor([cos.data_ptr(), sin.data_ptr(), 0 if rope_rows is None else rope_rows.data_ptr(),
                             chunks.data_ptr(), chunks.shape[-1], dm.chunk, dm.keys, dst.data_ptr(),
                             0 if bias is None else bias.data_ptr()], dtype=torch.int64)
        R = N if rows is None else rows.shape[0]
        tokens = torch.empty(R, dtype=torch.int64) if argmax else None
        chosen, work = self._work_for(N)
        logits = kernels.mtp_pass(self.args, block, input_ids.view(-1), hidden, attn, chosen, rows, *head, work, tokens)
        return logits, tokens

    def fill(self, ids: torch.Tensor, positions: torch.Tensor, rings: torch.Tensor, slots: torch.Tensor,
             hidden: torch.Tensor, ring_slots: int) -> bool:
        """Only the block's K/V at N rows, stored at `slots` (a catch-up: the K/V at a position depends on its hidden
        state and token alone; no attention, MLP or head): the pass's embedding, norms, eh_proj, input_layernorm, q|k|v
        product and RoPE in one C call (kernels.mtp_pass with no wanted row). ids / positions / rings / slots (N,)
        int64, hidden (N, H). -> False (nothing stored) where `draft` would not run: the caller uses the modules."""
        N = ids.shape[0]
        block = self._pass_block(N, hidden)
        if block is None:
            return False
        cos, sin, rope_rows = _rope_rows(self.model.model.rotary["sliding"], positions)
        attn = torch.tensor([cos.data_ptr(), sin.data_ptr(), 0 if rope_rows is None else rope_rows.data_ptr(),
                             rings.data_ptr(), 1, ring_slots, 1, slots.data_ptr(), 0], dtype=torch.int64)
        chosen, work = self._work_for(N)
        no_rows = torch.empty(0, dtype=torch.int64)        # no wanted row: the head (any weight, S = 1) is not read
        kernels.mtp_pass(self.args, block, ids, hidden, attn, chosen, no_rows, self.emb, False, 1, work)
        return True

    def _pass_block(self, N: int, hidden: torch.Tensor) -> tuple | None:
        """The block as kernels.mtp_pass takes it (embedding, norms and their eps, eh_proj's weight or panels and
        whether panels, final_layernorm), the panels refreshed first; None where the C pass does not apply (eh_proj
        not a bf16 Bf16Linear, more rows than its kernel takes, a subclass with its own embedding or block, hidden
        states not fp32 rows of unit stride)."""
        from .cpu_layout import KERNEL_MAX_ROWS, Bf16Linear
        L = self.layer
        eh = L.eh_proj
        if (type(eh) is not Bf16Linear or eh.weight.dtype != torch.bfloat16 or N > KERNEL_MAX_ROWS
                or type(self)._embed is not FusedMTPLayer._embed or type(self)._block is not FusedMTPLayer._block
                or hidden.dtype != torch.float32 or hidden.stride(-1) != 1):
            return None
        for p in self._panels:
            p.get()
        eh_w = eh._panels.get() if eh._panels is not None else None
        if eh_w is None and not eh.weight.is_contiguous():
            return None
        return (self.emb, L.enorm.weight, L.enorm.eps, L.hnorm.weight, L.hnorm.eps,
                eh.weight if eh_w is None else eh_w, eh_w is not None, L.final_layernorm.weight,
                L.final_layernorm.eps)

    def _work_for(self, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1) expert ids and the pass's float work for N rows, made once per row count."""
        got = self._work.get(N)
        if got is None:
            got = self._work[N] = (torch.empty(N, 1, dtype=torch.int64), torch.empty(4 * N * self.emb.shape[1]))
        return got
