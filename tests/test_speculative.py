"""MTP speculative decoding (engine/speculative.py, docs/MTP.md): greedy output identical to plain decoding, sampled
output distributed as plain decoding (chi-square), caches back to their initial state, per-request depth, errors."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from conftest import make_model, tiny_config
from mimoflash import LLM, SamplingParams
from mimoflash.engine.sampling import SampleRow, distributions
from mimoflash.engine.speculative import AdaptiveDepth, SpeculativeConfig

G = torch.Generator().manual_seed(0)


def _cfg(**kw):
    base = dict(num_nextn_predict_layers=2)          # window 4, 8 layers: rings wrap within a few tokens
    base.update(kw)
    return tiny_config(**base)


def _prompts(lengths, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (n,), generator=g).tolist()} for n in lengths]


def _assert_pools_initial(llm):
    e = llm.engine
    assert e.kv.num_free_blocks == e.layout.num_blocks and e.kv.num_free_rings == e.layout.num_rings
    assert sorted(e.kv.free_blocks) == list(range(e.layout.num_blocks))
    assert not e.drafter.states and not e.scheduler.running and not e.scheduler.waiting


def _oracle_drafts(llm, reference: dict[tuple, list[int]], hit: float, seed: int = 0):
    """Bias the MTP logits towards the true greedy continuation (known from a plain run) with probability `hit`,
    so that verification sees long accepted prefixes and rejections at every depth (a random tiny model's MTP
    layers almost never agree with it)."""
    runner = llm.engine.runner
    inner = runner.execute_mtp
    rnd = random.Random(seed)

    def execute_mtp(layer, slices, hidden, head_weight=None):
        logits = inner(layer, slices, hidden, head_weight).clone()
        for row, s in enumerate(slices):
            r = s.request
            full = reference[tuple(r.prompt_token_ids)]
            q = s.start + len(s.tokens) - 1
            want = q + 1 + len(r.draft_token_ids) + 1           # position of the token this draft guesses
            if want < len(full) and rnd.random() < hit:
                logits[row, full[want]] += 1e4
        return logits
    runner.execute_mtp = execute_mtp
    runner.draft_greedy = lambda *a: execute_mtp(*a).argmax(-1).tolist()    # greedy drafts: the biased logits,
    llm.engine.drafter.chain = False                                          # pass by pass


@pytest.mark.parametrize("spec", [{"num_speculative_tokens": 1}, {"num_speculative_tokens": 2},
                                  {"num_speculative_tokens": 3}, {"num_speculative_tokens": 3, "adaptive": True}])
def test_greedy_equals_plain_decoding(spec):
    """Mixed-length batch (more prompts than sequences: later ones are admitted and prefilled in chunks of 8 while
    others verify), window 4 (rings wrap), blocks of 4, drafts right ~70% of the time: tokens and logprobs as with
    MTP off, and every pool back to its initial state."""
    model = make_model(_cfg(), seed=3)
    ps = _prompts([5, 19, 3, 11, 26, 7])
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    kw = dict(max_num_seqs=4, block_size=4, max_num_batched_tokens=8)
    ref = LLM(model, **kw).generate(ps, sp, use_tqdm=False)
    reference = {tuple(p["prompt_token_ids"]): p["prompt_token_ids"] + o.outputs[0].token_ids
                 for p, o in zip(ps, ref)}
    llm = LLM(model, speculative_config=spec, **kw)
    _oracle_drafts(llm, reference, hit=0.7)
    got = llm.generate(ps, sp, use_tqdm=False)
    _assert_same_outputs(got, ref)
    m = [o.metrics for o in got]
    assert sum(x.verify_steps for x in m) > 0 and sum(x.accepted_tokens for x in m) > 0
    assert all(len(x.acceptance_per_position) <= spec["num_speculative_tokens"] for x in m)
    _assert_pools_initial(llm)


def _assert_same_outputs(got, ref) -> None:
    """Same tokens as the reference run, and each chosen token's logprob within 1e-4."""
    for g, r in zip(got, ref, strict=True):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        for lg, lr in zip(g.outputs[0].logprobs, r.outputs[0].logprobs, strict=True):
            t = next(iter(lr))
            assert abs(lg[t].logprob - lr[t].logprob) < 1e-4


@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_rows_past_the_window_before_the_ring_wraps(impl):
    """A ring with draft slack is longer than the window (window 4 + the current key = 5 keys, 8 slots at k = 3):
    rows at positions 5..7 of short prompts, verified before the ring wraps, must not see the key a window back.
    Logprobs as with MTP off, on the fused C step and on the torch decode path."""
    model = make_model(_cfg(), seed=6).cast(torch.bfloat16) if impl == "fused" else make_model(_cfg(), seed=6)
    ps = _prompts([1, 2, 3])
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    kw = dict(max_num_seqs=3, block_size=4)
    ref = LLM(model, **kw).generate(ps, sp, use_tqdm=False)
    reference = {tuple(p["prompt_token_ids"]): p["prompt_token_ids"] + o.outputs[0].token_ids
                 for p, o in zip(ps, ref)}
    with pytest.warns(UserWarning, match="reuse the last MTP layer"):
        llm = LLM(model, speculative_config={"num_speculative_tokens": 3}, **kw)
    assert (llm.engine.runner.fused is not None) == (impl == "fused")
    assert llm.engine.layout.ring_slots > llm.engine.layout.swa_keys
    _oracle_drafts(llm, reference, hit=0.9)
    got = llm.generate(ps, sp, use_tqdm=False)
    _assert_same_outputs(got, ref)
    assert sum(o.metrics.accepted_tokens for o in got) >= 6


