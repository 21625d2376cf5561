"""The engine process: it owns the `LLM` and is the only code that calls its engine (add / step / abort).

The server process (engine_loop.py) speaks HTTP, renders chat templates, tokenizes, parses and encodes; this
process loads the model and runs the engine's loop. They share no memory and no GIL, so the event loop's JSON and
SSE work runs beside the engine's Python instead of taking turns with it (as vLLM's engine core does).

    server process                      pipes (pickled plain data)          engine process
    EngineLoop.add / abort / drain  --- commands ------------------------>  add_request / abort_request
    reader in the event loop        <-- one message per step -----------    step(): acks, token deltas, stats

One message per step carries: the acknowledgements of the requests added just before it (or the error that refused
one, e.g. the ValueError of a prompt the engine cannot take), every request's delta (new text and token ids, per
choice: several tokens when the engine produced several in one step), and the figures `/metrics` shows (running
and waiting requests, KV use per pool, preemptions). MTP acceptance arrives with each finished request's metrics.

Grammar matchers (llguidance) live here, next to the sampler: the server sends the compiled grammar (a string) with
the request, this process builds one matcher per choice, masks the logits of those rows (grammar.MaskingRunner)
and advances each matcher with the sampled tokens. The masking wrapper is the engine's runner only while a
constrained request runs: with the plain runner the engine may decode several steps per call (multi-step
decoding), which a mask computed once per call could not follow.

The loop: while requests run, read the commands that arrived (one `select`, a read when there are bytes), step,
send. While idle, wait for a command (checking tensor-parallel workers every half second). When the server process
goes away (its end of the command pipe closes), abort everything and exit; SIGINT is ignored (Ctrl-C reaches the
whole process group, and the server decides when to stop, after its graceful period).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import time
import traceback
from dataclasses import dataclass, field

log = logging.getLogger("mimoflash.serve.engine")

# Errors the engine's add may raise for a request it cannot take; the server maps them back (ValueError -> 400).
_ERRORS = {cls.__name__: cls for cls in (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                                         RuntimeError)}


@dataclass
class EngineSpec:
    """What the engine process loads: `LLM(model, **llm_kwargs)`."""
    model: str
    llm_kwargs: dict = field(default_factory=dict)


@dataclass
class EngineInfo:
    """What the server needs to know about the loaded engine (sent once, when the engine is ready)."""
    max_model_len: int              # tokens a sequence may hold: max_model_len, or less where the KV cache holds fewer
    vocab_size: int
    eos_token_ids: list[int]
    max_num_seqs: int
    mtp: bool                       # speculative decoding on (grammar masks are built for one row per request)


def error_tuple(e: BaseException) -> tuple[str, str]:
    """An exception -> (class name, message): plain data for the pipe."""
    return type(e).__name__, str(e)


def rebuild_error(err: tuple[str, str]) -> Exception:
    """(class name, message) -> the exception, for the classes the server maps to HTTP statuses; else RuntimeError."""
    name, msg = err
    cls = _ERRORS.get(name)
    return cls(msg) if cls is not None else RuntimeError(f"{name}: {msg}")


def step_stats(engine) -> tuple:
    """-> (running, waiting, fraction of global KV blocks used or None, fraction of sliding-window rings used or
    None, preemptions so far): the gauges of /metrics."""
    sched, kv = engine.scheduler, engine.kv
    lay = kv.layout
    blocks = 1 - kv.num_free_blocks / lay.num_blocks if lay.num_blocks else None
    rings = 1 - kv.num_free_rings / lay.num_rings if lay.num_rings else None
    return len(sched.running), len(sched.waiting), blocks, rings, sched.num_preemptions


def engine_main(spec: EngineSpec, commands, outputs) -> None:
    """The engine process's entry point: load, report ready (or the error), run until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from ..engine.cli import context_limit
        from ..engine.llm import LLM
        llm = LLM(spec.model, **spec.llm_kwargs)
        core = EngineCore(llm, outputs)
        info = EngineInfo(context_limit(llm), llm.model.config.vocab_size, sorted(llm.engine.eos_token_ids),
                          llm.engine.config.max_num_seqs, getattr(llm.engine, "drafter", None) is not None)
    except Exception as e:                                   # a bad checkpoint or option: the server reports it
        outputs.send(("failed", error_tuple(e)))
        return
    outputs.send(("ready", info))
    try:
        core.run(commands)
    except BrokenPipeError:                                  # the server process is gone: nobody to report to
        return
    except Exception as e:                                   # an engine bug: the server fails the streams, 503
        outputs.send(("dead", error_tuple(e), traceback.format_exc()))
        raise SystemExit(1)
    finally:
        llm.close()


