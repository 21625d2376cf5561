"""mimoflash/kernels (C, built on first use) against the torch code they replace, and the engine's bf16-weight mode
(engine/cpu_layout.py) against the fp32 model with the same weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mimoflash import kernels
from mimoflash.engine.cpu_layout import KERNEL_MAX_ROWS, Bf16Experts, PickedExperts, use_cpu_layout
from mimoflash.engine.kv_cache import KVCache, KVCacheManager, plan_cache
from mimoflash.engine.llm import LLM
from mimoflash.engine.request import Request
from mimoflash.engine.runner import ModelRunner
from mimoflash.engine.sampling import SamplingParams
from mimoflash.engine.scheduler import Batch, ScheduledRequest
from mimoflash.model.attention import attend_reference
from mimoflash.model.layers import RMSNorm, apply_partial_rope

from tests.conftest import kernel_threads, make_model, run_portable, tiny_config

if not kernels.available():          # a failed build is an error here, not a reason to skip
    kernels.build(force=True)

G = torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(*shape, generator=G)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 12, 17])
@pytest.mark.parametrize("N,K", [(1, 1), (3, 7), (4, 8), (7, 9), (64, 24), (33, 100), (8, 512)])
def test_linear_bf16w_matches_upcast_matmul(M, N, K):
    w = _randn(N, K).bfloat16()
    x = _randn(M, 2 * K)[:, ::2]                                   # strided rows: the wrapper copies them
    got = kernels.linear_bf16w(x, w)
    ref = kernels.linear_bf16w_reference(x, w)
    torch.testing.assert_close(got, ref, atol=1e-5 * K ** 0.5, rtol=1e-5)
    torch.testing.assert_close(kernels.linear_bf16w(_randn(2, 3, K), w).shape, torch.Size([2, 3, N]))


def test_linear_bf16w_rejects_bad_input():
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.linear_bf16w(_randn(1, 8), _randn(4, 8).half())
    with pytest.raises(ValueError, match="contiguous"):
        kernels.linear_bf16w(_randn(1, 8), _randn(8, 4).bfloat16().t())


def test_simd_level_reported():
    assert kernels.simd_level() in (0, 2)


def test_rms_norm_matches_module():
    norm = RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * _randn(96))
        x = _randn(3, 5, 96) * 4
        torch.testing.assert_close(kernels.rms_norm(x, norm.weight, norm.eps), norm.forward_reference(x),
                                   atol=1e-6, rtol=1e-5)


def test_qkv_rope_matches_partial_rope_and_value_scale():
    N, nq, nkv, d, dv, rd = 5, 4, 2, 48, 32, 16
    qkv = _randn(N, (nq + nkv) * d + nkv * dv)
    freqs = torch.arange(N).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, rd, 2).float() / rd))
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    ref_qk = apply_partial_rope(qkv[:, :(nq + nkv) * d].view(1, N, nq + nkv, d), cos[None], sin[None])
    ref_v = qkv[:, (nq + nkv) * d:] * 0.7
    got = kernels.qkv_rope_(qkv.clone(), nq + nkv, d, cos, sin, (nq + nkv) * d, 0.7)
    torch.testing.assert_close(got[:, :(nq + nkv) * d], ref_qk.reshape(N, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[:, (nq + nkv) * d:], ref_v)
    with pytest.raises(ValueError, match="inconsistent"):
        kernels.qkv_rope_(qkv, nq + nkv, d, cos[:2], sin[:2], (nq + nkv) * d, 1.0)


def test_argmax_rows_matches_torch():
    """Greedy sampling's argmax: the first index of the maximum (ties), the first NaN when a row has one, all -inf,
    rows with a stride (a slice of a wider tensor), one column."""
    x = _randn(7, 1001)
    x[1, 10] = x[1, 500] = x[1].max() + 1                       # a tie: the first wins
    x[2, 30], x[2, 40] = float("nan"), float("inf")             # NaN beats everything, as in torch
    x[3] = float("-inf")
    x[4, 1000] = 1e9                                            # the last column
    x[5] = 0.0
    wide = _randn(4, 300)[:, 17:250]
    for t in (x, wide, _randn(3, 1)):
        assert torch.equal(kernels.argmax_rows(t), t.argmax(dim=-1))


def test_argmax_rows_blocks_and_threads():
    """The kernel keeps the maximum of each block of 64 and rescans the first block holding the row's maximum: ties
    in two blocks, a tie inside a block, the maximum at a block's first/last index or in a short last block, NaN
    after the maximum, -inf rows; rows split over 2 and 3 threads give the same indices."""
    V = 64 * 40 + 17
    x = _randn(16, V)
    x[0, 64 * 3 + 5] = x[0, 64 * 30 + 1] = 50.0               # tie across blocks: the earlier block
    x[1, 64 * 7 + 9] = x[1, 64 * 7 + 2] = 50.0                 # tie within a block: the earlier index
    x[2, 64 * 9] = 50.0                                        # a block's first index
    x[3, 64 * 9 + 63] = 50.0                                   # a block's last index
    x[4, V - 1] = 50.0                                         # the short last block
    x[5, 64 * 2 + 3], x[5, 64 * 20] = 50.0, float("nan")       # NaN later than the maximum still wins
    x[6] = float("-inf")
    x[7, :] = 1.0                                              # all equal: index 0
    ref = x.argmax(dim=-1)
    assert torch.equal(kernels.argmax_rows(x), ref)
    for n in (2, 3):
        with kernel_threads(n):
            assert torch.equal(kernels.argmax_rows(x), ref)


def test_read_sum_matches_wrapping_int64_sum():
    """The bandwidth yardstick reads every byte: its sum equals torch's (wrapping) int64 sum of the same words, on one
    thread and split over the pool (2 and 3 threads, a length that is no multiple of the ranges), a tail shorter than
    one word is ignored, empty reads 0; bad input is refused."""
    g = torch.Generator().manual_seed(3)
    words = torch.randint(-2**62, 2**62, ((1 << 17) + 37,), generator=g, dtype=torch.int64)
    ref = int(words.sum())
    assert kernels.read_sum(words) == ref
    for n in (2, 3):
        with kernel_threads(n):
            assert kernels.read_sum(words) == ref
    tail = torch.cat([words[:5].view(torch.uint8), torch.full((7,), 255, dtype=torch.uint8)])
    assert kernels.read_sum(tail) == int(words[:5].sum())
    assert kernels.read_sum(torch.empty(0, dtype=torch.uint8)) == 0
    with pytest.raises(ValueError):
        kernels.read_sum(words[::2])


def test_silu_mul():
    h = _randn(3, 2 * 20)
    torch.testing.assert_close(kernels.silu_mul(h), F.silu(h[:, :20]) * h[:, 20:])


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sinks", [True, False])
@pytest.mark.parametrize("nq,h,dv,n", [(4, 2, 32, 3), (2, 2, 32, 3), (6, 2, 72, 5), (8, 2, 32, 3), (10, 2, 32, 3),
                                        (14, 2, 32, 3), (16, 1, 136, 3), (24, 2, 32, 2)])
def test_attn_decode_paged_matches_reference(sinks, nq, h, dv, n, kv_dtype):
    """GQA (query heads per kv head G = 1..16: every score-block shape of the AVX2 kernel, and G > 8 in sub-groups),
    chunks of 4 slots scattered over the pool, a mask with empty slots, K not a multiple of the key blocks, dv over
    one 64-wide pass; fp32 and bf16 pools (read as fp32)."""
    B, d, chunk = 3, 48, 4
    K = n * chunk - 1
    pool = B * n + 4
    k_pool, v_pool = _randn(h, pool * chunk, d).to(kv_dtype), _randn(h, pool * chunk, dv).to(kv_dtype)
    table = torch.randperm(pool, generator=G)[:B * n].view(B, n)
    slots = (table[:, :, None] * chunk + torch.arange(chunk)).view(B, -1)[:, :K]          # (B, K)
    keys = k_pool[:, slots].permute(1, 2, 0, 3).float()                  # (B, K, h, dim); bf16 -> fp32 is exact
    vals = v_pool[:, slots].permute(1, 2, 0, 3).float()
    q = _randn(B, nq, d)
    valid = torch.rand(B, K, generator=G) > 0.3
    valid[:, 0] = True
    bias = torch.zeros(B, K).masked_fill(~valid, float("-inf"))
    sink = _randn(nq) if sinks else None
    got = kernels.attn_decode_paged(q, k_pool, v_pool, table, chunk, K, bias, sink, d ** -0.5)
    k_pos = torch.where(valid, torch.arange(K), -1)                  # (B, K); the query sits at position K
    ref = attend_reference(q[:, None], keys, vals, torch.full((B, 1), K), k_pos, None, sink, d ** -0.5)[:, 0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="table"):
        kernels.attn_decode_paged(q, k_pool, v_pool, table, chunk, n * chunk + 1, None, sink, 1.0)
    with pytest.raises(ValueError, match="outside"):
        kernels.attn_decode_paged(q, k_pool, v_pool, table + pool, chunk, K, None, sink, 1.0)


# ------------------------------------------------------------------------------------------- engine, bf16 weights

def _pair(seed=3, **overrides):
    """The same weights twice: bf16 storage, and upcast to fp32 (exact) for the reference."""
    m16 = make_model(tiny_config(**overrides), seed=seed, dtype=torch.bfloat16)
    m32 = make_model(tiny_config(**overrides), seed=seed, dtype=torch.bfloat16).cast(torch.float32)
    return m16, m32


def test_bf16_weight_decode_equals_fp32_recompute():
    """Cached decode with bf16 weights and fp32 compute, across ring wraps (window 4) and blocks (size 4), equals a
    full forward of the fp32 model holding the same values."""
    m16, m32 = _pair()
    toks = torch.randint(0, 512, (23,), generator=G).tolist()
    with torch.no_grad():
        ref = m32(torch.tensor([toks]))[0]
    layout = plan_cache(m16.config, 1 << 24, max_num_seqs=2, block_size=4, dtype=torch.float32)
    kv = KVCacheManager(layout)
    runner = ModelRunner(m16, KVCache(layout), "fast", compute_dtype=torch.float32)
    assert runner.use_kernels and m16.lm_head.weight.dtype == torch.bfloat16
    assert runner.fused is not None                                    # single-sequence decode: one call per layer
    assert isinstance(m16.model.layers[1].mlp.experts, Bf16Experts)
    req = Request("r", list(toks), SamplingParams(max_tokens=1))
    pos = 0
    for n in [3] + [1] * 9 + [6, 1, 1, 1, 2]:
        kv.allocate(req, n)
        got = runner.execute(Batch([ScheduledRequest(req, pos, n, True)]))[0]
        req.num_computed_tokens = pos = pos + n
        torch.testing.assert_close(got, ref[pos - 1], atol=2e-5, rtol=1e-4)


def test_bf16_weight_transform_keeps_names_values_and_autograd():
    m16, m32 = _pair(seed=4)
    ids = torch.randint(0, 512, (2, 9), generator=G)
    use_cpu_layout(m16, torch.float32)
    use_cpu_layout(m16, torch.float32)                                 # idempotent
    sd16, sd32 = m16.state_dict(), m32.state_dict()
    assert set(sd16) == set(sd32) and all(torch.equal(sd16[k].float(), sd32[k]) for k in sd16)
    with torch.no_grad():
        torch.testing.assert_close(m16(ids), m32(ids), atol=2e-5, rtol=1e-4)
    m16(ids).sum().backward()                                          # the modules' own math under autograd
    assert m16.lm_head.weight.grad is not None


def test_llm_default_keeps_bf16_weights_and_matches_fp32():
    m16, m32 = _pair(seed=5)
    prompts = [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=G).tolist()} for n in (5, 12, 3)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    a = LLM(m16, max_num_seqs=4)
    b = LLM(m32, max_num_seqs=4)
    assert (a.dtype, a.weight_dtype) == (torch.float32, torch.bfloat16)
    assert (b.dtype, b.weight_dtype) == (torch.float32, torch.float32)
    for x, y in zip(a.generate(prompts, sp), b.generate(prompts, sp)):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            t = next(iter(lx))
            assert abs(lx[t].logprob - ly[t].logprob) < 1e-4
    with pytest.raises(ValueError, match="weight_dtype"):
        LLM(make_model(tiny_config()), dtype="bfloat16", weight_dtype="float32")


def test_without_kernels_weights_are_upcast():
    """MIMOFLASH_NO_KERNELS=1 (or no compiler): available() is False and LLM keeps everything in fp32."""
    code = ("import torch; from mimoflash import kernels; from mimoflash.engine.llm import LLM; "
            "from tests.conftest import kernel_threads, make_model, run_portable, tiny_config; assert not kernels.available(); "
            "llm = LLM(make_model(tiny_config(), dtype=torch.bfloat16)); assert llm.weight_dtype == torch.float32; "
            "out = llm.generate({'prompt_token_ids': [1, 2, 3]}, {'max_tokens': 4, 'temperature': 0}); "
            "assert len(out[0].outputs[0].token_ids) == 4")
    env = dict(os.environ, MIMOFLASH_NO_KERNELS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr


def test_build_without_compiler_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("MIMOFLASH_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C compiler"):
        kernels.build()


@pytest.mark.parametrize("norm", [True, False])
def test_moe_token_kernel_matches_dense_reference(norm):
    from mimoflash.model.moe import MoE
    cfg = tiny_config(norm_topk_prob=norm, routed_scaling_factor=1.5)
    m32 = make_model(cfg, seed=6, dtype=torch.bfloat16).cast(torch.float32)
    moe = next(x for x in m32.modules() if isinstance(x, MoE))
    ex = moe.experts
    gu = torch.cat([ex.gate_proj.data, ex.up_proj.data], 1).bfloat16().contiguous()
    x = _randn(1, cfg.hidden_size)
    with torch.no_grad():
        y, chosen = kernels.moe_token_bf16(x, moe.gate.weight, moe.gate.e_score_correction_bias,
                                           cfg.num_experts_per_tok, norm, 1.5, gu, ex.down_proj.data.bfloat16())
        idx, _, _ = moe.gate(x)
        assert sorted(chosen[0].tolist()) == sorted(idx[0].tolist())
        torch.testing.assert_close(y, moe.forward_dense_reference(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T", [1, 3, 5 * KERNEL_MAX_ROWS])
@pytest.mark.parametrize("groups", [{}, {"n_group": 2, "topk_group": 1}])
def test_bf16_weight_moe_paths_match_dense_reference(T, groups):
    """T=1: the one-call token kernel (group-limited routing: the torch router, then the picked experts one by
    one); T=3: all experts in one kernel call; T=5 * KERNEL_MAX_ROWS (top-2 of 8 experts: > KERNEL_MAX_ROWS rows
    for some expert): MKL on upcast weights, expert by expert."""
    from mimoflash.model.moe import MoE
    m16, m32 = _pair(seed=7, **groups)
    use_cpu_layout(m16, torch.float32)
    moe16 = next(x for x in m16.modules() if isinstance(x, MoE))
    moe32 = next(x for x in m32.modules() if isinstance(x, MoE))
    x = _randn(1, T, m16.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(moe16(x), moe32.forward_dense_reference(x), atol=1e-5, rtol=1e-4)


def test_experts_kernel_rejects_counts_that_do_not_match_rows():
    gu, dn = _randn(3, 8, 4).bfloat16(), _randn(3, 4, 4).bfloat16()
    x = _randn(5, 4)
    with pytest.raises(ValueError, match="sum"):
        kernels.experts_bf16(x, torch.tensor([2, 2, 2]), gu, dn)
    y = kernels.experts_bf16(x, torch.tensor([2, 0, 3]), gu, dn)
    ref = torch.cat([F.linear(F.silu(F.linear(x[:2], gu[0, :4].float())) * F.linear(x[:2], gu[0, 4:].float()),
                              dn[0].float()),
                     F.linear(F.silu(F.linear(x[2:], gu[2, :4].float())) * F.linear(x[2:], gu[2, 4:].float()),
                              dn[2].float())])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)


def test_portable_paths_agree_too():
    """The same kernel tests with the AVX2 paths switched off (MIMOFLASH_KERNELS_PORTABLE=1): the portable loops
    are what a non-AVX2 machine runs."""
    run_portable(__file__, "linear_bf16w_matches or attn_decode or moe_token or experts_kernel or bf16_weight")


def test_portable_switch_is_seen():
    code = "from mimoflash import kernels; print(kernels.simd_level())"
    env = dict(os.environ, MIMOFLASH_KERNELS_PORTABLE="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2, "attention_value_scale": 0.5,
                                            "norm_topk_prob": False, "routed_scaling_factor": 2.0}])
@pytest.mark.parametrize("lengths", [[6], [6, 11, 2]])
def test_fused_layer_decode_matches_module_path(overrides, lengths):
    """runner.fused (kernels.decode_layer, one call per layer; one sequence, or a ragged batch with masks and
    experts grouped across sequences) vs the same engine with it switched off (the modules with their kernel-backed
    forwards): same greedy tokens, logprobs within 1e-5, across ring wraps (window 4) and block boundaries."""
    m16, _ = _pair(seed=8, **overrides)
    ps = [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=G).tolist()} for n in lengths]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
    a = LLM(m16, max_num_seqs=4, block_size=4)
    assert a.engine.runner.fused is not None
    got = [o.outputs[0] for o in a.generate(ps, sp)]
    a.engine.runner.fused = None
    _assert_same_greedy(got, [o.outputs[0] for o in a.generate(ps, sp)], 1e-5)


def _assert_same_greedy(got, ref, tol):
    """Two runs' completions: the same tokens, and the chosen tokens' logprobs within tol."""
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
        for lx, ly in zip(g.logprobs, r.logprobs):
            t = next(iter(ly))
            assert abs(lx[t].logprob - ly[t].logprob) < tol


def test_fused_decode_same_withkernel_threads():
    """A ragged batch and a single sequence through runner.fused with the kernel pool at 1 and at 2 threads
    (attention split by sequence and kv head; products in row chunks over the pool: wide enough MLPs that the dense
    gate|up, the routed experts' gate|up and downs and the lm_head pass the size under which a group runs on one
    thread): the same tokens and the same logprobs, bit for bit."""
    m16, _ = _pair(seed=5, num_hidden_layers=3, intermediate_size=512, moe_intermediate_size=256)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    llm = LLM(m16, max_num_seqs=4, block_size=4)
    assert llm.engine.runner.fused is not None
    assert 2 * 256 * 128 * 2 >= 1 << 16                  # two experts' gate|up: one group split over the threads
    for n in ((7, 12, 3), (9,)):
        ps = [{"prompt_token_ids": torch.randint(0, 512, (k,), generator=G).tolist()} for k in n]
        one = [o.outputs[0] for o in llm.generate(ps, sp)]
        with kernel_threads(2):
            two = [o.outputs[0] for o in llm.generate(ps, sp)]
        for a, b in zip(one, two):
            assert a.token_ids == b.token_ids
            assert [{t: p.logprob for t, p in d.items()} for d in a.logprobs] == \
                [{t: p.logprob for t, p in d.items()} for d in b.logprobs]


def test_embed_bf16_equals_torch_embedding_and_checks_ids():
    emb = _randn(50, 24).bfloat16()
    ids = torch.tensor([3, 0, 49, 3], dtype=torch.int64)
    assert torch.equal(kernels.embed_bf16(ids, emb), F.embedding(ids, emb).float())
    for bad in ([50], [-1]):
        with pytest.raises(ValueError, match="outside"):
            kernels.embed_bf16(torch.tensor(bad, dtype=torch.int64), emb)
    with pytest.raises(ValueError, match="int64"):
        kernels.embed_bf16(ids.int(), emb)


def test_fused_decode_rope_past_the_tables(monkeypatch):
    """The fused step reads cos/sin rows from RotaryEmbedding's tables by position; past MAX_TABLE it passes
    computed rows instead (and the module path computes them too): the same tokens and logprobs, bit for bit, as
    with the tables, across the switch (MAX_TABLE lowered to 12 so that 20 new tokens cross it)."""
    from mimoflash.model.layers import RotaryEmbedding
    ps = [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=G).tolist()} for n in (6, 9)]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
    m16, _ = _pair(seed=8)
    llm = LLM(m16, max_num_seqs=4, block_size=4)
    assert llm.engine.runner.fused is not None
    tables = [o.outputs[0] for o in llm.generate(ps, sp)]
    monkeypatch.setattr(RotaryEmbedding, "MAX_TABLE", 12)
    computed = [o.outputs[0] for o in llm.generate(ps, sp)]
    _assert_same_greedy(computed, tables, 1e-12)


def test_decode_phase_timers_count_each_phase_and_change_nothing():
    """kernels.decode_phase_timing (benchmarks/profile_decode_step.py): with the timers on, the same tokens and
    logprobs as with them off; every phase a MoE/dense model runs gets time; stopped, they stay put."""
    m16, _ = _pair(seed=5)
    ps = [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=G).tolist()} for n in (7, 12)]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    llm = LLM(m16, max_num_seqs=4, block_size=4)
    assert llm.engine.runner.fused is not None
    off = [o.outputs[0] for o in llm.generate(ps, sp)]
    kernels.decode_phase_timing(True)
    try:
        on = [o.outputs[0] for o in llm.generate(ps, sp)]
    finally:
        times = kernels.decode_phase_timing(False)
    _assert_same_greedy(on, off, 1e-12)
    assert set(times) == set(kernels.DECODE_PHASES)
    kinds = {type(layer.mlp).__name__ for layer in m16.model.layers}
    for phase, t in times.items():
        runs = {"routed experts": "MoE" in kinds, "dense MLP": "MLP" in kinds}.get(phase, True)
        assert (t > 0) == runs, (phase, t, kinds)
    llm.generate(ps, sp)
    assert kernels.decode_phase_timing(False) == times        # stopped: nothing more was added


def test_bf16_kv_cache_fused_and_module_paths_agree():
    """kv_cache_dtype="bfloat16" under fp32 compute: the pools are bf16 (half the bytes), decode steps still take
    the fused kernel path, and it matches the module path (torch stores, kernel or torch reads) and the reference
    attention token for token,
    logprobs within 2e-3. Both round to nearest even when storing, but the two paths' fp32 keys differ in the last
    bits (summation order), and a value on a rounding boundary then lands one bf16 step (2^-8 relative) apart
    (measured: ~5 of 11,520 ring elements; logprob differences 1e-5 to 1.2e-4), so the bound is looser than the fp32
    cache's 1e-5; a misread or misrounded pool would be off by far more."""
    m16, _ = _pair(seed=8)
    g = torch.Generator().manual_seed(11)                 # fixed prompts: the last check has a tolerance
    ps = [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=g).tolist()} for n in (6, 11, 2)]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
    a = LLM(m16, max_num_seqs=4, block_size=4, kv_cache_dtype="bfloat16")
    ref32 = LLM(_pair(seed=8)[0], max_num_seqs=4, block_size=4)
    assert a.engine.layout.dtype == torch.bfloat16 and a.engine.runner.fused is not None
    assert a.engine.layout.bytes_per_sequence(4096) * 2 == ref32.engine.layout.bytes_per_sequence(4096)
    got = [o.outputs[0] for o in a.generate(ps, sp)]
    a.engine.runner.fused = None
    slow = LLM(_pair(seed=8)[0], max_num_seqs=4, block_size=4, kv_cache_dtype="bfloat16", attention_impl="reference")
    for other in (a, slow):                            # the module path, and the per-sequence reference attention
        _assert_same_greedy(got, [o.outputs[0] for o in other.generate(ps, sp)], 2e-3)
    # against the fp32 cache: only the K/V rounding (2^-9 relative) differs, so the chosen tokens' logprobs stay
    # within ~0.1 nats (measured on these prompts: at most 0.018; a misread pool would be off by nats)
    full = [o.outputs[0] for o in ref32.generate(ps, sp)]
    for g, f in zip(got, full):
        n = next((i for i, (x, y) in enumerate(zip(g.token_ids, f.token_ids)) if x != y), len(g.token_ids))
        assert n >= 3                                  # near-ties of this random model may flip later tokens
        for lx, ly in list(zip(g.logprobs, f.logprobs))[:n]:
            t = next(iter(ly))
            assert abs(lx[t].logprob - ly[t].logprob) < 0.1


