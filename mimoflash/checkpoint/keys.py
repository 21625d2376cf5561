"""The one table between checkpoint tensor names and mimoflash parameter names.

Official MiMo-V2-Flash layout (docs/MODEL.md §4) -> mimoflash:
| official checkpoint name                               | mimoflash parameter                      | transform        |
|--------------------------------------------------------|------------------------------------------|------------------|
| model.layers.L.mlp.experts.{e}.gate_proj.weight (F, D) | model.layers.L.mlp.experts.gate_proj     | stack over e     |
| model.layers.L.mlp.experts.{e}.up_proj.weight   (F, D) | model.layers.L.mlp.experts.up_proj       | stack over e     |
| model.layers.L.mlp.experts.{e}.down_proj.weight (D, F) | model.layers.L.mlp.experts.down_proj     | stack over e     |
| everything else (q/k/v/o_proj, attention_sink_bias, mlp.gate.*, norms, model.mtp.*, embed_tokens, lm_head) | same name | none |

`*.weight_scale_inv` siblings carry block-FP8 scales (checkpoint/fp8.py); they are consumed by the loader.
transformers 5.23 layout (used by the parity tests and by `to_transformers_state_dict`):
  experts fused as `mlp.experts.gate_up_proj` (E, 2F, D) = cat(gate, up) and `mlp.experts.down_proj` (E, D, F);
  `self_attn.attention_sink_bias` -> `self_attn.sinks`; `model.mtp.*` has no counterpart.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
SCALE_SUFFIX = "_scale_inv"          # "<name>.weight" + "_scale_inv" = "<name>.weight_scale_inv"


def official_to_internal(name: str) -> tuple[str, int | None]:
    """Checkpoint name -> (mimoflash parameter name, expert index or None)."""
    m = _EXPERT.match(name)
    if m:
        return f"{m['prefix']}.{m['proj']}", int(m["e"])
    return name, None


def is_stacked_expert(name: str) -> bool:
    """A mimoflash stacked expert parameter (`...mlp.experts.gate_proj`), stored as one tensor per expert."""
    return re.search(r"\.mlp\.experts\.(gate_proj|up_proj|down_proj)$", name) is not None


def expert_name(name: str, e: int) -> str:
    """Stacked expert parameter + expert index -> that expert's checkpoint name."""
    prefix, proj = name.rsplit(".", 1)
    return f"{prefix}.{e}.{proj}.weight"


def internal_to_official(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """mimoflash parameter -> checkpoint (name, tensor) pairs (one per expert for stacked expert weights)."""
    if is_stacked_expert(name):
        for e in range(tensor.shape[0]):
            yield expert_name(name, e), tensor[e]
    else:
        yield name, tensor


def is_fp8_candidate(name: str, block_size: tuple[int, int] | None) -> bool:
    """Which weights the official release stores in block-FP8 (docs/MODEL.md §4.2-4.3): 2-D projection weights except
    o_proj, embeddings, lm_head, the router and MTP eh_proj, which stay BF16/FP32."""
    if block_size is None or not name.endswith(".weight"):
        return False
    if any(s in name for s in ("o_proj", "embed_tokens", "lm_head", "mlp.gate.weight", "eh_proj", "norm")):
        return False
    return re.search(r"(q_proj|k_proj|v_proj|gate_proj|up_proj|down_proj)\.weight$", name) is not None


def to_transformers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mimoflash state dict -> transformers 5.23 MiMoV2FlashForCausalLM state dict (MTP dropped)."""
    out = {}
    for name, t in state_dict.items():
        if ".mtp." in name or name.endswith(("experts.gate_proj", "experts.up_proj")):
            continue
        if name.endswith("self_attn.attention_sink_bias"):
            out[name.replace("attention_sink_bias", "sinks")] = t
        else:
            out[name] = t
    for name, t in state_dict.items():
        if name.endswith("experts.gate_proj") and ".mtp." not in name:
            up = state_dict[name[: -len("gate_proj")] + "up_proj"]
            out[name[: -len("gate_proj")] + "gate_up_proj"] = torch.cat([t, up], dim=1)
    return out
