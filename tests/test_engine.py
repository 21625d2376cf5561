"""End-to-end engine tests on CPU: batch invariance, transformers parity, preemption, abort, seeds, stop strings,
streaming, n > 1, logprobs, input errors. Text handling is tested with a scripted model that emits a fixed byte
sequence and a byte-level fake tokenizer, so multibyte boundaries are exact."""

import pytest
import torch
from torch import nn

from mimoflash.engine.llm import LLM, collect
from mimoflash.engine.sampling import SamplingParams
from tests.conftest import make_model, tiny_config


GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    """Every test must leave autograd as it found it (on): a leaked no-grad mode would silently change later tests.
    Grad mode is restored either way, so one offender cannot cascade."""
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left torch's grad mode disabled"


class ByteTokenizer:
    """ids 0..255 are bytes, 256 is eos (special), 257.. are specials that decode to nothing."""
    eos_token_id = 256
    stop_token_ids = {256}

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out += f"<{i}>".encode()
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, enable_thinking=None):
        return "".join(f"[{m['role']}]{m['content']}\n" for m in messages) + ("[assistant]" if add_generation_prompt
                                                                               else "")


class ScriptedModel(nn.Module):
    """After position p it predicts `script[p + 1]`, whatever the inputs: the engine's text logic in isolation."""

    def __init__(self, script: bytes):
        super().__init__()
        self.config = tiny_config(max_position_embeddings=128)
        self.q_proj = nn.Linear(1, 1)                       # gives the engine a dtype/device to read
        self.script = torch.tensor(list(script) + [256])     # eos after the script

    def model(self, input_ids, positions, backend):
        return positions[..., None].float()                  # (1, N, 1)

    def logits(self, hidden):
        nxt = self.script[(hidden[:, 0].long() + 1).clamp(max=len(self.script) - 1)]
        out = torch.full((hidden.shape[0], self.config.vocab_size), -10.0)
        out[torch.arange(len(nxt)), nxt] = 10.0
        return out


@pytest.fixture(scope="module")
def tiny():
    return make_model(tiny_config(), seed=11)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=g).tolist()} for n in lengths]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("chunked,budget", [(True, 7), (True, 64), (False, 64)])
def test_batch_equals_each_prompt_alone(tiny, chunked, budget):
    ps = prompts([3, 17, 9, 26])
    llm = LLM(tiny, max_num_seqs=4, block_size=4, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    batched = tokens(llm.generate(ps, GREEDY, use_tqdm=False))
    alone = [tokens(LLM(tiny, max_num_seqs=1, block_size=16).generate(p, GREEDY))[0] for p in ps]
    assert batched == alone and all(len(t) == 10 for t in batched)


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True, sliding_window_size=6,
                                                hybrid_layer_pattern=[1, 0, 1, 1, 0, 1, 1, 0],
                                                moe_layer_freq=[0, 0, 1, 1, 1, 0, 1, 1])])
def test_greedy_matches_transformers_generate(tiny, overrides):
    transformers = pytest.importorskip("transformers")
    from tests.test_parity_hf import hf_model_from
    model = make_model(tiny_config(**overrides), seed=11) if overrides else tiny
    hf = hf_model_from(model)
    ps = prompts([2, 13])
    ours = tokens(LLM(model, block_size=4, max_num_batched_tokens=8).generate(
        ps, SamplingParams(temperature=0, max_tokens=16)))
    for p, got in zip(ps, ours):
        ids = torch.tensor([p["prompt_token_ids"]])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert got == ref[0, ids.shape[1]:].tolist()
    assert transformers.__version__.startswith("5.")


