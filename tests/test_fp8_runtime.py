"""FP8 checkpoints run as shipped: the FP8 kernels against their reference, exactness through `LLM`, resident bytes,
experts read only when routed, the memory budget and the cache statistics (engine/fp8_layout.py,
engine/expert_store.py, kernels/fp8.c)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import kernel_threads, make_model, run_portable, tiny_config
from mimoflash import LLM, SamplingParams, kernels
from mimoflash.checkpoint.fp8 import FP8_DTYPE, quantize_fp8_block
from mimoflash.checkpoint.loader import load_model
from mimoflash.checkpoint.saver import save_model
from mimoflash.engine import fp8_layout
from mimoflash.engine.expert_store import ExpertStore, current_rss, parse_bytes
from mimoflash.kernels import fp8 as kfp8
from mimoflash.model.moe import Experts, MoE

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built (no C compiler)")
PROMPTS = [{"prompt_token_ids": [1, 5, 7, 9, 11, 3, 8]}, {"prompt_token_ids": [2, 4, 6]}]


def _save_tiny(tmp_path_factory, block):
    model = make_model(tiny_config(hidden_size=256, moe_intermediate_size=128))
    return save_model(model, tmp_path_factory.mktemp("fp8") / "ckpt", dtype=torch.bfloat16, fp8=True,
                      fp8_block_size=block)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny model with experts of 256 x 128 (whole 4 KB pages per tensor) saved as the release does: block-FP8
    projections, bf16 everything else. 16-row tiles: q and k rows are whole tiles, so q|k|v are fused."""
    return _save_tiny(tmp_path_factory, (16, 128))


@pytest.fixture(scope="module")
def ckpt_128(tmp_path_factory):
    """The same with the release's 128 x 128 tiles: q (192 rows) is not whole tiles, so q/k/v run apart."""
    return _save_tiny(tmp_path_factory, (128, 128))


def _logprobs(out):
    return [next(iter(d.values())).logprob for d in out.outputs[0].logprobs]


# ---------------------------------------------------------------------------------------------- kernels
@needs_kernels
@pytest.mark.parametrize("N,K,block,M", [(256, 256, (128, 128), 1), (300, 200, (128, 128), 3), (37, 53, (16, 8), 2),
                                         (130, 260, (128, 128), 5), (64, 80, (16, 16), 1), (96, 64, (16, 16), 40),
                                         (1024, 512, (128, 128), 16)])
def test_linear_fp8_matches_reference(N, K, block, M):
    g = torch.Generator().manual_seed(N * K + M)
    q, s = quantize_fp8_block(torch.randn(N, K, generator=g), block)
    x = torch.randn(M, K, generator=g)
    ref = kfp8.linear_fp8_reference(x, q, s, block)
    y = kfp8.linear_fp8(x, q, s, block)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * K ** 0.5)
    with kernel_threads(2):                        # split by block rows: the same bits whatever the thread count
        assert torch.equal(kfp8.linear_fp8(x, q, s, block), y)


@needs_kernels
def test_fp8_experts_share_one_pass_and_split_over_threads():
    """kfp8.experts_fp8 (the fused step's expert code, mf_experts_rows): rows of one expert go through it together
    (each weight converted once for all of them) and give the rows' SwiGLU on the dequantised weights (fp32
    rounding), equal to each row alone; experts wide enough to be split in block-row chunks over 2 threads give the
    same bits as one."""
    g = torch.Generator().manual_seed(7)
    D, Fd, block, counts = 256, 384, (128, 128), [3, 1, 4]
    ws, ptrs = [], []
    for _ in counts:
        qs = [quantize_fp8_block(torch.randn(n, k, generator=g) * 0.1, block) for n, k in ((Fd, D), (Fd, D), (D, Fd))]
        ws.append(qs)
        ptrs.append([t.data_ptr() for q, sc in qs for t in (q, sc)])
    ptrs = torch.tensor(ptrs, dtype=torch.int64)
    x = torch.randn(sum(counts), D, generator=g)
    y = kfp8.experts_fp8(x, counts, ptrs, D, Fd, block)
    row = 0
    for i, c in enumerate(counts):
        (gq, gs), (uq, us), (dq, ds) = ws[i]
        for r in range(row, row + c):
            h = torch.nn.functional.silu(kfp8.linear_fp8_reference(x[r:r + 1], gq, gs, block)) \
                * kfp8.linear_fp8_reference(x[r:r + 1], uq, us, block)
            torch.testing.assert_close(y[r:r + 1], kfp8.linear_fp8_reference(h, dq, ds, block), rtol=1e-5, atol=1e-5)
            alone = kfp8.experts_fp8(x[r:r + 1], [1], ptrs[i:i + 1].contiguous(), D, Fd, block)
            torch.testing.assert_close(y[r:r + 1], alone, rtol=1e-6, atol=1e-7)   # other kernels for 1 row
        row += c
    with kernel_threads(2):
        assert torch.equal(kfp8.experts_fp8(x, counts, ptrs, D, Fd, block), y)