@pytest.mark.parametrize("prompt_len", [3, 40])          # rows before the rings wrap (8 slots) / after
def test_mtp_pass_metadata_from_the_verification_equals_prepared(prompt_len):
    """A draft pass over the rows the verification ran reuses its sliding metadata, masking the ring columns
    before each slice's key_from on top: the same tables, slots, key counts and masks as `prepare_slices` builds
    for the pass, for key_from off, before the window, inside it and past some rows' own positions."""
    from mimoflash.engine.runner import Slice
    with pytest.warns(UserWarning, match="reuse the last MTP layer"):
        llm = LLM(make_model(_cfg(), seed=7), max_num_seqs=2, block_size=4,
                  speculative_config={"num_speculative_tokens": 3})
    eng, run = llm.engine, llm.engine.runner
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for p in _prompts([prompt_len, prompt_len + 2]):
        eng.add_request(p["prompt_token_ids"], sp)
    for _ in range(3):
        eng.step()
    reqs = list(eng.scheduler.running)
    main = [Slice(r, r.num_computed_tokens - 3, [1, 2, 3], "all") for r in reqs]
    top = max(s.start + 2 for s in main)
    assert (top >= eng.layout.ring_slots) == (prompt_len > 8)
    checked = 0
    for kf in (0, 1, top - 5, top - 1):
        run._main_rows = (tuple((s.request.ring_id, s.start, 3, 0) for s in main), run.prepare_slices(main))
        run._mtp_step = None
        mtp = [Slice(s.request, s.start, [4, 5, 6], "last", max(kf, 0)) for s in main]
        got, want = run._mtp_rows_step(mtp), run.prepare_slices(mtp, kinds=(True,))
        assert got.positions is run._main_rows[1].positions               # built from the verification's
        g, w = got.meta.kinds[True], want.meta.kinds[True]
        assert g.keys == w.keys and g.chunk == w.chunk
        assert torch.equal(g.chunks, w.chunks) and torch.equal(g.write_dst, w.write_dst)
        assert (g.bias is None) == (w.bias is None)
        if w.bias is not None:
            assert torch.equal(g.bias, w.bias)
            checked += int(bool((w.bias == float("-inf")).any()))
        assert torch.equal(got.positions, want.positions) and torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.sample_rows, want.sample_rows) and got.all_rows == want.all_rows
    assert checked >= 2


def test_greedy_equals_plain_with_real_mtp_layers_and_rejections():
    """The MTP layers' own drafts (random weights: nearly all rejected), k = 3 with 2 layers (the last reused),
    the reference attention path too: same tokens; caches back to their initial state after many rollbacks."""
    model = make_model(_cfg(), seed=4)
    ps = _prompts([9, 4, 17])
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(model, max_num_seqs=4, block_size=4).generate(ps, sp, use_tqdm=False)]
    with pytest.warns(UserWarning, match="reuse the last MTP layer"):
        llm = LLM(model, max_num_seqs=4, block_size=4, speculative_config={"num_speculative_tokens": 3})
    outs = llm.generate(ps, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert sum(o.metrics.verify_steps for o in outs) >= 3 * 15
    _assert_pools_initial(llm)
    with pytest.warns(UserWarning):
        slow = LLM(model, max_num_seqs=4, block_size=4, attention_impl="reference",
                   speculative_config={"num_speculative_tokens": 3})
    assert [o.outputs[0].token_ids for o in slow.generate(ps, sp, use_tqdm=False)] == ref


def test_shipped_model_greedy_equal_and_drafts_accepted():
    """The shipped model (bf16 weights, fused C step for decode and verification): k = 1, 2, 3 and adaptive give the
    tokens of plain decoding, and its trained MTP layers get most first drafts accepted."""
    import mimoflash
    path = mimoflash.default_model()
    prompts = ["def merge_intervals(pairs):\n", "class LRUCache:\n    def __init__(self, capacity):\n"]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(path, max_num_seqs=2, progress=False)
    assert plain.engine.runner.fused is not None
    ref = [o.outputs[0].token_ids for o in plain.generate(prompts, sp, use_tqdm=False)]
    for spec in ({"num_speculative_tokens": 1}, {"num_speculative_tokens": 2}, {"num_speculative_tokens": 3},
                 {"num_speculative_tokens": 3, "adaptive": True}):
        with pytest.warns() if spec["num_speculative_tokens"] > plain.model.config.num_nextn_predict_layers \
                else _no_warning():
            llm = LLM(path, max_num_seqs=2, progress=False, speculative_config=spec)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref, spec
        if spec.get("adaptive"):
            # Adaptive may settle on depth 0 here (a verify step costs ~2x a plain one at this size), so a request
            # verifies only a few trial steps: too few to judge acceptance; it must have tried at least once.
            assert sum(o.metrics.verify_steps for o in outs) >= 1, spec
            continue
        assert all(o.metrics.acceptance_per_position[0] > 0.4 for o in outs), spec
        assert all(o.metrics.tokens_per_verify_step > 1.3 for o in outs), spec


@pytest.mark.skipif(not __import__("mimoflash").kernels.available(), reason="CPU kernels not built (no C compiler)")
def test_fp8_checkpoint_greedy_equals_plain(tmp_path):
    """An FP8 checkpoint as the release ships it (block-FP8 projections, MTP blocks included, bf16 the rest): the
    fused FP8 step verifies several rows per sequence; with drafts right ~70% of the time (long accepted runs and
    rejections at every depth), k = 1, 2, 3 and adaptive give MTP off's tokens and logprobs, caches back to their
    initial state."""
    from mimoflash.checkpoint.fp8 import FP8_DTYPE
    from mimoflash.checkpoint.saver import save_model
    model = make_model(_cfg(hidden_size=256, moe_intermediate_size=128), seed=5)
    ckpt = save_model(model, tmp_path / "ckpt", dtype=torch.bfloat16, fp8=True, fp8_block_size=(16, 128))
    ps = _prompts([5, 13, 3])
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    kw = dict(max_num_seqs=2, block_size=4, max_num_batched_tokens=8, progress=False)
    plain = LLM(ckpt, **kw)
    assert plain.weight_dtype == FP8_DTYPE and plain.engine.runner.fused is not None
    ref = plain.generate(ps, sp, use_tqdm=False)
    reference = {tuple(p["prompt_token_ids"]): p["prompt_token_ids"] + o.outputs[0].token_ids
                 for p, o in zip(ps, ref)}
    for spec in ({"num_speculative_tokens": 1}, {"num_speculative_tokens": 2}, {"num_speculative_tokens": 3},
                 {"num_speculative_tokens": 3, "adaptive": True}):
        with pytest.warns(UserWarning) if spec["num_speculative_tokens"] > 2 else _no_warning():
            llm = LLM(ckpt, speculative_config=spec, **kw)
        assert llm.engine.runner.fused is not None                     # verify rows through the fused FP8 step
        _oracle_drafts(llm, reference, hit=0.7)
        got = llm.generate(ps, sp, use_tqdm=False)
        for g, r in zip(got, ref):
            assert g.outputs[0].token_ids == r.outputs[0].token_ids, spec
            for lg, lr in zip(g.outputs[0].logprobs, r.outputs[0].logprobs):
                t = next(iter(lr))
                assert abs(lg[t].logprob - lr[t].logprob) < 1e-4
        assert sum(o.metrics.accepted_tokens for o in got) > 0, spec
        _assert_pools_initial(llm)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_per_request_depth_and_plain_requests_share_batches():
    """One engine, requests with depths 0 (plain), 1 and 2 decoding side by side: each gets plain decoding's
    tokens; the plain one is never verified."""
    model = make_model(_cfg(), seed=5)
    ps = _prompts([6, 10, 3])
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(model, max_num_seqs=4, block_size=4).generate(ps, sp, use_tqdm=False)]
    llm = LLM(model, max_num_seqs=4, block_size=4, speculative_config={"num_speculative_tokens": 2})
    reference = {tuple(p["prompt_token_ids"]): p["prompt_token_ids"] + r for p, r in zip(ps, ref)}
    _oracle_drafts(llm, reference, hit=0.8)
    e = llm.engine
    ids = [e.add_request(p["prompt_token_ids"], sp, num_speculative_tokens=d) for p, d in zip(ps, (0, 1, 2))]
    final = {}
    while e.has_unfinished_requests():
        for out in e.step():
            final.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
            if out.finished:
                final[out.request_id + "m"] = out.metrics
    assert [final[i] for i in ids] == ref
    assert final[ids[0] + "m"].verify_steps == 0
    assert final[ids[1] + "m"].verify_steps > 0 and len(final[ids[1] + "m"].acceptance_per_position) == 1
    assert len(final[ids[2] + "m"].acceptance_per_position) == 2
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        e.add_request([1, 2], sp, num_speculative_tokens=3)
    _assert_pools_initial(llm)


