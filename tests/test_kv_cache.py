"""Hybrid KV cache: the budget split, block/ring accounting, and the key property: decoding from the cache gives the
same logits as recomputing the whole sequence, across ring wraps (window 4) and block boundaries (block size 4),
for ragged batches, for both attention paths, and after a speculative rollback."""

import pytest
import torch

from mimoflash.engine.kv_cache import KVCache, KVCacheManager, plan_cache
from mimoflash.engine.request import Request
from mimoflash.engine.runner import ModelRunner
from mimoflash.engine.sampling import SamplingParams
from mimoflash.engine.scheduler import Batch, ScheduledRequest
from tests.conftest import make_model, tiny_config


GEN = torch.Generator().manual_seed(123)


def _tokens(n, vocab=512):
    return torch.randint(0, vocab, (n,), generator=GEN).tolist()


def _req(tokens, rid="r"):
    # Teacher forcing: every token is "prompt"; the test advances num_computed_tokens itself.
    return Request(rid, list(tokens), SamplingParams(max_tokens=1))


class Driver:
    def __init__(self, model, impl="fast", block_size=4, max_draft=0, num_seqs=4, dtype=torch.float32):
        self.layout = plan_cache(model.config, 1 << 24, max_num_seqs=num_seqs, block_size=block_size,
                                 max_draft=max_draft, dtype=dtype)
        self.kv = KVCacheManager(self.layout)
        self.runner = ModelRunner(model, KVCache(self.layout), impl)

    def step(self, work):
        """work: [(request, num_tokens)] -> logits (len(work), V) of each slice's last token."""
        items = []
        for req, n in work:
            self.kv.allocate(req, n)
            items.append(ScheduledRequest(req, req.num_computed_tokens, n, True))
        logits = self.runner.execute(Batch(items))
        for req, n in work:
            req.num_computed_tokens += n
        return logits


@pytest.fixture(scope="module")
def model():
    return make_model(tiny_config(), seed=3)


def full_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]                                      # (T, V)


def test_plan_splits_one_budget_from_model_shape():
    cfg = tiny_config()
    lay = plan_cache(cfg, 1 << 20, max_num_seqs=3, block_size=4, dtype=torch.float32)
    assert lay.global_layers == (0, 5) and lay.sliding_layers == (1, 2, 3, 4, 6, 7)
    assert lay.ring_slots == cfg.swa_keys == 5 and lay.num_rings == 3
    # ring: 6 layers x 5 slots x 2 heads x (48 + 32) x 4 B; block: 2 layers x 4 tokens x 1 head x 80 x 4 B
    assert lay.ring_bytes == 6 * 5 * 2 * 80 * 4 and lay.block_bytes == 2 * 4 * 1 * 80 * 4
    assert lay.total_bytes <= 1 << 20 and (1 << 20) - lay.total_bytes < lay.block_bytes
    cache = KVCache(lay)
    assert cache.k_global.shape[-1] == 48 and cache.v_global.shape[-1] == 32          # V is not padded to 48
    assert cache.k_ring.shape == (6, 2, 3 * 5, 48) and cache.v_ring.shape == (6, 2, 3 * 5, 32)
    assert cache.nbytes == lay.total_bytes
    # a small budget gets fewer rings; MTP layers add rings; slack for drafts widens the ring
    small = plan_cache(cfg, 2 * (lay.ring_bytes + lay.block_bytes), max_num_seqs=8, block_size=4)
    assert small.num_rings == 2
    mtp = plan_cache(cfg, 1 << 20, max_num_seqs=3, block_size=4, include_mtp=True, max_draft=3)
    assert mtp.sliding_layers[-1] == cfg.num_hidden_layers and mtp.ring_slots == cfg.swa_keys + 3
    with pytest.raises(ValueError, match="too small"):
        plan_cache(cfg, 100, max_num_seqs=1)


def test_kv_bytes_do_not_grow_with_context_in_sliding_layers():
    cfg = tiny_config(num_hidden_layers=8)
    lay = plan_cache(cfg, 1 << 22, max_num_seqs=1, block_size=16)
    all_global = plan_cache(cfg.replace(hybrid_layer_pattern=[0] * 8, swa_num_key_value_heads=1), 1 << 22,
                            max_num_seqs=1, block_size=16)
    short, long = lay.bytes_per_sequence(64), lay.bytes_per_sequence(4096)
    assert long - short == (4096 - 64) // 16 * lay.block_bytes          # only the 2 global layers grow
    assert all_global.bytes_per_sequence(4096) > 3 * long


def test_manager_accounting_and_rollback():
    lay = plan_cache(tiny_config(), 1 << 16, max_num_seqs=2, block_size=4)
    kv = KVCacheManager(lay)
    nb, nr = kv.num_free_blocks, kv.num_free_rings
    a, b = _req(range(10), "a"), _req(range(3), "b")
    assert kv.blocks_needed(a, 10) == 3
    kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.allocate(b, 3)
    assert kv.num_free_blocks == nb - 4 and kv.num_free_rings == nr - 2
    assert not kv.can_allocate(_req([1], "c"), 1)                       # no ring left
    assert kv.blocks_needed(a, 2) == 0 and kv.blocks_needed(a, 3) == 1
    kv.rollback(a, 4)
    assert a.num_computed_tokens == 4 and len(a.block_ids) == 1 and kv.num_free_blocks == nb - 2
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == nb and kv.num_free_rings == nr and a.ring_id is None and not a.block_ids


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_incremental_decode_equals_full_recompute(model, impl):
    """Window 4 (5 keys, ring of 5) and block size 4: 23 tokens wrap the ring four times and cross five blocks."""
    toks = _tokens(23)
    ref = full_logits(model, toks)
    d = Driver(model, impl)
    req = _req(toks)
    pos = 0
    for n in [3] + [1] * 9 + [6, 1, 1, 1, 2]:
        got = d.step([(req, n)])[0]
        pos += n
        torch.testing.assert_close(got, ref[pos - 1], atol=2e-5, rtol=1e-4)
    assert pos == 23


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_ragged_batch_equals_each_sequence_alone(model, block_size):
    """Prefill chunks and decodes of sequences of different lengths in one forward."""
    seqs = [_tokens(n) for n in (9, 17, 4)]
    refs = [full_logits(model, s) for s in seqs]
    d = Driver(model, "fast", block_size=block_size)
    reqs = [_req(s, f"s{i}") for i, s in enumerate(seqs)]
    plan = [[(0, 5), (1, 7)], [(0, 1), (1, 7), (2, 3)], [(0, 1), (1, 1), (2, 1)], [(0, 2), (1, 2)]]
    for work in plan:
        out = d.step([(reqs[i], n) for i, n in work])
        for row, (i, n) in enumerate(work):
            torch.testing.assert_close(out[row], refs[i][reqs[i].num_computed_tokens - 1], atol=2e-5, rtol=1e-4)


