"""kernels/prefill.c through kernels/prefill.py: the routed experts and the sink attention of long prefill slices
against their torch references (AVX-512 where the machine has it; the portable loops in a subprocess with
MIMOFLASH_PREFILL_PORTABLE=1), and an engine prefill with the kernels against one without."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mimoflash import kernels
from mimoflash.kernels import prefill as PK
from mimoflash.model.attention import attend_reference

if not kernels.available():          # a failed build is an error here, not a reason to skip
    kernels.build(force=True)

REPO = Path(__file__).resolve().parents[1]


def _experts_reference(x, idx, w, gu, dn):
    """Token by token, expert by expert, on the fp32 upcast weights."""
    Fd = dn.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            h = x[t] @ gu[e].float().T
            out[t] += w[t, k] * ((F.silu(h[:Fd]) * h[Fd:]) @ dn[e].float().T)
    return out


def _experts_case(T, E=6, K=2, D=40, Fd=28, seed=0, skewed=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    gu = (torch.randn(E, 2 * Fd, D, generator=g) * 0.2).bfloat16()
    dn = (torch.randn(E, D, Fd, generator=g) * 0.2).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if skewed:                        # expert 0 on every token (several tasks), the last expert on none
        idx[:, 0] = 0
        idx[:, 1] = torch.randint(1, E - 1, (T,), generator=g)
    return x, idx, torch.rand(T, K, generator=g), gu, dn


@pytest.mark.parametrize("T,skewed", [(1, False), (7, False), (64, False), (150, True)])
def test_experts_match_the_reference(T, skewed):
    """Sizes that are not multiples of the 6 x 32 tile (D 40, F 28), an expert with more than one task's 64 tokens
    and an expert with none."""
    x, idx, w, gu, dn = _experts_case(T, skewed=skewed)
    torch.testing.assert_close(PK.experts(x, idx, w, gu, dn), _experts_reference(x, idx, w, gu, dn),
                               atol=2e-5, rtol=1e-5)


def test_a_tokens_experts_do_not_depend_on_its_batch():
    """Each output sums k in order in one chain: a token alone gives bit for bit what it gives among 150."""
    x, idx, w, gu, dn = _experts_case(150, skewed=True)
    full = PK.experts(x, idx, w, gu, dn)
    for t in (0, 77, 149):
        assert torch.equal(PK.experts(x[t:t + 1], idx[t:t + 1], w[t:t + 1], gu, dn)[0], full[t])


def test_experts_reject_bad_input():
    x, idx, w, gu, dn = _experts_case(4)
    with pytest.raises(ValueError, match="expert ids"):
        PK.experts(x, idx + 10, w, gu, dn)
    with pytest.raises(ValueError, match="shapes"):
        PK.experts(x, idx, w, gu.float(), dn)
    with pytest.raises(ValueError, match="shapes"):
        PK.experts(x[:, :-1], idx, w, gu, dn)


@pytest.mark.parametrize("M,K,N", [(33, 40, 50), (100, 24, 16), (512, 64, 200)])
def test_panels_split_by_rows_give_the_panel_kernels_values(M, K, N):
    """kernels.prefill.panels splits linear_panels' product by rows and panels: bit for bit its values."""
    g = torch.Generator().manual_seed(M)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).bfloat16()
    wp = kernels.pack_panels(w)
    assert torch.equal(PK.panels(x, wp, N), kernels.linear_panels(x, wp, N))
    torch.testing.assert_close(PK.panels(x, wp, N), x @ w.float().T, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="panels"):
        PK.panels(x, wp, N + 16)


def _attention_case(nq, h, window, sinks, seed=0):
    """Two sequences with cached keys (one with empty slots and a masked older key, as a ring's stale slot has),
    new rows as strided views of one fused product, as the engine hands them over."""
    g = torch.Generator().manual_seed(seed)
    d, dv, S, P = 24, 16, 40, 12
    lens, starts = [37, 70], [10, 0]
    N = sum(lens)
    qkv = torch.randn(N, nq * d + h * d + h * dv + 3, generator=g)
    q = qkv[:, :nq * d].view(N, nq, d)
    k = qkv[:, nq * d:(nq + h) * d].view(N, h, d)
    v = qkv[:, (nq + h) * d:(nq + h) * d + h * dv].view(N, h, dv)
    pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
    seq_lo = torch.tensor([0, lens[0], N])
    read = torch.randperm(S, generator=g)[:2 * P].view(2, P)
    past = torch.full((2, P), -1)
    past[0, :10] = torch.randperm(10, generator=g)
    past[0, 3] = -1                                                   # a stale slot
    args = (q, k, v, pos, seq_lo, torch.randn(h, S, d, generator=g), torch.randn(h, S, dv, generator=g), read, past,
            window, torch.randn(nq, generator=g) if sinks else None, d ** -0.5)
    return args, lens