def test_stops_inside_accepted_drafts():
    """A stop token, max_tokens and a stop string met in the middle of a verified run of drafts end the output
    exactly where plain decoding ends it."""
    model = make_model(_cfg(), seed=6)
    ps = _prompts([7, 12])
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = LLM(model, max_num_seqs=2, block_size=4).generate(ps, base, use_tqdm=False)
    reference = {tuple(p["prompt_token_ids"]): p["prompt_token_ids"] + o.outputs[0].token_ids for p, o in zip(ps, ref)}
    for sp in (base.replace(stop_token_ids=[ref[0].outputs[0].token_ids[9]]), base.replace(max_tokens=11)):
        want = [o.outputs[0].token_ids for o in LLM(model, max_num_seqs=2, block_size=4).generate(ps, sp,
                                                                                                 use_tqdm=False)]
        llm = LLM(model, max_num_seqs=2, block_size=4, speculative_config={"num_speculative_tokens": 3})
        _oracle_drafts(llm, reference, hit=1.0)
        got = llm.generate(ps, sp, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == want
        assert [o.outputs[0].finish_reason for o in got] == [
            o.outputs[0].finish_reason for o in LLM(model, max_num_seqs=2, block_size=4).generate(ps, sp,
                                                                                                  use_tqdm=False)]
        _assert_pools_initial(llm)


def test_preemption_resets_the_mtp_side():
    """A KV budget too small for all sequences: requests are preempted and recomputed mid-speculation; tokens stay
    those of plain decoding."""
    model = make_model(_cfg(), seed=7)
    ps = _prompts([10, 14, 9, 12])
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = dict(max_num_seqs=4, block_size=4, max_num_batched_tokens=64)
    ref = LLM(model, **kw).generate(ps, sp, use_tqdm=False)
    reference = {tuple(p["prompt_token_ids"]): p["prompt_token_ids"] + o.outputs[0].token_ids for p, o in zip(ps, ref)}
    probe = LLM(model, speculative_config={"num_speculative_tokens": 2}, **kw)
    budget = probe.engine.layout.num_rings * probe.engine.layout.ring_bytes + 20 * probe.engine.layout.block_bytes
    llm = LLM(model, speculative_config={"num_speculative_tokens": 2}, kv_cache_memory=budget, **kw)
    _oracle_drafts(llm, reference, hit=0.7)
    got = llm.generate(ps, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert sum(o.metrics.num_preemptions for o in got) > 0
    _assert_pools_initial(llm)


# ------------------------------------------------------------------------------------------------ sampling


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed counts against probabilities, cells with expected count < 5 pooled."""
    n = counts.sum()
    exp = probs * n
    small = exp < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    ex = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = ex > 0
    obs, ex = obs[keep], ex[keep]
    stat = float(((obs - ex) ** 2 / ex).sum())
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _joint_target(model, prompt: list[int], sp: SamplingParams, V: int) -> torch.Tensor:
    """Exact P(t1, t2, t3) of plain decoding: the model's full forward and the sampler's own distributions."""
    out = torch.zeros(V, V, V, dtype=torch.float64)
    with torch.no_grad():
        def dist(prefix_list):
            ids = torch.tensor([prompt + p for p in prefix_list])
            logits = model(ids)[:, -1].float()
            rows = [SampleRow(sp, None, prompt, p) for p in prefix_list]
            return distributions(logits, rows)[1].double()
        p1 = dist([[]])[0]
        p2 = dist([[a] for a in range(V)])
        pairs = list(itertools.product(range(V), range(V)))
        p3 = dist([list(ab) for ab in pairs])
    for i, (a, b) in enumerate(pairs):
        out[a, b] = p1[a] * p2[a, b] * p3[i]
    return out.reshape(-1)


def _sample_joint(llm, prompt, sp, n: int, V: int) -> tuple[torch.Tensor, list]:
    counts = torch.zeros(V ** 3, dtype=torch.float64)
    outs = llm.generate([{"prompt_token_ids": prompt}] * n, sp, use_tqdm=False)
    for o in outs:
        a, b, c = o.outputs[0].token_ids
        counts[(a * V + b) * V + c] += 1
    return counts, outs


def test_speculative_sampling_matches_target_distribution():
    """Chi-square: the first three sampled tokens (t1 from the prompt; t2, t3 through a verification of two drafts)
    with temperature, top-p, repetition and presence penalties on, against the exact joint distribution of plain
    decoding. The same test rejects a broken verifier that keeps every draft (the test can fail)."""
    V = 6
    model = make_model(_cfg(vocab_size=V, pad_token_id=0, eos_token_id=1), seed=11)
    prompt = [2, 3, 4, 5, 2]
    sp = SamplingParams(temperature=1.3, top_p=0.9, repetition_penalty=1.4, presence_penalty=0.3, max_tokens=3,
                        ignore_eos=True)
    target = _joint_target(model.float(), prompt, sp, V)
    llm = LLM(model, max_num_seqs=128, block_size=4, seed=1, speculative_config={"num_speculative_tokens": 2})
    counts, outs = _sample_joint(llm, prompt, sp, 2000, V)
    assert _chi2_pvalue(counts, target) > 1e-3
    # drafts were judged, and both outcomes happened: some accepted, some rejected (the residual draw ran)
    assert 0 < sum(o.metrics.accepted_tokens for o in outs) < 2 * sum(o.metrics.verify_steps for o in outs)
    broken = LLM(model, max_num_seqs=128, block_size=4, seed=1, speculative_config={"num_speculative_tokens": 2})
    broken.engine.drafter.verify = lambda req, logits, drafts, g, sg: (
        list(drafts) + [int(torch.multinomial(torch.softmax(logits[len(drafts)], -1), 1))], len(drafts))
    assert _chi2_pvalue(_sample_joint(broken, prompt, sp, 2000, V)[0], target) < 1e-6


def test_draw_follows_its_weights_and_skips_zero_weights():
    """The drafter's inverse-CDF draw: frequencies within 5 standard deviations of the weights, never an index of
    weight zero, the same draws for the same seed."""
    from mimoflash.engine.speculative import draw
    w = torch.tensor([0.0, 1.0, 0.0, 3.0, 6.0, 0.0])
    g = torch.Generator().manual_seed(1)
    n = 6000
    counts = torch.bincount(torch.tensor([draw(w, g) for _ in range(n)]), minlength=6).double()
    p = w.double() / w.sum()
    assert counts[p == 0].sum() == 0
    sd = (n * p * (1 - p)).sqrt()
    assert bool(((counts - n * p).abs() <= 5 * sd + 1e-9).all()), counts.tolist()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [draw(w, g1) for _ in range(20)] == [draw(w, g2) for _ in range(20)]


def test_sampling_acceptance_stats_cover_accepts_and_rejects():
    """The verification with sampling both accepts and rejects drafts on a tiny vocabulary (so the chi-square above
    exercised the residual draw as well as acceptance)."""
    V = 6
    model = make_model(_cfg(vocab_size=V, pad_token_id=0, eos_token_id=1), seed=11)
    sp = SamplingParams(temperature=1.3, top_p=0.9, max_tokens=12, ignore_eos=True, seed=5)
    llm = LLM(model, max_num_seqs=8, block_size=4, speculative_config={"num_speculative_tokens": 2})
    outs = llm.generate([{"prompt_token_ids": [2, 3, 4]}] * 8, sp, use_tqdm=False)
    acc = sum(o.metrics.accepted_tokens for o in outs)
    steps = sum(o.metrics.verify_steps for o in outs)
    assert 0 < acc < 2 * steps
    again = LLM(model, max_num_seqs=8, block_size=4, speculative_config={"num_speculative_tokens": 2})
    assert [o.outputs[0].token_ids for o in again.generate([{"prompt_token_ids": [2, 3, 4]}] * 8, sp,
                                                           use_tqdm=False)] == [o.outputs[0].token_ids for o in outs]


# ------------------------------------------------------------------------------------------------ config, adaptive


def test_config_errors_are_clear():
    model = make_model(_cfg(), seed=1)
    for bad, msg in [({"method": "eagle"}, "method"), ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                     ({"num_speculative_tokens": 2, "adaptiv": True}, "unknown key"),
                     ({"adaptive": "yes"}, "adaptive"), ({"draft_vocab_size": 0}, "draft_vocab_size")]:
        with pytest.raises(ValueError, match=msg):
            LLM(model, speculative_config=bad)
    with pytest.raises(ValueError, match="MTP layers"):
        LLM(make_model(_cfg(num_nextn_predict_layers=0), seed=1), speculative_config={"num_speculative_tokens": 1})
    with pytest.raises(ValueError, match="draft_vocab"):
        LLM(model, speculative_config={"draft_vocab": [0, 9999]})


def _steady(a: AdaptiveDepth, depth: int, sequences: int, seconds: float) -> None:
    a.depth, a.sequences = depth, sequences
    a.run = AdaptiveDepth.SETTLE + 1
    a.checked = True                                        # no initial measurement phase
    a.record_step(seconds)


def _simulate(a: AdaptiveDepth, cost: list[float], accept: list[float], sequences: int, steps: int,
              seed: int = 0, run_cost: float | None = None) -> list[int]:
    """Drives `a` as the engine does, on synthetic measurements: each step chooses a depth (or is idle), its drafts
    are judged (draft j + 1 kept with probability accept[j] after draft j was), and the step's cost is recorded:
    cost[k] seconds at depth k, +-1% jitter, 30% more on the first step at a new depth (the MTP rings' catch-up)
    and 60% more over the engine's first 4 steps (first touches). With `run_cost`, steps that `plain_steps` allows
    run as multi-step decoding, up to 8 per call at run_cost seconds each (reported with `skipped`).
    -> the depth of every step."""
    rnd = random.Random(seed)
    out = []
    while len(out) < steps:
        step = len(out)
        n = min(8, a.plain_steps(sequences, margin=3), steps - step) if run_cost is not None else 0
        if n > 1:
            a.skipped(n, n * run_cost)
            out += [0] * n
            continue
        if a.idle(sequences, margin=3):
            out.append(0)
            continue
        k = a.choose([3] * sequences, 0)[0]
        for _ in range(sequences if k else 0):
            n = 0
            while n < k and rnd.random() < accept[n]:
                n += 1
            a.record_acceptance(k, n)
        a.record_step(cost[k] * (1.3 if a.run == 1 else 1.0) * (1.6 if step < 4 else 1.0)
                      * (1 + 0.02 * (rnd.random() - 0.5)))
        out.append(k)
    return out


# Costs of a whole engine step (ms) and acceptance by draft position measured on the shipped model (1 thread, greedy,
# 1024-token draft vocabulary): alone one draft gains a few percent and deeper drafting less; with 8 or 16 sequences
# every depth > 0 loses (a step at depth 1 costs ~2.25x a plain one for 1.9x the tokens).
_ACCEPT = [0.89, 0.80, 0.84]
_COSTS = {1: [0.80, 1.40, 1.95, 2.55], 8: [2.73, 6.15, 8.0, 10.0], 16: [4.6, 8.8, 12.0, 15.0]}


def test_adaptive_depth_compares_drafting_with_multi_step_decoding():
    """Where the engine runs the steps that draft nothing several per call (multi-step decoding: alone ~0.6 ms a
    step on the shipped model instead of 0.8), adaptive depth learns that cost from the runs `skipped` reports and
    settles on depth 0 alone too; `plain_steps` is 0 while it drafts, and counts the steps left before a trial."""
    a = AdaptiveDepth(3)
    depths = _simulate(a, _COSTS[1], _ACCEPT, 1, 1200, run_cost=0.6)
    assert a.best == {1: 0} and a.step_time[0][1] == pytest.approx(0.6)
    assert sum(1 for k in depths[100:] if k) < 0.02 * len(depths)
    assert a.plain_steps(1, margin=3) == a.next_trial - a.steps - 3
    assert a.plain_steps(2, margin=3) == 0                  # another batch size: choose first
    b = AdaptiveDepth(3)
    _simulate(b, _COSTS[1], _ACCEPT, 1, 300)                # no multi-step runs: drafting at depth 1
    assert b.depth == 1 and b.plain_steps(1, margin=3) == 0


def test_adaptive_depth_times_steps_end_to_end():
    """With a clock, a step's cost runs from the end of the step before it when that one was seen (what the engine
    does between steps counts), a run of n steps from the end of the step before the run; after a gap (a step not
    reported, e.g. a prefill) the caller's own figure is used."""
    now = [1.0]
    a = AdaptiveDepth(1, clock=lambda: now[0])
    a.steps = 1
    assert a._elapsed(0.1, 1) == 0.1                        # nothing seen before
    a.steps, now[0] = 2, 1.5
    assert a._elapsed(0.1, 1) == pytest.approx(0.5)
    a.steps, now[0] = 4, 3.0                                # step 3 was not reported
    assert a._elapsed(0.1, 1) == 0.1
    a.steps, now[0] = 12, 4.0                               # a run of 8 steps
    assert a._elapsed(0.8, 8) == pytest.approx(1.0)
    assert AdaptiveDepth(1)._elapsed(0.3, 1) == 0.3         # no clock: the caller's figure


def test_adaptive_depth_picks_one_draft_alone():
    """Alone, one draft pays (1.89 tokens for 1.75x the cost of a plain step: +8% tokens per second) and deeper
    drafts pay less: adaptive settles on depth 1 and stays there between its trials of depths 0 and 2."""
    a = AdaptiveDepth(3)
    depths = _simulate(a, _COSTS[1], _ACCEPT, 1, 1200)
    assert a.last_best == 1
    settled = depths[100:]
    assert settled.count(1) >= 0.85 * len(settled), {k: settled.count(k) for k in range(4)}   # trials: 16 steps
    assert {0, 2} <= set(settled)                           # it keeps checking its neighbours
    assert a.accept[0] == pytest.approx(0.89, abs=0.08)


@pytest.mark.parametrize("sequences, backoff", [(8, 8), (16, 2)])
def test_adaptive_depth_stops_drafting_where_it_loses(sequences, backoff):
    """With 8 or 16 sequences drafting loses (by ~15% / ~3%): adaptive settles on depth 0 after measuring depths 0,
    1 and 0 again (the first samples of depth 0 are inflated: taken alone they make depth 1 look cheaper at 8
    sequences), and its trials back off, 8x per trial where the loss is large (8), else 2x: over 4000 steps at most 8
    steps (8) / 20 steps (16) after the first measurement run drafts."""
    a = AdaptiveDepth(3)
    depths = _simulate(a, _COSTS[sequences], _ACCEPT, sequences, 4000)
    assert a.last_best == 0
    drafting = sum(1 for k in depths[20:] if k)
    assert drafting <= (8 if backoff == 8 else 20), drafting
    assert a.interval == 2 * a.explore * backoff ** (5 if backoff == 2 else 2)     # 5 or 2 trials after the first


def test_adaptive_depth_hysteresis_and_settled_costs():
    """The choice moves only for a predicted gain of MARGIN, in both directions (two near-equal depths do not
    alternate), and the first SETTLE steps at a depth (catch-up) are not recorded."""
    a = AdaptiveDepth(1, explore=0)
    for _ in range(20):
        a.record_acceptance(1, 1)                           # a_1 close to 1: depth 1 yields ~2 tokens
    a.choose([1], 0)
    a.record_step(5.0)                                      # the first step at a depth: not recorded
    assert a.step_time == {}
    _steady(a, 0, 1, 1.0)
    e1 = a.expected_tokens(1)
    _steady(a, 1, 1, 2.0)
    assert a.step_time == {0: {1: 1.0}, 1: {1: 2.0}}
    a.hold, a.last_best = 0, 0
    for gain, depth in [(1 + AdaptiveDepth.MARGIN / 2, 0),  # depth 1 predicted 1% faster: stays at 0
                        (1 + 2 * AdaptiveDepth.MARGIN, 1),  # 4% faster: moves
                        (1 - AdaptiveDepth.MARGIN / 2, 1),  # 1% slower: stays at 1
                        (1 - 2 * AdaptiveDepth.MARGIN, 0)]:
        a.step_time[1][1] = e1 / gain
        assert a.choose([1], 0) == [depth], gain


def test_adaptive_depth_follows_cost_and_acceptance():
    """Cheap extra rows and good acceptance -> deep drafts; rows that cost as much as whole steps, or drafts that
    are never accepted -> no drafts; nothing measured yet -> depths 0 and 1 are held and measured first (only
    steady-state steps count); a depth measured at one batch size keeps its ratio to depth 0 at another; trials of
    a neighbouring depth back off while they do not change the choice."""
    a = AdaptiveDepth(3, explore=0)
    assert [a.choose([3], 0) for _ in range(AdaptiveDepth.JUDGED)] == [[0]] * AdaptiveDepth.JUDGED   # depth 0 held
    a.record_step(1.0)                                      # steady at depth 0: recorded
    assert a.choose([3], 0) == [1]
    a.record_step(9.9)                                      # a transition (0 -> 1): not recorded
    assert a.step_time == {0: {1: 1.0}}
    for depth, t in [(1, 1.1), (2, 1.2), (3, 1.3)]:
        _steady(a, depth, 1, t)
    for _ in range(50):
        a.record_acceptance(3, 3)
    a.hold = 0
    assert a.choose([3], 0) == [3]
    b = AdaptiveDepth(3, explore=0)
    for depth, t in [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]:
        _steady(b, depth, 16, t)
    assert b.choose([3] * 16, 0) == [0] * 16
    _steady(b, 0, 8, 0.5)
    assert b.cost(1, 8) == pytest.approx(1.0)               # depth 1 measured at 16 only: 2x depth 0 carries over
    assert b.choose([3] * 8, 0) == [0] * 8
    steps = b.steps                                         # settled on 0: idle steps skip the MTP side, and count
    assert b.idle(8, margin=4) and b.idle(8, margin=4) and b.steps == steps + 2
    assert not b.idle(9, margin=4)                          # another batch size: choose again
    c = AdaptiveDepth(2, explore=0)
    for depth, t in [(0, 1.0), (1, 1.05), (2, 1.1)]:
        _steady(c, depth, 1, t)
    for _ in range(200):
        c.record_acceptance(2, 0)
    assert c.choose([2], 0) == [0]
    d = AdaptiveDepth(3, explore=4)
    for depth, t in [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]:
        _steady(d, depth, 16, t)
    trials = [s for s in range(1, 1000) if d.choose([3] * 16, 0) != [0] * 16]
    starts = [s for s in trials if s - 1 not in trials]
    assert 3 <= len(starts) <= 8 and starts[1] - starts[0] < starts[-1] - starts[-2]
    while d.hold or d.depth:
        d.choose([3] * 16, 0)
    idle = 0                                                # never idle within `margin` steps of a trial
    while d.idle(16, margin=3):
        idle += 1
    assert idle >= 1 and d.next_trial - d.steps == 3


def test_adaptive_cost_outside_measured_batch_sizes_keeps_ratio_to_depth_0():
    """Depth 2 measured only at 6 and 8 sequences, slightly cheaper at 8 (noise): a line through those two points
    would put it at 16 sequences below the cost of depth 1 and choose it; its ratio to depth 0 at 8 carries over
    instead, depths are never estimated cheaper than shallower ones, and no drafts is chosen."""
    a = AdaptiveDepth(2, explore=0)
    for seqs, t in [(6, 3.6), (8, 4.7), (16, 7.0)]:
        _steady(a, 0, seqs, t)
    _steady(a, 1, 8, 8.1)
    for seqs, t in [(6, 10.2), (8, 9.95)]:
        _steady(a, 2, seqs, t)
    assert a.cost(1, 16) == pytest.approx(8.1 * 7.0 / 4.7)
    assert a.cost(2, 16) == pytest.approx(9.95 * 7.0 / 4.7)
    assert a.cost(2, 7) == pytest.approx((10.2 + 9.95) / 2)            # between measured sizes: linear
    _steady(a, 1, 6, 11.0)                                              # noise: depth 1 above depth 2 at 6
    assert a.cost(2, 6) == pytest.approx(11.0)
    a.depth, a.hold, a.last_best = 0, 0, 0
    assert a.choose([2] * 16, 0) == [0] * 16


def test_reduced_draft_vocabulary_is_lossless_and_restricts_drafts():
    model = make_model(_cfg(), seed=9)
    ps = _prompts([8, 5])
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(model, max_num_seqs=2, block_size=4).generate(ps, sp, use_tqdm=False)]
    vocab = list(range(0, 512, 3))
    llm = LLM(model, max_num_seqs=2, block_size=4, speculative_config={"num_speculative_tokens": 2,
                                                                       "draft_vocab": vocab})
    seen = []
    inner = llm.engine.drafter.propose

    def propose(reqs, depths, *a):
        inner(reqs, depths, *a)
        seen.extend(t for r in reqs for t in r.draft_token_ids)
    llm.engine.drafter.propose = propose
    assert [o.outputs[0].token_ids for o in llm.generate(ps, sp, use_tqdm=False)] == ref
    assert seen and set(seen) <= set(vocab)
    cfg = SpeculativeConfig(num_speculative_tokens=1, draft_vocab_size=3, draft_vocab_counts=[0, 5, 1, 9, 2, 7])
    assert cfg.vocab(6).tolist() == [1, 3, 5]
    assert SpeculativeConfig(draft_vocab_size=2).vocab(6).tolist() == [0, 1]


# ------------------------------------------------------------------------------------------------ fused multi-row step


def test_fused_verify_and_draft_steps_equal_module_path():
    """bf16 weights: verification rows (k + 1 per sequence, each attending to its own sequence's keys up to its own
    position) and the MTP blocks' draft rows go through the fused C step (kernels.decode_layer); switched off, the
    same engine runs the modules (the reference). Same greedy tokens, logprobs within 1e-4, the same drafts
    accepted, across ring wraps and block boundaries with a ragged batch."""
    model = make_model(_cfg(), seed=12, dtype=torch.bfloat16)
    ps = _prompts([6, 13, 2])
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)

    def run(fused: bool):
        llm = LLM(model, max_num_seqs=4, block_size=4, speculative_config={"num_speculative_tokens": 2})
        runner = llm.engine.runner
        assert runner.fused is not None and runner.fused_mtp is not None
        calls = {"verify": 0, "mtp": 0}
        if fused:
            inner, inner_mtp = runner.fused.forward, runner.fused_mtp[0].forward

            def fwd(ids, pos, kinds):
                calls["verify"] += int(ids.shape[1] > len({int(r) for r in kinds[True].chunks.view(-1)}))
                return inner(ids, pos, kinds)

            def fwd_mtp(*a):
                calls["mtp"] += 1
                return inner_mtp(*a)
            runner.fused.forward, runner.fused_mtp[0].forward = fwd, fwd_mtp
            runner.mtp_pass = False               # the oracle's logits: FusedMTPLayer.forward (draft.c: below)
        else:
            runner.fused, runner.fused_mtp = None, None
        reference = {tuple(p["prompt_token_ids"]): p["prompt_token_ids"] + o.outputs[0].token_ids
                     for p, o in zip(ps, LLM(model, max_num_seqs=4, block_size=4).generate(ps, sp, use_tqdm=False))}
        _oracle_drafts(llm, reference, hit=0.7)
        return llm.generate(ps, sp, use_tqdm=False), calls

    (fast, calls), (slow, _) = run(True), run(False)
    assert calls["verify"] > 5 and calls["mtp"] > 5            # several rows of one sequence in one fused step
    for f, s in zip(fast, slow):
        assert f.outputs[0].token_ids == s.outputs[0].token_ids
        assert f.metrics.accepted_tokens == s.metrics.accepted_tokens
        for lf, ls in zip(f.outputs[0].logprobs, s.outputs[0].logprobs):
            t = next(iter(ls))
            assert abs(lf[t].logprob - ls[t].logprob) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mtp_ring_entries_before_key_from_are_masked(dtype):
    """A bounded MTP catch-up masks the ring entries before `Slice.key_from`: garbage written there changes nothing,
    while without key_from it does (the mask is real). Unwrapped and wrapped rings; torch rows path (fp32) and the
    fused C step (bf16)."""
    from mimoflash.engine.request import Request
    from mimoflash.engine.runner import Slice
    model = make_model(_cfg(), seed=4, dtype=dtype)
    llm = LLM(model, max_num_seqs=2, block_size=4, speculative_config={"num_speculative_tokens": 1})
    runner, cache = llm.engine.runner, llm.engine.cache
    R = llm.engine.layout.ring_slots
    _, k_pool, v_pool = cache.pools(model.config.num_hidden_layers)        # MTP block 0's ring
    req = Request("x", [1], SamplingParams())
    req.ring_id = 1
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, model.config.hidden_size, generator=g)
    for q in (R - 2, 2 * R + 1):                                            # ring not wrapped / wrapped
        kf = q - 1
        k_pool.copy_(torch.randn(k_pool.shape, generator=g))
        v_pool.copy_(torch.randn(v_pool.shape, generator=g))

        def run(key_from):
            return runner.execute_mtp(0, [Slice(req, q, [7], "last", key_from)], hidden).clone()

        base, unmasked = run(kf), run(0)
        slots = [req.ring_id * R + p % R for p in range(max(0, q - R + 1), kf)]
        k_pool[:, slots] = torch.randn(k_pool[:, slots].shape, generator=g).to(k_pool.dtype)
        v_pool[:, slots] = torch.randn(v_pool[:, slots].shape, generator=g).to(v_pool.dtype)
        assert torch.equal(run(kf), base)
        assert not torch.allclose(run(0), unmasked)


