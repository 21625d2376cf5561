"""Attention and MoE: every fast path against its slow reference, and the sliding-window off-by-one probe."""

import pytest
import torch

from mimoflash.model.attention import Attention, attend_reference, attend_sdpa
from mimoflash.model.moe import MoE
from tests.conftest import make_model, tiny_config


@pytest.mark.parametrize("window, sinks", [(None, False), (5, True), (3, False), (None, True)])
def test_sdpa_matches_reference_with_cache_like_positions(window, sinks):
    g = torch.Generator().manual_seed(0)
    B, Tq, Tk, nq, nkv, d, dv = 2, 3, 11, 4, 2, 48, 32
    q = torch.randn(B, Tq, nq, d, generator=g)
    k = torch.randn(B, Tk, nkv, d, generator=g)
    v = torch.randn(B, Tk, nkv, dv, generator=g)
    # ring-buffer-like key order with two empty slots (-1) and queries at the end of each sequence
    k_pos = torch.tensor([[8, 9, 10, 0, 1, 2, 3, 4, 5, 6, 7], [3, 4, 5, 6, -1, -1, 0, 1, 2, 7, 8]])
    q_pos = torch.tensor([[8, 9, 10], [6, 7, 8]])
    s = torch.randn(nq, generator=g) if sinks else None
    ref = attend_reference(q, k, v, q_pos, k_pos, window, s, d ** -0.5)
    fast = attend_sdpa(q, k, v, q_pos, k_pos, window, s, d ** -0.5)
    assert ref.shape == (B, Tq, nq, dv)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_sinks_make_rows_sum_below_one():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 8, generator=g).expand(1, 1, 2, 8)   # both heads score alike: only the sinks differ
    k = torch.randn(1, 4, 1, 8, generator=g)
    v = torch.ones(1, 4, 1, 8)                      # output = sum of probabilities
    pos = torch.arange(4)[None]
    o = attend_reference(q, k, v, pos[:, -1:], pos, None, torch.tensor([0.0, 3.0]), 1.0)
    total = o[0, 0, :, 0]
    assert (total < 1).all() and total[1] < total[0]     # larger sink logit -> more mass to the sink


@pytest.mark.parametrize("convention, W", [("previous", 4), ("total", 4), ("previous", 7)])
def test_window_probe_one_key_beyond(convention, W):
    """Perturb x at exactly the first position outside the window: the last query's output must not move; perturb
    the oldest position inside: it must move. 'previous' sees W previous keys + itself, 'total' W keys in all."""
    cfg = tiny_config(sliding_window_size=W, sliding_window_convention=convention)
    torch.manual_seed(0)
    attn = Attention(cfg, layer_idx=1, sliding=True)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    T = 3 * W
    i = T - 1
    keys = W + 1 if convention == "previous" else W
    assert attn.window_keys == keys
    x = torch.randn(1, T, cfg.hidden_size)
    pos = torch.arange(T)[None]
    from mimoflash.model.layers import RotaryEmbedding
    rope = RotaryEmbedding(cfg.rotary_dim(True), cfg.swa_rope_theta)(pos, x.dtype)

    def out_at_i(xx):
        with torch.no_grad():
            return attn(xx, pos, rope)[0, i]

    base = out_at_i(x)
    outside, inside = i - keys, i - keys + 1
    for impl in ("sdpa", "reference"):
        attn.impl = impl
        x_out = x.clone(); x_out[0, outside] += 5.0
        x_in = x.clone(); x_in[0, inside] += 5.0
        assert torch.allclose(out_at_i(x_out), base, rtol=1e-5, atol=1e-4), f"{impl}: key {outside} must be outside the window"
        assert (out_at_i(x_in) - base).abs().max() > 1e-2, f"{impl}: key {inside} must be inside"