def test_kv_cache_dtype_is_validated():
    m16, _ = _pair(seed=8)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(m16, kv_cache_dtype="int8")


def test_shipped_model_default_path_matches_fp32_weights():
    """The shipped (bf16) model through the default CPU path (bf16 weights, fused single-sequence decode) and with
    its weights upcast to fp32 (torch matmuls): the same greedy text."""
    from mimoflash.default import default_model
    sp = SamplingParams(temperature=0, max_tokens=24)
    a = LLM(default_model(), progress=False)
    b = LLM(default_model(), weight_dtype="float32", progress=False)
    assert a.weight_dtype == torch.bfloat16 and a.engine.runner.fused is not None
    assert b.weight_dtype == torch.float32
    oa, ob = a.generate("def fibonacci(n):", sp)[0].outputs[0], b.generate("def fibonacci(n):", sp)[0].outputs[0]
    assert oa.token_ids == ob.token_ids and oa.text


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("N,K", [(8200, 520), (300, 256), (37, 2048)])
def test_threaded_gemm_matches_single_thread(M, N, K):
    """GEMMs of >= 2^16 weights are split by rows over the pool's threads (uneven last chunk, 2 and 3 threads): the
    same bits as one thread."""
    w, x = _randn(N, K).bfloat16(), _randn(M, K)
    one = kernels.linear_bf16w(x, w)
    for n in (2, 3):
        with kernel_threads(n):
            torch.testing.assert_close(kernels.linear_bf16w(x, w), one, atol=0, rtol=0)