@pytest.mark.parametrize("reduced", [False, True])
def test_draft_pass_in_one_call_equals_fused_layer_and_head(reduced):
    """kernels.mtp_pass (kernels/draft.c, FusedMTPLayer.draft) against FusedMTPLayer.forward + the head + argmax
    (runner.mtp_pass off): the same logits bit for bit and the same argmax, for one row and several (the last
    wanted, or every one), unwrapped and wrapped rings, a masked key_from, the full and a reduced head; the K/V it
    stores are the same too (the reference reads them after it)."""
    from mimoflash.engine.request import Request
    from mimoflash.engine.runner import Slice
    model = make_model(_cfg(), seed=5, dtype=torch.bfloat16)
    llm = LLM(model, max_num_seqs=2, block_size=4, speculative_config={"num_speculative_tokens": 2})
    runner, cache = llm.engine.runner, llm.engine.cache
    assert runner.fused_mtp is not None
    R, H = llm.engine.layout.ring_slots, model.config.hidden_size
    head = model.lm_head.weight[:300].contiguous() if reduced else None
    req = Request("x", [1], SamplingParams())
    req.ring_id = 1
    g = torch.Generator().manual_seed(1)
    calls = []
    inner = runner.fused_mtp[1].draft
    runner.fused_mtp[1].draft = lambda *a: calls.append(inner(*a)) or calls[-1]
    for q, n, rows, kf in [(2, 1, "last", 0), (R - 2, 3, "last", 0), (2 * R + 1, 2, "last", 2 * R - 1),
                           (3 * R + 2, 3, "all", 0)]:
        _, k_pool, v_pool = cache.pools(model.config.num_hidden_layers + 1)     # MTP block 1's ring
        k_pool.copy_(torch.randn(k_pool.shape, generator=g))
        v_pool.copy_(torch.randn(v_pool.shape, generator=g))
        hidden = torch.randn(n, H, generator=g)
        sl = [Slice(req, q - n + 1, torch.randint(0, 512, (n,), generator=g).tolist(), rows, kf)]
        out = {}
        for fast in (False, True):
            runner.mtp_pass = fast
            k0 = k_pool.clone()
            out[fast] = (runner.execute_mtp(1, sl, hidden, head), runner.draft_greedy(1, sl, hidden, head),
                         k_pool.clone())
            k_pool.copy_(k0)
        assert torch.equal(out[True][0], out[False][0]) and out[True][0].shape[0] == (n if rows == "all" else 1)
        assert out[True][1] == out[False][1] == out[False][0].argmax(-1).tolist()
        assert torch.equal(out[True][2], out[False][2]) and not torch.equal(out[True][2], k0)
    assert len(calls) == 8 and all(c is not None for c in calls)          # every fast pass was one C call


