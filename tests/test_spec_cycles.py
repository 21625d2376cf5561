"""Greedy speculative cycles in one C call (kernels/speculate.c, ModelRunner.spec_cycles, MTPDrafter.cycles,
LLMEngine._spec_run) against the engine's own steps (num_scheduler_steps=1: verify, accept, draft from Python):
the same tokens, metrics and drafts, the same drafter state, every KV pool bit for bit, caches back to their initial
state; the C loop is what ran."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import make_model, tiny_config
from mimoflash import LLM, SamplingParams, kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the C kernels did not build on this machine")


@torch.no_grad()
def _agreeing_model(nl: int, seed: int, mix: float):
    """A random bf16 tiny model (window 4, blocks of 4) whose MTP blocks mostly agree with it, so that cycles accept
    long runs of drafts and reject some: the main model's attention and MLP outputs scaled by `mix` (the embedding
    then mostly decides the next token), each MTP block's eh_proj passing its token's normed embedding through and
    its block's outputs scaled the same way, all norms ones."""
    model = make_model(tiny_config(num_nextn_predict_layers=nl, vocab_size=64), seed=seed)
    H = model.config.hidden_size
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
            p.mul_(mix)
        elif name.endswith("eh_proj.weight"):
            p.zero_()
            p[:, :H] = torch.eye(H)
    return model.cast(torch.bfloat16).eval()