def _attention_reference(q, k, v, pos, seq_lo, k_pool, v_pool, read, past, window, sinks, scale):
    out = []
    for b in range(len(seq_lo) - 1):
        lo, hi = int(seq_lo[b]), int(seq_lo[b + 1])
        keep = past[b] >= 0
        kk = torch.cat([k_pool[:, read[b][keep]].transpose(0, 1), k[lo:hi]])[None]
        vv = torch.cat([v_pool[:, read[b][keep]].transpose(0, 1), v[lo:hi]])[None]
        kpos = torch.cat([past[b][keep], pos[lo:hi]])[None]
        out.append(attend_reference(q[None, lo:hi], kk, vv, pos[None, lo:hi], kpos, window, sinks, scale)[0])
    return torch.cat(out)


@pytest.mark.parametrize("nq,h", [(4, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("sinks", [False, True])
def test_attention_matches_the_reference(nq, h, window, sinks):
    args, _ = _attention_case(nq, h, window, sinks)
    torch.testing.assert_close(PK.attention(*args), _attention_reference(*args), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 9])
def test_attention_reads_a_bf16_cache_exactly(window):
    """A bf16 cache (kv_cache_dtype="bfloat16") is read as its exact fp32 values."""
    args, _ = _attention_case(4, 2, window, True, seed=1)
    kp, vp = args[5].bfloat16(), args[6].bfloat16()
    ref_args = args[:5] + (kp.float(), vp.float()) + args[7:]
    torch.testing.assert_close(PK.attention(*args[:5], kp, vp, *args[7:]), _attention_reference(*ref_args),
                               atol=2e-6, rtol=1e-5)


def test_attention_rejects_bad_input():
    args, _ = _attention_case(4, 2, None, True)
    with pytest.raises(ValueError, match="shapes"):
        PK.attention(*args[:5], args[5].bfloat16(), *args[6:])         # k and v caches of different dtypes
    with pytest.raises(ValueError, match="rows"):
        PK.attention(args[0].transpose(1, 2), *args[1:])                 # heads not contiguous
    with pytest.raises(ValueError, match="ranges"):
        PK.attention(*args[:4], torch.tensor([0, 90, 80]), *args[5:])


def test_the_portable_loops_pass_the_same_tests():
    """Machines without AVX-512 run the portable C (the engine then keeps torch's path, but the kernels stay
    correct): this file's kernel tests again with MIMOFLASH_PREFILL_PORTABLE=1, which also turns `fast()` off."""
    env = dict(os.environ, MIMOFLASH_PREFILL_PORTABLE="1", OMP_WAIT_POLICY="PASSIVE")
    code = ("import sys, pytest; from mimoflash.kernels import prefill as PK; assert not PK.fast(); "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', __import__('sys').argv[1], '-k', "
            "'match_the_reference or do_not_depend or bf16_cache']))")
    r = subprocess.run([sys.executable, "-c", code, __file__], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


@pytest.mark.skipif(not PK.fast(), reason="the engine uses the prefill kernels only on AVX-512F machines")
def test_engine_prefill_with_the_kernels_matches_torchs_path(monkeypatch):
    """The shipped model's 300-token prompt through the engine (bf16 weights, both kernels in every layer): the
    prompt's logits within 1e-4 of the torch path's (MKL experts, SDPA) and the same greedy continuation."""
    from mimoflash import LLM, SamplingParams, default_model
    llm = LLM(str(default_model()), skip_tokenizer_init=True, max_model_len=400, max_num_batched_tokens=512,
              progress=False)
    prompt = torch.randint(3, llm.model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(PK, "fast", lambda on=on: on)
        out = llm.generate([{"prompt_token_ids": prompt.tolist()}], sp)[0].outputs[0]
        runs[on] = out
    assert runs[True].token_ids == runs[False].token_ids
    for a, b in zip(runs[True].logprobs, runs[False].logprobs):
        assert a.keys() == b.keys()
        for tok in a:
            assert abs(a[tok].logprob - b[tok].logprob) < 1e-4
