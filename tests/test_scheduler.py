"""Scheduler policy with no model: admission, chunked prefill mixed with decodes, preemption, abort, token stops.
A fake "runner" just returns token 7 for every sampled row."""

import pytest

from mimoflash.engine.kv_cache import CacheLayout, KVCacheManager
from mimoflash.engine.request import Request, RequestStatus
from mimoflash.engine.sampling import SamplingParams
from mimoflash.engine.scheduler import Batch, ScheduledRequest, Scheduler, SchedulerConfig


def make(num_blocks=64, num_rings=4, block_size=4, **cfg):
    lay = CacheLayout((0,), (1,), (1, 8, 8), (1, 8, 8), block_size, num_blocks, 5, num_rings, 5, None)
    return Scheduler(SchedulerConfig(**{"max_num_seqs": 4, "max_num_batched_tokens": 8, "max_model_len": 256,
                                        **cfg}), KVCacheManager(lay))


def req(rid, n_prompt, max_tokens=100, **params):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **params),
                   eos_token_ids=frozenset({0}))


def step(s, token=7):
    batch = s.schedule()
    s.postprocess(batch, [token if it.sample else None for it in batch.items])
    return batch


def shape(batch):
    return [(it.request.request_id, it.start, it.num_tokens, it.sample) for it in batch.items]


def test_chunked_prefill_mixes_with_decodes():
    s = make()
    s.add(req("a", 3))
    assert shape(step(s)) == [("a", 0, 3, True)]
    s.add(req("b", 13))
    # a decodes (1 token) and b's prefill takes the rest of the 8-token budget, then continues next step
    assert shape(step(s)) == [("a", 3, 1, True), ("b", 0, 7, False)]
    assert shape(step(s)) == [("a", 4, 1, True), ("b", 7, 6, True)]
    assert shape(step(s)) == [("a", 5, 1, True), ("b", 13, 1, True)]


def test_without_chunking_a_prompt_waits_until_it_fits_whole():
    s = make(enable_chunked_prefill=False)
    s.add(req("a", 3))
    step(s)
    s.add(req("b", 8))
    assert shape(step(s)) == [("a", 3, 1, True)]                 # 1 + 8 > 8: b waits (FCFS, no skipping)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        s.add(req("c", 9))


def test_admission_limits():
    s = make(num_rings=2, max_num_batched_tokens=64)
    for r in "abc":
        s.add(req(r, 2))
    assert [it.request.request_id for it in step(s).items] == ["a", "b"]      # two rings only
    s2 = make(max_num_seqs=1, max_num_batched_tokens=64)
    s2.add(req("a", 2))
    s2.add(req("b", 2))
    assert len(step(s2).items) == 1
    with pytest.raises(ValueError, match="max_model_len"):
        s2.add(req("long", 256))


def test_preempts_youngest_when_blocks_run_out_and_recomputes_it():
    s = make(num_blocks=4, max_num_batched_tokens=64)                # 16 tokens of global cache in all
    a, b = req("a", 7), req("b", 7)
    s.add(a)
    s.add(b)
    step(s)                                                          # a: 2 blocks, b: 2 blocks
    assert s.kv.num_free_blocks == 0
    batch = step(s)                                                  # both at 8 tokens: still fit
    batch = step(s)                                                  # a needs a 3rd block -> b (younger) goes
    assert [r.request_id for r in batch.preempted] == ["b"] and shape(batch) == [("a", 8, 1, True)]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and not b.block_ids
    assert b.ring_id is None and s.waiting[0] is b and b.num_preemptions == 1
    assert b.output_token_ids == [7, 7]                              # its tokens survive the preemption
    a_out = list(a.output_token_ids)
    s.abort("a")
    batch = step(s)
    assert shape(batch) == [("b", 0, 9, True)]                       # recompute prompt + outputs, then sample
    assert a.finish_reason == "abort" and a_out == a.output_token_ids


def test_lone_request_that_outgrows_the_cache_finishes_with_length():
    s = make(num_blocks=2, max_num_batched_tokens=64)
    r = req("a", 6)
    s.add(r)
    while s.has_unfinished():
        step(s)
    assert r.finish_reason == "length" and r.num_tokens == 9
    assert s.kv.num_free_blocks == 2 and s.kv.num_free_rings == 4


