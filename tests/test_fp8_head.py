"""The opt-in block-FP8 LM head (`LLM(..., lm_head_fp8=True)`, engine/fp8_layout.py `quantize_lm_head`): the head's
weight quantised at load to E4M3 with 128 x 128 tile scales and run as an FP8Linear. Its logits must be those of the
dequantised weight; the C multi-step loop (kernels/steps.c) must run it with the tokens and log-probabilities of one
step per call (the Python fused step: model.logits -> the FP8Linear), on bf16 and on FP8 checkpoints; it is off by
default; bad combinations are refused with a clear error, from the API and the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimoflash import kernels
from mimoflash.checkpoint.fp8 import FP8_DTYPE, dequantize_fp8_block, quantize_fp8_block
from mimoflash.engine import fp8_layout
from mimoflash.engine.fp8_layout import FP8Linear, quantize_lm_head
from mimoflash.engine.llm import LLM
from mimoflash.engine.sampling import SamplingParams
from tests.conftest import make_model, tiny_config

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the FP8 head runs through the CPU kernels")


@pytest.fixture(scope="module")
def bf16_model():
    return make_model(tiny_config(), seed=11, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """A block-FP8 checkpoint (projections kept FP8, lm_head bf16 as the release stores it); window 4."""
    from mimoflash.checkpoint.saver import save_model
    return save_model(make_model(tiny_config(hidden_size=256, moe_intermediate_size=128), seed=3),
                      tmp_path_factory.mktemp("fp8head") / "ckpt", fp8=True, fp8_block_size=(16, 128))


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=g).tolist()} for n in lengths]


def outputs(outs):
    return [[(c.token_ids, c.finish_reason, c.logprobs) for c in o.outputs] for o in outs]


def make_llm(source, steps, **kw):
    kw = {"progress": False} | kw if not isinstance(source, nn.Module) else kw
    return LLM(source, num_scheduler_steps=steps, block_size=4, max_num_seqs=4, lm_head_fp8=True, **kw)


# ---------------------------------------------------------------------------------------------- the module

def test_head_logits_equal_the_dequantized_weight(bf16_model):
    """The swapped-in head holds exactly quantize_fp8_block(bf16 head) and its logits equal F.linear on the fp32
    dequantisation up to fp32 rounding; the caller's model keeps its bf16 head."""
    llm = LLM(bf16_model, lm_head_fp8=True)
    head = llm.model.lm_head
    assert type(head) is FP8Linear and head.weight.dtype == FP8_DTYPE and head.block == (128, 128)
    assert type(bf16_model.lm_head) is nn.Linear and bf16_model.lm_head.weight.dtype == torch.bfloat16
    q, s = quantize_fp8_block(bf16_model.lm_head.weight.detach(), (128, 128))
    assert torch.equal(head.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(head.weight_scale_inv, s)
    x = torch.randn(5, head.in_features, generator=torch.Generator().manual_seed(0))
    want = F.linear(x, dequantize_fp8_block(head.weight, head.weight_scale_inv, head.block, torch.float32))
    torch.testing.assert_close(head(x), want, rtol=1e-5, atol=1e-5)
    bf16 = F.linear(x, bf16_model.lm_head.weight.float())
    assert not torch.allclose(head(x), bf16, rtol=1e-5, atol=1e-5)        # the quantisation is really there


def test_quantized_in_chunks_equals_whole(monkeypatch):
    """Row chunks of whole tiles (a small `_QUANT_ROWS`) give the whole-weight quantisation bit for bit, ragged
    tiles included (300 x 200 in 128 x 128 tiles); an untied copy of a tied head; a head with bias refused."""
    g = torch.Generator().manual_seed(1)
    m = nn.Module()
    m.lm_head = nn.Linear(200, 300, bias=False)
    m.lm_head.weight.data = torch.randn(300, 200, generator=g).bfloat16()
    monkeypatch.setattr(fp8_layout, "_QUANT_ROWS", 128)
    w = m.lm_head.weight.detach().clone()
    got = quantize_lm_head(m)
    q, s = quantize_fp8_block(w, (128, 128))
    assert m.lm_head is got and got.weight_scale_inv.shape == (3, 2)
    assert torch.equal(got.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(got.weight_scale_inv, s)
    tied = make_model(tiny_config(tie_word_embeddings=True), seed=2, dtype=torch.bfloat16)
    emb = tied.model.embed_tokens.weight.detach().clone()
    quantize_lm_head(tied)
    assert torch.equal(tied.model.embed_tokens.weight, emb)            # the embedding keeps its bf16 weight
    m.lm_head = nn.Linear(200, 300, bias=True)
    with pytest.raises(ValueError, match="without bias"):
        quantize_lm_head(m)


def test_off_by_default(bf16_model, fp8_ckpt):
    from mimoflash.engine.cpu_layout import Bf16Linear
    assert type(LLM(bf16_model).model.lm_head) is Bf16Linear
    llm = LLM(fp8_ckpt, progress=False)
    assert type(llm.model.lm_head) is Bf16Linear and llm.model.lm_head.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- the C loop

def spy_decode_steps(monkeypatch):
    """Record each kernels.decode_steps call as (steps run, whole run (no logits buffer), FP8 head layout)."""
    calls = []
    real = kernels.decode_steps

    def spy(n, *args, logits=None, **kw):
        done = real(n, *args, logits=logits, **kw)
        calls.append((done, logits is None, isinstance(args[8], tuple)))
        return done

    monkeypatch.setattr(kernels, "decode_steps", spy)
    return calls


@pytest.mark.parametrize("source", ["bf16", "fp8"])
@pytest.mark.parametrize("lengths", [[5], [3, 17, 9]])
def test_c_loop_same_tokens_as_one_step(bf16_model, fp8_ckpt, source, lengths, monkeypatch):
    """Greedy runs of 8 steps in one kernels.decode_steps call with the FP8 head, and sampled rows with logprobs
    (one call a step, the C loop's logits sampled): the tokens and log-probabilities of one step per call, whose
    steps run the Python fused step and the FP8Linear; batch 1 and a mixed batch, 30 tokens (rings of 4 wrap)."""
    model = bf16_model if source == "bf16" else fp8_ckpt
    calls = spy_decode_steps(monkeypatch)
    ps = prompts(lengths, seed=6)
    greedy = [SamplingParams(temperature=0, max_tokens=m) for m in (30, 7, 23)[:len(ps)]]
    sampled = [SamplingParams(temperature=0.8, seed=5 + i, max_tokens=12, logprobs=2) for i in range(len(ps))]
    got = {}
    for n in (1, 8):
        llm = make_llm(model, n)
        assert type(llm.model.lm_head) is FP8Linear and llm.engine.runner.fused is not None
        got[n] = [outputs(llm.generate(ps, sp, use_tqdm=False)) for sp in (greedy, sampled)]
        if n == 1:
            assert not calls                                # the reference: no C loop
    assert got[8] == got[1]
    runs = [done for done, whole, fp8 in calls if whole]
    assert runs and max(runs) == 8 and all(fp8 for _, _, fp8 in calls)
    assert {done for done, whole, _ in calls if not whole} == {1}


def test_c_loop_really_reads_the_fp8_head(bf16_model, monkeypatch):
    """The C loop's head is the FP8 bytes it is given: zeroing every scale but the one covering token t's row makes
    the loop pick a token of that row block (all other logits 0), which the bf16 head would not."""
    llm = make_llm(bf16_model, 8)
    head = llm.model.lm_head
    calls = spy_decode_steps(monkeypatch)
    ps = prompts([5], seed=2)
    sp = SamplingParams(temperature=0, max_tokens=12)
    before = llm.generate(ps, sp, use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        keep = head.weight_scale_inv[3].clone()
        head.weight_scale_inv.zero_()
        head.weight_scale_inv[3] = keep * 1000                     # rows 384..511 only, scaled far up
    after = llm.generate(ps, sp, use_tqdm=False)[0].outputs[0].token_ids
    assert calls and any(whole and fp8 for _, whole, fp8 in calls)
    assert all(384 <= t < 512 for t in after[1:]) and after != before


def test_mtp_with_the_fp8_head_same_greedy_tokens(bf16_model):
    """MTP drafting with the FP8 head (the draft head is the same module): greedy output equals plain decoding's."""
    ps = prompts([4, 11], seed=9)
    sp = SamplingParams(temperature=0, max_tokens=20)
    plain = outputs(make_llm(bf16_model, 1).generate(ps, sp, use_tqdm=False))
    spec = make_llm(bf16_model, 8, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    assert outputs(spec.generate(ps, sp, use_tqdm=False)) == plain


# ---------------------------------------------------------------------------------------------- errors and the CLI

@pytest.mark.parametrize("kw, needle", [
    ({"dtype": "bfloat16"}, "float32 compute"),
    ({"lm_head_fp8": "yes"}, "True or False"),
    ({"tensor_parallel_size": 2}, "tensor_parallel_size"),
    ({"speculative_config": {"method": "mtp", "num_speculative_tokens": 1, "draft_vocab_size": 64}},
     "draft vocabulary"),
])
def test_bad_combinations_refused(bf16_model, kw, needle):
    kw = {"lm_head_fp8": True} | kw
    with pytest.raises(ValueError, match=needle):
        LLM(bf16_model, **kw)


def test_decode_steps_checks_the_fp8_head(bf16_model):
    """kernels.decode_steps refuses an FP8 head whose scale grid does not fit its weight (no C call made)."""
    llm = make_llm(bf16_model, 8)
    head = llm.model.lm_head
    V, H = head.weight.shape
    empty = torch.zeros(1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="FP8 head"):
        kernels.decode_steps(1, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                             torch.zeros(1, 0, dtype=torch.int64), torch.zeros(1, 2, 9, dtype=torch.int64),
                             torch.zeros(V, H, dtype=torch.bfloat16), torch.ones(H), 1e-6, head.weight,
                             (head.weight_scale_inv[:1].contiguous(), head.block), torch.zeros(2, 1, dtype=torch.int64),
                             empty.view(1), torch.zeros(2, dtype=torch.int64))


def test_cli_generate_and_serve_flag(bf16_model, tmp_path):
    """`mimoflash generate --lm-head-fp8` as a user runs it: exit 0 and the tokens of the API's FP8 head (greedy);
    a refused combination exits 1 with one line; `mimoflash serve --lm-head-fp8` answers a completion with them too."""
    import httpx

    from mimoflash.checkpoint.saver import save_model
    from tests.test_cli import mimoflash, ok, refused
    from tests.test_serve import ServerProcess
    ckpt = save_model(bf16_model, tmp_path / "ckpt")
    ids = [5, 17, 300, 2]
    want = make_llm(ckpt, 8).generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=16,
                                                                                 ignore_eos=True), use_tqdm=False)
    want = want[0].outputs[0].token_ids
    common = ["generate", "--model", str(ckpt), "--token-ids", ",".join(map(str, ids)), "--max-tokens", "16",
              "--json", "--temperature", "0", "--ignore-eos"]
    got = json.loads(ok(mimoflash(*common, "--lm-head-fp8")).stdout)["outputs"][0]["token_ids"]
    assert got == want
    refused(mimoflash(*common, "--lm-head-fp8", "--dtype", "bfloat16"), 1, "lm_head_fp8", "float32 compute")
    server = ServerProcess(str(ckpt), "--lm-head-fp8", "--served-model-name", "m")
    try:
        r = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": ids, "max_tokens": 16,
                                                             "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 16
    finally:
        server.stop()
