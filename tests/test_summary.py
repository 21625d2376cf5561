"""`mimoflash inspect` reproduces the published shape arithmetic of the real model (docs/MODEL.md §2.6, §4.2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mimoflash.config import MiMoConfig
from mimoflash.summary import count_parameters, kv_report, main
from tests.conftest import make_model, tiny_config

FIXTURE = Path(__file__).parent / "fixtures" / "mimo_v2_flash_config.json"


def test_real_config_parameter_counts():
    p = count_parameters(MiMoConfig.from_file(FIXTURE))
    assert abs(p["total"] / 1e9 - 308.78) < 0.01           # docs/MODEL.md §4.2: 308.78B main model
    assert abs(p["active"] / 1e9 - 15.4) < 0.1              # docs/MODEL.md §6: 15.4B active incl. embeddings
    assert abs(p["mtp_per_layer"] / 1e9 - 0.329) < 0.001    # docs/MODEL.md §3.2: ~0.329B per MTP layer
    assert abs((p["total"] + p["mtp_total"]) / 1e9 - 309.77) < 0.01


def test_real_config_kv_bytes():
    kv = kv_report(MiMoConfig.from_file(FIXTURE), context=262144, batch=1)
    assert kv["bytes_per_token_global_layers"] == 9 * 4 * (192 + 128) * 2 == 22.5 * 1024
    assert kv["bytes_per_token_per_swa_layer"] == 8 * 320 * 2
    assert abs(kv["kv_bytes"] / 2**30 - 5.65) < 0.05 and abs(kv["kv_bytes_all_global"] / 2**30 - 30.0) < 0.01
    assert 5.2 < kv["ratio_all_global_over_ours"] < 5.4      # docs/MODEL.md §2.6: ~5.3x


def test_counts_match_instantiated_model():
    cfg = tiny_config(num_nextn_predict_layers=2)
    model = make_model(cfg)
    n_main = sum(p.numel() for n, p in model.named_parameters() if ".mtp." not in n)
    n_mtp = sum(p.numel() for n, p in model.named_parameters() if ".mtp." in n)
    p = count_parameters(cfg)
    assert (p["total"], p["mtp_total"]) == (n_main, n_mtp)


def test_cli_json_and_errors(capsys, tmp_path):
    assert main([str(FIXTURE), "--context", "32768", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["global_layers"] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope")])
    with pytest.raises(SystemExit):
        main([str(FIXTURE), "--context", "0"])


def test_cli_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "mimoflash", "inspect", str(FIXTURE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "308.78B" in r.stdout and "22.5 KiB/token" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mimoflash", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_inspect_lists_fp8_tensors_of_a_saved_checkpoint(tmp_path, capsys):
    from mimoflash.checkpoint.saver import save_model
    cfg = tiny_config(num_nextn_predict_layers=1)
    save_model(make_model(cfg), tmp_path, fp8=True, fp8_block_size=(16, 16))
    assert main([str(tmp_path), "--json"]) == 0
    fp8 = json.loads(capsys.readouterr().out)["fp8"]
    pats = fp8["fp8_patterns"]
    assert pats["model.layers.N.mlp.experts.N.gate_proj.weight"] == 7 * 8      # 7 MoE layers x 8 experts
    assert pats["model.layers.N.self_attn.q_proj.weight"] == 8
    assert not any("o_proj" in p or "embed" in p or "lm_head" in p for p in pats)


def test_dense_linear_count_is_what_the_cpu_panels_pack():
    """count_parameters' dense_linear equals the weights the bf16 CPU layout packs in panels (main model + MTP)."""
    import torch
    from mimoflash.engine.cpu_layout import use_cpu_layout
    cfg = tiny_config(num_nextn_predict_layers=2)
    model = make_model(cfg, dtype=torch.bfloat16)
    use_cpu_layout(model, torch.float32)
    packed = [p for m in model.modules() for p in (getattr(m, "_panels", None), getattr(m, "_qkv_panels", None))
              if p is not None]
    assert packed and sum(p.N * p.K for p in packed) == count_parameters(cfg)["dense_linear"]
