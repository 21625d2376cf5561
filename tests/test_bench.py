"""`mimoflash bench`: the measuring mode run as a user runs it (quick, on the shipped model), and `--plan` on the
release config checked against arithmetic done here from the config's numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mimoflash.bench import distinct_experts, main, step_bytes, weight_bytes

RELEASE = Path(__file__).parent / "fixtures" / "mimo_v2_flash_config.json"


def _run(*args, timeout=300):
    out = subprocess.run([sys.executable, "-m", "mimoflash", "bench", *args], capture_output=True, text=True,
                         timeout=timeout)
    return out.returncode, out.stdout, out.stderr


def test_quick_measure_on_the_shipped_model():
    rc, out, err = _run("--quick", "--threads", "1", "--price-per-hour", "2.0")
    assert rc == 0, err
    lines = out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["bench"] == "measure" and res["model"].endswith("default_model")
    assert any(line.lstrip().startswith("batch") for line in lines) and "CNY 0.7 / 2.1" in out
    roof = res["roofline"]
    assert all(roof[k] > 0 for k in ("read_bandwidth", "copy_bandwidth", "matmul_flops"))
    assert set(res["batches"]) == {"1", "4"}
    for b, r in res["batches"].items():
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
        assert r["bandwidth_bound_tok_s"] == pytest.approx(int(b) * roof["read_bandwidth"] / r["bytes_per_step"])
        assert r["fraction_of_bound"] == pytest.approx(r["decode_tok_s"] / r["bandwidth_bound_tok_s"])
        assert r["usd_per_mtok_output"] == pytest.approx(2.0 / 3600 / r["decode_tok_s"] * 1e6)
        assert r["usd_per_mtok_input"] == pytest.approx(2.0 / 3600 / r["prefill_tok_s"] * 1e6)
    # the shipped model's weights are bf16: a step reads all dense weights, 2 bytes each, plus its experts and KV
    assert res["weights"]["dtype"] == "bfloat16"
    assert res["batches"]["4"]["bytes_per_step"] > res["batches"]["1"]["bytes_per_step"]


def test_bytes_per_step_of_a_loaded_model(tiny_model):
    """Roles by name, once per storage, and the step formula: dense + B rows + L_moe * U(B) * expert + B * KV."""
    cfg = tiny_model.config
    wb = weight_bytes(tiny_model)
    expect = {"dense": 0, "experts": 0, "embedding": 0, "mtp": 0}
    for name, t in list(tiny_model.named_parameters()) + list(tiny_model.named_buffers()):
        if "inv_freq" in name:
            continue
        role = ("mtp" if ".mtp." in name else "embedding" if "embed_tokens" in name
                else "experts" if ".mlp.experts." in name else "dense")
        expect[role] += t.numel() * 4
    assert {k: wb[k] for k in expect} == expect and wb["row"] == cfg.hidden_size * 4
    L_moe = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    context = 10
    kv = sum((context if not cfg.is_sliding(i) else min(context, cfg.swa_keys))
             * cfg.attn_shape(cfg.is_sliding(i))[1] * (cfg.attn_shape(cfg.is_sliding(i))[2]
                                                       + cfg.attn_shape(cfg.is_sliding(i))[3]) * 2
             for i in range(cfg.num_hidden_layers))
    for B in (1, 3):
        U = E * (1 - (1 - k / E) ** B)
        want = wb["dense"] + B * wb["row"] + L_moe * U * per_expert + B * kv
        assert step_bytes(cfg, wb, B, context, 2) == pytest.approx(want)
    assert distinct_experts(256, 8, 1) == pytest.approx(8) and distinct_experts(256, 8, 10**6) == pytest.approx(256)


def _release_bytes(fp8: bool) -> dict:
    """Checkpoint bytes of the release computed by hand from its config: FP8 q/k/v/MLP/expert weights (1 byte +
    a 4-byte scale per 128x128 tile), bf16 o_proj/embeddings/lm_head/eh_proj/norms/sinks, fp32 router."""
    c = json.loads(RELEASE.read_text())
    H, V, nq, d, dv = c["hidden_size"], c["vocab_size"], c["num_attention_heads"], c["head_dim"], c["v_head_dim"]
    F, f, E = c["intermediate_size"], c["moe_intermediate_size"], c["n_routed_experts"]

    def lin(rows, cols, quant=True):         # one weight (+ scale grid)
        if quant and fp8:
            return rows * cols + (rows // 128) * (cols // 128) * 4
        return rows * cols * 2

    def attn(nkv, sinks):
        return (lin(nq * d, H) + lin(nkv * d, H) + lin(nkv * dv, H) + lin(H, nq * dv, quant=False)
                + (nq * 2 if sinks else 0))
    dense_mlp = 2 * lin(F, H) + lin(H, F)
    expert = 2 * lin(f, H) + lin(H, f)
    layers, experts = 0, 0
    for i, (swa, moe) in enumerate(zip(c["hybrid_layer_pattern"], c["moe_layer_freq"])):
        layers += attn(c["swa_num_key_value_heads"] if swa else c["num_key_value_heads"], swa) + 2 * H * 2
        if moe:
            layers += E * H * 4 + E * 4
            experts += E * expert
        else:
            layers += dense_mlp
    mtp = c["num_nextn_predict_layers"] * (5 * H * 2 + lin(H, 2 * H, quant=False)
                                           + attn(c["swa_num_key_value_heads"], True) + dense_mlp)
    # panels: the packed bf16 linears. FP8 weights: o_proj, lm_head, MTP eh_proj; bf16: every non-expert linear
    n_mtp, L = c["num_nextn_predict_layers"], len(c["hybrid_layer_pattern"])
    o_proj = H * nq * dv
    if fp8:
        panels = 2 * ((L + n_mtp) * o_proj + V * H + n_mtp * 2 * H * H)
    else:
        kv_heads = [c["swa_num_key_value_heads"] if swa else c["num_key_value_heads"]
                    for swa in c["hybrid_layer_pattern"]] + [c["swa_num_key_value_heads"]] * n_mtp
        qkv = sum(nq * d * H + nkv * (d + dv) * H for nkv in kv_heads)
        n_dense = c["moe_layer_freq"].count(0) + n_mtp
        panels = 2 * (qkv + (L + n_mtp) * o_proj + n_dense * 3 * F * H + V * H + n_mtp * 2 * H * H)
    return {"embedding": V * H * 2, "dense": layers + V * H * 2 + H * 2, "experts": experts,    # + lm_head, norm
            "mtp": mtp, "expert": expert, "panels": panels}


@pytest.mark.parametrize("fmt", ["--fp8", "--bf16"])
def test_plan_matches_hand_arithmetic(fmt, capsys):
    args = ["--plan", str(RELEASE), "--ram", "384GiB", "--bandwidth", "200GB/s", "--cores", "32", "--context",
            "32768", "--batch", "1", fmt]
    if fmt == "--fp8":                   # as a user runs it
        rc, out, err = _run(*args, timeout=120)
        assert rc == 0, err
    else:
        assert main(args) == 0
        out = capsys.readouterr().out
    p = json.loads(out.strip().splitlines()[-1])
    assert "bandwidth bound: B * bandwidth / step bytes" in out and "W_dense + L_moe * U(B) * W_expert" in out
    hand = _release_bytes(fp8=fmt == "--fp8")
    wb = p["memory"]["weights_by_role"]
    assert wb["embedding"] == hand["embedding"] and wb["experts"] == hand["experts"] and wb["mtp"] == hand["mtp"]
    assert wb["dense"] == hand["dense"]
    assert p["memory"]["weights"] == hand["embedding"] + hand["dense"] + hand["experts"] + hand["mtp"]
    assert p["memory"]["panels"] == hand["panels"]
    if fmt == "--fp8":                       # the release's files: about 310 GB
        assert 300e9 < p["memory"]["weights"] < 320e9
    # KV at 32k, bf16: 9 global layers x 4 kv heads x (192 + 128) x 32768 + 39 SWA layers x 8 x 320 x 129 keys
    kv = (9 * 4 * 320 * 32768 + 39 * 8 * 320 * 129) * 2
    assert p["memory"]["kv"] == kv
    step = hand["dense"] + 4096 * 2 + 47 * 8 * hand["expert"] + kv
    assert p["per_step"]["total"] == pytest.approx(step)
    assert p["decode_bandwidth_bound_tok_s"] == pytest.approx(200e9 / step)
    assert p["memory"]["fits"] == (fmt == "--fp8")     # 620 GB of bf16 weights do not fit in 384 GiB
    if fmt == "--fp8":
        assert p["decode_predicted_tok_s"] == pytest.approx(min(200e9 / step, p["compute_bound_tok_s"]))
    else:                       # bf16 experts are not memory-mapped by the engine: no prediction, said so
        assert p["decode_predicted_tok_s"] is None and "only for FP8 checkpoints" in out


def test_plan_batch_and_a_machine_too_small(capsys):
    assert main(["--plan", str(RELEASE), "--batch", "16", "--ram", "64GiB", "--bandwidth", "100GB/s",
                 "--disk-bandwidth", "5GB/s", "--json"]) == 0
    p = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    U = 256 * (1 - (1 - 8 / 256) ** 16)
    assert p["per_step"]["distinct_experts"] == pytest.approx(U)
    frac = p["memory"]["experts_not_resident_fraction"]
    assert not p["memory"]["fits"] and 0.8 < frac < 1
    ex = p["per_step"]["experts"]
    t = (p["per_step"]["total"] - frac * ex) / 100e9 + frac * ex / 5e9
    assert p["decode_predicted_tok_s"] == pytest.approx(min(16 / t, p["compute_bound_tok_s"]))
    assert main(["--plan", str(RELEASE), "--ram", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["decode_predicted_tok_s"] is None and "give --disk-bandwidth" in out


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    rc, _, err = _run("--plan", str(RELEASE), "--ram", "lots", timeout=120)
    assert rc == 1 and "not a size: 'lots'" in err and "Traceback" not in err
    for argv, msg in (([str(tmp_path / "missing")], "not a checkpoint directory"),
                      (["--quick", "--new", "1"], "--new >= 2"),
                      (["--plan", str(RELEASE), "--batch", "1", "16"], "one --batch")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_fp8_checkpoint_counts_the_experts_each_step_reads(tmp_path, capsys):
    """On an FP8 checkpoint the engine reads experts from its files; the bench takes their bytes from the expert
    store and counts the distinct experts per layer per decode step: exactly k for one sequence."""
    from mimoflash.checkpoint.synthetic import synthetic_config, write_synthetic_checkpoint
    from conftest import tiny_config
    cfg = synthetic_config(3, 8, 2, 0, tiny_config())
    path = write_synthetic_checkpoint(tmp_path / "fp8", cfg, fp8_block=(16, 16))
    assert main([str(path), "--quick", "--json", "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["weights"]["dtype"] == "float8_e4m3fn"
    per_expert = 3 * (cfg.hidden_size * cfg.moe_intermediate_size + (cfg.hidden_size // 16)
                      * (cfg.moe_intermediate_size // 16) * 4)                      # FP8 bytes + fp32 scales
    assert res["weights"]["experts"] == 2 * 8 * per_expert                           # 2 MoE layers x 8 experts
    one, four = res["batches"]["1"], res["batches"]["4"]
    assert one["experts_measured"] and one["experts_per_layer_step"] == 2
    assert 2 <= four["experts_per_layer_step"] <= 8
    kv = sum((16 + 4) * cfg.attn_shape(cfg.is_sliding(i))[1] * sum(cfg.attn_shape(cfg.is_sliding(i))[2:])
             if not cfg.is_sliding(i) else
             min(20, cfg.swa_keys) * cfg.attn_shape(True)[1] * sum(cfg.attn_shape(True)[2:])
             for i in range(cfg.num_hidden_layers)) * res["kv_elem_bytes"]
    assert one["bytes_per_step"] == res["weights"]["dense"] + res["weights"]["row"] + 2 * 2 * per_expert + kv
