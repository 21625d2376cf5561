"""The panel layout (kernels/panels.c, engine/cpu_layout.Panels): packing, the product against F.linear on the
unpacked weight, batch and thread invariance, the copy following its weight, and the engine with and without it."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from mimoflash import kernels
from mimoflash.engine.cpu_layout import use_cpu_layout
from mimoflash.engine.llm import LLM
from mimoflash.engine.sampling import SamplingParams

from tests.conftest import kernel_threads, make_model, run_portable, tiny_config

if not kernels.available():          # a failed build is an error here, not a reason to skip
    kernels.build(force=True)

G = torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(*shape, generator=G)


@pytest.mark.parametrize("N,K", [(1, 1), (5, 33), (16, 8), (37, 100), (64, 24), (1408, 64)])
def test_pack_unpack_round_trip_and_layout(N, K):
    w = _randn(N, K).bfloat16()
    wp = kernels.pack_panels(w)
    assert wp.shape == (-(-N // 16), K, 16) and wp.dtype == torch.bfloat16
    assert torch.equal(kernels.unpack_panels(wp, N), w)
    # the documented layout: in k-row k of panel p, element 2j holds row 16p + j, element 2j + 1 row 16p + j + 8
    p, k, j = (N - 1) // 16, K - 1, ((N - 1) % 16) % 8
    hi = ((N - 1) % 16) // 8
    assert wp[p, k, 2 * j + hi] == w[N - 1, k]
    if N % 16:
        assert wp.view(-1, K, 8, 2).permute(0, 3, 2, 1).reshape(-1, K)[N:].eq(0).all()     # zero padding rows


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 17, 40])
@pytest.mark.parametrize("N,K", [(1, 1), (3, 7), (16, 8), (37, 100), (64, 24), (100, 513)])
def test_linear_panels_matches_upcast_matmul(M, N, K):
    w = _randn(N, K).bfloat16()
    wp = kernels.pack_panels(w)
    x = _randn(M, 2 * K)[:, ::2]                                   # strided rows: the wrapper copies them
    got = kernels.linear_panels(x, wp, N)
    ref = F.linear(x.double(), w.double()).float()
    torch.testing.assert_close(got, ref, atol=1e-5 * K ** 0.5, rtol=1e-5)
    assert kernels.linear_panels(_randn(2, 3, K), wp, N).shape == (2, 3, N)


@pytest.mark.parametrize("N,K", [(37, 100), (1408, 64), (200, 480)])
def test_linear_panels_row_does_not_depend_on_its_batch(N, K):
    """Every row sums k in order in one chain whatever the block it lands in (one-row groups of 4 panels, two-row
    groups, blocks of up to 6 rows, the padded last panel): a request's logits do not depend on what else is in the
    batch, bit for bit."""
    w = _randn(N, K).bfloat16()
    wp = kernels.pack_panels(w)
    x = _randn(17, K)
    full = kernels.linear_panels(x, wp, N)
    for M in (1, 2, 3, 5, 8):
        torch.testing.assert_close(kernels.linear_panels(x[:M], wp, N), full[:M], atol=0, rtol=0)


@pytest.mark.parametrize("M", [1, 2, 16])
@pytest.mark.parametrize("N,K", [(8200, 520), (300, 256), (37, 2048)])
def test_threaded_panels_match_single_thread(M, N, K):
    """Products of >= 2^16 weights are split into ~4 tasks per thread (uneven last task): the same bits as one
    thread at 2 and 3 threads."""
    w, x = _randn(N, K).bfloat16(), _randn(M, K)
    wp = kernels.pack_panels(w)
    one = kernels.linear_panels(x, wp, N)
    for n in (2, 3):
        with kernel_threads(n):
            torch.testing.assert_close(kernels.linear_panels(x, wp, N), one, atol=0, rtol=0)


def test_panels_reject_bad_input():
    wp = kernels.pack_panels(_randn(20, 8).bfloat16())
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.pack_panels(_randn(4, 8))
    with pytest.raises(ValueError, match="panels"):
        kernels.linear_panels(_randn(1, 8), wp, 33)                 # more rows than the panels hold
    with pytest.raises(ValueError, match="panels"):
        kernels.linear_panels(_randn(1, 8), wp, 16)                 # a whole panel would be unused: not this weight
    with pytest.raises(ValueError, match="panels"):
        kernels.linear_panels(_randn(1, 9), wp, 20)
    with pytest.raises(ValueError, match="float32"):
        kernels.linear_panels(_randn(1, 8).double(), wp, 20)


def test_portable_panels_agree_too():
    """The panel tests with the AVX2 paths off (MIMOFLASH_KERNELS_PORTABLE=1): what a non-AVX2 machine runs."""
    run_portable(__file__, "matches_upcast or does_not_depend")


def _bf16_model(seed=4):
    return make_model(tiny_config(), seed=seed, dtype=torch.bfloat16)


def test_layout_packs_dense_linears_not_experts_and_keeps_state_dict():
    m = _bf16_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    use_cpu_layout(m, torch.float32)
    assert m.lm_head._panels.get() is not None
    for layer in m.model.layers:
        attn = layer.self_attn
        assert attn._qkv_panels.get() is not None and attn.o_proj._panels.get() is not None
        assert attn.q_proj._panels is None                           # fused: q|k|v packed once, together
    after = m.state_dict()
    assert after.keys() == before.keys()                             # the panels are not parameters or buffers
    for k, v in before.items():
        assert torch.equal(after[k].to(v.dtype), v), k


def test_panels_follow_their_weight():
    """The copy is repacked when the weight changes in place (no_grad) or is replaced (`.data =`)."""
    m = _bf16_model()
    use_cpu_layout(m, torch.float32)
    lin, x = m.lm_head, _randn(3, m.config.hidden_size)

    def ref():
        return F.linear(x.double(), lin.weight.double()).float()
    torch.testing.assert_close(lin(x), ref(), atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(-2)
    torch.testing.assert_close(lin(x), ref(), atol=1e-4, rtol=1e-5)
    lin.weight.data = _randn(*lin.weight.shape).bfloat16()
    torch.testing.assert_close(lin(x), ref(), atol=1e-4, rtol=1e-5)
    lin.weight.data = _randn(7, lin.weight.shape[1]).bfloat16()     # another shape: the row-major path
    torch.testing.assert_close(lin(x), ref(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("lengths", [[6], [6, 11, 2, 9]])
def test_engine_with_and_without_panels(lengths):
    """LLM(weight_panels=True) (the default: fused decode steps and prefill products on panels) vs False (the
    row-major kernel): the same greedy tokens, logprobs within 1e-5 (the two sum in different orders)."""
    ps = [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=G).tolist()} for n in lengths]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    on = LLM(_bf16_model(), max_num_seqs=4, block_size=4)
    off = LLM(_bf16_model(), max_num_seqs=4, block_size=4, weight_panels=False)
    assert on.engine.runner.fused is not None and off.engine.runner.fused is not None
    assert all(a.panels == 1 for a, _, _ in on.engine.runner.fused.layers)
    assert all(a.panels == 0 for a, _, _ in off.engine.runner.fused.layers)
    assert off.model.lm_head._panels is None
    got, ref = on.generate(ps, sp), off.generate(ps, sp)
    for g, r in zip(got, ref):
        g, r = g.outputs[0], r.outputs[0]
        assert g.token_ids == r.token_ids
        for lx, ly in zip(g.logprobs, r.logprobs):
            t = next(iter(ly))
            assert abs(lx[t].logprob - ly[t].logprob) < 1e-5


def test_fused_decode_repacks_a_weight_edited_in_place():
    """A decode step after an in-place edit of a dense weight reads the edited values (the panels are repacked into
    the buffers the layer arguments point at): same tokens as a fresh engine on the edited model. One-token prompts,
    so that every step of the layers takes the fused path (a prefill through the modules would repack first)."""
    ps = [{"prompt_token_ids": [t]} for t in torch.randint(0, 512, (3,), generator=G).tolist()]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = LLM(_bf16_model(), max_num_seqs=4, block_size=4)
    a.generate(ps, sp)
    with torch.no_grad():
        for layer in a.model.model.layers:
            layer.self_attn.o_proj.weight.mul_(-1)
    b_model = _bf16_model()
    with torch.no_grad():
        for layer in b_model.model.layers:
            layer.self_attn.o_proj.weight.mul_(-1)
    b = LLM(b_model, max_num_seqs=4, block_size=4)
    assert [o.outputs[0].token_ids for o in a.generate(ps, sp)] == [o.outputs[0].token_ids for o in b.generate(ps, sp)]


def test_cli_no_weight_panels_reaches_the_engine(tmp_path, monkeypatch, capsys):
    """`mimoflash generate --no-weight-panels` on a bf16 checkpoint builds the engine without panels; the default
    builds it with them; both print the same greedy tokens."""
    import json
    from mimoflash.checkpoint.saver import save_model
    from mimoflash.engine import cli, llm as llm_module
    ckpt = save_model(_bf16_model(), tmp_path / "ckpt", dtype=torch.bfloat16)
    built = []

    def spy(*args, **kwargs):
        llm = LLM(*args, **kwargs)
        built.append(llm)
        return llm
    monkeypatch.setattr(llm_module, "LLM", spy)                    # cli imports it from there when it runs
    outs = []
    for extra in ([], ["--no-weight-panels"]):
        assert cli.generate_main(["--model", str(ckpt), "--token-ids", "1,2,3", "--max-tokens", "6", "--json",
                                  "--temperature", "0", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outputs"][0]["token_ids"])
    assert built[0].model.lm_head._panels is not None and built[1].model.lm_head._panels is None
    assert outs[0] == outs[1] and len(outs[0]) == 6


def test_transformed_model_pickles():
    """The panels hold no closures: a model after the CPU layout still goes through torch.save / load, and the
    loaded copy computes the same logits."""
    import io
    m = _bf16_model()
    use_cpu_layout(m, torch.float32)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    x = _randn(2, m.config.hidden_size)
    torch.testing.assert_close(m2.lm_head(x), m.lm_head(x), atol=0, rtol=0)
