"""engine/cpu_layout.py: the fast path is explicit module classes swapped into the model (so `print(model)` shows
what runs), each keeping the reference module's parameters, and each agreeing with the reference it replaces;
`LLM(model)` transforms its own copy and leaves the caller's model as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mimoflash import kernels
from mimoflash.engine import cpu_layout as cl
from mimoflash.engine.llm import LLM
from mimoflash.engine.sampling import SamplingParams
from mimoflash.model.attention import Attention, attend_reference
from mimoflash.model.layers import RMSNorm
from mimoflash.model.moe import Experts, MoE
from tests.conftest import make_model, tiny_config

if not kernels.available():          # a failed build is an error here, not a reason to skip
    kernels.build(force=True)

G = torch.Generator().manual_seed(0)

# mode -> (model dtype, compute dtype, the classes the layout must swap in)
MODES = {
    "bf16 weights": (torch.bfloat16, torch.float32, {cl.Bf16Linear, cl.Bf16Embedding, cl.FastRMSNorm,
                                                    cl.FastAttention, cl.Bf16Experts, cl.KernelMoE}),
    "fp32": (torch.float32, torch.float32, {cl.FastRMSNorm, cl.FastAttention, cl.Fp32Experts}),
    "bf16 compute": (torch.bfloat16, torch.bfloat16, {cl.PickedExperts}),
}


def _types(model) -> set[type]:
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize("mode", MODES)
def test_layout_swaps_in_named_classes_and_keeps_the_state_dict(mode):
    """The classes of each mode replace the model's modules (and print), state_dict names/shapes/values stay, a
    second call changes nothing, and no module carries a patched instance `forward`."""
    dtype, compute, want = MODES[mode]
    m = make_model(tiny_config(), seed=1, dtype=dtype)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cl.use_cpu_layout(m, compute)
    assert want <= _types(m), want - _types(m)
    assert all(cls.__name__ in repr(m) for cls in want)
    others = {cl.Bf16Linear, cl.Bf16Embedding, cl.FastRMSNorm, cl.FastAttention, cl.Bf16Experts, cl.KernelMoE,
              cl.Fp32Experts, cl.PickedExperts} - want
    assert not others & _types(m)
    assert not any("forward" in vars(x) for x in m.modules())
    after = m.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k].to(v.dtype), v), k
    mods = list(m.modules())
    cl.use_cpu_layout(m, compute)                                        # idempotent: the same objects
    assert all(a is b for a, b in zip(mods, m.modules())) and len(mods) == len(list(m.modules()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 2, 3, 5 * cl.KERNEL_MAX_ROWS])
def test_every_moe_path_matches_the_dense_reference(mode, T):
    """Whatever class runs the experts (Bf16Experts/KernelMoE, Fp32Experts, PickedExperts), a MoE layer equals
    `MoE.forward_dense_reference` on the same weights: T=1 (one token: the token kernel / the K experts in turn), 2
    and 3 (grouped), and enough rows that some expert has more than KERNEL_MAX_ROWS (MKL expert by expert)."""
    dtype, compute, _ = MODES[mode]
    m = make_model(tiny_config(), seed=2, dtype=dtype)
    ref = make_model(tiny_config(), seed=2, dtype=dtype).cast(torch.float32)
    cl.use_cpu_layout(m, compute)
    moe = next(x for x in m.modules() if isinstance(x, MoE))
    moe_ref = next(x for x in ref.modules() if isinstance(x, MoE))
    x = torch.randn(1, T, m.config.hidden_size, generator=G)
    with torch.no_grad():
        got = moe(x.to(compute)).float()
        want = moe_ref.forward_dense_reference(x.to(compute).float())
    tol = dict(atol=1e-5, rtol=1e-4) if compute == torch.float32 else dict(atol=0.03, rtol=0.03)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("prefill_kernel", [False, True])
def test_bf16_experts_many_rows_match_the_dense_reference(monkeypatch, prefill_kernel):
    """Many rows with bf16 experts: kernels.prefill.experts (one call for the layer; forced on, so machines without
    AVX-512 run its portable loops) and the torch path (MKL expert by expert) both equal the dense reference."""
    calls = []
    real = cl.prefill_kernels.experts
    monkeypatch.setattr(cl.prefill_kernels, "fast", lambda: prefill_kernel)
    monkeypatch.setattr(cl.prefill_kernels, "experts", lambda *a: calls.append(a[0].shape) or real(*a))
    m = make_model(tiny_config(), seed=2, dtype=torch.bfloat16)
    ref = make_model(tiny_config(), seed=2, dtype=torch.bfloat16).cast(torch.float32)
    cl.use_cpu_layout(m, torch.float32)
    moe = next(x for x in m.modules() if isinstance(x, MoE))
    moe_ref = next(x for x in ref.modules() if isinstance(x, MoE))
    T = 3 * cl.KERNEL_MAX_ROWS + 5
    x = torch.randn(1, T, m.config.hidden_size, generator=G)
    with torch.no_grad():
        got, want = moe(x), moe_ref.forward_dense_reference(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert calls == ([(T, m.config.hidden_size)] if prefill_kernel else [])


class _CacheFree:
    """A backend over the step's own tokens (no cache): attend_reference with causal positions."""

    def attend(self, layer, q, k, v):
        B, T = q.shape[:2]
        pos = torch.arange(T).expand(B, T)
        return attend_reference(q, k, v, pos, pos, layer.window_keys, layer.attention_sink_bias, layer.scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_attention_kernel_rope_matches_the_reference_module(dtype):
    """FastAttention with a backend (the engine's case: fused q|k|v product, RoPE + value scale in one kernel) vs
    the model's Attention with the three projections and torch RoPE, same backend and weights."""
    m = make_model(tiny_config(attention_value_scale=0.7), seed=3, dtype=dtype)
    ref = make_model(tiny_config(attention_value_scale=0.7), seed=3, dtype=dtype).cast(torch.float32)
    cl.use_cpu_layout(m, torch.float32)
    ids = torch.randint(0, 512, (2, 9), generator=G)
    pos = torch.arange(9).expand(2, 9)
    for layer, layer_ref in zip(m.model.layers, ref.model.layers):
        attn, attn_ref = layer.self_attn, layer_ref.self_attn
        assert isinstance(attn, cl.FastAttention) and attn.rope_kernel and type(attn_ref) is Attention
        x = torch.randn(2, 9, m.config.hidden_size, generator=G)
        rope = m.model.rope(pos, torch.float32)[attn.sliding]
        with torch.no_grad():
            torch.testing.assert_close(attn(x, pos, rope, _CacheFree()), attn_ref(x, pos, rope, _CacheFree()),
                                       atol=2e-5, rtol=1e-4)
    with torch.no_grad():                                 # the whole model, cache-free (torch RoPE on the fusion)
        torch.testing.assert_close(m(ids), ref(ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("panels", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 2 * cl.KERNEL_MAX_ROWS])
def test_bf16_linear_embedding_and_norm_match_their_references(panels, rows):
    m = make_model(tiny_config(), seed=4, dtype=torch.bfloat16)
    cl.use_bf16_weights(m, panels=panels)
    cl.use_cpu_layout(m, torch.float32, panels=panels)
    lin, emb, norm = m.lm_head, m.model.embed_tokens, m.model.norm
    assert isinstance(lin, cl.Bf16Linear) and (lin._panels is not None) == panels
    x = torch.randn(rows, m.config.hidden_size, generator=G)
    ids = torch.randint(0, 512, (rows,), generator=G)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight.float()), atol=1e-4, rtol=1e-5)
        assert torch.equal(emb(ids), F.embedding(ids, emb.weight).float())
        torch.testing.assert_close(norm(x), RMSNorm.forward_reference(norm, x), atol=1e-6, rtol=1e-5)


