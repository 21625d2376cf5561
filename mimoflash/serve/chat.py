"""`POST /v1/chat/completions`: chat template (thinking, tools, earlier turns' reasoning) -> engine -> reasoning,
content and tool calls parsed per choice -> one JSON response, or SSE chunks ending in `data: [DONE]`."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..tokenizer import ChatTemplateError
from .engine_loop import EngineDead
from .errors import APIError, error_body
from .parsers import ChatOutputParser
from .protocol import ChatCompletionRequest
from .state import ServerState
from .streaming import ChunkWriter, logprob_entries, tok_lp, until_disconnect

_RESERVED_TEMPLATE_KEYS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "pad_token"}


def add_routes(v1: APIRouter, st: ServerState) -> None:
    cfg, tok, compiler = st.cfg, st.tok, st.compiler
    check_model, sampling, submit, usage, account = st.check_model, st.sampling, st.submit, st.usage, st.account

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        if tok is None:
            raise APIError(400, "this model has no tokenizer: use /v1/completions with token-id prompts", "model")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice
        named = choice.function.name if choice is not None and not isinstance(choice, str) else None
        if choice not in (None, "none", "auto") and not tools:
            raise APIError(400, "tool_choice needs 'tools'", "tool_choice")
        if named and named not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
        use_tools = tools if tools and choice != "none" else None
        kwargs = dict(req.chat_template_kwargs or {})
        bad = sorted(_RESERVED_TEMPLATE_KEYS & kwargs.keys())
        if bad:
            raise APIError(400, f"chat_template_kwargs may not set {bad}", "chat_template_kwargs")
        thinking = kwargs.pop("enable_thinking", None)
        if thinking is not None and not isinstance(thinking, bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false",
                           "chat_template_kwargs.enable_thinking")
        messages = [_message_dict(m) for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking,
                                           tools=use_tools, **kwargs)
        except (ChatTemplateError, ValueError) as e:
            raise APIError(400, str(e), "messages")
        except Exception as e:                                  # jinja errors from the checkpoint's template
            raise APIError(400, f"the chat template failed on these messages: {type(e).__name__}: {e}", "messages")
        try:
            ids = tok.encode(text)
        except ValueError as e:                                 # e.g. a lone surrogate in a message's text
            raise APIError(400, str(e), "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        n_lp = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        params = sampling(req, max_tokens, None, len(ids), n_lp).replace(skip_special_tokens=False)
        grammars = make_grammars(req, use_tools, named, bool(thinking), params.n)
        handle = await submit(ids, params, text, grammars)
        start_reasoning = text.rstrip().endswith("<think>")
        parsers = [ChatOutputParser(start_reasoning, use_tools, parse_reasoning=True) for _ in range(params.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if req.stream:
            return StreamingResponse(chat_stream(req, handle, parsers, rid, now, len(ids), request),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await until_disconnect(request, [handle], chat_full(req, handle, parsers, rid, now, len(ids),
                                                                    request))

    def make_grammars(req: ChatCompletionRequest, tools, named, thinking: bool, n: int) -> list[str] | None:
        """The request's constraint as a compiled grammar per choice (the engine process builds the matchers), or
        None when its output is free."""
        rf = req.response_format
        want_tools = tools and (req.tool_choice == "required" or named)
        if not want_tools and (rf is None or rf.type == "text"):
            return None
        if compiler is None:
            raise APIError(400, "constrained decoding (response_format, tool_choice required/named) needs the "
                           "llguidance package: pip install 'mimoflash[serve]'", "response_format")
        if st.info.mtp:
            # MTP verify steps score several positions per request; the masks are built for one row per request.
            raise APIError(400, "constrained decoding (response_format, tool_choice required/named) is not "
                           "available while the server runs MTP speculative decoding (--mtp)",
                           "response_format" if not want_tools else "tool_choice")
        if want_tools and rf is not None and rf.type != "text":
            raise APIError(400, "response_format cannot be combined with a forced tool call", "response_format")
        try:
            if want_tools:
                grammar = compiler.tool_calls(tools, only=named, allow_think=thinking,
                                              multiple=named is None and req.parallel_tool_calls)
            elif rf.type == "json_object":
                grammar = compiler.json_schema(None)
            else:
                if rf.json_schema is None or rf.json_schema.schema_ is None:
                    raise APIError(400, "response_format json_schema needs json_schema.schema",
                                   "response_format.json_schema")
                grammar = compiler.json_schema(rf.json_schema.schema_)
            return [grammar] * n
        except ValueError as e:
            raise APIError(400, str(e), "tools" if want_tools else "response_format.json_schema")

    async def chat_full(req, handle, parsers, rid, now, n_prompt, request) -> dict:
        texts_lp: list[list] = [[] for _ in parsers]
        finish: list[str | None] = [None] * len(parsers)
        n_gen, mx = 0, None
        deltas = {i: ParsedAcc() for i in range(len(parsers))}
        try:
            async for out in handle:
                for o in out.outputs:
                    p = parsers[o.index]
                    n_gen += len(o.token_ids)
                    deltas[o.index].add(p.feed(o.text, final=o.finish_reason is not None,
                                               num_tokens=len(o.token_ids)))
                    if req.logprobs:
                        texts_lp[o.index] += logprob_entries(o)
                    finish[o.index] = o.finish_reason
                mx = out.metrics or mx
        except EngineDead as e:
            raise APIError(503, str(e))
        finally:
            handle.abort()
        choices = []
        for i, p in enumerate(parsers):
            acc = deltas[i]
            calls = p.tool_calls()
            msg: dict[str, Any] = {"role": "assistant", "content": acc.content if (acc.content or not calls) else None}
            if p.saw_reasoning or acc.reasoning:
                msg["reasoning_content"] = acc.reasoning if req.include_reasoning else None
            if calls:
                msg["tool_calls"] = calls
            reason = finish[i]
            if calls and reason == "stop":
                reason = "tool_calls"
            choices.append({"index": i, "message": msg, "finish_reason": reason,
                            "logprobs": {"content": [_chat_lp(c, t, req.top_logprobs or 0) for c, t in texts_lp[i]]}
                            if req.logprobs else None})
        u = usage(n_prompt, n_gen, sum(p.reasoning_tokens for p in parsers), mx)
        account(u)
        return {"id": rid, "object": "chat.completion", "created": now, "model": cfg.served_model_name,
                "choices": choices, "usage": u, "system_fingerprint": None}

    async def chat_stream(req, handle, parsers, rid, now, n_prompt, request) -> AsyncIterator[str]:
        chunk = ChunkWriter(rid, "chat.completion.chunk", now, cfg.served_model_name, req.stream_options)
        n_gen, mx = 0, None
        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(parsers))], lambda: usage(n_prompt, 0, 0))
            async for batch in handle.batches(cfg.stream_interval):
                merged: dict[int, dict] = {}                  # choice index -> its chunk entry for this batch
                for out in batch:
                    for o in out.outputs:
                        p = parsers[o.index]
                        n_gen += len(o.token_ids)
                        d = p.feed(o.text, final=o.finish_reason is not None, num_tokens=len(o.token_ids))
                        e = merged.setdefault(o.index, {"index": o.index, "delta": {}, "logprobs": None,
                                                        "finish_reason": None})
                        delta = e["delta"]
                        if d.reasoning and req.include_reasoning:
                            delta["reasoning_content"] = delta.get("reasoning_content", "") + d.reasoning
                        if d.content:
                            delta["content"] = delta.get("content", "") + d.content
                        if d.tool_calls:
                            delta.setdefault("tool_calls", []).extend(d.tool_calls)
                        reason = o.finish_reason
                        if reason == "stop" and p.calls:
                            reason = "tool_calls"
                        e["finish_reason"] = reason or e["finish_reason"]
                        if req.logprobs and o.token_ids:
                            e["logprobs"] = e["logprobs"] or {"content": []}
                            e["logprobs"]["content"] += [_chat_lp(c, t, req.top_logprobs or 0)
                                                         for c, t in logprob_entries(o)]
                    mx = out.metrics or mx
                choices = [e for e in merged.values() if e["delta"] or e["finish_reason"] or e["logprobs"]]
                if choices:
                    yield chunk(choices, lambda: usage(n_prompt, n_gen, sum(p.reasoning_tokens for p in parsers),
                                                       mx))
            u = usage(n_prompt, n_gen, sum(p.reasoning_tokens for p in parsers), mx)
            account(u)
            yield chunk.final(u)
        except EngineDead as e:
            yield f"data: {json.dumps(error_body(503, str(e)))}\n\n"
        finally:
            handle.abort()                 # a no-op when finished; frees the cache when the client went away


class ParsedAcc:
    """Concatenation of a choice's parsed deltas (non-streaming responses)."""

    def __init__(self):
        self.reasoning, self.content = "", ""

    def add(self, d) -> None:
        self.reasoning += d.reasoning
        self.content += d.content


def _message_dict(m) -> dict:
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    content = m.content
    if isinstance(content, list):
        content = "".join(p.text for p in content)
    d["content"] = content if content is not None else ""
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments}}
                           for c in m.tool_calls]
    if m.reasoning_content is not None:
        d["reasoning_content"] = m.reasoning_content
    if m.name is not None:
        d["name"] = m.name
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    return d


def _chat_lp(chosen, top, n_top: int) -> dict:
    entry = tok_lp(chosen.decoded_token if chosen else None, chosen.logprob if chosen else -9999.0)
    entry["top_logprobs"] = [tok_lp(lp.decoded_token, lp.logprob) for _, lp in top[:n_top]]
    return entry
