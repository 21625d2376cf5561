"""One thread owns the engine; request handlers talk to it through queues.

    handler (event loop)                       engine thread
    ---------------------                      -------------
    await loop.add(ids, params)  --inbox-->    engine.add_request   (ack: ok, or the ValueError for a 4xx)
    async for delta in handle    <--queue--    engine.step() -> RequestOutput deltas, one per changed group
    handle.abort()               --inbox-->    engine.abort_request (the cache is freed at once)

The engine is not thread-safe and a step is a blocking forward pass, so it runs in a plain thread: every engine
call happens there, and between two steps the thread drains the inbox. Deltas go back to the handlers' asyncio
queues through one `loop.call_soon_threadsafe` per step, so one slow client never blocks the others or the engine
(its queue just grows by the few deltas it has not read). Many handlers streaming at once simply means many groups
in the engine's continuous batch.

The engine thread is the critical path: between two steps it does only what the next step needs (commands, grammar
matchers, bookkeeping of finished requests). Token and latency metrics are recorded by the event loop when the
step's deltas arrive there, while the engine thread is already inside the next forward pass.

Admission control: at most `max_num_seqs + max_waiting` sequences (n counts) may be queued or running; `add`
raises `QueueFull` beyond that and the HTTP layer answers 429 instead of letting the queue grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..engine.request import RequestOutput
from ..engine.sampling import SamplingParams

log = logging.getLogger("mimoflash.serve")


class QueueFull(Exception):
    """The waiting queue is full (HTTP 429)."""


class EngineDead(Exception):
    """The engine thread stopped (shutdown, or an internal error); HTTP 503."""


@dataclass
class RequestHandle:
    request_id: str
    n: int
    loop: asyncio.AbstractEventLoop
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
            self.owner._inbox.put(("abort", self.request_id))


class EngineLoop:
    def __init__(self, llm, *, max_waiting: int = 64, metrics=None):
        self.llm, self.engine = llm, llm.engine
        self.metrics = metrics
        self.max_active = self.engine.config.max_num_seqs + max_waiting
        self.masking = None
        from .grammar import MaskingRunner, available
        if available():
            self.masking = MaskingRunner(self.engine.runner)
            self.engine.runner = self.masking
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._active = 0                      # sequences admitted and not yet finished
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._drain_deadline: float | None = None

    # ------------------------------------------------------------------ handler side (event loop)
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        # Two threads share the GIL: the engine thread (Python between torch calls) and the event loop (HTTP, JSON).
        # With CPython's default 5 ms switch interval each hand-over can stall the other for up to 5 ms, which is
        # longer than a decode step of a small model; 0.5 ms keeps both responsive.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._thread = threading.Thread(target=self._run, name="mimoflash-engine", daemon=True)
        self._thread.start()

    async def add(self, prompt_token_ids: list[int], params: SamplingParams, *, prompt: str | None = None,
                  matchers: list[Any] | None = None) -> RequestHandle:
        """Queue a request; -> its handle once the engine accepted it. Raises QueueFull, EngineDead, ValueError."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        with self._lock:
            if self._active + params.n > self.max_active:
                raise QueueFull(f"{self._active} sequences are queued or running (limit {self.max_active}); "
                                "retry later")
            self._active += params.n
        loop = asyncio.get_running_loop()
        handle = RequestHandle(f"req-{uuid.uuid4().hex}", params.n, loop, self)
        ack = loop.create_future()
        self._inbox.put(("add", handle, list(prompt_token_ids), params, prompt, matchers, ack))
        try:
            await ack
        except BaseException:
            handle.finished = True
            raise
        return handle

    def drain(self, seconds: float) -> None:
        """Shutting down: requests still running after `seconds` are aborted (their streams end with
        finish_reason "abort"), so that no connection is left for the server to cancel."""
        self._inbox.put(("drain", time.monotonic() + seconds))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort whatever is left and stop the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                try:
                    cmd = self._inbox.get(block=not busy, timeout=None if busy else 0.5)
                except queue.Empty:
                    cmd = None
                    self.llm.check_workers()          # tensor parallel: a dead worker stops the engine while idle
                while cmd is not None:
                    if cmd[0] == "stop":
                        self._stop()
                        return
                    self._command(cmd)
                    try:
                        cmd = self._inbox.get_nowait()
                    except queue.Empty:
                        cmd = None
                if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                    for gid in list(self._handles):
                        self.engine.abort_request(gid)
                if self.engine.has_unfinished_requests():
                    outs = self.engine.step()
                    self._dispatch(outs)
                    if self.metrics is not None:
                        self.metrics.on_step(self.engine)
        except BaseException as e:                         # an engine bug: fail every stream, report unhealthy
            log.exception("engine loop crashed")
            self.error = e
            for h in list(self._handles.values()):
                self._deliver(h, EngineDead(f"the engine stopped: {type(e).__name__}: {e}"))
            self._handles.clear()

    def _command(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, handle, ids, params, prompt, matchers, ack = cmd
            try:
                self.engine.add_request(ids, params, request_id=handle.request_id, prompt=prompt)
            except BaseException as e:
                with self._lock:
                    self._active -= params.n
                self._resolve(handle, ack, e)
                return
            self._handles[handle.request_id] = handle
            if matchers and self.masking is not None:
                for i, m in enumerate(matchers):
                    self.masking.matchers[self._child_id(handle, i)] = m
            self._resolve(handle, ack, None)
        elif cmd[0] == "drain":
            self._drain_deadline = cmd[1]
        elif cmd[0] == "abort":
            if cmd[1] in self._handles:
                self.engine.abort_request(cmd[1])

    @staticmethod
    def _child_id(handle: RequestHandle, index: int) -> str:
        return handle.request_id if handle.n == 1 else f"{handle.request_id}#{index}"

    @staticmethod
    def _resolve(handle: RequestHandle, ack: asyncio.Future, error: BaseException | None) -> None:
        def settle():
            if not ack.done():
                ack.set_exception(error) if error is not None else ack.set_result(None)
        try:
            handle.loop.call_soon_threadsafe(settle)
        except RuntimeError:          # the event loop is gone (shutdown)
            pass

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        """Engine thread, after a step: grammar matchers and finished requests; then hand the deltas over."""
        now = time.perf_counter()
        ready: list[tuple[RequestHandle, RequestOutput]] = []
        for out in outs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue
            if self.masking is not None:
                for o in out.outputs:
                    m = self.masking.matchers.get(self._child_id(handle, o.index))
                    if m is not None and o.token_ids and not m.is_stopped():
                        m.consume_tokens(list(o.token_ids))
            if out.finished:
                self._handles.pop(out.request_id, None)
                if self.masking is not None:
                    for i in range(handle.n):
                        self.masking.matchers.pop(self._child_id(handle, i), None)
                with self._lock:
                    self._active -= handle.n
            ready.append((handle, out))
        self._deliver_many(ready, now, self.metrics)

    @staticmethod
    def _deliver_many(ready: list, now: float, met) -> None:
        """One wake-up of each event loop per step (not one per request): fewer self-pipe writes and GIL trips.
        The event loop then records the metrics and fills the handles' queues."""
        by_loop: dict[Any, list] = {}
        for handle, item in ready:
            by_loop.setdefault(handle.loop, []).append((handle, item))

        def put_all(pairs):
            try:
                if met is not None:
                    tokens = sum(_observe(met, handle, out, now) for handle, out in pairs)
                    if tokens:
                        met.m(met.generation_tokens).inc(tokens)
            except Exception:                   # a metrics bug must not stall the streams
                log.exception("recording metrics failed")
            for handle, out in pairs:
                handle.queue.put_nowait(out)

        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(put_all, pairs)
            except RuntimeError:
                pass

    @staticmethod
    def _deliver(handle: RequestHandle, item) -> None:
        try:
            handle.loop.call_soon_threadsafe(handle.queue.put_nowait, item)
        except RuntimeError:
            pass

    def _stop(self) -> None:
        for gid in list(self._handles):
            self.engine.abort_request(gid)
        while self.engine.has_unfinished_requests():
            self._dispatch(self.engine.step())
        self._handles.clear()


def _observe(met, handle: RequestHandle, out: RequestOutput, now: float) -> int:
    """Latency metrics of one delta and, when it ends its request, the request's counters (`now`: when the engine
    produced it) -> its number of new tokens (counted once per step by the caller)."""
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
        met.m(met.prompt_tokens).inc(len(out.prompt_token_ids))
        met.m(met.e2e).observe(now - handle.arrival)
        for o in out.outputs:
            met.m(met.success, finished_reason=o.finish_reason or "abort").inc()
        mx = out.metrics
        if mx is not None and getattr(mx, "verify_steps", None):
            met.m(met.spec_verify).inc(mx.verify_steps)
            met.m(met.spec_accepted).inc(getattr(mx, "accepted_tokens", 0) or 0)
    return n_tokens
