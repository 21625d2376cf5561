"""engine/hugepages.py: weights and KV pools moved onto 2 MB transparent huge pages keep every value, view and
alias, and the engine's results do not change."""

from __future__ import annotations

import json

import pytest
import torch

from mimoflash.engine import hugepages
from mimoflash.engine.llm import LLM
from mimoflash.engine.sampling import SamplingParams
from tests.conftest import make_model, tiny_config

needs_thp = pytest.mark.skipif(not hugepages.supported(),
                               reason="transparent huge pages unavailable here (not Linux, THP 'never', or a Python "
                                      "without mmap.MADV_HUGEPAGE): the helpers fall back to ordinary tensors")


def _vma_fields(ptr: int) -> dict:
    """/proc/self/smaps fields of the mapping that holds address ptr."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                if inside:
                    break
                inside = lo <= ptr < hi
            elif inside and head.endswith(":"):
                fields[head[:-1]] = line.split()[1]
    return fields


@needs_thp
def test_empty_bytes_is_aligned_zeroed_and_advised():
    t = hugepages.empty_bytes(5 << 20)
    assert t.dtype == torch.uint8 and t.numel() == 5 << 20
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    assert int(t.count_nonzero()) == 0
    assert _vma_fields(t.data_ptr()).get("THPeligible") == "1"       # MADV_HUGEPAGE reached the kernel
    z = hugepages.zeros((3, 5, 7), torch.float32)
    assert z.shape == (3, 5, 7) and z.dtype == torch.float32 and int(z.count_nonzero()) == 0


def test_empty_bytes_falls_back_when_the_kernel_refuses(monkeypatch):
    """madvise failing (a kernel without THP answers EINVAL) gives ordinary zeroed memory, not an error."""
    import mmap

    class Refusing(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")
    monkeypatch.setattr(hugepages, "supported", lambda: True)
    monkeypatch.setattr(hugepages.mmap, "mmap", Refusing)
    t = hugepages.empty_bytes(3 << 20)
    assert t.numel() == 3 << 20 and int(t.count_nonzero()) == 0


def test_helpers_fall_back_where_unsupported(monkeypatch):
    monkeypatch.setattr(hugepages, "supported", lambda: False)
    z = hugepages.zeros((4, 6), torch.bfloat16)
    assert z.shape == (4, 6) and z.dtype == torch.bfloat16 and int(z.count_nonzero()) == 0
    w = torch.randn(300, 300)
    before = w.data_ptr()
    assert hugepages.rehome([w]) == 0 and w.data_ptr() == before


@needs_thp
def test_rehome_keeps_values_views_and_aliases(monkeypatch):
    monkeypatch.setattr(hugepages, "MIN_BYTES", 4096)
    base = torch.randn(64, 48)
    top, cols = base[:16], base[:, 8:20]                 # views: a row block and a strided column block
    param = torch.nn.Parameter(torch.randn(40, 64).bfloat16(), requires_grad=False)   # 5 KB
    small = torch.randn(8)                               # under MIN_BYTES: stays
    ref = [base.clone(), top.clone(), cols.clone(), param.detach().clone()]
    strides = [t.stride() for t in (base, top, cols, param)]
    old = [base.data_ptr(), param.data_ptr(), small.data_ptr()]
    expected = base.untyped_storage().nbytes() + param.untyped_storage().nbytes()       # each storage once
    assert hugepages.rehome([base, top, cols, param, small]) == expected
    assert base.data_ptr() != old[0] and param.data_ptr() != old[1] and small.data_ptr() == old[2]
    assert isinstance(param, torch.nn.Parameter) and param.dtype == torch.bfloat16
    for t, r, s in zip((base, top, cols, param), ref, strides):
        assert torch.equal(t, r) and t.stride() == s
    assert base.data_ptr() % hugepages.HUGE_PAGE == 0
    base[0, 10] = 123.0                                  # still one storage: the views see the write
    assert top[0, 10] == 123.0 and cols[0, 2] == 123.0
    assert hugepages.rehome([base, top, param]) == 0      # already ours: not copied again


@needs_thp
def test_rehome_leaves_file_backed_storage(tmp_path, monkeypatch):
    """A storage mapped from a file (a memory-mapped checkpoint) is not copied into anonymous memory."""
    monkeypatch.setattr(hugepages, "MIN_BYTES", 4096)
    path = tmp_path / "w.bin"
    path.write_bytes(torch.arange(1 << 14, dtype=torch.float32).numpy().tobytes())
    t = torch.from_file(str(path), shared=True, size=1 << 14, dtype=torch.float32)
    before = t.data_ptr()
    assert hugepages.rehome([t]) == 0 and t.data_ptr() == before


@needs_thp
def test_engine_results_identical_with_and_without_huge_pages(monkeypatch):
    """The tiny model's tensors are below the 1 MB floor, so the floor is lowered: everything moves, and the engine
    (fused decode steps on panels, prefill through the modules) gives bit-identical tokens and logprobs. Moved
    panels are re-stamped, not repacked."""
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)
    g = torch.Generator().manual_seed(3)
    ps = [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=g).tolist()} for n in (5, 12, 2)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)

    def build(huge):
        return LLM(make_model(tiny_config(), seed=5, dtype=torch.bfloat16), max_num_seqs=4, block_size=4,
                   huge_pages=huge)
    on, off = build(True), build(False)
    m = on.model
    ours = lambda t: t.untyped_storage().data_ptr() in hugepages._OURS                     # noqa: E731
    assert ours(m.lm_head.weight) and ours(m.lm_head._panels.wp) and ours(m.model.embed_tokens.weight)
    attn = m.model.layers[1].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv_fused[0].untyped_storage().data_ptr()
    with torch.no_grad():
        assert attn.fused_qkv() is not None              # q/k/v are still views of the fused tensor
    assert all(ours(t) for t in (on.engine.cache.k_ring, on.engine.cache.v_global))
    assert not ours(off.model.lm_head.weight) and not ours(off.engine.cache.k_ring)
    assert on.engine.runner.fused is not None and all(a.panels == 1 for a, _, _ in on.engine.runner.fused.layers)
    stamp = m.lm_head._panels._stamp
    assert stamp == (m.lm_head.weight.data_ptr(), m.lm_head.weight._version)   # current: no repack on first use
    got, ref = on.generate(ps, sp), off.generate(ps, sp)
    for a, b in zip(got, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


def test_cli_huge_pages_reaches_the_engine(tmp_path, monkeypatch, capsys):
    from mimoflash.checkpoint.saver import save_model
    from mimoflash.engine import cli, llm as llm_module
    ckpt = save_model(make_model(tiny_config(), seed=6, dtype=torch.bfloat16), tmp_path / "ckpt",
                      dtype=torch.bfloat16)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("huge_pages"))
        return LLM(*args, **kwargs)
    monkeypatch.setattr(llm_module, "LLM", spy)
    outs = []
    for extra in ([], ["--huge-pages"]):
        assert cli.generate_main(["--model", str(ckpt), "--token-ids", "1,2,3", "--max-tokens", "5", "--json",
                                  "--temperature", "0", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outputs"][0]["token_ids"])
    assert seen == [False, True] and outs[0] == outs[1] and len(outs[0]) == 5
