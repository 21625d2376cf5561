"""The server side of the engine: request handlers talk to the engine process (engine_core.py) through this.

    handler (event loop)                        engine process
    ---------------------                       --------------
    await loop.add(ids, params)  --command-->   engine.add_request   (ack: ok, or the ValueError for a 4xx)
    async for delta in handle    <--step-----   engine.step() -> every request's delta, one message per step
    handle.abort()               --command-->   engine.abort_request (the cache is freed at once)

Commands are written by the event loop through asyncio's non-blocking pipe transport (a large prompt never blocks
the loop on a full pipe; the transport keeps the rest and writes it when the pipe has room). The engine's messages
are read by the event loop itself (`add_reader` on the pipe): per step it records the token
and latency metrics and puts each delta in its request's asyncio queue, so one slow client never blocks the others
or the engine (its queue just grows by the few deltas it has not read). Many handlers streaming at once simply
means many groups in the engine's continuous batch.

Admission control: at most `max_num_seqs + max_waiting` sequences (n counts) may be queued or running; `add`
raises `QueueFull` beyond that and the HTTP layer answers 429 instead of letting the queue grow without bound.

If the engine process dies, every open stream ends with an error event, /health answers 503 and new requests get
503 (`EngineDead`).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..engine.request import CompletionOutput, RequestOutput
from ..engine.sampling import SamplingParams
from .engine_core import EngineInfo, EngineSpec, engine_main, frame, rebuild_error

log = logging.getLogger("mimoflash.serve")


class QueueFull(Exception):
    """The waiting queue is full (HTTP 429)."""


class EngineDead(Exception):
    """The engine process stopped (shutdown, or it crashed or was killed); HTTP 503."""


@dataclass
class RequestHandle:
    request_id: str
    n: int
    num_prompt_tokens: int
    owner: "EngineLoop"
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    last_token: dict[int, float] = field(default_factory=dict)      # per choice index, for inter-token latency
    finished: bool = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self, min_tokens: int = 1) -> AsyncIterator[list[RequestOutput]]:
        """Deltas in batches: everything queued since the last read. A client that falls behind the engine then
        gets one SSE chunk for several steps instead of one chunk per step. With `min_tokens` > 1 (the server's
        `--stream-interval`) a batch also waits until it holds that many new tokens (all choices together), except
        the first one with tokens (time to first token is not delayed) and the last one."""
        first = True
        while not self.finished:
            out: list[RequestOutput] = []
            tokens = 0
            while True:
                items = [await self.queue.get()]
                while not self.queue.empty():
                    items.append(self.queue.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        self.finished = True
                        raise item
                    out.append(item)
                    tokens += sum(len(o.token_ids) for o in item.outputs)
                    if item.finished:
                        self.finished = True
                        break
                if self.finished or tokens >= min_tokens or (first and tokens):
                    break
            first = first and not tokens
            yield out

    def abort(self) -> None:
        """Abort unless finished; safe to call more than once."""
        if not self.finished:
            self.finished = True
            self.owner._send(("abort", self.request_id))


class EngineLoop:
    """Starts the engine process, sends it commands, and hands its per-step deltas to the request handles.

    `start()` (blocking) spawns the process and waits until the model is loaded: a checkpoint that does not load is
    an error there, before the server listens. `attach()` (in the running event loop) starts reading the engine's
    messages; `aclose()` stops the engine (it aborts what still runs) and waits for the process to exit."""

    def __init__(self, spec: EngineSpec, *, max_waiting: int = 64, metrics=None):
        self.spec, self.max_waiting, self.metrics = spec, max_waiting, metrics
        self.info: EngineInfo | None = None
        self.max_active = 0
        self.error: BaseException | None = None
        self._proc = None
        self._commands = self._outputs = None
        self._transport: asyncio.WriteTransport | None = None       # the command pipe, once attached
        self._handles: dict[str, RequestHandle] = {}
        self._acks: dict[str, asyncio.Future] = {}
        self._active = 0                       # sequences admitted and not yet finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float | None = None) -> EngineInfo:
        """Spawn the engine process and wait for its model to load -> what the server needs to know. Raises the
        engine's own error (ValueError, FileNotFoundError, ...) when the model does not load."""
        ctx = multiprocessing.get_context("spawn")        # a fresh interpreter: no forked OpenMP or torch state
        cmd_recv, cmd_send = ctx.Pipe(duplex=False)
        out_recv, out_send = ctx.Pipe(duplex=False)
        # Not a daemon: the engine may start processes of its own (tensor-parallel ranks). It exits by itself when
        # this process goes away (its command pipe closes); `close()` makes sure of it on every way out.
        self._proc = ctx.Process(target=engine_main, args=(self.spec, cmd_recv, out_send), name="mimoflash-engine")
        self._proc.start()
        cmd_recv.close()                                  # the child's ends: EOF on ours when the child exits
        out_send.close()
        self._commands, self._outputs = cmd_send, out_recv
        deadline = None if timeout is None else time.monotonic() + timeout
        while not out_recv.poll(0.2):
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine process exited with status {self._proc.exitcode} while loading")
            if deadline is not None and time.monotonic() > deadline:
                self._proc.kill()
                raise RuntimeError("the engine process did not load the model in time")
        try:
            msg = out_recv.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited with status {self._proc.exitcode} while loading")
        if msg[0] == "failed":
            self._proc.join(10)
            raise rebuild_error(msg[1])
        self.info = msg[1]
        self.max_active = self.info.max_num_seqs + self.max_waiting
        return self.info

    async def attach(self) -> None:
        """From now on, the running event loop writes the commands and reads the engine's messages."""
        self._loop = loop = asyncio.get_running_loop()
        pipe = os.fdopen(os.dup(self._commands.fileno()), "wb", buffering=0)
        self._commands.close()
        self._transport, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, pipe)
        loop.add_reader(self._outputs.fileno(), self._on_readable)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and self.error is None and not self._stopping

    def drain(self, seconds: float) -> None:
        """Shutting down: requests still running after `seconds` are aborted (their streams end with
        finish_reason "abort"), so that no connection is left for the server to cancel. Called from the signal
        handler, so the command is handed to the event loop rather than written here."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._send, ("drain", seconds))

    async def aclose(self, timeout: float = 30.0) -> None:
        """Stop the engine (it aborts whatever is left and reports the last deltas) and wait for its exit."""
        if self._proc is None:
            return
        self._stopping = True
        if self._proc.is_alive():
            self._send(("stop",))
            await asyncio.get_running_loop().run_in_executor(None, self._proc.join, timeout)
            if self._proc.is_alive():
                log.warning("the engine process did not stop within %.0f s; killing it", timeout)
                self._proc.kill()
                self._proc.join(5)
        self._on_readable()                                   # the last deltas, if the reader has not seen them
        self._detach()

    def close(self, timeout: float = 30.0) -> None:
        """After the event loop has gone (or never ran): close the command pipe, which stops an engine still running
        (it aborts what is left), and wait for it to exit; kill it if it does not."""
        for end in (self._commands, self._outputs):
            if end is not None:
                end.close()
        self._commands = self._outputs = None
        if self._proc is not None and self._proc.is_alive():
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)

    # ------------------------------------------------------------------ handler side (event loop)
    async def add(self, prompt_token_ids: list[int], params: SamplingParams, *, prompt: str | None = None,
                  grammars: list[str] | None = None) -> RequestHandle:
        """Queue a request; -> its handle once the engine accepted it. Raises QueueFull, EngineDead, ValueError.
        `grammars`: one compiled grammar per choice (grammar.py), for constrained decoding."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        if self._active + params.n > self.max_active:
            raise QueueFull(f"{self._active} sequences are queued or running (limit {self.max_active}); retry later")
        self._active += params.n
        handle = RequestHandle(f"req-{uuid.uuid4().hex}", params.n, len(prompt_token_ids), self)
        ack = asyncio.get_running_loop().create_future()
        self._handles[handle.request_id] = handle
        self._acks[handle.request_id] = ack
        self._send(("add", handle.request_id, list(prompt_token_ids), params, prompt, grammars))
        try:
            await ack
        except asyncio.CancelledError:            # the client went away while the request was being added
            handle.abort()
            raise
        except BaseException:
            handle.finished = True
            raise
        return handle

    def _send(self, cmd: tuple) -> None:
        """Write a command (event loop only). Nothing is written once the engine is gone (the reader reports it)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame(cmd))

    # ------------------------------------------------------------------ the engine's messages (event loop)
    def _on_readable(self) -> None:
        try:
            while self._outputs is not None and self._outputs.poll():
                msg = self._outputs.recv()
                if msg[0] == "step":
                    self._on_step(msg[1], msg[2], msg[3])
                elif msg[0] == "dead":
                    log.error("the engine crashed:\n%s", msg[2])
                    self._fail(rebuild_error(msg[1]))
        except (EOFError, OSError):
            self._fail(None)

    def _on_step(self, acks: list, deltas: list, stats: tuple) -> None:
        now = time.perf_counter()
        for rid, err in acks:
            fut = self._acks.pop(rid, None)
            if err is not None:
                handle = self._handles.pop(rid, None)
                if handle is not None:
                    self._active -= handle.n
            if fut is not None and not fut.done():
                fut.set_exception(rebuild_error(err)) if err is not None else fut.set_result(None)
        met = self.metrics
        tokens = 0
        for rid, finished, choices, mx in deltas:
            handle = self._handles.get(rid)
            if handle is None:
                continue
            out = RequestOutput(rid, None, [], [CompletionOutput(*c) for c in choices], finished, mx)
            if finished:
                del self._handles[rid]
                self._active -= handle.n
            if met is not None:
                try:
                    tokens += _observe(met, handle, out, now)
                except Exception:                 # a metrics bug must not stall the streams
                    log.exception("recording metrics failed")
            handle.queue.put_nowait(out)
        if met is not None:
            try:
                if tokens:
                    met.m(met.generation_tokens).inc(tokens)
                met.on_stats(stats)
            except Exception:
                log.exception("recording metrics failed")

    def _fail(self, error: BaseException | None) -> None:
        """The engine process is gone: end every stream with EngineDead and refuse new requests."""
        self._detach()
        if self._stopping and error is None:
            return
        code = self._proc.exitcode if self._proc is not None else None
        if error is None:
            self._proc.join(1)
            code = self._proc.exitcode
            log.error("the engine process exited (status %s)", code)
        self.error = EngineDead(f"the engine stopped: {error}" if error is not None else
                                f"the engine process exited (status {code})")
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(self.error)
        for h in self._handles.values():
            h.queue.put_nowait(self.error)
        self._acks.clear()
        self._handles.clear()
        self._active = 0

    def _detach(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._outputs is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._outputs.fileno())
            self._outputs.close()
            self._outputs = None


def _observe(met, handle: RequestHandle, out: RequestOutput, now: float) -> int:
    """Latency metrics of one delta and, when it ends its request, the request's counters (`now`: when the step's
    message arrived) -> its number of new tokens (counted once per step by the caller)."""
    n_tokens = 0
    for o in out.outputs:
        if o.token_ids:
            n_tokens += len(o.token_ids)
            last = handle.last_token.get(o.index)
            if last is None:
                met.m(met.ttft).observe(now - handle.arrival)
            else:
                met.m(met.itl).observe((now - last) / len(o.token_ids))
            handle.last_token[o.index] = now
    if out.finished:
        met.m(met.prompt_tokens).inc(handle.num_prompt_tokens)
        met.m(met.e2e).observe(now - handle.arrival)
        for o in out.outputs:
            met.m(met.success, finished_reason=o.finish_reason or "abort").inc()
        mx = out.metrics
        if mx is not None and getattr(mx, "verify_steps", None):
            met.m(met.spec_verify).inc(mx.verify_steps)
            met.m(met.spec_accepted).inc(getattr(mx, "accepted_tokens", 0) or 0)
    return n_tokens
