"""mimoflash: Xiaomi MiMo-V2-Flash in plain PyTorch.

Public API (imports are lazy so that `import mimoflash` stays fast and the CLI starts quickly):
    load_model(path, dtype, device) -> MiMoForCausalLM
    save_model(model, path, ...)
    MiMoConfig, MiMoForCausalLM, Tokenizer
    LLM, SamplingParams                (inference engine, vLLM-shaped)
    default_model() -> path of the small model shipped in the package
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "MiMoConfig": "mimoflash.config",
    "MiMoForCausalLM": "mimoflash.model.mimo",
    "load_model": "mimoflash.checkpoint.loader",
    "save_model": "mimoflash.checkpoint.saver",
    "Tokenizer": "mimoflash.tokenizer",
    "LLM": "mimoflash.engine.llm",
    "SamplingParams": "mimoflash.engine.sampling",
    "default_model": "mimoflash.default",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mimoflash' has no attribute {name!r}")