class EngineCore:
    """The loop of the engine process. `outputs` is the pipe to the server (a multiprocessing Connection)."""

    def __init__(self, llm, outputs):
        self.llm, self.engine, self.outputs = llm, llm.engine, outputs
        self.masking = None
        self._compiler = None
        from . import grammar
        if grammar.available():
            self.masking = grammar.MaskingRunner(self.engine.runner)     # in the engine only while it has matchers
        self._n: dict[str, int] = {}                 # request id -> its number of choices, while it runs
        self._drain_deadline: float | None = None

    def run(self, commands) -> None:
        """`commands`: the read end of the command pipe (a multiprocessing Connection; read as CommandReader)."""
        reader = CommandReader(commands.fileno())
        while True:
            busy = self.engine.has_unfinished_requests()
            if not busy and not reader.wait(0.5):
                self.llm.check_workers()             # tensor parallel: a dead worker stops the engine while idle
                continue
            acks = []
            for cmd in reader.read():
                if cmd[0] == "stop":                 # also what EOF (the server process is gone) reads as
                    self._stop(acks)
                    return
                ack = self._command(cmd)
                if ack is not None:
                    acks.append(ack)
            if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                for rid in list(self._n):
                    self.engine.abort_request(rid)
            deltas = self._pack(self.engine.step()) if self.engine.has_unfinished_requests() else []
            self.outputs.send(("step", acks, deltas, step_stats(self.engine)))

    def _command(self, cmd: tuple):
        """-> the acknowledgement of an add: (request id, None or the error as plain data)."""
        if cmd[0] == "add":
            _, rid, ids, params, prompt, grammars = cmd
            try:
                matchers = [self._matcher(g) for g in grammars] if grammars else None
                self.engine.add_request(ids, params, request_id=rid, prompt=prompt)
            except Exception as e:                   # ValueError: the request's fault (HTTP 400)
                if not isinstance(e, ValueError):
                    log.exception("add_request failed")
                return rid, error_tuple(e)
            self._n[rid] = params.n
            if matchers:
                for i, m in enumerate(matchers):
                    self.masking.matchers[_child_id(rid, params.n, i)] = m
                self.engine.runner = self.masking
            return rid, None
        if cmd[0] == "abort":
            if cmd[1] in self._n:
                self.engine.abort_request(cmd[1])    # its blocks and ring are free now; its last delta follows
        elif cmd[0] == "drain":
            self._drain_deadline = time.monotonic() + cmd[1]
        return None

    def _matcher(self, grammar: str):
        if self.masking is None:
            raise ValueError("constrained decoding needs the llguidance package: pip install 'mimoflash[serve]'")
        if self._compiler is None:
            from .grammar import GrammarCompiler
            self._compiler = GrammarCompiler(self.llm.tokenizer, self.llm.model.config.vocab_size,
                                             self.engine.eos_token_ids)
        return self._compiler.matcher(grammar)

    def _pack(self, outs) -> list[tuple]:
        """A step's RequestOutputs -> plain tuples (request id, finished, choices, metrics when finished), with
        each choice (index, text, token ids, finish reason, stop reason, logprobs). Matchers advance here."""
        deltas = []
        matchers = self.masking.matchers if self.masking is not None else None
        for out in outs:
            rid = out.request_id
            n = self._n.get(rid)
            if n is None:
                continue
            if matchers:
                for o in out.outputs:
                    m = matchers.get(_child_id(rid, n, o.index))
                    if m is not None and o.token_ids and not m.is_stopped():
                        m.consume_tokens(list(o.token_ids))
            if out.finished:
                del self._n[rid]
                if matchers:
                    for i in range(n):
                        matchers.pop(_child_id(rid, n, i), None)
                    if not matchers:
                        self.engine.runner = self.masking.inner        # no constrained request left
            deltas.append((rid, out.finished, [(o.index, o.text, o.token_ids, o.finish_reason, o.stop_reason,
                                                o.logprobs) for o in out.outputs], out.metrics))
        return deltas

    def _stop(self, acks: list) -> None:
        """Abort whatever runs, report the last deltas, and return (the process then exits)."""
        for rid in list(self._n):
            self.engine.abort_request(rid)
        deltas = []
        while self.engine.has_unfinished_requests():
            deltas += self._pack(self.engine.step())
        self.outputs.send(("step", acks, deltas, step_stats(self.engine)))


def frame(cmd: tuple) -> bytes:
    """A command as written to the command pipe: its pickle's length (4 bytes, big-endian), then the pickle."""
    data = pickle.dumps(cmd, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(4, "big") + data


class CommandReader:
    """The engine's end of the command pipe: length-prefixed pickles (`frame`). The server writes them from its event
    loop through a non-blocking transport, so a command may arrive in pieces; `read` returns the complete ones."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()
        self.eof = False

    def wait(self, timeout: float) -> bool:
        """True when bytes (or EOF) are there to read within `timeout` seconds."""
        return self.eof or bool(select.select([self.fd], [], [], timeout)[0])

    def read(self) -> list[tuple]:
        """The commands complete now (none if nothing arrived); ("stop",) once the server process is gone."""
        if not self.eof and select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 1 << 20)
            if data:
                self.buf += data
            else:
                self.eof = True
        cmds = []
        while len(self.buf) >= 4:
            n = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < 4 + n:
                break
            cmds.append(pickle.loads(self.buf[4:4 + n]))
            del self.buf[:4 + n]
        if self.eof:
            cmds.append(("stop",))
        return cmds


def _child_id(rid: str, n: int, index: int) -> str:
    """The engine's id of choice `index` of request `rid` (a request with n > 1 is a group of n sequences)."""
    return rid if n == 1 else f"{rid}#{index}"