@needs_kernels
def test_fp8_kernel_decodes_every_byte_exactly():
    """Row b of the weight holds byte b once: the product with a one-hot x is that byte's E4M3 value times the
    tile scale, with no rounding anywhere (subnormals, both signs, the largest values)."""
    b = torch.arange(256, dtype=torch.uint8)
    b[(b & 0x7F) == 0x7F] = 0                                      # E4M3 NaN: checkpoints hold none
    w = torch.zeros(256, 32, dtype=torch.uint8)
    w[:, 5] = b
    w = w.view(FP8_DTYPE)
    s = torch.tensor([[0.5, 0.5], [2.0, 2.0]])                     # block (128, 16): rows 128+ scale 2
    x = torch.zeros(1, 32)
    x[0, 5] = 1.0
    want = b.view(FP8_DTYPE).float() * torch.where(torch.arange(256) < 128, 0.5, 2.0)
    assert torch.equal(kfp8.linear_fp8(x, w, s, (128, 16))[0], want)


def test_fp8_kernels_portable_loop_matches():
    """The portable C loop (machines without AVX2/F16C) against the same references."""
    if not kernels.available():
        pytest.skip("CPU kernels not built (no C compiler)")
    run_portable(__file__, "decodes_every_byte or 256-256 or 300-200 or 37-53 or 130-260 or 64-80")