def test_autograd_and_a_cast_fall_back_to_the_reference_modules():
    m = make_model(tiny_config(), seed=5, dtype=torch.bfloat16)
    ref = make_model(tiny_config(), seed=5, dtype=torch.bfloat16).cast(torch.float32)
    ids = torch.randint(0, 512, (2, 7), generator=G)
    cl.use_cpu_layout(m, torch.float32)
    m(ids).sum().backward()                                        # every class: the parent's math under autograd
    assert m.lm_head.weight.grad is not None
    assert m.model.layers[1].mlp.experts.gate_proj.grad is not None
    m.float()                                                      # breaks the fused views: reference modules' math
    with torch.no_grad():
        attn = m.model.layers[1].self_attn
        assert attn.fused_qkv() is None and not m.model.layers[1].mlp.experts.layout_ok()
        torch.testing.assert_close(m(ids), ref(ids), atol=2e-5, rtol=1e-4)


def test_llm_leaves_the_callers_model_as_it_was():
    """LLM(model) works on `engine_copy(model)`: the caller's modules, parameter objects, dtypes, storages, values
    and mode are unchanged after building and generating; the engine's copy runs the swapped classes."""
    m = make_model(tiny_config(), seed=6, dtype=torch.bfloat16)
    m.train()
    mods = [(n, type(x)) for n, x in m.named_modules()]
    params = [(n, p, p.dtype, p.data_ptr(), p.clone()) for n, p in m.named_parameters()]
    ids = torch.randint(0, 512, (1, 6), generator=G)
    with torch.no_grad():
        out = m(ids)
    llm = LLM(m, max_num_seqs=2, block_size=4)
    llm.generate({"prompt_token_ids": ids[0].tolist()}, SamplingParams(temperature=0, max_tokens=4))
    assert llm.model is not m and isinstance(llm.model.lm_head, cl.Bf16Linear)
    assert [(n, type(x)) for n, x in m.named_modules()] == mods
    assert m.training and not llm.model.training
    for (n, p, dt, ptr, val), (n2, p2) in zip(params, m.named_parameters()):
        assert n == n2 and p is p2 and p.dtype == dt and p.data_ptr() == ptr and torch.equal(p, val), n
    assert type(m.lm_head) is torch.nn.Linear and not hasattr(m.lm_head, "_panels")
    with torch.no_grad():
        assert torch.equal(m(ids), out)
    m32 = make_model(tiny_config(), seed=6)                         # a cast on the engine's side: still untouched
    plain = _types(m32)
    LLM(m32, dtype="bfloat16", max_num_seqs=2)
    assert all(p.dtype == torch.float32 for p in m32.parameters()) and _types(m32) == plain