def test_greedy_draft_passes_in_one_call_equal_pass_by_pass():
    """MTPDrafter._propose_chain (every greedy pass of a step in one ModelRunner.draft_chain call, kernels/draft.c
    making each pass's ring metadata) against the passes run one by one (drafter.chain off): the same drafts at every
    step, the same MTP rings' K/V, the same tokens, with ragged prompts, a reused last block (3 drafts, 2 blocks),
    catch-ups that mask older ring entries (key_from) and rings that wrap; the chain is what ran."""
    model = make_model(_cfg(), seed=6, dtype=torch.bfloat16)
    ps = _prompts([3, 9, 5])
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def run(chain: bool):
        with pytest.warns(UserWarning, match="reuse the last MTP layer"):
            llm = LLM(model, max_num_seqs=3, block_size=4, speculative_config={"num_speculative_tokens": 3})
        d, runner = llm.engine.drafter, llm.engine.runner
        d.chain = chain
        drafts, chained = [], []
        inner_propose, inner_chain = d.propose, runner.draft_chain

        def propose(reqs, depths, *a):
            inner_propose(reqs, depths, *a)
            drafts.append([list(r.draft_token_ids) for r in reqs])
        d.propose = propose
        runner.draft_chain = lambda *a: chained.append(inner_chain(*a)) or chained[-1]
        outs = [o.outputs[0].token_ids for o in llm.generate(ps, sp, use_tqdm=False)]
        rings = [llm.engine.cache.pools(i)[1].clone() for i in range(model.config.num_hidden_layers,
                                                                      model.config.num_hidden_layers + 2)]
        return outs, drafts, rings, chained

    (o1, d1, k1, c1), (o0, d0, k0, c0) = run(True), run(False)
    assert o1 == o0 and d1 == d0 and len(d1) > 10
    assert all(torch.equal(a, b) for a, b in zip(k1, k0))
    assert not c0 and len(c1) > 10 and all(c is not None for c in c1)


