"""Multi-step decoding (`num_scheduler_steps`): several decode steps per `LLMEngine.step()` must give exactly what
one step per call gives: the same tokens, text, finish reasons, logprobs and seeded samples, the run cut at a stop
in its middle, and the KV cache's accounting where one-step decoding leaves it."""

import json
import math

import pytest
import torch

from mimoflash.engine.llm import LLM
from mimoflash.engine.sampling import SamplingParams
from tests.conftest import make_model, tiny_config
from tests.test_engine import ByteTokenizer


@pytest.fixture(scope="module")
def models():
    """fp32 (the module path) and bf16 weights (the fused C decode step on CPU); window 4: rings wrap after 4."""
    return {"fp32": make_model(tiny_config(), seed=11),
            "bf16": make_model(tiny_config(), seed=11, dtype=torch.bfloat16)}


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=g).tolist()} for n in lengths]


def outputs(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs] for o in outs]


def run(model, steps, ps, params, **kw):
    llm = LLM(model, num_scheduler_steps=steps, block_size=4, max_num_seqs=4, **kw)
    return llm, llm.generate(ps, params, use_tqdm=False)


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [[5], [3, 17, 9, 26]])
def test_greedy_same_tokens_as_one_step(models, kind, lengths):
    """Batch 1 and a mixed batch, 40 tokens: rings wrap many times, blocks fill and new ones are reserved mid-run;
    different max_tokens end requests in the middle of runs."""
    ps = prompts(lengths)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (40, 7, 23, 12)[:len(ps)]]
    _, ref = run(models[kind], 1, ps, params)
    for n in (2, 8):
        llm, got = run(models[kind], n, ps, params)
        assert outputs(got) == outputs(ref)
        kv = llm.engine.kv
        assert kv.num_free_blocks == kv.layout.num_blocks and kv.num_free_rings == kv.layout.num_rings
    assert [len(o.outputs[0].token_ids) for o in ref] == [p.max_tokens for p in params]


