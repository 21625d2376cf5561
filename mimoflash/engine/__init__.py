"""Inference engine: request -> scheduler -> KV cache -> runner -> sampler (docs/ENGINE.md has the walk-through).

Modules, in the order a request meets them:
  sampling.py   SamplingParams (validated, vLLM names) and the seeded per-row sampler
  request.py    Request state machine and the output types (RequestOutput, CompletionOutput, RequestMetrics)
  kv_cache.py   hybrid cache: paged blocks for global layers, per-sequence rings for sliding-window layers
  scheduler.py  continuous batching, chunked prefill, preemption (pure Python)
  runner.py     batch -> ragged tensors + attention metadata -> one forward -> logits
  engine.py     LLMEngine.step(): the loop tying them together, detokenization and stop strings
  llm.py        LLM: generate / generate_stream / chat
  cli.py        `mimoflash generate` and `mimoflash chat`
"""

from .sampling import SamplingParams

__all__ = ["SamplingParams", "LLM", "LLMEngine", "EngineConfig"]


def __getattr__(name: str):
    # Lazy: `from mimoflash.engine import SamplingParams` must not import the model code.
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name in ("LLMEngine", "EngineConfig"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'mimoflash.engine' has no attribute {name!r}")