def test_engine_copy_keeps_ties_and_shares_storage():
    m = make_model(tiny_config(tie_word_embeddings=True), seed=7)
    c = cl.engine_copy(m)
    assert c is not m and c.lm_head.weight is c.model.embed_tokens.weight             # the tie survives
    assert c.lm_head.weight is not m.lm_head.weight
    assert c.lm_head.weight.data_ptr() == m.lm_head.weight.data_ptr()                 # no weight copied
    assert all(a is not b for a, b in zip(c.modules(), m.modules()))
    c.lm_head.register_forward_hook(lambda *args: None)                                # hooks are the copy's own
    assert not m.lm_head._forward_hooks and c.config is m.config                       # other attributes shared
    cl.use_cpu_layout(c, torch.float32)
    assert type(m.model.layers[1].self_attn) is Attention and type(m.model.norm) is RMSNorm


def _long_prefill_steps(model, cache_dtype=torch.float32) -> tuple[dict, list]:
    """A ragged two-sequence step with long slices (padding rows) after a first chunk of one of them (cached keys):
    -> ({impl: logits}, the full recompute's last logits of both sequences)."""
    from tests.test_kv_cache import Driver, _req, _tokens, full_logits
    seqs = [_tokens(150), _tokens(90)]
    outs = {}
    for impl in ("fast", "reference"):
        d = Driver(model, impl, block_size=8, dtype=cache_dtype)
        reqs = [_req(s, f"s{i}") for i, s in enumerate(seqs)]
        outs[impl] = torch.cat([d.step([(reqs[0], 20)]), d.step([(reqs[0], 130), (reqs[1], 90)])])
    return outs, [full_logits(model, s)[-1] for s in seqs]