def test_runs_really_take_several_steps(models):
    llm = LLM(models["bf16"], num_scheduler_steps=8, block_size=4)
    eng = llm.engine
    eng.add_request(prompts([5])[0]["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=20))
    counts = []
    while eng.has_unfinished_requests():
        before = sum(len(r.output_token_ids) for r in eng.scheduler.running)
        eng.step()
        counts.append(sum(len(r.output_token_ids) for r in eng.scheduler.running) - before)
    assert counts[1:3] == [8, 8]        # prefill's token, then two full runs; the last run is cut (19 = 16 + 3)


def test_reference_attention_same_tokens(models):
    ps = prompts([6, 11])
    sp = SamplingParams(temperature=0, max_tokens=15)
    assert outputs(run(models["fp32"], 8, ps, sp, attention_impl="reference")[1]) == outputs(
        run(models["fp32"], 1, ps, sp, attention_impl="reference")[1])


def test_stop_tokens_and_eos_in_the_middle_of_a_run(models):
    """The stop token is the 6th greedy token of request 0 (a run of 8 ends there) and a later one of request 1."""
    ps = prompts([4, 9], seed=3)
    free = run(models["bf16"], 1, ps, SamplingParams(temperature=0, max_tokens=30))[1]
    toks = [o.outputs[0].token_ids for o in free]
    params = [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[toks[0][5]]),
              SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[toks[1][13]])]
    ref = run(models["bf16"], 1, ps, params)[1]
    assert [o.outputs[0].finish_reason for o in ref] == ["stop", "stop"]
    for n in (3, 8):
        assert outputs(run(models["bf16"], n, ps, params)[1]) == outputs(ref)


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_found_after_the_run(models, include):
    """Stop strings on text (a byte tokenizer): the run goes on past the token that completes one; those later
    tokens are dropped, the text cut as one-step decoding cuts it."""
    tok = ByteTokenizer()
    ps = prompts([4, 7], seed=7)
    free = run(models["bf16"], 1, ps, SamplingParams(temperature=0, max_tokens=30), tokenizer=tok)[1]
    texts = [o.outputs[0].text for o in free]
    assert all(len(t) > 12 for t in texts)
    stops = [t[len(t) // 2:len(t) // 2 + 2] for t in texts]
    params = [SamplingParams(temperature=0, max_tokens=30, stop=[s], include_stop_str_in_output=include)
              for s in stops]
    ref = run(models["bf16"], 1, ps, params, tokenizer=tok)[1]
    assert all(o.outputs[0].finish_reason == "stop" for o in ref)
    llm, got = run(models["bf16"], 8, ps, params, tokenizer=tok)
    assert outputs(got) == outputs(ref)
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.layout.num_blocks


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_seeded_and_shared_generator_sampling_same_as_one_step(models, kind):
    """Seeded requests (own generators, with stop strings and logprobs) and unseeded ones (the engine's shared
    generator, whose draws a run makes in the same order) sample the same tokens."""
    tok = ByteTokenizer()
    ps = prompts([4, 9, 6], seed=7)
    params = [SamplingParams(temperature=0.9, seed=3, max_tokens=25, logprobs=2, stop=["zz"]),
              SamplingParams(temperature=1.2, top_k=50, max_tokens=19),
              SamplingParams(temperature=0.7, top_p=0.9, max_tokens=25, n=2)]
    ref = run(models[kind], 1, ps, params, tokenizer=tok, seed=4)[1]
    assert outputs(run(models[kind], 8, ps, params, tokenizer=tok, seed=4)[1]) == outputs(ref)


def test_a_request_arriving_mid_generation(models):
    """A request added while another decodes (runs of 8 around it): the same tokens for both as with one step per
    call; while it waits the running request takes single steps, so it is admitted at once."""
    ps = prompts([5, 8], seed=9)
    sp = SamplingParams(temperature=0, max_tokens=30)
    got = {}
    for n in (1, 8):
        eng = LLM(models["bf16"], num_scheduler_steps=n, block_size=4).engine
        eng.add_request(ps[0]["prompt_token_ids"], sp, request_id="a")
        out, calls = {}, 0
        while eng.has_unfinished_requests():
            for d in eng.step():
                out.setdefault(d.request_id, []).extend(d.outputs[0].token_ids)
            calls += 1
            if calls == 3:
                eng.add_request(ps[1]["prompt_token_ids"], sp, request_id="b")
        got[n] = out
        kv = eng.kv
        assert kv.num_free_blocks == kv.layout.num_blocks and kv.num_free_rings == kv.layout.num_rings
    assert got[8] == got[1] and all(len(v) == 30 for v in got[1].values())


def test_cache_accounting_after_every_run(models):
    """After each step() the cache holds what one-step decoding holds: the blocks of the cached tokens and no more
    (a run cut short by a stop token gives back the rest of its reservation)."""
    ps = prompts([3, 10, 6], seed=2)
    toks = [o.outputs[0].token_ids for o in run(models["bf16"], 1, ps, SamplingParams(temperature=0, max_tokens=40))[1]]
    eng = LLM(models["bf16"], num_scheduler_steps=8, block_size=4, max_num_seqs=4).engine
    for p, t in zip(ps, toks):
        eng.add_request(p["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[t[9]]))
    kv, total = eng.kv, eng.kv.layout.num_blocks
    while eng.has_unfinished_requests():
        eng.step()
        running = eng.scheduler.running
        for r in running:
            assert r.num_computed_tokens == r.num_tokens - 1
            assert len(r.block_ids) == math.ceil(r.num_computed_tokens / 4)
        assert kv.num_free_blocks == total - sum(len(r.block_ids) for r in running)
    assert kv.num_free_blocks == total and kv.num_free_rings == kv.layout.num_rings


def test_one_step_when_a_request_needs_the_scheduler(models):
    """Stop strings on unseeded sampling, MTP: one step per call."""
    llm = LLM(models["fp32"], num_scheduler_steps=8, block_size=4)
    eng = llm.engine
    eng.add_request([1, 2, 3], SamplingParams(temperature=0.8, stop=["a"]))
    eng.step()
    assert eng._steps_wanted() == 1
    while eng.has_unfinished_requests():
        eng.step()
    eng.add_request([1, 2, 3], SamplingParams(temperature=0.8, seed=1, stop=["a"]))
    eng.step()
    assert eng._steps_wanted() == 8
    spec = {"method": "mtp", "num_speculative_tokens": 1}
    mtp = LLM(models["fp32"], num_scheduler_steps=8, block_size=4, speculative_config=spec)
    assert mtp.engine._steps_wanted() == 1


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_penalties_see_the_runs_tokens(models, kind):
    """Repetition, frequency and presence penalties read the output tokens, those of the run so far included: the
    same tokens as one step per call, greedy and sampled, next to a request without penalties."""
    ps = prompts([5, 9, 3], seed=8)
    params = [SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3),
              SamplingParams(temperature=0.9, seed=2, max_tokens=30, frequency_penalty=0.8, presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=30)]
    ref = run(models[kind], 1, ps, params)[1]
    assert outputs(run(models[kind], 8, ps, params)[1]) == outputs(ref)
    free = run(models[kind], 1, ps, [p.replace(repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
                                     for p in params])[1]
    assert outputs(free)[:2] != outputs(ref)[:2]                   # the penalties change the tokens


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_num_scheduler_steps_checked(models, bad):
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        LLM(models["fp32"], num_scheduler_steps=bad)


def test_cli_num_scheduler_steps(models, tmp_path):
    """`mimoflash generate --num-scheduler-steps N` as a user runs it: the same tokens for 1 and 5, a clear refusal
    of 0."""
    from mimoflash.checkpoint.saver import save_model
    from tests.test_cli import mimoflash, ok, refused
    ckpt = save_model(models["bf16"], tmp_path / "ckpt")
    common = ["generate", "--model", str(ckpt), "--token-ids", "5,17,300,2", "--max-tokens", "20", "--json",
              "--temperature", "0", "--ignore-eos"]
    got = [json.loads(ok(mimoflash(*common, "--num-scheduler-steps", n)).stdout)["outputs"][0]["token_ids"]
           for n in ("1", "5")]
    assert got[0] == got[1] and len(got[0]) == 20
    refused(mimoflash(*common, "--num-scheduler-steps", "0"), 2, "--num-scheduler-steps must be >= 1")


@pytest.mark.parametrize("panels", [True, False])
def test_greedy_runs_go_through_the_c_loop(models, panels, monkeypatch):
    """Greedy runs on the fused path are one kernels.decode_steps call each (the lm_head on its panels or
    row-major), with the tokens of one-step decoding, stop tokens included; with logprobs (sampled in Python) the
    run calls it once per step and samples its logits."""
    from mimoflash import kernels
    runs, single = [], []
    real = kernels.decode_steps

    def spy(n, *args, logits=None, **kw):
        done = real(n, *args, logits=logits, **kw)
        (runs if logits is None else single).append(done)
        return done

    monkeypatch.setattr(kernels, "decode_steps", spy)
    ps = prompts([4, 9, 2], seed=4)
    free = run(models["bf16"], 1, ps, SamplingParams(temperature=0, max_tokens=30), weight_panels=panels)[1]
    params = [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[o.outputs[0].token_ids[11]]) for o in free]
    ref = run(models["bf16"], 1, ps, params, weight_panels=panels)[1]
    assert not runs
    assert outputs(run(models["bf16"], 8, ps, params, weight_panels=panels)[1]) == outputs(ref)
    assert len(runs) >= 2 and max(runs) > 1
    runs.clear()
    lp = SamplingParams(temperature=0, max_tokens=20, logprobs=1)
    assert outputs(run(models["bf16"], 8, ps, lp)[1]) == outputs(run(models["bf16"], 1, ps, lp)[1])
    assert not runs and len(single) >= 8 and set(single) == {1}


def _read(ptr: int, shape, dtype):
    """The array at address ptr (a test reads what the C loop's argument rows point to)."""
    import ctypes
    import numpy as np
    n = int(np.prod(shape))
    if not n:
        return np.zeros(shape, dtype)
    buf = (ctypes.c_char * (n * np.dtype(dtype).itemsize)).from_address(int(ptr))
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


@pytest.mark.parametrize("max_draft", [0, 2])
@pytest.mark.parametrize("lengths", [[3], [2, 9, 5]])
def test_c_loop_arguments_equal_each_steps_own_metadata(models, max_draft, lengths):
    """The run's arguments made for all steps at once (`_decode_run_args`) hold, step by step, what
    `prepare_slices` + `FusedDecoder.step_args` make for that step alone (the reference): positions, chunk tables,
    write slots, key counts, masks and RoPE rows; across block boundaries and ring wraps (window 4, 20 steps), with and
    without ring slack (max_draft)."""
    import numpy as np
    from mimoflash.engine.engine import EngineConfig, LLMEngine
    model = LLM(models["bf16"], block_size=4).model                   # the engine's copy, in its CPU layout
    eng = LLMEngine(model, None, EngineConfig(block_size=4, max_num_seqs=4, max_draft=max_draft))
    runner = eng.runner
    assert runner.fused is not None
    for p in prompts(lengths, seed=1):
        eng.add_request(p["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=60))
    checked = 0
    for _ in range(24):
        eng.step()                                                     # one step: every start position in turn
        batch = eng.scheduler.schedule(num_steps=6)
        assert batch.num_steps == 6
        rows, _keep = runner._decode_run_args(batch)
        steps, per_step = runner._plan_steps(batch)
        B = len(batch.items)
        for i, (per_kind, _) in enumerate(per_step):
            for sliding, (cos, sin, rope_rows, table, chunk, K, slots, bias) in per_kind.items():
                r = rows[i, int(sliding)]
                assert (r[4], r[5], r[6]) == (table.shape[-1], chunk, K)
                assert np.array_equal(_read(r[3], table.shape, np.int64), table.numpy())
                assert np.array_equal(_read(r[7], (B,), np.int64), slots.numpy())
                pos = _read(r[2], (B,), np.int64)
                assert np.array_equal(pos, rope_rows.numpy())
                assert (r[8] == 0) == (bias is None)
                if bias is not None:
                    assert np.array_equal(_read(r[8], (B, K), np.float32), bias.numpy())
                width = cos.shape[1]
                assert np.array_equal(_read(r[0], (int(pos.max()) + 1, width), np.float32)[pos], cos[pos].numpy())
                assert np.array_equal(_read(r[1], (int(pos.max()) + 1, width), np.float32)[pos], sin[pos].numpy())
                checked += 1
        eng.scheduler.finish_steps(batch, [])                          # no step run: the reservation given back
    assert checked > 100


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """A block-FP8 checkpoint (weights kept FP8 in memory, experts read through the expert store); window 4."""
    from mimoflash.checkpoint.saver import save_model
    return save_model(make_model(tiny_config(hidden_size=256, moe_intermediate_size=128), seed=3),
                      tmp_path_factory.mktemp("fp8") / "ckpt", fp8=True, fp8_block_size=(16, 128))


@pytest.mark.parametrize("lengths", [[5], [3, 17, 9]])
def test_fp8_runs_in_the_c_loop_same_tokens_and_expert_statistics(fp8_ckpt, lengths, monkeypatch):
    """FP8 runs of 8 go through the C loop too (greedy: one kernels.decode_steps call a run; sampled: one a step),
    each step's routed experts counted after the run: the tokens of one step per call (which runs the fused step
    from Python), batch 1 and a mixed batch, 40 tokens (rings of window 4 wrap, blocks of 4 fill mid-run), and the
    expert store's counters, cache order and keys read end where one step per call leaves them; the sampled rows'
    log-probabilities are equal too (the logits bit for bit)."""
    from mimoflash import kernels
    calls = []
    real = kernels.decode_steps

    def spy(n, *args, logits=None, **kw):
        done = real(n, *args, logits=logits, **kw)
        calls.append((done, logits is None))
        return done

    monkeypatch.setattr(kernels, "decode_steps", spy)
    ps = prompts(lengths, seed=6)
    greedy = [SamplingParams(temperature=0, max_tokens=m) for m in (40, 7, 23)[:len(ps)]]
    sampled = [SamplingParams(temperature=0.8, seed=5 + i, max_tokens=20, logprobs=2) for i in range(len(ps))]
    got, state = {}, {}
    for n in (1, 8):
        llm = LLM(fp8_ckpt, progress=False, num_scheduler_steps=n, block_size=4, max_num_seqs=4)
        store = llm.expert_store
        assert store is not None and llm.engine.runner.fused is not None
        got[n] = [outputs(llm.generate(ps, sp, use_tqdm=False)) for sp in (greedy, sampled)]
        state[n] = (store.stats().as_dict(), store.resident_keys(), store.touched_keys())
        kv = llm.engine.kv
        assert kv.num_free_blocks == kv.layout.num_blocks and kv.num_free_rings == kv.layout.num_rings
        if n == 1:
            assert not calls
    assert got[8] == got[1] and state[8] == state[1]
    assert state[1][0]["steps"] > 40 and state[1][0]["hits"] > 0
    runs = [done for done, whole in calls if whole]
    assert runs and max(runs) == 8                                         # greedy: whole runs in one call
    assert {done for done, whole in calls if not whole} == {1} and len(calls) - len(runs) >= 19   # sampled


def test_fp8_bounded_expert_cache_keeps_the_python_loop(fp8_ckpt, monkeypatch):
    """An expert store with a bounded cache (it evicts between layers) keeps runs off the C loop: same tokens."""
    from mimoflash import kernels
    calls = []
    real = kernels.decode_steps
    monkeypatch.setattr(kernels, "decode_steps", lambda n, *a, **k: calls.append(n) or real(n, *a, **k))
    ps = prompts([4, 7], seed=6)
    sp = SamplingParams(temperature=0, max_tokens=16)
    llm = LLM(fp8_ckpt, progress=False, num_scheduler_steps=8)
    want = outputs(llm.generate(ps, sp, use_tqdm=False))
    assert calls
    calls.clear()
    store = llm.expert_store
    store.set_capacity(3 * store.expert_bytes(*next(iter(store.touched_keys()))))
    assert outputs(llm.generate(ps, sp, use_tqdm=False)) == want
    assert not calls and store.stats().resident_bytes <= store.capacity


def test_mtp_steps_without_drafts_run_as_multi_step(models, monkeypatch):
    """With MTP on, the steps adaptive depth is sure not to draft in (`MTPDrafter.plain_steps`) run several per call
    and are reported to it (`skipped`, with their number and CPU time); greedy tokens stay those of plain decoding,
    one step per call, before, during and after such runs."""
    from mimoflash.engine.speculative import MTPDrafter
    ps = prompts([5, 9], seed=12)
    sp = SamplingParams(temperature=0, max_tokens=40)
    ref = outputs(run(models["bf16"], 1, ps, sp)[1])
    spec = {"method": "mtp", "num_speculative_tokens": 2, "adaptive": True}
    llm = LLM(models["bf16"], num_scheduler_steps=8, block_size=4, max_num_seqs=4, speculative_config=spec)
    reported = []
    calls = {"n": 0}

    def plain_steps(self, sequences):                  # drafting steps and runs of plain steps, alternately
        calls["n"] += 1
        return 0 if calls["n"] % 3 else 6

    monkeypatch.setattr(MTPDrafter, "plain_steps", plain_steps)
    monkeypatch.setattr(MTPDrafter, "skipped", lambda self, steps, seconds: reported.append((steps, seconds)))
    assert outputs(llm.generate(ps, sp, use_tqdm=False)) == ref
    assert reported and max(n for n, _ in reported) == 6 and all(t >= 0 for _, t in reported)
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.layout.num_blocks and kv.num_free_rings == kv.layout.num_rings