def _spec_llm(model, steps: int, k: int, vocab: int | None = None, **kw) -> LLM:
    """An engine drafting k tokens, blocks of 4, `steps` cycles per call at most (1: the engine's own steps)."""
    spec = {"num_speculative_tokens": k, **({"draft_vocab_size": vocab} if vocab else {}), **kw.pop("spec", {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # (more drafts than MTP blocks: the last reused)
        return LLM(model, **{"max_num_seqs": 1, "block_size": 4, **kw}, num_scheduler_steps=steps,
                   speculative_config=spec, progress=False)


def _run(model, prompts, sp, steps: int, k: int, vocab: int | None = None):
    """Each prompt alone (a C run needs its sequence alone) -> (outputs, every pool, the C runs made, the llm)."""
    llm = _spec_llm(model, steps, k, vocab, max_num_seqs=2)
    runner = llm.engine.runner
    runs = []
    inner = runner.spec_cycles
    runner.spec_cycles = lambda *a, **kw: runs.append(inner(*a, **kw)) or runs[-1]
    outs = []
    for p in prompts:
        outs.append(llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0])
    return outs, _pools(llm.engine), runs, llm


def _pools(e) -> list[torch.Tensor]:
    """Every layer's K and V pool (main layers and MTP blocks), copied."""
    return [t.clone() for i in range(len(e.layout.sliding_layers) + len(e.layout.global_layers))
            for t in e.cache.pools(i)[1:]]


@pytest.mark.parametrize("nl,k,mix,vocab", [(1, 1, 0.05, None), (2, 2, 0.05, None), (3, 3, 0.1, None),
                                            (2, 4, 0.1, None), (3, 3, 0.3, 24), (1, 3, 1.0, None)])
def test_cycles_in_one_call_equal_the_engine_steps(nl, k, mix, vocab):
    """Window 4 and blocks of 4 (rings wrap every few cycles; cycles cross block boundaries), prompts of 1-13
    tokens, 60 new tokens: 1-3 MTP blocks, 1-4 drafts (4 drafts with 2 blocks: the last reused), a reduced draft
    vocabulary, mostly-accepting and mostly-rejecting models. The same tokens, verify steps and accepted tokens by
    position, and every pool (main layers and MTP rings, K and V) bit for bit as the engine's steps leave them."""
    model = _agreeing_model(nl, seed=nl + k, mix=mix)
    g = torch.Generator().manual_seed(k)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (1, 6, 13)]
    sp = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    got, pools, runs, llm = _run(model, prompts, sp, 8, k, vocab)
    ref, ref_pools, ref_runs, _ = _run(model, prompts, sp, 1, k, vocab)
    assert not ref_runs and runs and all(r is not None for r in runs)
    assert sum(r[0] for r in runs) >= 10                         # cycles run in C
    for a, b in zip(got, ref, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        ma, mb = a.metrics, b.metrics
        assert (ma.verify_steps, ma.accepted_tokens, ma.acceptance_per_position) == (
            mb.verify_steps, mb.accepted_tokens, mb.acceptance_per_position)
    assert all(torch.equal(x, y) for x, y in zip(pools, ref_pools, strict=True))
    if mix <= 0.1:                                               # the agreeing models accept long runs
        assert sum(o.metrics.accepted_tokens for o in got) > 20
    e = llm.engine
    assert e.kv.num_free_blocks == e.layout.num_blocks and not e.drafter.states


def test_cycles_hand_back_drafter_state_and_drafts():
    """After each engine step (a C run of cycles, or the Python steps' one cycle), the drafter's state (kept hidden
    states, each block's done / key_from / tentative entries) and the request's next drafts are those of the engine
    steps at the same token count (a C run ends where an engine step ends too: at a token count both reach)."""
    model = _agreeing_model(3, seed=7, mix=0.1)
    prompt = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(1)).tolist()

    def states(steps: int):
        e = _spec_llm(model, steps, 3).engine
        rid = e.add_request(prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        at = {}
        while e.has_unfinished_requests():
            e.step()
            req = e.scheduler.requests.get(rid)
            if req is not None:
                st = e.drafter.state(req)
                at[len(req.output_token_ids)] = (list(req.draft_token_ids), st.h0, st.end, list(st.done),
                                                 list(st.key_from), [dict(t) for t in st.tentative])
        return at

    c, py = states(8), states(1)
    common = sorted(set(c) & set(py))
    assert len(common) >= 4 and len(c) < len(py)                 # fewer engine steps: several cycles a step
    for n in common:
        assert c[n] == py[n], n


def test_stop_ids_and_budgets_end_a_run_where_the_steps_end():
    """A stop token met inside a cycle's accepted drafts, max_tokens reached mid-run (the last cycles verify fewer
    drafts, then none) or before any verification: the same tokens and finish reasons as the engine's steps."""
    model = _agreeing_model(2, seed=7, mix=0.05)           # (a greedy run that meets new tokens until ~30)
    prompt = torch.randint(0, 64, (5,), generator=torch.Generator().manual_seed(2)).tolist()
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = _run(model, [prompt], base, 1, 3)[0][0].outputs[0].token_ids
    stop_tok = next(t for i, t in enumerate(ref) if i >= 14 and t not in ref[:i])     # first met at i >= 14
    for sp in (SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_tok]),
               SamplingParams(temperature=0, max_tokens=23, ignore_eos=True),
               SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)):
        (a,), _, runs, llm = _run(model, [prompt], sp, 8, 3)
        (b,), _, _, _ = _run(model, [prompt], sp, 1, 3)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert (a.outputs[0].finish_reason, a.outputs[0].stop_reason) == (b.outputs[0].finish_reason,
                                                                           b.outputs[0].stop_reason)
        assert len(a.outputs[0].token_ids) <= sp.max_tokens
        assert bool(runs) == (sp.max_tokens > 2)
        assert sp.stop_token_ids == [] or a.outputs[0].stop_reason == stop_tok
        e = llm.engine
        assert e.kv.num_free_blocks == e.layout.num_blocks


def test_the_context_length_ends_a_run_where_the_steps_end():
    """max_model_len reached mid-run (the last cycles verify fewer drafts, then none): the same tokens, finish reason
    and cache accounting as the engine's steps."""
    model = _agreeing_model(2, seed=7, mix=0.05)
    prompt = torch.randint(0, 64, (5,), generator=torch.Generator().manual_seed(2)).tolist()
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    got = []
    for steps in (8, 1):
        llm = _spec_llm(model, steps, 3, max_model_len=41)
        runs = []
        inner = llm.engine.runner.spec_cycles
        llm.engine.runner.spec_cycles = lambda *a, **kw: runs.append(inner(*a, **kw)) or runs[-1]
        out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0]
        got.append((out.token_ids, out.finish_reason))
        assert bool(runs) == (steps > 1)
        assert llm.engine.kv.num_free_blocks == llm.engine.layout.num_blocks
    assert got[0] == got[1] and got[0][1] == "length" and len(prompt) + len(got[0][0]) == 41