def test_preemption_and_recompute_keep_outputs(tiny):
    ps = prompts([5, 12, 8, 3], seed=1)
    params = [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=0.9, seed=5, max_tokens=24)]
    roomy = LLM(tiny, block_size=4, max_num_seqs=4)
    cramped = LLM(tiny, block_size=4, max_num_seqs=4, kv_cache_memory=20 * roomy.engine.layout.block_bytes +
                  4 * roomy.engine.layout.ring_bytes)                # 80 tokens of global cache for 4 x ~35
    for sp in params:
        a, b = roomy.generate(ps, sp), cramped.generate(ps, sp)
        assert tokens(a) == tokens(b)
        assert sum(o.metrics.num_preemptions for o in b) > 0 and sum(o.metrics.num_preemptions for o in a) == 0
    kv = cramped.engine.kv
    assert kv.num_free_blocks == kv.layout.num_blocks and kv.num_free_rings == kv.layout.num_rings


def test_abort_returns_pools_to_initial_state(tiny):
    llm = LLM(tiny, block_size=4, max_num_seqs=3, max_num_batched_tokens=8)
    eng = llm.engine
    free = (eng.kv.num_free_blocks, eng.kv.num_free_rings)
    ids = [eng.add_request(p["prompt_token_ids"], SamplingParams(max_tokens=50, n=n))
           for p, n in zip(prompts([20, 4, 6, 9]), (1, 2, 1, 1))]
    for _ in range(4):
        eng.step()
    assert eng.kv.num_free_blocks < free[0] and eng.kv.num_free_rings == 0        # busy, one still waiting
    for gid in ids:
        eng.abort_request(gid)
    assert (eng.kv.num_free_blocks, eng.kv.num_free_rings) == free
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == sorted(ids) and all(o.finished for o in outs)
    assert all(c.finish_reason == "abort" for o in outs for c in o.outputs)
    assert not eng.has_unfinished_requests() and not eng._groups and not eng._state


def test_seeded_sampling_same_alone_and_in_busy_batch(tiny):
    sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234, max_tokens=12)
    p = prompts([7], seed=3)[0]
    alone = tokens(LLM(tiny).generate(p, sp))[0]
    busy = prompts([3, 30, 11, 5], seed=4)
    mixed = busy[:2] + [p] + busy[2:]
    others = [SamplingParams(temperature=0.8, max_tokens=20)] * 2 + [sp] + [SamplingParams(seed=9, max_tokens=5)] * 2
    outs = LLM(tiny, max_num_seqs=5, max_num_batched_tokens=16, block_size=4).generate(mixed, others)
    assert tokens(outs)[2] == alone
    assert len(set(alone)) > 3                                        # really sampled, not a degenerate loop


def test_n_samples_logprobs_and_metrics(tiny):
    sp = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=6, logprobs=2)
    (out,) = LLM(tiny).generate(prompts([5])[0:1], sp)
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == 6 and o.finish_reason == "length"
        for tok, entry in zip(o.token_ids, o.logprobs):
            assert tok in entry and 2 <= len(entry) <= 3
            assert entry[tok].logprob <= 0 and entry[tok].rank >= 1
    m = out.metrics
    assert m.prompt_tokens == 5 and m.generated_tokens == 18 and m.time_to_first_token > 0
    assert m.decode_tokens_per_s > 0


def test_input_errors(tiny):
    llm = LLM(tiny, max_model_len=32)
    with pytest.raises(ValueError, match="unknown field"):
        llm.generate(prompts([3]), {"temperature": 0.5, "max_new_tokens": 3})
    with pytest.raises(ValueError, match="temperature"):
        llm.generate(prompts([3]), {"temperature": -1})
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(prompts([40]))
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [1, 512]})
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate({"prompt_token_ids": []})
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(tiny, max_model_len=10_000)
    # no tokenizer: token prompts still run, text stays empty (vLLM skip_tokenizer_init)
    (out,) = llm.generate(prompts([3]), GREEDY)
    assert out.outputs[0].text == "" and len(out.outputs[0].token_ids) == 10