def test_fp8_kernels_avx2_path_matches():
    """Where the CPU has AVX-512 the kernels use it; the AVX2 loops (MIMOFLASH_KERNELS_NO_AVX512=1, what an AVX2-only
    machine runs) against the same references, and the fused FP8 decode step on them."""
    if not kernels.available():
        pytest.skip("CPU kernels not built (no C compiler)")
    env = dict(os.environ, MIMOFLASH_KERNELS_NO_AVX512="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                        "linear_fp8_matches_reference or decodes_every_byte or fused_fp8_step_agrees"],
                       env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- through LLM
@needs_kernels
@pytest.mark.parametrize("which", ["ckpt", "ckpt_128"])
def test_llm_default_on_fp8_equals_fp32_dequantised(which, request):
    """LLM's default on an FP8 checkpoint keeps FP8 (print(model) shows the swapped modules) and gives the fp32
    dequantisation's greedy tokens and log-probabilities (<= 1e-4), with q|k|v fused on whole tiles (16-row tiles)
    or on a finer stacked grid (128-row tiles: q has 192 rows)."""
    from mimoflash.engine.cpu_layout import FastAttention
    ckpt = request.getfixturevalue(which)
    sp = SamplingParams(temperature=0, max_tokens=10, logprobs=0)
    fp8 = LLM(ckpt, progress=False)
    assert fp8.weight_dtype == FP8_DTYPE
    shown = repr(fp8.model)
    assert "FP8Linear" in shown and "FP8Experts" in shown
    attn = fp8.model.model.layers[0].self_attn
    with torch.no_grad():
        fused = attn.fused_qkv() if isinstance(attn, FastAttention) else None
    assert fused is not None and fused[0].dtype == FP8_DTYPE
    assert fused[1].block == ((16, 128) if which == "ckpt" else (16, 128))          # gcd(128, 192 q, 48 k rows)
    assert not any(isinstance(m, Experts) for m in fp8.model.modules())     # no bf16/fp32 expert tensors exist
    ref = LLM(load_model(ckpt, dtype=torch.float32), weight_dtype="float32", progress=False)
    for a, b in zip(fp8.generate(PROMPTS, sp, use_tqdm=False), ref.generate(PROMPTS, sp, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert max(abs(u - v) for u, v in zip(_logprobs(a), _logprobs(b))) <= 1e-4


@needs_kernels
@pytest.mark.parametrize("which", ["ckpt", "ckpt_128"])
def test_fused_fp8_step_agrees(which, request, monkeypatch):
    """Decode steps of an FP8 model run the fused one-call-per-layer step (kernels.decode_layer on E4M3 bytes and
    their scales, the bf16 o_proj from its panels (a small model's panels fit fp8_layout.panels_fit); experts by
    address from the store): every decoder layer goes through it, and its greedy tokens
    and log-probabilities equal the per-module FP8 path's and the fp32 dequantisation's (<= 1e-4) at 1, 2 and 5
    sequences (one row, two rows, the many-row kernels); the expert store's statistics are the same either way.
    (Multi-step runs make the same calls from C, kernels/steps.c: tests/test_multistep.py compares them with this.)"""
    ckpt = request.getfixturevalue(which)
    sp = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
    batches = [PROMPTS[:1], PROMPTS, PROMPTS + [{"prompt_token_ids": [7 * i + 1, i + 2]} for i in range(3)]]
    fused = LLM(ckpt, progress=False, num_scheduler_steps=1)    # one step per call: the fused step from Python
    runner = fused.engine.runner
    assert runner.fused is not None and all(a.qkv_s and a.fp8_br for a, _, _ in runner.fused.layers)
    assert all(a.panels and not a.o_s for a, _, _ in runner.fused.layers)       # bf16 o_proj read from its panels
    assert any(a.experts_fp8 for a, _, _ in runner.fused.layers)
    calls = []
    real = kernels.decode_layer
    monkeypatch.setattr(kernels, "decode_layer", lambda args, *a, **k: calls.append(args.qkv_s) or real(args, *a, **k))
    modules = LLM(ckpt, progress=False)
    modules.engine.runner.fused = None                                   # the per-module FP8 path
    ref = LLM(load_model(ckpt, dtype=torch.float32), weight_dtype="float32", progress=False)
    for prompts in batches:
        outs = [llm.generate(prompts, sp, use_tqdm=False) for llm in (fused, modules, ref)]
        for a, b, c in zip(*outs):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
            assert max(abs(u - v) for u, v in zip(_logprobs(a), _logprobs(b))) <= 1e-4
            assert max(abs(u - v) for u, v in zip(_logprobs(a), _logprobs(c))) <= 1e-4
    n_layers = fused.model.config.num_hidden_layers
    assert len(calls) >= n_layers * 5 * len(batches) and len(calls) % n_layers == 0 and all(calls)
    sf, sm = fused.expert_stats(), modules.expert_stats()
    assert (sf.steps, sf.touched, sf.hits, sf.misses, sf.bytes_read) == (sm.steps, sm.touched, sm.hits, sm.misses,
                                                                          sm.bytes_read)


@needs_kernels
def test_fused_fp8_mtp_drafts_keep_greedy(ckpt):
    """MTP speculative decoding on the FP8 checkpoint: the MTP block's FP8 attention and MLP run in the fused step
    too (its E4M3 bytes), and the greedy tokens equal plain decoding's."""
    sp = SamplingParams(temperature=0, max_tokens=12)
    plain = LLM(ckpt, progress=False)
    spec = LLM(ckpt, progress=False, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    mtp = spec.engine.runner.fused_mtp
    assert mtp is not None and all(m.args.qkv_s and m.args.fp8_br for m in mtp)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, sp, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in spec.generate(PROMPTS, sp, use_tqdm=False)] == want


@needs_kernels
def test_fused_fp8_step_not_used_with_bounded_cache(ckpt):
    """With a memory budget the experts' cache evicts between layers, which the one-call step cannot: the
    per-module path runs."""
    llm = LLM(ckpt, progress=False, memory_budget=current_rss() + (400 << 20))
    assert llm.engine.runner.fused is None


@needs_kernels
def test_fp8_prefill_path_matches_reference(ckpt):
    """Many rows (prefill) go through the chunked dequantise-then-GEMM path of linear_fp8 and the per-expert path
    of FP8Experts; both equal the modules' references."""
    model, _ = fp8_layout.load_fp8(ckpt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 256, generator=g)
    lin = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(lin(x), lin.forward_reference(x), rtol=1e-5, atol=1e-4)
    moe = model.model.layers[1].mlp
    assert isinstance(moe, MoE)
    idx, w, _ = moe.gate(x)
    for rows in (x[:1], x[:3], x):                                    # one token, a few (kernel), many (chunked)
        i, ww, _ = moe.gate(rows)
        torch.testing.assert_close(moe.experts(rows, i, ww), moe.experts.forward_reference(rows, i, ww),
                                   rtol=1e-5, atol=1e-4)


@needs_kernels
def test_resident_weight_bytes_match_checkpoint(ckpt):
    """Tensor bytes held (model tensors + every expert once read) ~= the checkpoint's file bytes."""
    llm = LLM(ckpt, progress=False)
    store = llm.expert_store
    files = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    held = fp8_layout._tensor_bytes(llm.model) + store.total_bytes
    # + the norms' fp32 copies (use_bf16_weights) and the safetensors headers: a few percent on this tiny model
    assert 0.95 <= held / files <= 1.05, (held, files)


def test_loader_keep_fp8_keeps_bytes_and_scales(ckpt):
    """load_model(keep_fp8=True): the checkpoint's FP8 bytes and scales, verbatim, under the checkpoint's names;
    no expert tensor is loaded (they stay in the files until routed)."""
    from safetensors import safe_open
    model = load_model(ckpt, keep_fp8=True)
    sd = model.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert torch.equal(sd[name].view(torch.uint8), f.get_tensor(name).view(torch.uint8))
        assert torch.equal(sd[name + "_scale_inv"], f.get_tensor(name + "_scale_inv"))
    assert not any(".experts." in n for n in sd)
    with pytest.raises(ValueError):                     # the FP8 kernels are CPU kernels
        load_model(ckpt, keep_fp8=True, device="meta")


# ---------------------------------------------------------------------------------------------- lazy experts
def _routed(model) -> set:
    """Hooks recording (layer prefix, expert) for every routing decision the model makes."""
    seen = set()
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            m.gate.register_forward_hook(lambda mod, a, out, p=f"{name}.experts":
                                         seen.update((p, e) for e in out[0].reshape(-1).tolist()))
    return seen


@needs_kernels
@pytest.mark.parametrize("path", ["modules", "fused"])
def test_lazy_experts_touch_only_routed(ckpt, path):
    """Only the experts the router picked are read: on the per-module path (seen by hooks on the routers) and on the
    fused decode step (the expert ids its kernel returns)."""
    llm = LLM(ckpt, progress=False)
    store = llm.expert_store
    fused = llm.engine.runner.fused
    if path == "modules":
        llm.engine.runner.fused = None
        routed = _routed(llm.model)
    llm.generate([{"prompt_token_ids": [3]}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    if path == "fused":                     # a one-token prompt is a rows-path step: the fused step ran it
        routed = {(args.expert_layer[1], e) for (args, _, _), ch in zip(fused.layers, fused._chosen[1])
                  if hasattr(args, "expert_layer") for e in ch.view(-1).tolist()}
    n_moe = sum(isinstance(m, MoE) for m in llm.model.modules())
    assert store.touched_keys() == routed
    assert len(routed) == 2 * n_moe                        # one token, top-2: 2 of 8 experts per MoE layer
    st = llm.expert_stats()
    assert st.bytes_read == sum(store.expert_bytes(*k) for k in routed)
    assert st.step_touched == len(routed) and st.misses == len(routed) and st.hits == 0


@needs_kernels
def test_cache_statistics_and_bound(ckpt):
    """A repeated request hits the unbounded cache; a 3-expert cache stays within its bound (in the store's
    accounting and in the kernel's resident-page count of the mapped files) and gives the same tokens."""
    sp = SamplingParams(temperature=0, max_tokens=6)
    llm = LLM(ckpt, progress=False)
    first = llm.generate(PROMPTS[:1], sp, use_tqdm=False)[0].outputs[0].token_ids
    st1 = llm.expert_stats()
    again = llm.generate(PROMPTS[:1], sp, use_tqdm=False)[0].outputs[0].token_ids
    st2 = llm.expert_stats()
    assert again == first
    assert st2.bytes_read == st1.bytes_read and st2.misses == st1.misses     # everything came from the cache
    assert st2.hits > st1.hits and 0 < st2.hit_rate < 1 and st2.step_hit_rate == 1.0

    store = llm.expert_store
    one = store.expert_bytes(*next(iter(store.touched_keys())))
    store.set_capacity(3 * one)
    assert store.stats().resident_bytes <= 3 * one
    rss = store.mapped_rss()
    assert 0 <= rss <= 3 * one + 6 * 3 * 2 * 4096, rss
    for _ in range(2):
        out = llm.generate(PROMPTS[1:], sp, use_tqdm=False)[0].outputs[0].token_ids
        st = llm.expert_stats()
        assert st.resident_bytes <= 3 * one and st.step_misses > 0
    store.sweep()                                  # what the next step does first (fault-around spill)
    bounded_rss = store.mapped_rss()
    assert bounded_rss <= 3 * one + 6 * 3 * 2 * 4096, bounded_rss     # + pages shared at tensor edges
    store.set_capacity(None)
    assert llm.generate(PROMPTS[1:], sp, use_tqdm=False)[0].outputs[0].token_ids == out


def test_expert_store_lru_order(ckpt):
    """Eviction is least-recently-used; an expert larger than the cache is read and dropped, never admitted."""
    from mimoflash.checkpoint.loader import _weight_map
    store = ExpertStore(ckpt, _weight_map(ckpt))
    layer = store.add_layer("model.layers.1.mlp.experts", 8)
    one = store.expert_bytes(layer, 0)
    store.set_capacity(2 * one)
    for e in (0, 1, 0, 2):                          # 1 is the least recently used when 2 arrives
        store.acquire(layer, [e])
        store.release(layer, [e])
    assert [k[1] for k in store.resident_keys()] == [0, 2]
    st = store.stats()
    assert (st.hits, st.misses, st.bytes_read) == (1, 3, 3 * one)
    store.set_capacity(one // 2)
    assert store.resident_keys() == []
    ptrs = store.acquire(layer, [5])
    assert ptrs.shape == (1, 6) and store.resident_keys() == []


def _store_state(store):
    return (store.stats().as_dict(), store.resident_keys(), store.touched_keys(), set(store._step_seen))


@pytest.mark.parametrize("bounded", [False, True])
def test_record_steps_equals_acquire_and_release(ckpt, bounded):
    """`ExpertStore.record_steps` (how the fused steps of an FP8 model are counted, a C run's after the run) leaves
    the store as per-step `begin_step` + `acquire` + `release` of each layer's distinct ids leave it (the per-module
    path's calls): counters per step and in total, the LRU order, the keys ever read, the last step's keys. Repeated
    ids (several rows routed to one expert), a store with experts resident from before, unbounded (the batched count)
    and bounded (evictions)."""
    from mimoflash.checkpoint.loader import _weight_map
    wm = _weight_map(ckpt)
    g = torch.Generator().manual_seed(5)
    steps = torch.randint(0, 8, (11, 2, 6), generator=g).tolist()        # 11 steps, 2 layers, 3 rows x top-2
    stores = []
    for _ in range(2):
        store = ExpertStore(ckpt, wm, capacity=None)
        layers = [store.add_layer(f"model.layers.{i}.mlp.experts", 8) for i in (1, 2)]
        if bounded:
            store.set_capacity(5 * store.expert_bytes(layers[0], 0))
        stores.append(store)
    ref, fast = stores
    for chunk in (steps[:4], steps[4:5], steps[5:]):
        for step in chunk:
            ref.begin_step()
            for layer, row in zip(layers, step):
                picked = sorted(set(row))
                ref.acquire(layer, picked)
                ref.release(layer, picked)
        fast.record_steps(layers, chunk)
        assert _store_state(fast) == _store_state(ref)
    st = fast.stats()
    assert st.steps == 11 and st.hits > 0 and st.misses > 0 and st.step_touched > 0
    assert (st.resident_bytes < st.bytes_read) == bounded


# ---------------------------------------------------------------------------------------------- budget and errors
@needs_kernels
def test_memory_budget_bounds_expert_cache(ckpt):
    budget = current_rss() + (400 << 20)
    llm = LLM(ckpt, progress=False, memory_budget=budget)
    cap = llm.expert_store.capacity
    assert cap is not None and 0 < cap < budget
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert llm.expert_stats().resident_bytes <= cap
    with pytest.raises(ValueError, match="too small"):
        LLM(ckpt, progress=False, memory_budget="1M")


@needs_kernels
def test_files_larger_than_ram_still_run_and_say_so(ckpt, monkeypatch, caplog):
    """Where the files exceed the available RAM (simulated: MemAvailable reported as half the files), the cache is
    bounded, a warning says so, and the model gives the same tokens as with everything cached."""
    files = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    sp = SamplingParams(temperature=0, max_tokens=4)
    want = LLM(ckpt, progress=False).generate(PROMPTS, sp, use_tqdm=False)
    monkeypatch.setattr(fp8_layout, "available_ram", lambda: files // 2)
    with caplog.at_level("WARNING", logger="mimoflash.engine.fp8_layout"):
        llm = LLM(ckpt, progress=False)
    assert "exceed the available RAM" in caplog.text and "slower" in caplog.text
    assert llm.expert_store.capacity is not None and llm.expert_store.capacity < llm.expert_store.total_bytes
    got = llm.generate(PROMPTS, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert llm.expert_stats().resident_bytes <= llm.expert_store.capacity


def test_memory_budget_errors(tmp_path, ckpt):
    assert parse_bytes("24G") == 24 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes(1000) == 1000
    for bad in ("lots", "-1G", 0, True):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    bf16 = save_model(make_model(tiny_config()), tmp_path / "bf16", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="FP8"):
        LLM(bf16, progress=False, memory_budget="1G")
    with pytest.raises(ValueError, match="fp8"):
        LLM(bf16, progress=False, weight_dtype="fp8")


def test_llm_reads_the_headers_once(ckpt, tmp_path, monkeypatch):
    """LLM(path) decides how to load (FP8 or not, which dtype) and loads from one read of the shard headers, for an
    FP8 and a bf16 checkpoint; a rewritten checkpoint is read again."""
    from mimoflash.checkpoint import loader
    opened = []
    real = loader._open
    monkeypatch.setattr(loader, "_open", lambda f: opened.append(f.name) or real(f))
    bf16 = save_model(make_model(tiny_config()), tmp_path / "bf16", dtype=torch.bfloat16)
    # the FP8 loader maps the file for the data; the bf16 loader opens it a second time for the data
    for path, want in ((ckpt, ["model.safetensors"]), (bf16, ["model.safetensors"] * 2)):
        opened.clear()
        loader._files_cache.clear()
        LLM(path, progress=False)
        assert opened == want
    first = loader.read_checkpoint(bf16)
    assert loader.read_checkpoint(bf16) is first
    save_model(make_model(tiny_config(), seed=1), bf16, dtype=torch.bfloat16)
    assert loader.read_checkpoint(bf16) is not first


@needs_kernels
def test_bf16_weights_stay_available(ckpt):
    llm = LLM(ckpt, progress=False, weight_dtype="bfloat16")
    assert llm.weight_dtype == torch.bfloat16 and llm.expert_store is None
    assert not any(isinstance(m, fp8_layout.FP8Linear) for m in llm.model.modules())


@needs_kernels
def test_cli_memory_budget(ckpt):
    def run(*extra):
        return subprocess.run([sys.executable, "-m", "mimoflash", "generate", "--model", str(ckpt), "--token-ids",
                               "1,2,3", "--max-tokens", "2", "--temperature", "0", *extra],
                              capture_output=True, text=True, timeout=120)
    ok = run("--memory-budget", "8G")
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = run("--memory-budget", "1M")
    assert bad.returncode == 1 and "too small" in bad.stderr, bad.stderr[-2000:]
