"""Helpers the chat and completion routes share: SSE chunk encoding, logprob entries, aborting the requests of a
client that went away, speculative-decoding figures summed over requests."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from fastapi import Request


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class ChunkWriter:
    """SSE chunks of one streamed response. The fields every chunk repeats (id, object, created, model) are encoded
    once; per chunk only the choices (and the usage) are. `stream_options.include_usage` adds `"usage": null` to
    every chunk and a last chunk with the usage and no choices; with `continuous_usage_stats` too, every chunk
    carries the usage so far (as vLLM does)."""

    def __init__(self, rid: str, obj: str, created: int, model: str, stream_options):
        self.prefix = "data: " + _encode({"id": rid, "object": obj, "created": created, "model": model,
                                          "system_fingerprint": None})[:-1] + ',"choices":'
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self.continuous = self.include_usage and stream_options.continuous_usage_stats

    def __call__(self, choices: list, usage_so_far=None) -> str:
        """`usage_so_far`: a callable giving the usage up to this chunk (called only when the client asked)."""
        if not self.include_usage:
            return f"{self.prefix}{_encode(choices)}}}\n\n"
        u = _encode(usage_so_far()) if self.continuous and usage_so_far is not None else "null"
        return f"{self.prefix}{_encode(choices)},\"usage\":{u}}}\n\n"

    def final(self, usage_: dict) -> str:
        """The usage chunk (when asked for) and the end of the stream."""
        head = f"{self.prefix}[],\"usage\":{_encode(usage_)}}}\n\n" if self.include_usage else ""
        return head + "data: [DONE]\n\n"


async def until_disconnect(request: Request, handles, work):
    """Await a non-streaming response; if the client goes away first, abort its requests (freeing their caches)
    instead of generating for nobody. Streaming responses get this from Starlette, which cancels them."""
    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        for h in handles:
            h.abort()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    finally:
        watcher.cancel()


def logprob_entries(o) -> list[tuple]:
    """A delta's logprobs -> per token (the chosen token's Logprob or None, the alternatives by rank)."""
    out = []
    for tid, entry in zip(o.token_ids, o.logprobs or []):
        chosen = entry.get(tid)
        top = sorted(entry.items(), key=lambda kv: kv[1].rank)
        out.append((chosen, top))
    return out


def tok_lp(token: str | None, logprob: float) -> dict:
    t = token or ""
    return {"token": t, "logprob": max(logprob, -9999.0), "bytes": list(t.encode("utf-8"))}


def sum_metrics(mxs: list):
    """Speculative-decoding figures summed over several requests (one per prompt); None without MTP."""
    steps = sum(getattr(m, "verify_steps", 0) or 0 for m in mxs if m is not None)
    if not steps:
        return None
    acc = sum(getattr(m, "accepted_tokens", 0) or 0 for m in mxs if m is not None)
    return SimpleNamespace(verify_steps=steps, accepted_tokens=acc)