def test_long_prefill_attends_in_query_blocks_like_the_reference(monkeypatch):
    """Without the prefill attention kernel (no AVX-512: kernels.prefill.fast() False), a prefill slice longer than
    runner.QUERY_BLOCK attends through SDPA block by block, each block to the sink column and the key span its rows
    may see (window or causal limit): the same logits as the reference attention and the full recompute, and the
    blocks did leave keys out."""
    from mimoflash.engine import runner as R
    spans = []
    real = R._query_blocks

    def spy(bias):
        out = list(real(bias))
        spans.append((bias.shape[3], out))
        return iter(out)
    monkeypatch.setattr(R, "_query_blocks", spy)
    monkeypatch.setattr(R, "QUERY_BLOCK", 32)
    monkeypatch.setattr(R.prefill_kernels, "fast", lambda: False)
    outs, refs = _long_prefill_steps(make_model(tiny_config(), seed=4))
    torch.testing.assert_close(outs["fast"], outs["reference"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(outs["fast"][1:], torch.stack(refs), atol=2e-5, rtol=1e-4)
    blocks = [b for K, out in spans for b in out if len(out) > 1]
    assert blocks and any(c0 > 1 for _, _, c0, _ in blocks)                   # windows skipped old keys
    assert any(c1 < K for K, out in spans if len(out) > 1 for _, _, _, c1 in out)   # causal: later keys skipped


@pytest.mark.skipif(not kernels.available(), reason="the CPU kernels did not build (no C compiler)")
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_long_prefill_attention_kernel_like_the_reference(monkeypatch, cache_dtype):
    """With the prefill attention kernel (kernels.prefill.attention; forced on, so machines without AVX-512 run its
    portable loops): the same ragged step with cached keys gives the reference attention's logits and the full
    recompute's (with a bf16 cache, whose rounding every path sees: within 1e-3 of the reference, as SDPA's path is,
    and 1% in logprob of the fp32 recompute), and every layer of both steps went through the kernel, none SDPA."""
    from mimoflash.engine import runner as R
    from mimoflash.kernels import prefill as PK
    calls, sdpa = [], []
    real, real_blocks = PK.attention, R._query_blocks
    monkeypatch.setattr(R.prefill_kernels, "fast", lambda: True)
    monkeypatch.setattr(R.prefill_kernels, "attention", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(R, "_query_blocks", lambda bias: sdpa.append(bias.shape[2]) or real_blocks(bias))
    model = make_model(tiny_config(), seed=4)
    outs, refs = _long_prefill_steps(model, cache_dtype)
    tol = dict(atol=2e-5, rtol=1e-4) if cache_dtype == torch.float32 else dict(atol=1e-3, rtol=1e-3)   # as SDPA's
    torch.testing.assert_close(outs["fast"], outs["reference"], **tol)
    if cache_dtype == torch.float32:
        torch.testing.assert_close(outs["fast"][1:], torch.stack(refs), atol=2e-5, rtol=1e-4)
    else:
        lp = lambda x: torch.log_softmax(x.float(), -1)                                      # noqa: E731
        torch.testing.assert_close(lp(outs["fast"][1:]), lp(torch.stack(refs)), atol=0.01, rtol=0.01)
    L = model.config.num_hidden_layers
    assert calls == [20] * L + [220] * L and not sdpa                        # both steps, every layer, no SDPA
