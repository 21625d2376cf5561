"""Grammar-constrained decoding with llguidance: `response_format` and forced tool calls as token masks.

llguidance compiles a JSON schema (or a Lark grammar) against the tokenizer and, at each step, says which token ids
may come next (a bitmask over the vocabulary). We apply that mask to the logits of the constrained requests before
the engine samples, and feed each sampled token back to the request's matcher. Once the grammar is complete only
the end-of-turn token is allowed, so the request stops with a complete document.

Where the mask goes in. The engine has no per-request logits-processor hook, and the server does not own the
sampler, so `MaskingRunner` wraps the engine's `ModelRunner` (an explicit wrapper class, swapped in by the engine
process while constrained requests run, engine_core.py): its `execute(batch)` returns the runner's logits, one row
per sampled item in batch order (engine/runner.py), with the rows of constrained requests masked. The sampler then
sees -inf outside the grammar, for greedy and random sampling alike. Logprobs are those of the masked distribution
for these requests.

What is constrained: the whole completion. `json_object` = any JSON object; `json_schema` = that schema;
`tool_choice` "required" / named = one (or, for "required", one or more) `<tool_call>` blocks in the model's XML
form whose parameters follow each tool's JSON schema, optionally preceded by a `<think>` block when thinking is on.
"""

from __future__ import annotations

import json
from typing import Any

import torch


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarCompiler:
    """Builds llguidance matchers for one tokenizer (the tokenizer is converted once: ~25 ms for 8k tokens)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int] | frozenset[int]):
        import llguidance
        self._ll = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size,
                                                eos_token=sorted(eos_token_ids))
        self._token_id = tokenizer.token_to_id

    def json_schema(self, schema: dict[str, Any] | None) -> str:
        """A JSON schema (None = any JSON object) -> grammar; ValueError naming what is wrong."""
        schema = {"type": "object"} if schema is None else schema
        try:
            # Compact separators and no free whitespace: a small model otherwise spends its tokens on blanks.
            grammar = self._ll.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"invalid JSON schema: {e}") from e
        return self._validated(grammar, "JSON schema")

    def tool_calls(self, tools: list[dict], only: str | None = None, allow_think: bool = False,
                   multiple: bool = True) -> str:
        """Lark grammar: one call (or several) of `tools` (or of the tool named `only`) in the XML form."""
        names = {"<tool_call>": self._token_id("<tool_call>"), "</tool_call>": self._token_id("</tool_call>")}
        tok = {k: (f"<[{v}]>" if v is not None else json.dumps(k)) for k, v in names.items()}
        rules, alts = [], []
        for i, t in enumerate(tools):
            fn = t["function"]
            if only is not None and fn["name"] != only:
                continue
            params = fn.get("parameters") or {}
            props = (params.get("properties") or {}) if isinstance(params, dict) else {}
            req_list = (params.get("required") or []) if isinstance(params, dict) else []
            if not isinstance(props, dict) or not isinstance(req_list, list):
                raise ValueError(f"tools[{i}].function.parameters: 'properties' must be an object and 'required' "
                                 "a list")
            required = [p for p in req_list if isinstance(p, str) and p in props]
            order = required + [p for p in props if p not in required]
            parts = []
            for j, p in enumerate(order):
                sch = props[p] if isinstance(props[p], dict) else {}
                if isinstance(sch.get("enum"), list) and all(isinstance(v, str) for v in sch["enum"]):
                    value = "(" + " | ".join(json.dumps(v) for v in sch["enum"]) + ")"   # raw text, as written
                elif sch.get("type") == "string":
                    value = r'/[^<]*/'
                else:
                    value = f"%json {json.dumps(dict(sch, **{'x-guidance': JSON_OPTIONS}))}"
                rules.append(f'p_{i}_{j}: "<parameter=" {json.dumps(p)} ">" {value} "</parameter>\\n"')
                parts.append(f"p_{i}_{j}" + ("" if p in required else "?"))
            rules.append(f'call_{i}: {tok["<tool_call>"]} "\\n<function=" {json.dumps(fn["name"])} ">\\n" '
                         f'{" ".join(parts)} "</function>\\n" {tok["</tool_call>"]}')
            alts.append(f"call_{i}")
        if not alts:
            raise ValueError(f"tool_choice names {only!r}, which is not among the tools")
        call = "(" + " | ".join(alts) + ")"
        body = f'{call} ("\\n" {call})*' if multiple else call
        think = ""
        if allow_think and self._token_id("<think>") is not None and self._token_id("</think>") is not None:
            think = f'(<[{self._token_id("<think>")}]> /[^<]*/ <[{self._token_id("</think>")}]> /[ \\n]*/)? '
        lark = f"start: {think}{body}\n" + "\n".join(rules) + "\n"
        return self._validated(self._ll.LLMatcher.grammar_from_lark(lark), "tool-call grammar")

    def _validated(self, grammar: str, what: str) -> str:
        is_error, msgs = self._ll.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"{what} cannot be compiled: {msgs[0] if msgs else 'unknown error'}")
        return grammar

    def matcher(self, grammar: str):
        m = self._ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"grammar cannot be compiled: {m.get_error()}")
        return m


class MaskingRunner:
    """Wraps a ModelRunner: `execute` masks the logits rows of requests that carry a grammar matcher.

    Everything else (attributes, other methods) is the wrapped runner's. The engine process owns `matchers`
    (request id -> LLMatcher) and advances them with each sampled token."""

    def __init__(self, runner):
        self.inner = runner
        self.matchers: dict[str, Any] = {}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def execute(self, batch) -> torch.Tensor:
        logits = self.inner.execute(batch)                       # (R, V): one row per sampled item, batch order
        if not self.matchers:
            return logits
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask
        sampled = [it for it in batch.items if it.sample]
        rows = [(j, self.matchers[it.request.request_id]) for j, it in enumerate(sampled)
                if it.request.request_id in self.matchers]
        if not rows:
            return logits
        V = logits.shape[1]
        bitmask = allocate_token_bitmask(len(rows), V)          # (r, ceil(V / 32)) int32
        for k, (_, m) in enumerate(rows):
            fill_next_token_bitmask(m, bitmask, k)
        allowed = unpack_bitmask(bitmask, V)                      # (r, V) bool
        idx = torch.tensor([j for j, _ in rows], dtype=torch.long)
        with torch.inference_mode():                              # the runner's logits are inference tensors
            logits[idx] = logits[idx].masked_fill(~allowed.to(logits.device), float("-inf"))
        return logits


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 words (R, W), bit b of word w = token 32 w + b -> bool (R, vocab_size)."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1                  # (R, W, 32)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