def test_model_sdpa_equals_reference_attention():
    model = make_model(tiny_config())
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = model(ids)
        model.set_attention_impl("reference")
        ref = model(ids)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grouped_mm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_dispatch_matches_dense_reference(grouped_mm, dtype):
    cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1)
    model = make_model(cfg, dtype=dtype)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    moe.experts.use_grouped_mm = grouped_mm
    x = torch.randn(3, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        fast, ref = moe(x), moe.forward_dense_reference(x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast.float(), ref.float(), atol=tol, rtol=tol)


def test_router_bias_selects_but_does_not_weight():
    cfg = tiny_config(n_routed_experts=4, num_experts_per_tok=1, norm_topk_prob=False)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.zero_()                        # all scores sigmoid(0) = 0.5
        moe.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    idx, w, _ = moe.gate(torch.randn(5, cfg.hidden_size))
    assert (idx == 2).all() and torch.allclose(w, torch.full_like(w, 0.5))


def test_fused_qkv_path_matches_three_projections():
    """`FastAttention` (swapped in by the engine's CPU layout): one q|k|v matmul and one RoPE call for q|k, same math
    as the three projections; a cast that breaks the aliasing falls back to them."""
    from mimoflash.engine.cpu_layout import FastAttention, use_cpu_layout
    m = make_model(tiny_config(), seed=4)
    ref = make_model(tiny_config(), seed=4)
    ids = torch.randint(0, m.config.vocab_size, (2, 13))
    use_cpu_layout(m)
    attn = [x for x in m.modules() if isinstance(x, Attention)]
    assert attn and all(isinstance(a, FastAttention) for a in attn)
    assert all(a.fused_qkv() is None for a in attn)                    # grad mode: the parameters' own path
    with torch.no_grad():
        assert all(a.fused_qkv() is not None for a in attn)
        torch.testing.assert_close(m(ids), ref(ids), atol=1e-5, rtol=1e-4)
        m.double()
        assert all(a.fused_qkv() is None for a in attn)
        torch.testing.assert_close(m(ids).float(), ref(ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_fast_path_bit_identical_to_reference(dtype):
    from mimoflash.model.layers import RMSNorm
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    norm.to(dtype)
    for shape in [(1, 1, 96), (3, 7, 96), (5, 96)]:
        x = (torch.randn(shape, generator=g) * 30).to(dtype)
        assert torch.equal(norm(x), norm.forward_reference(x))


def test_rope_table_lookup_equals_direct_angles():
    """RotaryEmbedding looks cos/sin up in a table grown on demand (a batched decode step no longer computes them):
    bit-identical to the direct computation for positions inside the first table, after it grows, for (B, T)
    and expanded position tensors and a bf16 output; past MAX_TABLE and for negative positions it computes."""
    from mimoflash.model.layers import RotaryEmbedding
    rope = RotaryEmbedding(64, 10000.0)
    g = torch.Generator().manual_seed(3)
    cases = [torch.randint(0, 200, (1, 16), generator=g),                  # first table (256)
             torch.randint(0, 40000, (3, 40), generator=g),                # grows to 2^16
             torch.arange(9).expand(2, 9),                                 # an expanded view (the model's default)
             torch.tensor([[0, RotaryEmbedding.MAX_TABLE + 5]]),           # direct: too far for a table
             torch.tensor([[-3, 4]])]                                      # direct
    for pos in cases:
        for dtype in (torch.float32, torch.bfloat16):
            got, want = rope(pos, dtype), rope.reference(pos, dtype)
            assert got[0].shape == (*pos.shape, 64) and got[0].dtype == dtype
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (pos, dtype)
    assert rope._table[0].shape == (1 << 16, 64)
    assert rope.tables(RotaryEmbedding.MAX_TABLE) is None and rope.tables(5)[0].shape == (1 << 16, 64)
    rope.to(torch.bfloat16)                               # inv_freq cast: the tables follow it
    pos = torch.arange(300)[None]
    assert torch.equal(rope(pos, torch.float32)[0], rope.reference(pos, torch.float32)[0])