def test_a_catch_up_the_c_loop_does_not_take_goes_to_the_drafter():
    """A block whose ring lags (its rows would exceed what the rows path takes): the C run stops after that cycle's
    verification with the drafting left to MTPDrafter.propose (a catch-up stored pass by pass), and the outputs and
    pools are those of the engine's steps with the same lag."""
    model = _agreeing_model(2, seed=4, mix=0.1)
    prompt = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    def run(steps: int):
        e = _spec_llm(model, steps, 2).engine
        drafted = []                                              # per C run: whether it made the next drafts
        inner = e.drafter.cycles
        e.drafter.cycles = lambda *a: (lambda got: drafted.append(got and got[1]) or got)(inner(*a))
        rid = e.add_request(prompt, sp)
        e.step()                                                  # the prefill, then its drafts
        st = e.drafter.state(e.scheduler.requests[rid])
        st.done[0] -= 6                                           # block 0's ring lags 6 positions
        tokens = []
        while e.has_unfinished_requests():
            tokens += [t for o in e.step() for t in o.outputs[0].token_ids]
        return tokens, _pools(e), drafted

    (tc, pc, dc), (tp, pp, dp) = run(8), run(1)
    assert dc[0] is False and True in dc and not dp              # the first run left its drafting to Python
    assert tc == tp
    assert all(torch.equal(x, y) for x, y in zip(pc, pp, strict=True))


def test_shipped_model_cycles_equal_plain_decoding_with_stop_strings():
    """The shipped model (3 trained MTP heads, window 128: rings wrap in 200 tokens), 3 drafts from the full and
    from a reduced vocabulary: greedy tokens equal MTP off, whole runs of cycles in C, > 2 tokens per verification;
    a stop string ends the text where the engine's steps end it."""
    import mimoflash
    path = mimoflash.default_model()
    prompt = "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n"
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    off = LLM(path, max_num_seqs=1, progress=False).generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    for vocab in (None, 1024):
        spec = {"num_speculative_tokens": 3, **({"draft_vocab_size": vocab} if vocab else {})}
        llm = LLM(path, max_num_seqs=1, progress=False, speculative_config=spec)
        runs = []
        inner = llm.engine.runner.spec_cycles
        llm.engine.runner.spec_cycles = lambda *a, **kw: runs.append(inner(*a, **kw)) or runs[-1]
        got = llm.generate([prompt], sp, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == off.token_ids and got.outputs[0].text == off.text
        assert sum(r[0] for r in runs) >= 0.8 * got.metrics.verify_steps and got.metrics.tokens_per_verify_step > 2
    stop = off.text[60:64]
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, stop=[stop])
    texts = [LLM(path, max_num_seqs=1, progress=False, num_scheduler_steps=n,
                 speculative_config={"num_speculative_tokens": 3}).generate([prompt], sp, use_tqdm=False)[0].outputs[0]
             for n in (8, 1)]
    assert texts[0].text == texts[1].text == off.text[:off.text.index(stop)]
    assert texts[0].finish_reason == texts[1].finish_reason == "stop"


def test_adaptive_depth_runs_its_held_and_chosen_depth_in_c():
    """With adaptive depth, a lone greedy request's cycles at the depth it chose run in C too (while that depth is
    held, and then while it stays the best rate), reported with `AdaptiveDepth.ran`: the same tokens as MTP off,
    runs at depth > 0 made, and every step counted."""
    model = _agreeing_model(3, seed=6, mix=0.05)
    prompt = torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(5)).tolist()
    sp = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    off = LLM(model, max_num_seqs=1, block_size=4, progress=False).generate([{"prompt_token_ids": prompt}], sp,
                                                                             use_tqdm=False)[0]
    llm = _spec_llm(model, 8, 3, spec={"adaptive": True})
    a = llm.engine.drafter.adaptive
    runs, depths = [], []
    inner = llm.engine.runner.spec_cycles
    llm.engine.runner.spec_cycles = lambda req, n, state, *r, **kw: (
        depths.append(int(state[kernels.SPEC_DEPTH])) or runs.append(inner(req, n, state, *r, **kw)) or runs[-1])
    got = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
    assert got.outputs[0].token_ids == off.outputs[0].token_ids
    assert runs and min(depths) >= 1 and sum(r[0] for r in runs) >= 10
    assert a.steps >= got.metrics.verify_steps                    # each cycle counted as a step