def test_abort_frees_cache_at_once():
    s = make(max_num_batched_tokens=64)
    free = (s.kv.num_free_blocks, s.kv.num_free_rings)
    reqs = [req(r, 9) for r in "abc"]
    for r in reqs:
        s.add(r)
    step(s)
    step(s)
    s.add(req("d", 3))
    assert s.abort("b") and s.abort("d") and not s.abort("zzz")
    assert (s.kv.num_free_blocks, s.kv.num_free_rings) == (free[0] - 6, free[1] - 2)
    for r in ("a", "c"):
        s.abort(r)
    assert (s.kv.num_free_blocks, s.kv.num_free_rings) == free and not s.has_unfinished()
    assert all(r.finish_reason == "abort" for r in reqs)


@pytest.mark.parametrize("params,token,reason,stop_reason,n_out", [
    ({}, 0, "stop", None, 1),                                # eos
    ({"ignore_eos": True, "max_tokens": 3}, 0, "length", None, 3),
    ({"stop_token_ids": [7]}, 7, "stop", 7, 1),
    ({"max_tokens": 4}, 7, "length", None, 4),
])
def test_token_level_stops(params, token, reason, stop_reason, n_out):
    s = make(max_num_batched_tokens=64)
    r = req("a", 3, **params)
    s.add(r)
    while s.has_unfinished():
        step(s, token)
    assert (r.finish_reason, r.stop_reason, len(r.output_token_ids)) == (reason, stop_reason, n_out)
    assert r.first_token_time is not None and r.finish_time >= r.first_token_time


def test_max_model_len_stops_generation():
    s = make(max_num_batched_tokens=64, max_model_len=10)
    r = req("a", 6)
    s.add(r)
    while s.has_unfinished():
        step(s)
    assert r.finish_reason == "length" and r.num_tokens == 10


def test_reserve_steps_for_a_multi_step_run():
    """Only a batch of one-token decodes with nobody waiting gets several steps; their number is cut by max_tokens,
    max_model_len and the free blocks; `finish_steps` gives back what the steps not run reserved."""
    s = make(num_blocks=6, max_num_batched_tokens=64, max_model_len=40)   # block_size 4: 24 tokens of cache
    a, b = req("a", 3, max_tokens=30), req("b", 5, max_tokens=6)
    s.add(a)
    assert s.schedule(num_steps=8).num_steps == 1                    # a prefill
    s.add(b)
    s.postprocess(Batch([ScheduledRequest(a, 0, 3, True)]), [7])
    batch = s.schedule(num_steps=8)                                   # b's prefill joins: one step
    assert batch.num_steps == 1
    s.postprocess(batch, [7, 7])
    batch = s.schedule(num_steps=8)                                   # b may take 5 more tokens (max_tokens 6)
    assert batch.num_steps == 5 and shape(batch) == [("a", 4, 1, True), ("b", 5, 1, True)]
    assert len(a.block_ids) == 3 and len(b.block_ids) == 3            # a: 4 + 5 = 9 tokens, b: 5 + 5 = 10 tokens
    got = s.finish_steps(batch, [[7, 7], [0, 7]])                     # step 2: a meets eos; the run ends there
    assert got == [a, b] and a.finish_reason == "stop" and not a.block_ids
    assert b.num_computed_tokens == 7 and len(b.block_ids) == 2 and s.kv.num_free_blocks == 4
    batch = s.schedule(num_steps=8)                                   # b: 3 more tokens to max_tokens
    assert batch.num_steps == 3
    s.finish_steps(batch, [[7], [7], [7]])
    assert b.finish_reason == "length" and len(b.output_token_ids) == 6 and s.kv.num_free_blocks == 6


def test_reserve_steps_limited_by_free_blocks_and_waiting():
    s = make(num_blocks=3, max_num_batched_tokens=64)                  # 12 tokens of cache
    assert s.schedule(num_steps=16).num_steps == 1                    # nothing to run
    a = req("a", 5)
    s.add(a)
    step(s)
    batch = s.schedule(num_steps=16)                                  # 5 cached; 12 fit: 7 steps
    assert batch.num_steps == 7 and s.kv.num_free_blocks == 0
    s.finish_steps(batch, [[7]])                                      # one step run: blocks back to 2
    assert len(a.block_ids) == 2 and s.kv.num_free_blocks == 1
    s.add(req("b", 2))                                                # admitted: its prefill runs, one step
    assert s.schedule(num_steps=16).num_steps == 1