def test_streaming_equals_generate_and_chat(tiny):
    llm = LLM(tiny, ByteTokenizer())
    sp = SamplingParams(temperature=0, max_tokens=12, skip_special_tokens=False)
    full = llm.generate("héllo", sp)[0]
    deltas = list(llm.generate_stream("héllo", sp))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    streamed = collect(deltas)
    assert streamed.outputs[0].text == full.outputs[0].text and streamed.outputs[0].token_ids == \
        full.outputs[0].token_ids
    assert full.prompt_token_ids == list("héllo".encode())
    chat = llm.chat([{"role": "user", "content": "hi"}], sp)[0]
    assert chat.prompt_token_ids == list("[user]hi\n[assistant]".encode())
    # abandoning a stream aborts the request and frees its cache
    it = llm.generate_stream("abc", SamplingParams(max_tokens=100))
    next(it)
    it.close()
    assert not llm.engine.has_unfinished_requests() and not llm.engine._groups and not llm.engine._state
    assert llm.engine.kv.num_free_blocks == llm.engine.layout.num_blocks


SCRIPT = "Hi héllo wörld! STOP here".encode()


def scripted(**kw):
    return LLM(ScriptedModel(SCRIPT), ByteTokenizer()).generate({"prompt_token_ids": list(SCRIPT[:2])},
                                                                SamplingParams(temperature=0, max_tokens=40, **kw))[0]


@pytest.mark.parametrize("stop,include,text", [
    (["wö"], False, " héllo "), (["ö"], False, " héllo w"), (["ö"], True, " héllo wö"),
    (["zz", "llo", "é"], False, " h"), (["STOP"], False, " héllo wörld! "),
])
def test_stop_strings_on_text(stop, include, text):
    out = scripted(stop=stop, include_stop_str_in_output=include).outputs[0]
    assert out.text == text and out.finish_reason == "stop" and out.stop_reason in stop


def test_stop_token_eos_and_max_tokens_in_the_middle_of_a_character():
    out = scripted(stop_token_ids=[ord("!")]).outputs[0]
    assert out.text == " héllo wörld" and out.stop_reason == ord("!") and out.token_ids[-1] == ord("!")
    out = scripted().outputs[0]
    assert out.text == " héllo wörld! STOP here" and out.finish_reason == "stop" and out.stop_reason is None
    out = scripted(ignore_eos=True).outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 40
    # max_tokens ends after the first byte of "é": the held-back byte is flushed as U+FFFD, never silently dropped
    out = LLM(ScriptedModel(SCRIPT), ByteTokenizer()).generate({"prompt_token_ids": list(SCRIPT[:2])},
                                                               SamplingParams(temperature=0, max_tokens=3))[0]
    assert out.outputs[0].text == " h\ufffd"


def test_streaming_never_emits_a_partial_stop_string():
    llm = LLM(ScriptedModel(SCRIPT), ByteTokenizer())
    seen = ""
    for d in llm.generate_stream({"prompt_token_ids": list(SCRIPT[:2])}, SamplingParams(temperature=0, max_tokens=40,
                                                                                        stop=["STOP"])):
        seen += d.outputs[0].text
        assert " héllo wörld! ".startswith(seen)
    assert seen == " héllo wörld! "


@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory, tiny):
    """The tiny model saved twice: with a trained byte-level BPE tokenizer and without any tokenizer files."""
    from mimoflash.checkpoint.saver import save_model
    from mimoflash.train.tokenizer_train import train_tokenizer
    from tests.test_tokenizer import make_corpus
    root = tmp_path_factory.mktemp("engine_cli")
    (root / "corpus").mkdir()
    train_tokenizer(make_corpus(root / "corpus"), root / "tok", vocab_size=400, min_frequency=2, progress=False)
    return (save_model(tiny, root / "with_tok", dtype=torch.float32, tokenizer_dir=root / "tok"),
            save_model(tiny, root / "no_tok", dtype=torch.float32))