def test_threaded_attention_and_experts_match_single_thread():
    """Attention runs one pool task per (sequence, kv head), the routed experts one per expert (uneven counts, an
    empty expert): the same bits as one thread."""
    B, nq, h, d, dv, chunk, n = 5, 8, 2, 48, 32, 4, 3
    k_pool, v_pool = _randn(h, 20 * chunk, d), _randn(h, 20 * chunk, dv)
    table = torch.randperm(20, generator=G)[:B * n].view(B, n)
    q, sinks = _randn(B, nq, d), _randn(nq)
    E, F2, D = 6, 2 * 40, 64
    gate_up, down = _randn(E, F2, D).bfloat16(), _randn(E, D, F2 // 2).bfloat16()
    counts = torch.tensor([3, 0, 1, 5, 2, 1])
    x_PD = _randn(int(counts.sum()), D)
    one_a = kernels.attn_decode_paged(q, k_pool, v_pool, table, chunk, n * chunk - 2, None, sinks, 0.1)
    one_e = kernels.experts_bf16(x_PD, counts, gate_up, down)
    for t in (2, 3):
        with kernel_threads(t):
            two_a = kernels.attn_decode_paged(q, k_pool, v_pool, table, chunk, n * chunk - 2, None, sinks, 0.1)
            two_e = kernels.experts_bf16(x_PD, counts, gate_up, down)
        torch.testing.assert_close(two_a, one_a, atol=0, rtol=0)
        torch.testing.assert_close(two_e, one_e, atol=0, rtol=0)


def test_experts_share_one_pass_and_split_over_threads():
    """Rows routed to the same expert go through it together (one product of several rows, its weights read once):
    the same bits as each row through its expert alone, and as the SwiGLU in torch (within fp32 rounding). The
    experts are wide enough (2^16 gate|up weights each) that their products form a group split in row chunks over 2
    and 3 threads: the same bits again."""
    E, D, F_ = 5, 128, 256
    gate_up, down = (_randn(E, 2 * F_, D) * 0.1).bfloat16(), (_randn(E, D, F_) * 0.1).bfloat16()
    counts = torch.tensor([2, 0, 3, 1, 4])
    x_PD = _randn(int(counts.sum()), D)
    shared = kernels.experts_bf16(x_PD, counts, gate_up, down)
    experts = torch.repeat_interleave(torch.arange(E), counts)
    for r, e in enumerate(experts.tolist()):
        alone = kernels.experts_bf16(x_PD[r:r + 1], F.one_hot(torch.tensor(e), E), gate_up, down)
        torch.testing.assert_close(shared[r:r + 1], alone, atol=0, rtol=0)
        h = x_PD[r] @ gate_up[e].float().T
        ref = (F.silu(h[:F_]) * h[F_:]) @ down[e].float().T
        torch.testing.assert_close(shared[r], ref, atol=1e-5, rtol=1e-5)
    for t in (2, 3):
        with kernel_threads(t):
            torch.testing.assert_close(kernels.experts_bf16(x_PD, counts, gate_up, down), shared, atol=0, rtol=0)


def test_pool_workers_join_the_first_job_after_starting():
    """Workers start lazily on the first job after a thread-count change; one that began running only after the job
    was published must still take part (it used to wait for the next job, leaving this one to the caller). Eight
    tasks of 3 ms each: two threads have time to share them however late the worker starts."""
    for _ in range(3):
        kernels.set_num_threads(1)                      # stops the workers; the next job restarts them
        with kernel_threads(2):
            assert kernels.pool_threads_used(8, 3000) == 2
    assert kernels.pool_threads_used(4, 100) == 1      # one thread: the caller alone


def test_pool_concurrent_callers():
    """Two Python threads calling the kernels at once (ctypes releases the GIL): one job holds the pool, the other
    runs on its own thread; every result is still exact."""
    import threading
    w, x = _randn(600, 256).bfloat16(), _randn(5, 256)
    ref = kernels.linear_bf16w(x, w)
    bad = []

    def worker():
        for _ in range(200):
            if not torch.equal(kernels.linear_bf16w(x, w), ref):
                bad.append(1)

    with kernel_threads(2):
        ts = [threading.Thread(target=worker) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
    assert not any(t.is_alive() for t in ts) and not bad


def test_pool_survives_fork():
    """A child forked after the pool started has no worker threads: its first parallel call must start new ones
    (the atfork handler), not wait for the parent's."""
    import multiprocessing as mp
    w, x = _randn(512, 256).bfloat16(), _randn(4, 256)
    with kernel_threads(2):
        ref = kernels.linear_bf16w(x, w)                      # the parent's workers exist now
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_fork_child_gemm, (x, w)).get(timeout=60)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def _fork_child_gemm(x, w):
    kernels.set_num_threads(2)
    return kernels.linear_bf16w(x, w)


@pytest.mark.parametrize("T", [1, 2, 3])
def test_bf16_compute_picked_experts_match_grouped_forward(T):
    """dtype="bfloat16" on CPU: one or two tokens run only their picked experts (`PickedExperts`), more take
    `Experts.forward`; same routing inputs, so the two differ by bf16 rounding only."""
    from mimoflash.model.moe import Experts, MoE
    m = make_model(tiny_config(), seed=9, dtype=torch.bfloat16)
    use_cpu_layout(m, torch.bfloat16)
    ex = next(x for x in m.modules() if isinstance(x, MoE)).experts
    assert isinstance(ex, PickedExperts)
    x = _randn(T, m.config.hidden_size).bfloat16()
    idx = torch.stack([torch.randperm(8, generator=G)[:2] for _ in range(T)])
    w = torch.rand(T, 2, generator=G)
    with torch.no_grad():
        got, ref = ex(x, idx, w).float(), Experts.forward(ex, x, idx, w).float()
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


# ---------------------------------------------------------------------------------------------- the C interface

def _fresh_lib(signatures=None):
    """A second handle on the built library (its own ctypes function objects), declared from `signatures`."""
    import ctypes
    lib = ctypes.CDLL(str(kernels.build()))
    for name, (res, args) in (signatures or kernels._SIGNATURES).items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    return lib


def test_ctypes_side_matches_the_header():
    """Every function of the header's Python section is declared for ctypes exactly as there, and LayerArgs has
    mf_layer's fields in order at the compiler's offsets; the wrappers that declare their own (kernels/fp8.py) too."""
    from mimoflash.kernels import fp8
    assert set(kernels.header_prototypes()) == set(kernels._SIGNATURES)
    assert kernels.header_struct_fields() == [f for f, _ in kernels.LayerArgs._fields_]
    fp8._lib()
    kernels.check_abi()
    kernels.check_abi(_fresh_lib())


def test_a_mismatched_signature_or_struct_is_detected():
    import ctypes
    sigs = dict(kernels._SIGNATURES)
    res, args = sigs["mf_silu_mul"]
    sigs["mf_silu_mul"] = (res, args[:-1] + [ctypes.c_int])                    # long F declared as int
    with pytest.raises(kernels.KernelABIError, match=r"mf_silu_mul: header \(.*c_long\) != ctypes \(.*c_int\)"):
        kernels.check_abi(_fresh_lib(sigs))
    sigs = dict(kernels._SIGNATURES)
    sigs["mf_argmax_rows"] = (ctypes.c_int, sigs["mf_argmax_rows"][1])         # a void function said to return int
    with pytest.raises(kernels.KernelABIError, match="mf_argmax_rows: returns void"):
        kernels.check_abi(_fresh_lib(sigs))
    header = kernels._HEADER.read_text()
    edited = header.replace("void mf_silu_mul(const float *h, long ldh, float *out, long ldo, long M, long F);",
                            "void mf_silu_mul(const float *h, long ldh, float *out, long ldo, long M);")
    assert edited != header
    with pytest.raises(kernels.KernelABIError, match="mf_silu_mul"):
        kernels.check_abi(_fresh_lib(), header=edited)
    with pytest.raises(kernels.KernelABIError, match="mf_layer fields"):            # two fields swapped
        kernels.check_abi(_fresh_lib(), header=header.replace("int kv_bf16;", "int kv_tmp;").replace(
            "int panels;", "int kv_bf16;").replace("int kv_tmp;", "int panels;"))


def test_layer_args_offsets_are_checked_against_the_compiler(monkeypatch):
    """LayerArgs with a field retyped (float -> double: the later offsets move) fails the check, by the offsets that
    mf_layer_abi reports, although the names still match."""
    import ctypes
    fields = [(n, ctypes.c_double if n == "eps_in" else t) for n, t in kernels.LayerArgs._fields_]
    monkeypatch.setattr(kernels, "LayerArgs", type("LayerArgs", (ctypes.Structure,), {"_fields_": fields}))
    with pytest.raises(kernels.KernelABIError, match="offsets"):
        kernels.check_abi(_fresh_lib())


def test_a_mismatch_fails_loading_loudly():
    """Loading with a wrong declaration raises (every time), instead of kernels quietly being unavailable."""
    code = ("import ctypes, pytest; from mimoflash import kernels; "
            "kernels._SIGNATURES['mf_rms_norm'] = (None, [ctypes.c_void_p] * 8); "
            "[pytest.raises(kernels.KernelABIError, kernels.available) for _ in range(2)]; print('raised')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0 and "raised" in r.stdout, r.stderr


def test_a_definition_that_disagrees_with_the_header_does_not_compile(monkeypatch, tmp_path):
    """Every .c file includes the header, so a prototype there that differs from the definition is a compile error
    (checked with -fsyntax-only on a copy whose header declares mf_silu_mul's F as int)."""
    import shutil
    for p in kernels._SOURCES + [kernels._HEADER]:
        shutil.copy(p, tmp_path / p.name)
    h = tmp_path / kernels._HEADER.name
    h.write_text(h.read_text().replace("long ldo, long M, long F);", "long ldo, long M, int F);"))
    monkeypatch.setattr(kernels, "_SOURCES", [tmp_path / p.name for p in kernels._SOURCES])
    monkeypatch.setattr(kernels, "_HEADER", h)
    monkeypatch.setattr(kernels, "_FLAGS", kernels._FLAGS + ["-fsyntax-only"])
    monkeypatch.setenv("MIMOFLASH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="conflicting types for .mf_silu_mul"):
        kernels.build(force=True)


def test_c_files_declare_nothing_the_header_declares():
    """The interface is declared once: no .c file repeats a prototype of an mf_ function or the mf_layer struct (a
    local copy would be checked by nobody once the header changes)."""
    import re
    for src in kernels._SOURCES:
        text = re.sub(r"/\*.*?\*/", "", src.read_text(), flags=re.S)
        assert '#include "mimoflash_kernels.h"' in text, src.name
        protos = re.findall(r"^(?!static|typedef)[A-Za-z_][\w \t\*]*\b(mf_\w+)\s*\([^;{]*\)\s*;", text, re.M)
        assert not protos, f"{src.name} declares {protos}: put them in mimoflash_kernels.h"
        assert "} mf_layer;" not in text, src.name
