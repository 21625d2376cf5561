"""`POST /v1/completions`: prompts as text or token ids (one request per prompt, `n` choices each) -> engine -> one
JSON response, or SSE chunks ending in `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .engine_loop import EngineDead
from .errors import APIError, error_body
from .protocol import CompletionRequest
from .state import ServerState
from .streaming import ChunkWriter, logprob_entries, sum_metrics, until_disconnect


def add_routes(v1: APIRouter, st: ServerState) -> None:
    cfg, tok = st.cfg, st.tok
    check_model, sampling, submit, usage, account = st.check_model, st.sampling, st.submit, st.usage, st.account

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of other than n is not supported", "best_of")
        prompts = _prompts(req.prompt)
        vocab = st.vocab_size
        encoded = []
        for k, p in enumerate(prompts):
            if isinstance(p, str):
                if tok is None:
                    raise APIError(400, "this model has no tokenizer: send token ids", "prompt")
                try:
                    ids = tok.encode(p)
                except ValueError as e:                         # e.g. a lone surrogate in the prompt
                    raise APIError(400, str(e), "prompt")
                if not ids:
                    raise APIError(400, "the prompt is empty", "prompt")
                encoded.append((ids, p))
            else:
                if any(not 0 <= t < vocab for t in p):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
                encoded.append((list(p), None))
        params = [sampling(req, req.max_tokens, 16, len(ids), req.logprobs) for ids, _ in encoded]
        handles = []
        try:
            for (ids, text), sp in zip(encoded, params):
                handles.append(await submit(ids, sp, text))
        except BaseException:
            for h in handles:
                h.abort()
            raise
        rid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        echo = [((text if text is not None else (tok.decode(ids) if tok else "")) if req.echo else "")
                for ids, text in encoded]
        if req.stream:
            return StreamingResponse(completion_stream(req, handles, rid, now, encoded, echo),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await until_disconnect(request, handles, completion_full(req, handles, rid, now, encoded, echo))

    async def completion_full(req, handles, rid, now, encoded, echo) -> dict:
        n = req.n
        texts = [""] * (len(handles) * n)
        lps: list[list] = [[] for _ in texts]
        finish: list[str | None] = [None] * len(texts)
        n_gen, mxs = 0, []
        try:
            async for k, out in _merge(handles):
                for o in out.outputs:
                    j = k * n + o.index
                    texts[j] += o.text
                    n_gen += len(o.token_ids)
                    if req.logprobs is not None:
                        lps[j] += logprob_entries(o)
                    finish[j] = o.finish_reason
                mxs.append(out.metrics)
        except EngineDead as e:
            raise APIError(503, str(e))
        finally:
            for h in handles:
                h.abort()
        choices = []
        for j, t in enumerate(texts):
            k = j // n
            lp = _completion_lp(lps[j], req.logprobs, len(echo[k])) if req.logprobs is not None else None
            choices.append({"index": j, "text": echo[k] + t, "logprobs": lp, "finish_reason": finish[j]})
        u = usage(sum(len(ids) for ids, _ in encoded), n_gen, 0, sum_metrics(mxs))
        account(u)
        return {"id": rid, "object": "text_completion", "created": now, "model": cfg.served_model_name,
                "choices": choices, "usage": u, "system_fingerprint": None}

    async def completion_stream(req, handles, rid, now, encoded, echo) -> AsyncIterator[str]:
        chunk = ChunkWriter(rid, "text_completion", now, cfg.served_model_name, req.stream_options)
        n = req.n
        n_prompt = sum(len(ids) for ids, _ in encoded)
        n_gen, mxs = 0, []
        sent_echo = set()
        lp_pos: dict[int, int] = {}          # choice -> text_offset of its next token (echo included), as unstreamed
        try:
            async for batch in _merge_batches(handles, cfg.stream_interval):
                merged: dict[int, dict] = {}
                for k, out in batch:
                    for o in out.outputs:
                        j = k * n + o.index
                        n_gen += len(o.token_ids)
                        text = o.text
                        if j not in sent_echo:
                            text, _ = echo[k] + text, sent_echo.add(j)
                        e = merged.setdefault(j, {"index": j, "text": "", "logprobs": None, "finish_reason": None})
                        e["text"] += text
                        e["finish_reason"] = o.finish_reason or e["finish_reason"]
                        if req.logprobs is not None and o.token_ids:
                            pos = lp_pos.get(j, len(echo[k]))
                            lp = _completion_lp(logprob_entries(o), req.logprobs, pos)
                            lp_pos[j] = pos + sum(len(t) for t in lp["tokens"])
                            if e["logprobs"] is None:
                                e["logprobs"] = lp
                            else:
                                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                                    e["logprobs"][key] += lp[key]
                    mxs.append(out.metrics)
                choices = [e for e in merged.values() if e["text"] or e["finish_reason"] or e["logprobs"]]
                if choices:
                    yield chunk(choices, lambda: usage(n_prompt, n_gen, 0, sum_metrics(mxs)))
            u = usage(n_prompt, n_gen, 0, sum_metrics(mxs))
            account(u)
            yield chunk.final(u)
        except EngineDead as e:
            yield f"data: {json.dumps(error_body(503, str(e)))}\n\n"
        finally:
            for h in handles:
                h.abort()


async def _merge(handles) -> AsyncIterator[tuple[int, Any]]:
    """Interleave the deltas of several handles as they arrive: -> (handle index, delta)."""
    if len(handles) == 1:
        async for out in handles[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k, h):
        try:
            async for out in h:
                await q.put((k, out))
        except BaseException as e:
            await q.put((k, e))
        finally:
            await q.put((k, None))

    tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            k, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()


async def _merge_batches(handles, min_tokens: int = 1) -> AsyncIterator[list[tuple[int, Any]]]:
    """Like `_merge`, in batches. One prompt: everything available at once, at least `min_tokens` tokens (see
    RequestHandle.batches); several prompts: one delta at a time."""
    if len(handles) == 1:
        async for batch in handles[0].batches(min_tokens):
            yield [(0, out) for out in batch]
        return
    async for item in _merge(handles):
        yield [item]


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _completion_lp(entries: list, n_top: int, offset0: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset0
    for chosen, top in entries:
        t = (chosen.decoded_token if chosen else "") or ""
        tokens.append(t)
        token_lps.append(max(chosen.logprob, -9999.0) if chosen else None)
        tops.append({(lp.decoded_token or ""): max(lp.logprob, -9999.0) for _, lp in top[:n_top]} if n_top else None)
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
