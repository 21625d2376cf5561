"""MiMoConfig reads both dialects, maps them as documented in docs/CONFIG.md, and refuses bad values by name."""

import json
import warnings
from pathlib import Path

import pytest

from mimoflash.config import ConfigError, MiMoConfig

FIXTURE = Path(__file__).parent / "fixtures" / "mimo_v2_flash_config.json"


def test_official_config_reads_exactly():
    cfg = MiMoConfig.from_file(FIXTURE)
    ga = [i for i in range(48) if not cfg.is_sliding(i)]
    assert ga == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert [cfg.is_moe(i) for i in range(3)] == [False, True, True]
    assert cfg.attn_shape(False) == (64, 4, 192, 128) and cfg.attn_shape(True) == (64, 8, 192, 128)
    assert cfg.rotary_dim(True) == 64 and cfg.rope_theta == 5e6 and cfg.swa_rope_theta == 1e4
    assert cfg.routed_scaling_factor == 1.0          # null in the hub file
    assert cfg.swa_keys == 129                        # "previous" convention: 128 previous keys + the query
    assert cfg.has_sinks(True) and not cfg.has_sinks(False)
    assert cfg.fp8_block_size == (128, 128) and cfg.num_nextn_predict_layers == 3


def test_transformers_dialect_maps_to_official_fields():
    hf = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 1, "head_dim": 16, "v_head_dim": 8,
          "layer_types": ["full_attention", "sliding_attention", "full_attention"],
          "mlp_layer_types": ["dense", "sparse", "sparse"], "rms_norm_eps": 1e-6, "sliding_window": 9,
          "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 50.0, "partial_rotary_factor": 0.5}},
          "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8, "intermediate_size": 16}
    cfg = MiMoConfig.from_dict(hf)
    assert cfg.hybrid_layer_pattern == [0, 1, 0] and cfg.moe_layer_freq == [0, 1, 1]
    assert cfg.layernorm_epsilon == 1e-6 and cfg.rope_theta == 1000.0 and cfg.swa_rope_theta == 50.0
    assert cfg.partial_rotary_factor == 0.5
    # transformers' `sliding_window` counts keys incl. the query: 9 -> 8 previous keys
    assert cfg.sliding_window_size == 8 and cfg.swa_keys == 9
    # transformers hard-codes SWA kv heads = 2x GA kv heads and equal dims; absent official keys default to that
    assert cfg.attn_shape(True) == (4, 2, 16, 8)


def test_round_trip_through_to_dict_both_dialects():
    cfg = MiMoConfig.from_file(FIXTURE)
    d = cfg.to_dict()
    assert "rope_scaling" not in d                     # transformers 5.23 breaks on it (docs/MODEL.md §1.3)
    assert d["layer_types"][0] == "full_attention" and d["sliding_window"] == 129
    again = MiMoConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d


def test_window_convention_total():
    cfg = MiMoConfig.from_dict({**json.loads(FIXTURE.read_text()), "sliding_window_convention": "total"})
    assert cfg.swa_keys == 128
    assert MiMoConfig.from_dict(cfg.to_dict()).swa_keys == 128


def test_unknown_keys_warn_with_names():
    raw = json.loads(FIXTURE.read_text())
    raw.update({"frobnicate": 1, "zeta_key": 2})
    with pytest.warns(UserWarning, match=r"\['frobnicate', 'zeta_key'\]"):
        MiMoConfig.from_dict(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MiMoConfig.from_file(FIXTURE)                  # the official file has no unknown keys


@pytest.mark.parametrize("change, key", [
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"swa_num_key_value_heads": 5}, "swa_num_key_value_heads"),
    ({"hybrid_layer_pattern": [0, 1]}, "hybrid_layer_pattern"),
    ({"moe_layer_freq": [2] * 48}, "moe_layer_freq"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"n_group": 3}, "n_group"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"n_shared_experts": 1}, "n_shared_experts"),
    ({"sliding_window": 7}, "sliding_window"),
    ({"layer_types": ["full_attention"] * 48}, "hybrid_layer_pattern"),
    ({"rms_norm_eps": 1e-3}, "layernorm_epsilon"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_scaling"),
    ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
])
def test_invalid_or_contradictory_values_name_the_key(change, key):
    raw = {**json.loads(FIXTURE.read_text()), **change}
    with pytest.raises(ConfigError, match=key):
        MiMoConfig.from_dict(raw)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MiMoConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MiMoConfig.from_file(tmp_path)