def test_adaptive_run_length_and_ran():
    """`run_length`: 0 at depth 0, up to the hold (or the verifications a held depth waits for), 0 when a trial
    is due or another depth's predicted rate is better by the margin, else up to the next trial. `ran`: steps,
    hold and wait advance by the cycles; after the depth settled, its cost per step is the run's and single steps
    at that depth are no longer recorded."""
    from mimoflash.engine.speculative import AdaptiveDepth
    a = AdaptiveDepth(3, explore=32)
    a.sequences, a.depth = 1, 0
    assert a.run_length(8, [3]) == 0
    a.depth, a.hold, a.need, a.cap = 2, 3, 16, 15
    assert a.run_length(8, [3]) == 8 and a.run_length(2, [3]) == 2
    a.run = 1
    a.ran(8, 0.008)                                # the first run at a depth is not recorded (catch-up)
    assert (a.steps, a.hold, a.cap) == (8, 0, 7) and 2 not in a.step_time
    a.need = 0
    a.step_time = {0: {1: 1.0e-3}, 1: {1: 1.2e-3}, 2: {1: 1.3e-3}}
    a.hits, a.judged = [90.0, 80.0, 0.0], [100.0, 90.0, 0.0]
    a.next_trial = 100
    assert a.run_length(8, [3]) == 8
    a.ran(8, 0.008)
    assert a.step_time[2][1] == pytest.approx(1.0e-3) and (2, 1) in a._runs
    a.record_step(5.0)                              # a single step at a depth its runs measure: not recorded
    assert a.step_time[2][1] == pytest.approx(1.0e-3)
    a.next_trial = a.steps + 3
    assert a.run_length(8, [3]) == 3
    a.next_trial = a.steps
    assert a.run_length(8, [3]) == 0
    a.next_trial = 1000
    a.step_time[2][1] = 5e-3                       # depth 2 now much slower: depth 1's rate is better
    assert a.run_length(8, [3]) == 0


def test_fp8_checkpoint_cycles_equal_steps_and_expert_statistics(tmp_path):
    """A block-FP8 checkpoint (FP8 projections and experts, the experts read through an unbounded expert store, MTP
    blocks included): runs of cycles in C give the tokens and pools of the engine's steps, and the expert store's
    counters, cache order and keys read end where the steps leave them (each cycle's verification counted after the
    run, as a step of k + 1 rows)."""
    from mimoflash.checkpoint.saver import save_model
    model = _agreeing_model(2, seed=8, mix=0.05)
    ckpt = save_model(model, tmp_path / "ckpt", dtype=torch.bfloat16, fp8=True, fp8_block_size=(16, 128))
    prompt = torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    got = {}
    for steps in (8, 1):
        llm = LLM(ckpt, max_num_seqs=1, block_size=4, num_scheduler_steps=steps, progress=False,
                  speculative_config={"num_speculative_tokens": 2})
        store, runs = llm.expert_store, []
        assert store is not None and llm.engine.runner.fused is not None
        inner = llm.engine.runner.spec_cycles
        llm.engine.runner.spec_cycles = lambda *a, **kw: runs.append(inner(*a, **kw)) or runs[-1]
        out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
        got[steps] = (out.outputs[0].token_ids, out.metrics.accepted_tokens, _pools(llm.engine),
                      store.stats().as_dict(), store.resident_keys(), store.touched_keys())
        assert bool(runs) == (steps > 1) and all(r is not None for r in runs)
    (t8, a8, p8, *s8), (t1, a1, p1, *s1) = got[8], got[1]
    assert t8 == t1 and a8 == a1 > 5
    assert all(torch.equal(x, y) for x, y in zip(p8, p1, strict=True))
    assert s8 == s1 and s1[0]["steps"] > 10


