"""The synthetic real-shape checkpoint generator (mimoflash/checkpoint/synthetic.py), on tiny shapes: same layout as
`save_model`, loads in mimoflash and transformers, seeded, streamed (peak memory far below the checkpoint), CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mimoflash.checkpoint.fp8 import FP8_DTYPE
from mimoflash.checkpoint.loader import load_model
from mimoflash.checkpoint.saver import save_model
from mimoflash.checkpoint.synthetic import (checkpoint_plan, main, parse_size, synthetic_config,
                                            write_synthetic_checkpoint)
from mimoflash.engine.expert_store import parse_bytes
from mimoflash.summary import read_headers

from conftest import make_model, tiny_config

BLOCK = (16, 16)


@pytest.fixture(scope="module")
def cfg():
    return synthetic_config(layers=3, experts=6, experts_per_tok=2, mtp_layers=1, base=tiny_config())


@pytest.fixture(scope="module")
def synth(cfg, tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("synth") / "s", cfg, seed=3, fp8_block=BLOCK,
                                      max_shard_bytes=200_000)


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_config_cuts_the_release():
    c = synthetic_config()
    assert (c.hidden_size, c.num_attention_heads, c.head_dim, c.v_head_dim, c.vocab_size) == (4096, 64, 192, 128,
                                                                                               152576)
    assert (c.intermediate_size, c.moe_intermediate_size, c.num_hidden_layers, c.n_routed_experts,
            c.num_experts_per_tok, c.num_nextn_predict_layers) == (16384, 2048, 2, 32, 8, 1)
    assert c.hybrid_layer_pattern == [0, 1] and c.moe_layer_freq == [0, 1]     # GA + dense, then SWA + MoE
    with pytest.raises(ValueError, match="experts_per_tok"):
        synthetic_config(experts=4, experts_per_tok=8)
    with pytest.raises(ValueError, match="exceeds the base"):
        synthetic_config(layers=49)


def test_default_plan_is_the_release_layout():
    """4.15 GB: the figure the real-shape benchmark relies on; expert and scale shapes are the release's."""
    plan = {n: (dt, shape) for _, n, dt, shape in checkpoint_plan(synthetic_config())}
    assert plan["model.layers.1.mlp.experts.31.down_proj.weight"] == (FP8_DTYPE, (4096, 2048))
    assert plan["model.layers.1.mlp.experts.31.down_proj.weight_scale_inv"] == (torch.float32, (32, 16))
    assert plan["model.layers.0.self_attn.o_proj.weight"] == (torch.bfloat16, (4096, 64 * 128))
    assert plan["model.layers.1.mlp.gate.weight"] == (torch.float32, (32, 4096))
    assert "model.mtp.layers.0.eh_proj.weight" in plan and "model.layers.2.input_layernorm.weight" not in plan
    total = sum(torch.empty((), dtype=dt).element_size() * torch.Size(s).numel() for dt, s in plan.values())
    assert 4.1e9 < total < 4.2e9


def test_same_layout_as_save_model(cfg, synth, tmp_path):
    """Names, dtypes, shapes and the config's quantization block equal what save_model writes for a real model."""
    ref = save_model(make_model(cfg), tmp_path / "ref", dtype=torch.bfloat16, fp8=True, fp8_block_size=BLOCK)
    ours, theirs = read_headers(synth), read_headers(ref)
    assert {n: (h["dtype"], h["shape"]) for n, h in ours.items()} == \
        {n: (h["dtype"], h["shape"]) for n, h in theirs.items()}
    a, b = json.loads((synth / "config.json").read_text()), json.loads((ref / "config.json").read_text())
    assert a["quantization_config"] == b["quantization_config"]
    index = json.loads((synth / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(ours)
    assert not (synth / "tokenizer.json").exists()


def test_values_by_role_and_seeded(cfg, synth, tmp_path):
    t = _tensors(synth)
    assert torch.equal(t["model.norm.weight"].float(), torch.ones(cfg.hidden_size))
    w = t["model.layers.1.mlp.experts.0.gate_proj.weight"].float() * \
        t["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert 0.015 < w.std().item() < 0.025                                      # N(0, 0.02) through FP8
    assert 0.005 < t["model.embed_tokens.weight"].float().std().item() < 0.03
    # the same seed with another shard split gives the same tensors; another seed does not
    again = _tensors(write_synthetic_checkpoint(tmp_path / "again", cfg, seed=3, fp8_block=BLOCK,
                                                max_shard_bytes=None))
    assert (tmp_path / "again" / "model.safetensors").exists()
    assert t.keys() == again.keys()
    assert all(torch.equal(t[k].view(torch.uint8), again[k].view(torch.uint8)) for k in t)
    other = _tensors(write_synthetic_checkpoint(tmp_path / "other", cfg, seed=4, fp8_block=BLOCK))
    assert not torch.equal(t["lm_head.weight"], other["lm_head.weight"])


def test_loads_in_mimoflash_and_transformers(synth):
    transformers = pytest.importorskip("transformers", reason="transformers 5.23 is the parity oracle (dev extra)")
    ours = load_model(synth, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(synth, dtype=torch.float32,
                                                           attn_implementation="eager").float().eval()
    ids = torch.tensor([[1, 7, 99, 3, 250, 17, 42, 5]])
    with torch.no_grad():
        a = ours(ids)
        a = a.logits if hasattr(a, "logits") else a
        b = hf(ids).logits
    assert ours.config.num_nextn_predict_layers == 1
    assert (a - b).abs().max().item() <= 1e-4


def test_streams_without_materialising_the_model(tmp_path):
    """~300 MB of bf16 tensors written in a child process: its peak RSS grows by far less than the checkpoint."""
    child = r"""
import json, resource, sys
import torch
from mimoflash.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
from conftest import tiny_config
cfg = synthetic_config(2, 64, 2, 0, tiny_config(hidden_size=256, moe_intermediate_size=1024, vocab_size=4096))
torch.ones(1).sum()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
root = write_synthetic_checkpoint(sys.argv[1], cfg, fp8=False, max_shard_bytes=64 << 20)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(json.dumps({"peak": peak, "files": sum(f.stat().st_size for f in root.glob("*.safetensors"))}))
"""
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path / "big")], capture_output=True, text=True,
                         cwd=str(Path(__file__).parent), timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["files"] > 100e6
    assert r["peak"] < 0.25 * r["files"], r


def test_cli(tmp_path, capsys):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(tiny_config().to_dict()))
    cmd = [sys.executable, "-m", "mimoflash.checkpoint.synthetic", "--out", str(tmp_path / "c"), "--config",
           str(base), "--layers", "2", "--experts", "4", "--experts-per-tok", "2", "--shard-size", "100kB"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["bytes"] == sum(f.stat().st_size for f in (tmp_path / "c").glob("*.safetensors"))
    assert load_model(tmp_path / "c").config.n_routed_experts == 4
    # bad input: exit 1 and one clear line (in-process: the same main() the command runs)
    assert main(cmd[3:-2] + ["--experts-per-tok", "8"]) == 1
    assert "experts_per_tok=8 exceeds experts=4" in capsys.readouterr().err
    assert main(cmd[3:-2] + ["--shard-size", "lots"]) == 1
    assert "not a size: 'lots'" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 512 << 20 and parse_size("2e3") == 2000
    assert parse_size("8G") == 8 << 30 and parse_size("8G") == parse_bytes("8G")
    for bad in ("", "GB", "-1GB", "1XB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)