def test_fast_and_reference_attention_agree(model):
    seqs = [_tokens(n) for n in (13, 6, 21)]
    outs = {}
    for impl in ("fast", "reference"):
        d = Driver(model, impl)
        reqs = [_req(s, f"s{i}") for i, s in enumerate(seqs)]
        res = [d.step([(reqs[0], 7), (reqs[1], 6), (reqs[2], 11)])]
        res.append(d.step([(reqs[0], 1), (reqs[2], 10)]))
        res.append(d.step([(reqs[0], 5)]))
        outs[impl] = torch.cat(res)
    torch.testing.assert_close(outs["fast"], outs["reference"], atol=1e-5, rtol=1e-4)


def test_fast_path_bf16_close_to_reference():
    # dense FFNs: in bf16 a near-tied expert choice can flip between paths, which is noise, not a cache bug
    m = make_model(tiny_config(moe_layer_freq=[0] * 8), seed=5, dtype=torch.bfloat16)
    toks = _tokens(15)
    outs = []
    for impl in ("fast", "reference"):
        d = Driver(m, impl, dtype=torch.bfloat16)
        req = _req(toks)
        outs.append(torch.cat([d.step([(req, n)]) for n in (6, 1, 1, 7)]))
    assert (outs[0] - outs[1]).abs().max() < 0.05 * outs[1].abs().max()


@pytest.mark.parametrize("max_draft", [2, 3])
def test_ring_rollback_after_rejected_drafts(model, max_draft):
    """Speculative decoding writes 1 + max_draft tokens and may keep only the first: with `max_draft` slots of
    slack the positions the next query needs are still in the ring, and the stale slots are masked."""
    true = _tokens(20)
    ref = full_logits(model, true)
    d = Driver(model, max_draft=max_draft)
    req = _req(true)
    d.step([(req, 9)])
    for _ in range(3):
        s = req.num_computed_tokens
        drafts = _tokens(max_draft)                                        # wrong guesses
        req.prompt_token_ids[s + 1:s + 1 + max_draft] = drafts
        d.step([(req, 1 + max_draft)])
        req.prompt_token_ids[s + 1:s + 1 + max_draft] = true[s + 1:s + 1 + max_draft]
        d.kv.rollback(req, s + 1)                                          # accept only the verified token
        got = d.step([(req, 1)])[0]
        torch.testing.assert_close(got, ref[s + 1], atol=2e-5, rtol=1e-4)


def test_ring_without_slack_breaks_on_rollback(model):
    """The counter-example that motivates the slack: a ring of exactly swa_keys slots loses needed keys."""
    true = _tokens(20)
    ref = full_logits(model, true)
    d = Driver(model, max_draft=0)
    req = _req(true)
    d.step([(req, 9)])
    s = req.num_computed_tokens
    req.prompt_token_ids[s + 1:s + 4] = _tokens(3)
    d.step([(req, 4)])
    req.prompt_token_ids[s + 1:s + 4] = true[s + 1:s + 4]
    d.kv.rollback(req, s + 1)
    got = d.step([(req, 1)])[0]
    assert not torch.allclose(got, ref[s + 1], atol=1e-3)


@pytest.mark.parametrize("use_kernels", [False, True])
def test_decode_chunk_views_and_copies_agree_with_recompute(model, use_kernels):
    """The torch decode path reads consecutive chunks (rings handed out in order, one request's blocks) as a view of
    the pool and copies the others into a reused buffer; the kernel path (kernels.attn_decode_paged) reads them in
    place through the chunk table. All must give the full-recompute logits."""
    from mimoflash.engine.runner import _first_if_consecutive
    assert _first_if_consecutive(torch.tensor([[3], [4], [5]])) == 3
    assert _first_if_consecutive(torch.tensor([[2], [0]])) is None
    seqs = [_tokens(n) for n in (10, 13, 11)]
    refs = [full_logits(model, s) for s in seqs]
    d = Driver(model, "fast", num_seqs=3)
    d.runner.use_kernels = use_kernels
    reqs = [_req(s, f"s{i}") for i, s in enumerate(seqs)]
    for r in reqs:
        d.step([(r, 6)])
    for order in ([0, 1, 2], [2, 0], [1], [0, 2, 1], [2], [0, 1, 2]):
        out = d.step([(reqs[i], 1) for i in order])
        for row, i in enumerate(order):
            torch.testing.assert_close(out[row], refs[i][reqs[i].num_computed_tokens - 1], atol=2e-5, rtol=1e-4)
    assert bool(d.runner._buffers) != use_kernels             # the copy path ran (and its buffers were reused)
