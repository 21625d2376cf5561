"""What the routes share: the server's configuration, the engine loop, the tokenizer and grammar compiler, and the
checks and figures every route needs (model name, sampling parameters against the context, submission with its
4xx/5xx mapping, usage and cost)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from ..engine.sampling import SamplingParams
from .engine_loop import EngineDead, EngineLoop, QueueFull
from .errors import APIError
from .metrics import ServerMetrics


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_n: int = 16
    max_body_bytes: int = 4 << 20
    price_input_per_m: float = 0.10          # USD per million prompt tokens (MiMo-V2-Flash API price, docs/MODEL.md §6)
    price_output_per_m: float = 0.30         # USD per million completion tokens
    mtp: int | None = None
    stream_interval: int = 1                 # at least this many tokens per SSE chunk after the first


class ServerState:
    def __init__(self, engine_loop: EngineLoop, tokenizer, cfg: ServerConfig):
        """`engine_loop`: started (its `info` describes the loaded engine); `tokenizer`: the model's, or None."""
        self.cfg, self.engine_loop, self.tok = cfg, engine_loop, tokenizer
        self.info = info = engine_loop.info
        self.metrics = engine_loop.metrics = ServerMetrics(self.cfg.served_model_name)
        self.max_model_len = info.max_model_len        # max_model_len, or less where the KV cache holds fewer
        self.vocab_size = info.vocab_size
        self.compiler = None
        from . import grammar
        if self.tok is not None and grammar.available():
            self.compiler = grammar.GrammarCompiler(self.tok, info.vocab_size, info.eos_token_ids)
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.cfg.served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.cfg.served_model_name!r}",
                           "model", code="model_not_found")

    def sampling(self, req, max_tokens: int | None, default_max: int | None, prompt_len: int,
                 logprobs: int | None) -> SamplingParams:
        """The request's sampling fields -> SamplingParams. `max_tokens` is what the client asked for (None:
        `default_max`, or the rest of the context when that is None too). A default is clipped to the room left in
        the context; an explicit value that does not fit is a 400, as in vLLM. The values themselves (stop as a
        string or list, top_k -1 = off, ranges) are SamplingParams' business: its ValueError names the field."""
        if req.n > self.cfg.max_n:
            raise APIError(400, f"n={req.n} is above this server's limit of {self.cfg.max_n}", "n")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        max_model_len = self.max_model_len
        room = max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context is {max_model_len} tokens and at "
                           "least one must be generated", "messages" if hasattr(req, "messages") else "prompt",
                           code="context_length_exceeded")
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"{field}={max_tokens} does not fit: the prompt has {prompt_len} tokens and the "
                           f"context is {max_model_len}, so at most {room} can be generated", field,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        kw = req.sampling_fields()
        try:
            return SamplingParams(**kw, max_tokens=max_tokens, logprobs=logprobs)
        except ValueError as e:
            field_ = re.match(r"SamplingParams\.(\w+)", str(e))
            raise APIError(400, str(e), field_.group(1) if field_ else None)

    async def submit(self, ids: list[int], params: SamplingParams, prompt: str | None, grammars=None):
        try:
            return await self.engine_loop.add(ids, params, prompt=prompt, grammars=grammars)
        except QueueFull as e:
            self.metrics.m(self.metrics.rejected, reason="queue_full").inc()
            raise APIError(429, str(e), None, code="queue_full")
        except EngineDead as e:
            raise APIError(503, str(e))
        except ValueError as e:
            raise APIError(400, str(e), "messages")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        c = self.cfg
        return round((prompt_tokens * c.price_input_per_m + completion_tokens * c.price_output_per_m) / 1e6, 10)

    def usage(self, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int, mx=None) -> dict:
        u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens,
             "prompt_tokens_details": {"cached_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
             "cost": self.cost(prompt_tokens, completion_tokens),
             "cost_details": {"input_usd_per_m": self.cfg.price_input_per_m,
                              "output_usd_per_m": self.cfg.price_output_per_m}}
        steps = getattr(mx, "verify_steps", None) if mx is not None else None
        if steps:
            u["mtp"] = {"verify_steps": steps, "accepted_tokens": getattr(mx, "accepted_tokens", None),
                        "tokens_per_verify_step": round(1 + (getattr(mx, "accepted_tokens", 0) or 0) / steps, 4)}
        return u

    def account(self, u: dict) -> None:
        self.metrics.m(self.metrics.cost).inc(u["cost"])
        self.metrics.m(self.metrics.reasoning_tokens).inc(u["completion_tokens_details"]["reasoning_tokens"])
