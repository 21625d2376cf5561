"""MiMoConfig: one dataclass that reads both config dialects of MiMo-V2-Flash.

Two dialects exist in the wild (docs/MODEL.md §1.1-1.2):

* the **official hub keys** (`hybrid_layer_pattern`, `moe_layer_freq`, `swa_*`, `sliding_window_size`,
  `layernorm_epsilon`, `rope_theta` / `swa_rope_theta`, `add_*_attention_sink_bias`, ...), read by SGLang, vLLM
  and Xiaomi's remote code;
* the **transformers 5.x keys** (`layer_types`, `mlp_layer_types`, nested `rope_parameters`, `sliding_window`,
  `rms_norm_eps`), which ignore most official keys and hard-code the rest (SWA kv heads = 2 x GA kv heads, SWA dims
  = GA dims, sinks on every SWA layer and never on GA layers).

Field names are the official keys verbatim; `from_dict` maps the transformers keys onto them and refuses
contradictions (both dialects present but disagreeing). When an official key is absent, the default reproduces
what transformers would build, so a transformers-only config yields the same network in both libraries.

Sliding window (docs/MODEL.md §2.4): engines disagree by one key. `sliding_window_convention` makes the choice explicit:

* ``"previous"`` (default, = transformers 5.23 and SGLang): query i sees the `sliding_window_size` previous keys
  plus itself, i.e. keys ``[i - W, i]`` — ``W + 1`` keys.
* ``"total"`` (= vLLM, NeMo, Megatron-Bridge): ``W`` keys in all, ``[i - W + 1, i]``.

`swa_keys` is the resulting number of keys a sliding-window query attends to.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys we read but that change nothing in the network (kept so they round-trip into saved configs).
_INERT_KEYS = {
    "architectures", "model_type", "auto_map", "transformers_version", "attention_chunk_size", "hybrid_block_size",
    "use_cache", "attention_dropout", "output_router_logits", "dtype", "torch_dtype", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id", "num_local_experts", "router_aux_loss_coef", "_name_or_path",
    "return_dict", "output_hidden_states", "output_attentions", "tie_encoder_decoder", "is_encoder_decoder",
    "use_return_dict", "chunk_size_feed_forward", "rope_scaling", "swa_rope_scaling", "mimoflash",
}
# transformers-dialect keys handled explicitly by `from_dict`.
_HF_KEYS = {"layer_types", "mlp_layer_types", "rope_parameters", "sliding_window", "rms_norm_eps"}

LAYER_TYPE_NAMES = {0: "full_attention", 1: "sliding_attention"}
MLP_TYPE_NAMES = {0: "dense", 1: "sparse"}


class ConfigError(ValueError):
    """A config value is invalid or two keys contradict each other; the message names the key(s)."""


@dataclass
class MiMoConfig:
    vocab_size: int = 152576
    hidden_size: int = 4096
    num_hidden_layers: int = 48
    # global-attention (GA) layers
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 192            # Q/K head dim
    v_head_dim: int = 128          # V head dim (smaller than Q/K: K and V caches have different widths)
    # sliding-window (SWA) layers; None = transformers' hard-coded choice (see module docstring)
    swa_num_attention_heads: int | None = None
    swa_num_key_value_heads: int | None = None
    swa_head_dim: int | None = None
    swa_v_head_dim: int | None = None
    hybrid_layer_pattern: list[int] | None = None   # per layer: 0 = GA, 1 = SWA
    moe_layer_freq: list[int] | None = None         # per layer: 0 = dense SwiGLU, 1 = routed MoE
    intermediate_size: int = 16384                  # dense MLP (layer 0 and MTP blocks)
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int | None = None
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float | None = 1.0       # null in the hub file = 1.0
    sliding_window_size: int = 128
    sliding_window_convention: str = "previous"      # "previous" (W+1 keys) | "total" (W keys)
    add_swa_attention_sink_bias: bool = True
    add_full_attention_sink_bias: bool = False
    attention_value_scale: float | None = 0.707
    attention_bias: bool = False
    partial_rotary_factor: float = 0.334
    rope_theta: float = 5_000_000.0
    swa_rope_theta: float = 10_000.0
    max_position_embeddings: int = 262144
    layernorm_epsilon: float = 1e-5
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0               # MTP blocks (model.mtp.layers.N)
    quantization_config: dict | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = "bfloat16"
    extra: dict = field(default_factory=dict, repr=False)   # inert keys, preserved for round trips

    def __post_init__(self) -> None:
        L = self.num_hidden_layers
        if self.hybrid_layer_pattern is None:
            # transformers' default formula; equals the official 48-layer pattern.
            self.hybrid_layer_pattern = [0 if (i == 0 or (i + 1) % 6 == 0) else 1 for i in range(L)]
        if self.moe_layer_freq is None:
            self.moe_layer_freq = [0] + [1] * (L - 1)
        if self.routed_scaling_factor is None:
            self.routed_scaling_factor = 1.0
        if self.attention_value_scale is None:
            self.attention_value_scale = 1.0
        if self.swa_num_attention_heads is None:
            self.swa_num_attention_heads = self.num_attention_heads
        if self.swa_num_key_value_heads is None:
            self.swa_num_key_value_heads = 2 * self.num_key_value_heads
        if self.swa_head_dim is None:
            self.swa_head_dim = self.head_dim
        if self.swa_v_head_dim is None:
            self.swa_v_head_dim = self.v_head_dim
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config key '{key}': {msg}")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "v_head_dim", "swa_num_attention_heads", "swa_num_key_value_heads", "swa_head_dim",
                    "swa_v_head_dim", "intermediate_size", "sliding_window_size", "max_position_embeddings"):
            v = getattr(self, key)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, key, f"must be a positive integer, got {v!r}")
        L = self.num_hidden_layers
        for key in ("hybrid_layer_pattern", "moe_layer_freq"):
            pat = getattr(self, key)
            need(isinstance(pat, list), key, f"must be a list of 0/1 per layer, got {type(pat).__name__}")
            need(len(pat) == L, key, f"has {len(pat)} entries but num_hidden_layers is {L}")
            need(all(p in (0, 1) for p in pat), key, f"entries must be 0 or 1, got {sorted(set(pat))}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"num_attention_heads={self.num_attention_heads} is not divisible by num_key_value_heads="
             f"{self.num_key_value_heads}")
        need(self.swa_num_attention_heads % self.swa_num_key_value_heads == 0, "swa_num_key_value_heads",
             f"swa_num_attention_heads={self.swa_num_attention_heads} is not divisible by swa_num_key_value_heads="
             f"{self.swa_num_key_value_heads}")
        if any(self.moe_layer_freq):
            for key in ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
                v = getattr(self, key)
                need(isinstance(v, int) and v > 0, key, f"must be a positive integer, got {v!r}")
            need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"{self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}")
            need(self.n_routed_experts % self.n_group == 0, "n_group",
                 f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            need(self.topk_group <= self.n_group, "topk_group", f"{self.topk_group} > n_group={self.n_group}")
            need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                 "num_experts_per_tok", "larger than the experts left after group-limited selection")
            if self.n_group > 1:
                need(self.n_routed_experts // self.n_group >= 2, "n_group",
                     "group scores sum the top-2 experts of a group, so each group needs >= 2 experts")
        need(self.scoring_func == "sigmoid", "scoring_func", f"only 'sigmoid' is supported, got {self.scoring_func!r}")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"), "topk_method",
             f"unsupported value {self.topk_method!r}")
        need(not self.n_shared_experts, "n_shared_experts", "MiMo-V2-Flash has no shared expert; must be null or 0")
        need(self.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        need(not self.attention_bias, "attention_bias", "MiMo has no q/k/v/o bias; true is not supported")
        need(self.sliding_window_convention in ("previous", "total"), "sliding_window_convention",
             f"must be 'previous' or 'total', got {self.sliding_window_convention!r}")
        need(0 < self.partial_rotary_factor <= 1, "partial_rotary_factor", f"must be in (0, 1], got "
             f"{self.partial_rotary_factor}")
        for kind, d in (("head_dim", self.head_dim), ("swa_head_dim", self.swa_head_dim)):
            rd = int(d * self.partial_rotary_factor)
            need(rd >= 2 and rd % 2 == 0, kind, f"rotary dim int({d}*{self.partial_rotary_factor})={rd} must be even and >= 2")
        need(self.layernorm_epsilon > 0, "layernorm_epsilon", "must be > 0")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        if self.quantization_config is not None:
            q = self.quantization_config
            need(isinstance(q, dict), "quantization_config", "must be an object")
            need(q.get("quant_method") == "fp8", "quantization_config.quant_method",
                 f"only 'fp8' is supported, got {q.get('quant_method')!r}")
            bs = q.get("weight_block_size")
            need(isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs),
                 "quantization_config.weight_block_size", f"must be [rows, cols] of positive ints, got {bs!r}")

    # ------------------------------------------------------------------ derived properties
    def is_sliding(self, layer_idx: int) -> bool:
        return self.hybrid_layer_pattern[layer_idx] == 1

    def is_moe(self, layer_idx: int) -> bool:
        return self.moe_layer_freq[layer_idx] == 1

    @property
    def swa_keys(self) -> int:
        """Number of keys a sliding-window query attends to (itself included)."""
        W = self.sliding_window_size
        return W + 1 if self.sliding_window_convention == "previous" else W

    def attn_shape(self, sliding: bool) -> tuple[int, int, int, int]:
        """(q heads, kv heads, qk head dim, v head dim) for one attention kind."""
        if sliding:
            return (self.swa_num_attention_heads, self.swa_num_key_value_heads, self.swa_head_dim, self.swa_v_head_dim)
        return (self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.v_head_dim)

    def rotary_dim(self, sliding: bool) -> int:
        return int(self.attn_shape(sliding)[2] * self.partial_rotary_factor)

    def has_sinks(self, sliding: bool) -> bool:
        return self.add_swa_attention_sink_bias if sliding else self.add_full_attention_sink_bias

    @property
    def fp8_block_size(self) -> tuple[int, int] | None:
        q = self.quantization_config
        return tuple(q["weight_block_size"]) if q else None

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, warn_unknown: bool = True) -> "MiMoConfig":
        """Build from either dialect (or a mix); see the mapping table in docs/CONFIG.md."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        d = dict(raw)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        out: dict[str, Any] = {}

        def agree(official: str, value: Any, hf_key: str) -> None:
            if official in d and d[official] is not None and d[official] != value:
                raise ConfigError(f"config keys '{official}'={d[official]!r} and '{hf_key}' (={value!r} after mapping) "
                                  "contradict each other")
            out[official] = d[official] if d.get(official) is not None else value

        if d.get("layer_types") is not None:
            lt = d["layer_types"]
            bad = [t for t in lt if t not in ("full_attention", "sliding_attention")]
            if bad:
                raise ConfigError(f"config key 'layer_types': unknown layer types {sorted(set(bad))}")
            agree("hybrid_layer_pattern", [1 if t == "sliding_attention" else 0 for t in lt], "layer_types")
        if d.get("mlp_layer_types") is not None:
            mt = d["mlp_layer_types"]
            bad = [t for t in mt if t not in ("dense", "sparse")]
            if bad:
                raise ConfigError(f"config key 'mlp_layer_types': unknown MLP types {sorted(set(bad))}")
            agree("moe_layer_freq", [1 if t == "sparse" else 0 for t in mt], "mlp_layer_types")
        if d.get("rms_norm_eps") is not None:
            agree("layernorm_epsilon", d["rms_norm_eps"], "rms_norm_eps")
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
            for kind, key in (("full_attention", "rope_theta"), ("sliding_attention", "swa_rope_theta")):
                p = rp.get(kind) or {}
                if p.get("rope_type", "default") != "default":
                    raise ConfigError(f"config key 'rope_parameters.{kind}.rope_type': only 'default' is supported")
                if "rope_theta" in p:
                    agree(key, float(p["rope_theta"]), f"rope_parameters.{kind}.rope_theta")
            factors = {p.get("partial_rotary_factor") for p in rp.values() if isinstance(p, dict)} - {None}
            if len(factors) > 1:
                raise ConfigError("config key 'rope_parameters': partial_rotary_factor differs between layer types")
            if factors:
                agree("partial_rotary_factor", factors.pop(), "rope_parameters.*.partial_rotary_factor")
        elif rp is not None:
            raise ConfigError("config key 'rope_parameters': expected a dict keyed by layer type "
                              "('full_attention' / 'sliding_attention')")
        for key in ("rope_scaling",):
            val = d.get(key)
            if val not in (None, {}) and (not isinstance(val, dict) or val.get("rope_type", val.get("type")) != "default"):
                raise ConfigError(f"config key '{key}': rope scaling is not part of MiMo-V2-Flash; got {val!r}")
        sw = d.get("sliding_window")
        if sw is not None:
            if d.get("sliding_window_size") is None:
                # transformers stores keys-seen (W+1) in `sliding_window` under the "previous" convention.
                out["sliding_window_size"] = sw - 1
            elif sw not in (d["sliding_window_size"], d["sliding_window_size"] + 1):
                raise ConfigError(f"config keys 'sliding_window'={sw} and 'sliding_window_size'="
                                  f"{d['sliding_window_size']} contradict each other (expected equal or size+1)")
        conv = (d.get("mimoflash") or {}).get("sliding_window_convention") if isinstance(d.get("mimoflash"), dict) else None
        if conv is not None and "sliding_window_convention" not in d:
            out["sliding_window_convention"] = conv

        extra = {}
        unknown = []
        for k, v in d.items():
            if k in names:
                if k not in out:
                    out[k] = v
            elif k in _HF_KEYS:
                continue
            elif k in _INERT_KEYS:
                extra[k] = v
            else:
                unknown.append(k)
                extra[k] = v
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "torch_dtype"):
            if k in extra:
                out[k] = extra.pop(k)
        if "torch_dtype" not in out and "dtype" in extra:
            out["torch_dtype"] = extra["dtype"]
        if unknown and warn_unknown:
            warnings.warn(f"MiMoConfig: ignoring unknown config keys {sorted(unknown)}", stacklevel=2)
        try:
            return cls(**out, extra=extra)
        except TypeError as e:  # pragma: no cover - dataclass arg errors are reported as config errors
            raise ConfigError(str(e)) from e

    @classmethod
    def from_file(cls, path: str | Path) -> "MiMoConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(raw)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """Official keys plus the transformers 5.x keys, so that both stacks read the same network.

        `rope_scaling` is never written: transformers 5.23 replaces its nested rope dict with it and then fails
        (docs/MODEL.md §1.3)."""
        d = {k: v for k, v in self.extra.items() if k not in ("rope_scaling", "dtype", "mimoflash")}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("extra", "sliding_window_convention")})
        d["architectures"] = ["MiMoV2FlashForCausalLM"]
        d["model_type"] = "mimo_v2_flash"
        if d.get("quantization_config") is None:
            d.pop("quantization_config")
        d["mimoflash"] = {"sliding_window_convention": self.sliding_window_convention}
        # transformers dialect
        d["layer_types"] = [LAYER_TYPE_NAMES[p] for p in self.hybrid_layer_pattern]
        d["mlp_layer_types"] = [MLP_TYPE_NAMES[p] for p in self.moe_layer_freq]
        d["rms_norm_eps"] = self.layernorm_epsilon
        d["rope_parameters"] = {
            kind: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": self.partial_rotary_factor}
            for kind, theta in (("full_attention", self.rope_theta), ("sliding_attention", self.swa_rope_theta))
        }
        d["sliding_window"] = self.swa_keys if self.sliding_window_convention == "previous" else self.sliding_window_size
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def transformers_compatible(self) -> list[str]:
        """Reasons transformers 5.23 would build a *different* network from this config (empty = same network)."""
        why = []
        if self.swa_num_key_value_heads != 2 * self.num_key_value_heads:
            why.append("swa_num_key_value_heads must be 2 * num_key_value_heads")
        if self.swa_num_attention_heads != self.num_attention_heads:
            why.append("swa_num_attention_heads must equal num_attention_heads")
        if (self.swa_head_dim, self.swa_v_head_dim) != (self.head_dim, self.v_head_dim):
            why.append("SWA head dims must equal GA head dims")
        if not self.add_swa_attention_sink_bias or self.add_full_attention_sink_bias:
            why.append("transformers puts sinks on every SWA layer and none on GA layers")
        if self.sliding_window_convention != "previous":
            why.append("transformers only implements the 'previous' (W+1 keys) window convention")
        return why

    def replace(self, **changes: Any) -> "MiMoConfig":
        return dataclasses.replace(self, **changes)
