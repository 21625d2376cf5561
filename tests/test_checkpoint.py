"""Checkpoint I/O: block-FP8 against its loop reference, save/load round trips, official-layout parity with
transformers 5.23, and the strict loader's error messages (each names the tensor or file at fault)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mimoflash.checkpoint import keys
from mimoflash.checkpoint.fp8 import (FP8_DTYPE, dequantize_fp8_block, dequantize_fp8_block_reference,
                                      quantize_fp8_block, quantize_fp8_block_reference)
from mimoflash.checkpoint.loader import CheckpointError, load_model
from mimoflash.checkpoint.saver import save_model
from tests.conftest import make_model, tiny_config

IDS = torch.randint(0, 512, (2, 3 * 5 + 4), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


@pytest.fixture(scope="module")
def model():
    return make_model(tiny_config(), seed=3)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """fp32 single-file checkpoint of `model`; tests that damage it work on a copy (see `ckpt`)."""
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "fp32", dtype=torch.float32)


@pytest.fixture
def ckpt(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "ckpt")


def hf_load(path):
    transformers = pytest.importorskip("transformers", reason="transformers 5.23 is the parity oracle (dev extra)")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return hf.float().eval()


# ------------------------------------------------------------------------------------------------ FP8 format
@pytest.mark.parametrize("shape,block", [((64, 48), (16, 16)), ((50, 37), (16, 12)), ((33, 40), (7, 128))])
def test_fp8_matches_loop_reference(shape, block):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    w[: block[0], : block[1]] = 0                                     # an all-zero block must not give NaN
    q, s = quantize_fp8_block(w, block)
    q_ref, s_ref = quantize_fp8_block_reference(w, block)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert s.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    deq = dequantize_fp8_block(q, s, block, torch.float32)
    assert torch.equal(deq, dequantize_fp8_block_reference(q, s, block))
    assert not deq.isnan().any() and (deq[: block[0], : block[1]] == 0).all()
    assert ((deq - w).abs() <= w.abs() / 8 + 1e-6 * s.max()).all()  # E4M3 keeps 3 mantissa bits


def test_fp8_rejects_wrong_scale_shape():
    q, s = quantize_fp8_block(torch.randn(32, 32), (16, 16))
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj.*\(1, 2\).*expected \(2, 2\)"):
        dequantize_fp8_block(q, s[:1], (16, 16), name="layers.0.q_proj")


# ------------------------------------------------------------------------------------------------ round trips
def test_round_trip_fp32_is_exact_including_mtp(model, saved):
    loaded = load_model(saved, dtype="float32")
    assert loaded.config.num_nextn_predict_layers == 1
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert any(".mtp." in k for k in got)
    assert torch.equal(logits(model), logits(loaded))
    assert torch.equal(model.model.rotary["full"].inv_freq, loaded.model.rotary["full"].inv_freq)
    assert torch.equal(model.model.rotary["sliding"].inv_freq, loaded.model.rotary["sliding"].inv_freq)


def test_bf16_load_keeps_router_fp32(saved):
    loaded = load_model(saved, dtype=torch.bfloat16, progress=True)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


@pytest.mark.parametrize("block", [(16, 16), (16, 24)])             # (16, 24) leaves ragged edge blocks
def test_round_trip_fp8_equals_dequantized_reference(model, tmp_path, block):
    path = save_model(model, tmp_path / "fp8", dtype=torch.float32, fp8=True, fp8_block_size=block)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == list(block)
    loaded = load_model(path, dtype=torch.float32)
    reference = make_model(tiny_config(), seed=3)
    n_quantized = 0
    for pname, t in reference.state_dict().items():
        for oname, part in keys.internal_to_official(pname, t):
            if keys.is_fp8_candidate(oname, block):
                part.copy_(dequantize_fp8_block(*quantize_fp8_block(part, block), block, torch.float32))
                n_quantized += 1
    assert n_quantized > 50
    ref_sd, got_sd = reference.state_dict(), loaded.state_dict()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    assert torch.equal(logits(reference), logits(loaded))


def test_tied_embeddings_round_trip(tmp_path):
    model = make_model(tiny_config(tie_word_embeddings=True, num_nextn_predict_layers=0), seed=5)
    path = save_model(model, tmp_path / "tied", dtype=torch.float32)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    loaded = load_model(path, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(model), logits(loaded))


def test_tokenizer_files_are_copied(model, tmp_path):
    src = tmp_path / "tok"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text('{"x": 1}')
    path = save_model(model, tmp_path / "with_tok", tokenizer_dir=src)
    assert (path / "tokenizer.json").read_text() == "{}" and (path / "tokenizer_config.json").exists()


# ------------------------------------------------------------------------------------------------ transformers
def test_official_layout_parity_with_transformers(model, tmp_path):
    """Block-FP8 [16,16], bf16 o_proj/embeddings, several shards + index, MTP tensors present: mimoflash and
    transformers must read the same (dequantized) network."""
    path = save_model(model, tmp_path / "official", dtype=torch.bfloat16, fp8=True, fp8_block_size=(16, 16),
                      max_shard_bytes=300_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2 and all(f"-of-{len(shards):05d}.safetensors" in s for s in shards)
    assert "model.layers.1.mlp.experts.7.down_proj.weight_scale_inv" in weight_map
    assert any(k.startswith("model.mtp.layers.0.") for k in weight_map)
    cfg = json.loads((path / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "fp8" and "model.layers.7.self_attn.o_proj" in q["ignored_layers"]
    # Keep only the official (hub) keys, as the release ships them: no transformers dialect, no MTP count.
    for key in ("layer_types", "mlp_layer_types", "rope_parameters", "sliding_window", "rms_norm_eps", "mimoflash",
                "num_nextn_predict_layers"):
        del cfg[key]
    (path / "config.json").write_text(json.dumps(cfg))
    first = load_file(path / weight_map["model.layers.0.self_attn.q_proj.weight"])
    assert first["model.layers.0.self_attn.q_proj.weight"].dtype == FP8_DTYPE
    o_proj = load_file(path / weight_map["model.layers.0.self_attn.o_proj.weight"])
    assert o_proj["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16
    router = load_file(path / weight_map["model.layers.1.mlp.gate.weight"])
    assert router["model.layers.1.mlp.gate.weight"].dtype == torch.float32

    ours, hf = load_model(path, dtype=torch.float32), hf_load(path)
    assert ours.config.num_nextn_predict_layers == 1
    a, b = logits(ours), hf(IDS).logits.detach()
    assert (a - b).abs().max().item() <= 1e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_reads_plain_checkpoints(model, tmp_path, dtype):
    path = save_model(model, tmp_path / str(dtype), dtype=dtype)
    ours, hf = load_model(path, dtype=torch.float32), hf_load(path)
    a, b = logits(ours), hf(IDS).logits.detach()
    assert (a - b).abs().max().item() <= 1e-4 and torch.equal(a.argmax(-1), b.argmax(-1))
    if dtype == torch.float32:
        assert torch.equal(a, logits(model))


# ------------------------------------------------------------------------------------------------ MTP count
@pytest.mark.parametrize("depth", [0, 2])
def test_mtp_count_inferred_when_key_absent(tmp_path, depth):
    model = make_model(tiny_config(num_nextn_predict_layers=depth), seed=4)
    path = save_model(model, tmp_path / "mtp", dtype=torch.float32, max_shard_bytes=1_000_000)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["num_nextn_predict_layers"]
    (path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(path, dtype=torch.float32)
    assert loaded.config.num_nextn_predict_layers == depth
    assert len(loaded.mtp_layers()) == depth


# ------------------------------------------------------------------------------------------------ strictness
def rewrite(ckpt, edit):
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing(.|\n)*model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(ckpt)


def test_unexpected_tensor(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(64, 128)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected(.|\n)*model\.layers\.1\.mlp\.experts\.8\.up_proj"):
        load_model(ckpt)


def test_wrong_shape_names_both_shapes(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.layers.3.self_attn.k_proj.weight": torch.zeros(90, 128)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight: checkpoint \[90, 128\] vs model \[96, 128\]"):
        load_model(ckpt)


def test_fp8_scale_problems(model, tmp_path):
    path = save_model(model, tmp_path / "fp8", dtype=torch.float32, fp8=True, fp8_block_size=(16, 16))
    rewrite(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight_scale_inv": torch.ones(2, 8)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight_scale_inv: checkpoint \[2, 8\] vs expected \[3, 8\]"):
        load_model(path)
    rewrite(path, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight: stored as F8_E4M3 but has no .*weight_scale_inv"):
        load_model(path)


def test_many_problems_are_listed_with_a_count(ckpt):
    rewrite(ckpt, lambda t: [t.pop(k) for k in list(t) if ".experts." in k])
    with pytest.raises(CheckpointError, match=r"missing(.|\n)*\.\.\. and \d+ more"):
        load_model(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable"):
        load_model(ckpt)


@pytest.mark.parametrize("damage", ["garbage_header", "header_size_too_large"])
def test_corrupt_header(ckpt, damage):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "garbage_header":
        data[8:40] = b"\xff" * 32
    else:
        data[:8] = (len(data) * 2).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable"):
        load_model(ckpt)


@pytest.fixture(scope="module")
def sharded(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "sharded", dtype=torch.float32,
                      max_shard_bytes=1_000_000)


@pytest.fixture
def shard_ckpt(sharded, tmp_path):
    return shutil.copytree(sharded, tmp_path / "sharded")


def shard_names(ckpt):
    names = sorted(p.name for p in ckpt.glob("model-*.safetensors"))
    assert len(names) >= 2
    return names


def test_missing_shard(shard_ckpt):
    gone = shard_names(shard_ckpt)[1]
    (shard_ckpt / gone).unlink()
    with pytest.raises(CheckpointError, match=gone.replace(".", r"\.") + ": shard file is missing"):
        load_model(shard_ckpt)


def test_bad_index_json(shard_ckpt):
    (shard_ckpt / "model.safetensors.index.json").write_text('{"weight_map": {')
    with pytest.raises(CheckpointError, match=r"index\.json: not a valid index JSON"):
        load_model(shard_ckpt)


def test_index_without_weight_map(shard_ckpt):
    (shard_ckpt / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"index\.json: has no usable 'weight_map'"):
        load_model(shard_ckpt)


def test_tensor_in_index_missing_from_shard(shard_ckpt):
    index_file = shard_ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = shard_names(shard_ckpt)[0]
    index["weight_map"]["model.layers.9.self_attn.q_proj.weight"] = first
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=first.replace(".", r"\.") + r"(.|\n)*layers\.9\.self_attn\.q_proj"):
        load_model(shard_ckpt)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        load_model(ckpt)


def test_bad_arguments(saved, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype"):
        load_model(saved, dtype="int8")
    with pytest.raises(ValueError, match="device"):
        load_model(saved, device="not-a-device")