def test_draft_chain_masks_like_the_rows_path():
    """ModelRunner.draft_chain's masks, made in C (kernels/draft.c), against the rows path's (`_ring_rows`) on
    rings full of large random keys: a pass's draft feeding the next pass's rows, key_from masking older entries,
    unwrapped and wrapped rings, one and three rows; the same drafts as the passes run one by one (draft_greedy)."""
    from mimoflash.engine.request import Request
    from mimoflash.engine.runner import Slice
    model = make_model(_cfg(), seed=8, dtype=torch.bfloat16)
    llm = LLM(model, max_num_seqs=2, block_size=4, speculative_config={"num_speculative_tokens": 2})
    runner, cache = llm.engine.runner, llm.engine.cache
    R, H, L = llm.engine.layout.ring_slots, model.config.hidden_size, model.config.num_hidden_layers
    req = Request("x", [1], SamplingParams())
    req.ring_id = 1
    g = torch.Generator().manual_seed(2)
    for q, n, kf in [(R - 2, 3, R - 3), (2 * R + 1, 1, 0), (2 * R + 1, 3, 2 * R), (3 * R, 2, 0)]:
        pools = [p for i in (L, L + 1) for p in cache.pools(i)[1:]]
        for p in pools:
            p.copy_(10 * torch.randn(p.shape, generator=g))
        saved = [p.clone() for p in pools]
        hidden = [torch.randn(n, H, generator=g), torch.randn(n, H, generator=g)]
        known = torch.randint(0, 512, (n,), generator=g).tolist()
        d1 = runner.draft_greedy(0, [Slice(req, q - n + 1, known, "last", kf)], hidden[0])[0]
        d2 = runner.draft_greedy(1, [Slice(req, q - n + 1, known[1:] + [d1], "last", kf)], hidden[1])[0]
        for p, v in zip(pools, saved):
            p.copy_(v)
        got = runner.draft_chain([(0, [Slice(req, q - n + 1, known, "last", kf)], hidden[0], [0]),
                                  (1, [Slice(req, q - n + 1, known[1:] + [-1], "last", kf)], hidden[1], [1])],
                                 None, None, 2)
        assert got == [d1, d2]


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_mtp_flags_as_a_user_runs_them():
    """`mimoflash generate --mtp K [--mtp-adaptive]` on the shipped model: the same greedy tokens as without, the
    stats line shows tokens per verify step; bad values are one-line usage errors (exit 2)."""
    import json
    import os
    import subprocess
    import sys

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "mimoflash", "generate", "def area(r):\n", "--max-tokens", "24",
                               "--temperature", "0", "--threads", "1", "--json", *extra], capture_output=True, text=True,
                              env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"), timeout=300)
    plain, spec = run(), run("--mtp", "3", "--mtp-adaptive")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr[-2000:]
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (plain, spec))
    assert a["outputs"][0]["token_ids"] == b["outputs"][0]["token_ids"]
    assert b["metrics"]["verify_steps"] > 0 and "tokens per verify step" in spec.stderr
    assert "tokens per verify step" not in plain.stderr
    bad = subprocess.run([sys.executable, "-m", "mimoflash", "generate", "x", "--mtp-adaptive"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--mtp-adaptive needs --mtp" in bad.stderr and "Traceback" not in bad.stderr


def test_adaptive_engine_decodes_several_steps_per_call_once_it_stops_drafting():
    """Random MTP layers (drafts almost never accepted): adaptive depth settles on depth 0, and from then on the
    engine decodes those steps several per call (multi-step runs, reported back to adaptive depth) with the tokens
    of plain decoding."""
    model = make_model(_cfg(), seed=4)
    ps = _prompts([5, 9])
    sp = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(model, max_num_seqs=2, block_size=4).generate(ps, sp, use_tqdm=False)]
    llm = LLM(model, max_num_seqs=2, block_size=4, speculative_config={"num_speculative_tokens": 1, "adaptive": True})
    eng, runs = llm.engine, []
    inner = eng._run_steps

    def run_steps(batch):
        runs.append(batch.num_steps)
        return inner(batch)
    eng._run_steps = run_steps
    assert [o.outputs[0].token_ids for o in llm.generate(ps, sp, use_tqdm=False)] == ref
    assert eng.drafter.adaptive.best.get(2) == 0
    assert len(runs) >= 5 and sum(runs) >= 80, runs


@pytest.mark.parametrize("greedy,dtype", [(True, torch.bfloat16), (False, torch.bfloat16), (True, torch.float32)])
def test_plain_runs_keep_the_hidden_states_a_trial_reads(greedy, dtype):
    """Steps adaptive depth is sure not to draft in run several per call up to the next trial: each run's final
    hidden states (kernels.decode_steps writing them per step; sampled rows: one C call a step; fp32 weights: the
    Python loop) reach the drafter's buffer at the positions single steps would have left them, bit for bit, so a
    trial's catch-up reads what it would have."""
    model = make_model(_cfg(), seed=4, dtype=dtype)
    ps = _prompts([5, 9])
    sp = (SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) if greedy
          else SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True))

    def run(steps: int):
        llm = LLM(model, max_num_seqs=2, block_size=4, num_scheduler_steps=steps,
                  speculative_config={"num_speculative_tokens": 1, "adaptive": True})
        a, d, kept, runs = llm.engine.drafter.adaptive, llm.engine.drafter, [], []
        inner_run = llm.engine._run_steps
        llm.engine._run_steps = lambda batch: runs.append(batch.num_steps) or inner_run(batch)
        a.choose = lambda caps, other: [0] * len(caps)            # never drafts ...
        a.plain_steps = lambda sequences, margin: 8 if steps > 1 else 0   # ... and runs as plain decoding
        a.idle = lambda sequences, margin: False                   # (single steps: keep every hidden state)
        inner = d.observe
        d.observe = lambda spans, hidden: kept.extend(
            (r.request_id, s + i, hidden[lo + i].clone()) for r, s, lo, n in spans for i in range(n)) or inner(spans,
                                                                                                              hidden)
        outs = [o.outputs[0].token_ids for o in llm.generate(ps, sp, use_tqdm=False)]
        assert (sum(runs) >= 30) == (steps > 1)
        return outs, {(rid, p): h for rid, p, h in kept}

    (o8, k8), (o1, k1) = run(8), run(1)
    assert o8 == o1
    assert len(k8) >= 60 and set(k8) <= set(k1)       # (a request's last run finishes it: nothing left to keep)
    assert all(torch.equal(k8[key], k1[key]) for key in k8)