def test_cli_generate_json_and_token_ids(ckpt_dirs, capsys):
    import json
    from mimoflash.engine.cli import generate_main
    with_tok, no_tok = ckpt_dirs
    assert generate_main(["--model", str(with_tok), "the cat", "--max-tokens", "5", "--temperature", "0",
                          "--json", "--logprobs", "1"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = LLM(str(with_tok)).generate("the cat", SamplingParams(temperature=0, max_tokens=5))[0]
    assert doc["outputs"][0]["token_ids"] == ref.outputs[0].token_ids
    assert doc["outputs"][0]["text"] == ref.outputs[0].text and doc["metrics"]["generated_tokens"] == 5
    assert generate_main(["--model", str(no_tok), "--token-ids", "1,2,3", "--max-tokens", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(doc["outputs"][0]["token_ids"]) == 4 and doc["outputs"][0]["text"] == ""
    assert generate_main(["--model", str(with_tok), "hello", "--max-tokens", "3", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "tok/s" in err and "TTFT" in err
    with pytest.raises(ValueError, match="top_p"):
        generate_main(["--model", str(with_tok), "x", "--top-p", "0"])


def test_cli_chat_session(ckpt_dirs, capsys):
    from mimoflash.engine.cli import chat_main
    lines = iter(["hello there", "/system be brief", "/reset", "again", "/exit"])
    assert chat_main(["--model", str(ckpt_dirs[0]), "--max-tokens", "4", "--temperature", "0"],
                     input_fn=lambda prompt: next(lines)) == 0
    err = capsys.readouterr().err
    assert err.count("TTFT") == 2 and "conversation cleared" in err
    with pytest.raises(ValueError, match="tokenizer"):
        chat_main(["--model", str(ckpt_dirs[1])], input_fn=lambda p: "/exit")


def test_cpu_layout_transform_matches_dense_reference():
    from mimoflash.engine.cpu_layout import use_cpu_layout
    from mimoflash.model.moe import MoE
    m = make_model(tiny_config(), seed=2)
    ref = make_model(tiny_config(), seed=2)
    moe = next(x for x in m.modules() if isinstance(x, MoE))
    xs = [torch.randn(1, 1, 128), torch.randn(1, 2, 128), torch.randn(2, 5, 128)]
    ids = torch.randint(0, m.config.vocab_size, (2, 9))
    before = [moe(x) for x in xs]
    use_cpu_layout(m)
    use_cpu_layout(m)                                                   # idempotent
    moe(xs[2]).sum().backward()                                         # with autograd: the parameters' own path
    assert moe.experts.gate_proj.grad is not None and moe.experts.gate_proj.grad.abs().sum() > 0
    with torch.no_grad():                          # scoped: a failing check cannot leak no-grad into later tests
        assert type(moe.experts).__name__ == "Fp32Experts"         # engine/cpu_layout.py swapped it in
        assert moe.experts.gate_proj.data_ptr() == moe.experts._gate_up.data_ptr()          # views, no copy
        for x, b in zip(xs, before):
            torch.testing.assert_close(moe(x), b, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(moe(x), moe.forward_dense_reference(x), atol=1e-5, rtol=1e-4)
        sd, sd_ref = m.state_dict(), ref.state_dict()
        assert set(sd) == set(sd_ref) and all(torch.equal(sd[k], sd_ref[k]) for k in sd)   # same values
        torch.testing.assert_close(m(ids), ref(ids), atol=1e-5, rtol=1e-4)
        m.double()                                      # a cast breaks the views: the grouped forward takes over
        assert moe.experts.gate_proj.data_ptr() != moe.experts._gate_up.data_ptr()
        torch.testing.assert_close(moe(xs[2].double()).float(), before[2], atol=1e-5, rtol=1e-4)


def test_invalid_requests_raise_real_errors_not_asserts():
    """These checks must survive `python -O`, which strips `assert` statements: they raise ValueError instead."""
    from mimoflash.engine.engine import LLMEngine
    from mimoflash.engine.request import Request
    with pytest.raises(ValueError, match="empty prompt"):
        Request("r0", [], SamplingParams())
    engine = LLMEngine(make_model(tiny_config(), seed=3))
    engine.scheduler.add(Request("dup", [1, 2, 3], SamplingParams()))
    with pytest.raises(ValueError, match="duplicate request id"):
        engine.scheduler.add(Request("dup", [4, 5], SamplingParams()))
