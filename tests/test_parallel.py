"""Tensor- and expert-parallel inference (mimoflash/parallel, docs/PARALLEL.md): 2 ranks on CPU over gloo.

The single-process engine is the reference: logits (as top-k logprobs) at fp32 tolerance and greedy tokens must
match; each rank must hold about half the weights and half the KV cache bytes for the same token capacity; a
worker killed mid-generation must surface as ParallelError within a bounded time with no process left behind.
Each tensor-parallel LLM spawns one worker process (a few seconds), and a process holds one tensor-parallel LLM at a
time (it uses the default process group), so each test builds and closes its own.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from conftest import make_model, tiny_config
from mimoflash import LLM, SamplingParams
from mimoflash.checkpoint.loader import load_model
from mimoflash.checkpoint.saver import save_model
from mimoflash.parallel import ParallelError
from mimoflash.parallel.load import build_shard, resident_bytes
from mimoflash.parallel.shard import CheckpointReader, ShardPlan

PROMPTS = [{"prompt_token_ids": [1, 5, 9, 33, 2]}, {"prompt_token_ids": list(range(40, 77))},
           {"prompt_token_ids": [7] * 3 + [300, 301, 302]}]
KV = 1 << 22


def _greedy(llm, max_tokens=10, logprobs=5):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=logprobs),
                        use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _assert_same(ref, got, atol):
    for r, g in zip(ref, got):
        assert r.token_ids == g.token_ids
        for lr, lg in zip(r.logprobs, g.logprobs):        # per position: token id -> Logprob
            assert set(lr) == set(lg)
            for tid in lr:
                assert abs(lr[tid].logprob - lg[tid].logprob) < atol, (tid, lr[tid], lg[tid])


# ------------------------------------------------------------------------------------------ no processes


def test_shard_plan_splits_and_replicates_kv_heads():
    cfg = tiny_config()                 # GA: 4 q / 1 kv head, SWA: 4 q / 2 kv heads
    p0, p1 = ShardPlan(cfg, 0, 2), ShardPlan(cfg, 1, 2)
    assert (p0.heads[False].q_lo, p0.heads[False].q_hi, p1.heads[False].q_lo) == (0, 2, 2)
    assert p0.heads[False].replicated_kv and (p0.heads[False].kv_lo, p1.heads[False].kv_lo) == (0, 0)
    assert not p0.heads[True].replicated_kv and (p0.heads[True].kv_lo, p1.heads[True].kv_lo) == (0, 1)
    four = [ShardPlan(cfg, r, 4) for r in range(4)]     # SWA: 2 kv heads over 4 ranks -> head r // 2
    assert [p.heads[True].kv_lo for p in four] == [0, 0, 1, 1]
    rc = p1.rank_config()
    assert (rc.num_attention_heads, rc.num_key_value_heads, rc.swa_num_key_value_heads) == (2, 1, 1)
    odd = tiny_config(n_routed_experts=9, vocab_size=511, intermediate_size=255)
    assert ShardPlan(odd, 0, 2).experts == (0, 5) and ShardPlan(odd, 1, 2).experts == (5, 9)
    assert ShardPlan(odd, 1, 2).vocab == (256, 511) and ShardPlan(odd, 1, 2).ffn == (128, 255)
    with pytest.raises(ValueError, match="not divisible by tensor_parallel_size=3"):
        ShardPlan(cfg, 0, 3)


def test_decode_ffn_expert_ranges_add_up_to_the_whole_layer():
    """kernels.decode_ffn over a rank's expert range (the weights pointing at its first expert) routes over every
    expert and computes only its own: the ranges' outputs add up to the whole layer's, at 1 and 3 rows."""
    from mimoflash import kernels
    cfg = tiny_config(n_routed_experts=9, num_nextn_predict_layers=0)
    llm = LLM(make_model(cfg, dtype=torch.bfloat16), kv_cache_memory=KV, progress=False)
    args, _, top_k = llm.engine.runner.fused.layers[1]                              # a MoE layer
    F, H = cfg.moe_intermediate_size, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    for B in (1, 3):
        x = torch.randn(B, H, generator=g)
        whole, chosen = torch.empty(B, H), torch.empty(B, top_k, dtype=torch.int64)
        kernels.decode_ffn(args, x, whole, chosen)
        total = torch.zeros(B, H)
        for lo, hi in ((0, 5), (5, 9)):
            part = kernels.LayerArgs.from_buffer_copy(args)
            part.gate_up += lo * 2 * F * H * 2                                          # bf16 bytes
            part.down += lo * H * F * 2
            y, ch = torch.empty(B, H), torch.empty(B, top_k, dtype=torch.int64)
            kernels.decode_ffn(part, x, y, ch, (lo, hi))
            assert torch.equal(ch, chosen)
            total += y
        torch.testing.assert_close(total, whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expert range"):
        kernels.decode_ffn(args, x, whole, chosen, (5, 10))


def test_fp8_checkpoint_slices_equal_the_full_load(tmp_path):
    """Sliced reads of a block-FP8 checkpoint (blocks not aligned with the head ranges) equal the full load's
    slices, for every parameter of both ranks."""
    cfg = tiny_config(num_key_value_heads=2, num_nextn_predict_layers=0)
    path = save_model(make_model(cfg), tmp_path / "fp8", fp8=True, fp8_block_size=(32, 32), max_shard_bytes=1 << 20)
    full = load_model(path, dtype=torch.float32).state_dict()
    config = load_model(path, dtype=torch.float32).config
    for rank in (0, 1):
        plan = ShardPlan(config, rank, 2)
        reader = CheckpointReader(path, config)
        shard = build_shard(plan, reader, torch.float32, torch.device("cpu")).state_dict()
        for name, t in shard.items():
            want = full[name][plan.index(name)]
            assert torch.equal(t[:want.shape[0]], want), name
        assert reader.read_bytes < 0.75 * sum(f.stat().st_size for f in path.glob("*.safetensors"))


def test_bad_tensor_parallel_sizes_fail_before_starting_processes():
    m = make_model(tiny_config())
    with pytest.raises(ValueError, match="not divisible by tensor_parallel_size=3"):
        LLM(m, tensor_parallel_size=3, progress=False)
    with pytest.raises(ValueError, match="positive integer"):
        LLM(m, tensor_parallel_size=0, progress=False)
    with pytest.raises(ValueError, match="pass weight_dtype='auto'"):
        LLM(m, tensor_parallel_size=2, progress=False, weight_dtype="fp8")
    with pytest.raises(ValueError, match="needs a model with MTP layers"):
        LLM(make_model(tiny_config(num_nextn_predict_layers=0)), tensor_parallel_size=2, progress=False,
            speculative_config={"num_speculative_tokens": 1})
    with pytest.raises(ValueError, match="reduced draft vocabulary"):
        LLM(m, tensor_parallel_size=2, progress=False, speculative_config={"num_speculative_tokens": 1,
                                                                         "draft_vocab_size": 64})
    import multiprocessing
    assert not multiprocessing.active_children()


# ------------------------------------------------------------------------------------------ 2 ranks


@pytest.fixture
def replicated_kv():
    """The tiny config: 1 GA KV head over 2 ranks (replicated), 8 experts, fp32."""
    model = make_model(tiny_config())
    ref = LLM(model, kv_cache_memory=KV, progress=False, max_num_batched_tokens=16)
    tp = LLM(model, kv_cache_memory=KV, progress=False, max_num_batched_tokens=16, tensor_parallel_size=2)
    yield ref, tp
    tp.close()


def test_logits_and_greedy_equal_single_process(replicated_kv):
    ref, tp = replicated_kv
    _assert_same(_greedy(ref), _greedy(tp), atol=1e-4)          # chunked prefill (16-token steps) and decode


@pytest.fixture
def bf16_model():
    """bf16 weights (the fused decode step's condition), plain top-k routing over 9 experts (5 + 4 per rank). The
    single-process LLM is built first and used after the tensor-parallel one started: handing the model to the
    workers must leave its tensors (which the first engine's fused step points into) where they are."""
    model = make_model(tiny_config(n_routed_experts=9, num_key_value_heads=2, num_nextn_predict_layers=0),
                       dtype=torch.bfloat16)
    ref = LLM(model, kv_cache_memory=KV, progress=False)
    tp = LLM(model, kv_cache_memory=KV, progress=False, tensor_parallel_size=2)
    yield ref, tp
    tp.close()


def test_fused_step_per_rank_equals_module_path_and_one_process(bf16_model):
    from mimoflash.engine.fused_decode import FusedDecoder
    from mimoflash.parallel.fused import ParallelFusedDecoder
    ref, tp = bf16_model
    assert type(ref.engine.runner.fused) is FusedDecoder
    assert type(tp.engine.runner.fused) is ParallelFusedDecoder
    fused = _greedy(tp)
    steps = [s["fused_steps"] for s in tp._parallel.stats(tp)]
    assert steps[0] == steps[1] >= 9                    # every decode step of both ranks ran fused
    assert tp._parallel.use_fused(tp, False) is False
    module = _greedy(tp)
    assert [s["fused_steps"] for s in tp._parallel.stats(tp)] == steps
    assert tp._parallel.use_fused(tp, True) is True
    _assert_same(module, fused, atol=1e-4)
    _assert_same(_greedy(ref), fused, atol=1e-4)


def test_mtp_speculative_decoding_under_two_ranks_equals_one_process():
    """The shipped model (trained MTP blocks, bf16: the fused steps verify and draft) with 2 drafts per step over
    2 ranks: the greedy tokens of plain single-process decoding, drafts accepted, and the MTP blocks sharded (each
    rank holds half of them)."""
    from mimoflash.default import default_model
    prompts = ["def merge_intervals(pairs):\n", "class LRUCache:\n    def __init__(self, capacity):\n"]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(default_model(), max_num_seqs=2, progress=False)
    ref = [o.outputs[0].token_ids for o in plain.generate(prompts, sp, use_tqdm=False)]
    tp = LLM(default_model(), max_num_seqs=2, progress=False, tensor_parallel_size=2,
             speculative_config={"num_speculative_tokens": 2})
    try:
        outs = tp.generate(prompts, sp, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref
        assert all(o.metrics.verify_steps > 0 and o.metrics.accepted_tokens > 0 for o in outs)
        assert all(s["fused_steps"] > 0 and s["fused_mtp_steps"] > 0 for s in tp._parallel.stats(tp))
        mine, full = tp.model.model.mtp.layers[0], plain.model.model.mtp.layers[0]
        for w in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight"):
            assert mine.get_parameter(w).numel() * 2 == full.get_parameter(w).numel(), w
    finally:
        tp.close()


@pytest.fixture
def uneven_fp8(tmp_path_factory):
    """From an FP8 checkpoint path: 9 experts (5 + 4), group-limited routing (3 groups, top-2 groups), an odd
    vocabulary (256 + 255 rows) and dense width (128 + 127), dequantised to bf16 weights with fp32 compute."""
    cfg = tiny_config(n_routed_experts=9, n_group=3, topk_group=2, vocab_size=511, intermediate_size=255,
                      num_key_value_heads=2, num_nextn_predict_layers=0)
    path = save_model(make_model(cfg, seed=3), tmp_path_factory.mktemp("ckpt") / "fp8", fp8=True,
                      fp8_block_size=(32, 32))
    ref = LLM(path, kv_cache_memory=KV, progress=False, weight_dtype="bfloat16")
    tp = LLM(path, kv_cache_memory=KV, progress=False, tensor_parallel_size=2, weight_dtype="bfloat16")
    yield ref, tp
    tp.close()


def test_fp8_kept_compressed_on_each_rank(tmp_path):
    """An FP8 checkpoint with bf16 other weights (the release's kinds) under weight_dtype='auto': each rank keeps its
    slices as E4M3 (KV heads narrower than a tile: a finer row grid) and its experts (5 + 4 of 9) as FP8 views of the
    files, runs the fused step on them, holds about half the single process's FP8 weight bytes, and gives its
    greedy tokens and logprobs."""
    from mimoflash.engine.fp8_layout import FP8Experts, FP8Linear
    cfg = tiny_config(n_routed_experts=9, num_key_value_heads=2, num_nextn_predict_layers=0)
    path = save_model(make_model(cfg, seed=3), tmp_path / "fp8", fp8=True, fp8_block_size=(32, 32))
    # without the packed bf16 copies (which one process makes only below a share of the weights): weights alone
    ref = LLM(path, kv_cache_memory=KV, progress=False, weight_panels=False)
    assert ref.weight_dtype == torch.float8_e4m3fn
    tp = LLM(path, kv_cache_memory=KV, progress=False, tensor_parallel_size=2, weight_panels=False)
    try:
        assert tp.weight_dtype == torch.float8_e4m3fn
        layer = tp.model.model.layers[1]
        assert isinstance(layer.self_attn.k_proj, FP8Linear) and layer.self_attn.k_proj.block == (16, 32)
        assert isinstance(layer.mlp.experts, FP8Experts) and layer.mlp.experts.num_experts == 5
        _assert_same(_greedy(ref), _greedy(tp), atol=1e-4)
        single = resident_bytes(ref.model)
        for s in tp._parallel.stats(tp):
            assert 0.4 < s["weights_bytes"] / single < 0.6, (s, single)
            assert s["fused_steps"] >= 9
        touched = tp.expert_store.touched_keys()            # rank 0 counts its own experts (local ids 0..4)
        assert touched and all(e < 5 for _, e in touched) and len(touched) < len(ref.expert_store.touched_keys())
    finally:
        tp.close()


def test_group_limited_routing_uneven_experts_from_fp8_checkpoint(uneven_fp8):
    ref, tp = uneven_fp8
    assert tp.weight_dtype == ref.weight_dtype == torch.bfloat16
    _assert_same(_greedy(ref, max_tokens=12), _greedy(tp, max_tokens=12), atol=1e-4)
    # each rank holds about half: weights, and KV bytes for the same capacity (blocks, rings) as one process
    stats = tp._parallel.stats(tp)
    single_w, single_kv = resident_bytes(ref.model), ref.engine.cache.layout.total_bytes
    for s in stats:
        assert 0.4 < s["weights_bytes"] / single_w < 0.6, (s, single_w)
        assert s["kv_cache_bytes"] == pytest.approx(single_kv / 2, rel=0.02)
        assert (s["num_blocks"], s["num_rings"]) == (ref.engine.layout.num_blocks, ref.engine.layout.num_rings)


def test_killed_worker_gives_an_error_and_leaves_no_process(monkeypatch):
    monkeypatch.setenv("MIMOFLASH_TP_TIMEOUT", "30")           # the bound if the death were not seen at once
    tp = LLM(make_model(tiny_config()), kv_cache_memory=KV, progress=False, tensor_parallel_size=2)
    procs = list(tp._parallel._state.procs)
    stream = tp.generate_stream({"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0, max_tokens=400,
                                                                                ignore_eos=True))
    next(stream)
    os.kill(procs[0].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ParallelError, match="rank 1"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 30
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(ParallelError, match="failed earlier"):
        tp.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    tp.close()
    import multiprocessing
    assert not multiprocessing.active_children()


# ------------------------------------------------------------------------------------------ as users run it


def _cli(*args, timeout=240):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "mimoflash", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))


def test_cli_generate_with_two_ranks_matches_one():
    """The shipped model (a bf16 checkpoint with a tokenizer) through `mimoflash generate --tensor-parallel-size 2`,
    with MTP drafts (`--mtp 2`): the same greedy tokens and text as one process without them."""
    import json
    from mimoflash.default import default_model
    prompt = "def fibonacci(n):"
    two = _cli("generate", prompt, "--max-tokens", "12", "--temperature", "0", "--json", "--threads", "1",
               "--tensor-parallel-size", "2", "--mtp", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    got = json.loads(two.stdout)["outputs"][0]
    want = LLM(default_model(), progress=False).generate(prompt, SamplingParams(temperature=0, max_tokens=12),
                                                         use_tqdm=False)[0].outputs[0]
    assert got["token_ids"] == want.token_ids and got["text"] == want.text and len(want.token_ids) == 12
    bad = _cli("generate", "x", "--tensor-parallel-size", "0")
    assert bad.returncode == 2 and "--tensor-parallel-size must be >= 1" in bad.stderr


TORCHRUN_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config, make_model
from mimoflash import LLM, SamplingParams
m = make_model(tiny_config())
p, sp = [{{"prompt_token_ids": [1, 5, 9, 33, 2]}}], SamplingParams(temperature=0, max_tokens=8)
tp = LLM(m, kv_cache_memory=1 << 22, progress=False, tensor_parallel_size=int(os.environ["WORLD_SIZE"]))
got = tp.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids       # rank 0 only: the others exit inside LLM()
tp.close()
want = LLM(m, kv_cache_memory=1 << 22, progress=False).generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids
print("RANK", os.environ["RANK"], "SAME" if got == want else f"DIFFERENT {{got}} {{want}}", flush=True)
"""


def test_torchrun_ranks_join_and_followers_exit(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=os.path.dirname(__file__)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RANK 0 SAME" in r.stdout and "RANK 1" not in r.stdout


def _spawned_children(pid: int) -> list[int]:
    """Worker processes (multiprocessing spawn_main) whose parent is pid, from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
            out.append(int(d))
    return out


def test_serve_with_two_ranks_answers_then_reports_a_dead_worker_unhealthy():
    httpx = pytest.importorskip("httpx", reason="the serve tests need the dev extra")
    pytest.importorskip("openai", reason="the serve tests need the dev extra")
    from test_serve import ServerProcess
    s = ServerProcess("--tensor-parallel-size", "2", timeout=240)
    try:
        r = httpx.post(s.url + "/v1/completions", json={"model": "mimoflash-default", "prompt": "def f(",
                                                        "max_tokens": 5, "temperature": 0}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        (engine,) = _spawned_children(s.proc.pid)           # the server's engine process
        (worker,) = _spawned_children(engine)               # its rank-1 worker
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while httpx.get(s.url + "/health", timeout=5).status_code == 200:       # noticed while idle
            assert time.monotonic() < deadline, "a dead worker was not reported"
            time.sleep(0.2)
        r = httpx.post(s.url + "/v1/completions", json={"model": "mimoflash-default", "prompt": "x", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 503
    finally:
        code, out = s.stop()
    assert "rank 1" in out and not _spawned_children(s.proc.pid)