def test_catch_up_in_one_call_equals_the_modules(monkeypatch):
    """An MTP block's catch-up (ModelRunner.fill_mtp_kv: only the K/V of rows the ring lacks) in one C call
    (FusedMTPLayer.fill, kernels.mtp_pass with no wanted row) against the block's modules: the same slots written,
    the K/V within float rounding of the modules' (their RoPE is torch's), nothing else in the ring touched."""
    from mimoflash.engine.runner import Slice
    model = _agreeing_model(2, seed=9, mix=0.3)
    e = _spec_llm(model, 8, 2).engine
    prompt = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(6)).tolist()
    rid = e.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    e.step()                                                      # a ring for the request
    req, runner = e.scheduler.requests[rid], e.runner
    L, H, n = model.config.num_hidden_layers, model.config.hidden_size, e.layout.ring_slots - 1
    hidden = torch.randn(n, H, generator=torch.Generator().manual_seed(7))
    slices = [Slice(req, 3, torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(8)).tolist())]
    calls = []
    inner = kernels.mtp_pass
    monkeypatch.setattr(kernels, "mtp_pass", lambda *a, **kw: calls.append(a[6].numel()) or inner(*a, **kw))
    for layer in (0, 1):
        _, k_pool, v_pool = e.cache.pools(L + layer)
        before = (k_pool.clone(), v_pool.clone())
        got = []
        for c in (True, False):
            k_pool.copy_(before[0])
            v_pool.copy_(before[1])
            runner.mtp_pass = c
            runner.fill_mtp_kv(layer, slices, hidden)
            got.append((k_pool.clone(), v_pool.clone()))
        runner.mtp_pass = True
        assert calls == [0] * (layer + 1)                         # one C call (no wanted row) per C catch-up
        (kc, vc), (km, vm) = got
        changed = (kc != before[0]).any(-1).any(0) | (km != before[0]).any(-1).any(0)
        assert int(changed.sum()) == n                            # the rows' slots, in both
        assert torch.allclose(kc, km, atol=1e-5, rtol=1e-4) and torch.allclose(vc, vm, atol=1e-5, rtol=1e-4)
        assert torch.equal(kc[:, ~changed], before[0][:, ~changed])


def test_layout_constants_match_speculate_c():
    """kernels.SPEC_* (the Python side of mf_spec_cycles's int64 field tables) against speculate.c's enums."""
    src = (Path(kernels.__file__).with_name("speculate.c")).read_text()
    hdr = (Path(kernels.__file__).with_name("mimoflash_kernels.h")).read_text()

    def enum_size(first: str, last: str) -> int:
        body = re.search(r"enum \{\s*(" + first + r".*?)\};", src, re.S).group(1)
        names = [re.sub(r"/\*.*?\*/", "", n, flags=re.S).strip() for n in body.split(",")]
        names = [n for n in names if n]
        assert names[-1] == last
        return len(names) - 1

    assert enum_size("MM_L", "MF_SPEC_MAIN") == kernels.SPEC_MAIN
    assert enum_size("MT_NBLK", "MF_SPEC_MTP") == kernels.SPEC_MTP
    assert enum_size("MB_LAYER", "MF_SPEC_BLOCK") == kernels.SPEC_BLOCK
    m = re.search(r"enum \{ MF_SPEC_BLOCKS = (\d+), MF_SPEC_DRAFTS = (\d+) \}", hdr)
    assert (int(m.group(1)), int(m.group(2))) == (kernels.SPEC_BLOCKS, kernels.SPEC_DRAFTS)
    body = src[src.index("    ST_POS,"):src.index("MF_SPEC_STATE =")]
    assert re.findall(r"\b(ST_[A-Z0-9_]+)\b(?! \+)", re.sub(r"/\*.*?\*/", "", body, flags=re.S))[:7] == [
        "ST_POS", "ST_DEPTH", "ST_OUT_LEFT", "ST_LEN_LEFT", "ST_H0", "ST_END", "ST_DRAFTS"]
    assert (kernels.SPEC_POS, kernels.SPEC_DEPTH, kernels.SPEC_OUT_LEFT, kernels.SPEC_LEN_LEFT, kernels.SPEC_H0,
            kernels.SPEC_END, kernels.SPEC_DRAFTS_AT) == tuple(range(7))
    blocks, drafts = kernels.SPEC_BLOCKS, kernels.SPEC_DRAFTS
    assert kernels.SPEC_STATE == 6 + drafts + 4 * blocks + blocks * drafts
