"""Starting, driving and stopping the ranks of a tensor-parallel `LLM` (torch.distributed: gloo on CPU, NCCL on CUDA).

Who does what. Rank 0 is the process that called `LLM(model, tensor_parallel_size=N)`: it owns the scheduler,
samples, detokenizes, and runs its share of every forward. Ranks 1..N-1 are *followers*: each builds its own
shard (parallel/load.py) and a plain single-process engine over it, then loops: wait for the next command, run it.
Two ways to get the followers:
* one host: rank 0 starts N-1 processes itself (torch.multiprocessing, spawn), meeting on a free 127.0.0.1 port;
* across hosts: every rank is started by `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set) and runs the
  same script; `LLM(...)` returns on rank 0 and, on the others, serves rank 0 until it closes, then exits the process
  (SystemExit(0)).

The step plan. Each engine step, rank 0 publishes the scheduled batch as plain data (per item: start, the token
slice, draft count, whether it samples, its block ids and ring id: a few hundred bytes) under a sequence-numbered
key of the group's TCP store; the followers rebuild the same `Batch` shape from it and call the same
`ModelRunner.execute`, so all ranks prepare identical metadata and issue the same collectives in the same order.
The store (not a broadcast collective) carries the plan so an idle follower can wait for hours: collectives time
out, a store wait is retried, and a follower whose rank 0 is gone gets a connection error and exits. With
speculative decoding the drafter's MTP calls travel the same way (parallel/mtp.py), their hidden-state rows by one
broadcast. Every rank decodes with its fused step (parallel/fused.py) where one process would.

Failures. Collectives run with a timeout (`MIMOFLASH_TP_TIMEOUT`, seconds, default 120). Before each step rank 0
checks that its child processes are alive; a collective that fails (a peer died: gloo reports the closed connection
at once) or times out raises `ParallelError` naming the dead ranks and their exit codes; the group is then torn
down (remaining processes stopped) and the `LLM` refuses further work. `LLM.close()`, garbage collection and
interpreter exit stop every process the group started: a "stop" command, a bounded join, then terminate / kill.
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import socket
import sys
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import mtp
from .fused import ParallelFusedDecoder, ParallelFusedMTPLayer
from .load import build_shard, resident_bytes
from .modules import COMM
from .shard import CheckpointReader, ShardPlan, StateDictReader


class ParallelError(RuntimeError):
    """A tensor-parallel group failed (a rank died, a collective timed out) or was used after it failed/closed."""


def _timeout() -> float:
    return float(os.environ.get("MIMOFLASH_TP_TIMEOUT", "120"))


def _torchrun_env() -> tuple[int, int] | None:
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


# ---------------------------------------------------------------------------------------------- the step plan


@dataclass
class _PlanRequest:
    """What `ModelRunner.prepare` reads of a request: its cache (block ids, ring id) and the step's token slice."""
    start: int
    tokens: list[int]
    block_ids: list[int]
    ring_id: int | None

    def token_slice(self, start: int, end: int) -> list[int]:
        assert start == self.start and end == start + len(self.tokens), "plan and runner disagree on the slice"
        return self.tokens


@dataclass
class _PlanItem:
    request: _PlanRequest
    start: int
    num_tokens: int
    num_draft: int
    sample: bool


@dataclass
class _PlanBatch:
    items: list[_PlanItem] = field(default_factory=list)


def plan_of(batch) -> list[tuple]:
    """A scheduled Batch -> plain data (module docstring)."""
    return [(it.start, it.request.token_slice(it.start, it.start + it.num_tokens), it.num_draft, bool(it.sample),
             list(it.request.block_ids), it.request.ring_id) for it in batch.items]


def slices_plan(slices) -> list[tuple]:
    """An MTP call's runner Slices -> plain data."""
    return [(s.start, list(s.tokens), s.rows, s.key_from, list(s.request.block_ids), s.request.ring_id)
            for s in slices]


def slices_of(plan: list[tuple]) -> list:
    from ..engine.runner import Slice
    return [Slice(_PlanRequest(start, toks, blocks, ring), start, toks, rows, key_from)
            for start, toks, rows, key_from, blocks, ring in plan]


def batch_of(plan: list[tuple]) -> _PlanBatch:
    return _PlanBatch([_PlanItem(_PlanRequest(s, toks, blocks, ring), s, len(toks), nd, sample)
                       for s, toks, nd, sample, blocks, ring in plan])


# ---------------------------------------------------------------------------------------------- the store channel


def _first_line(e: BaseException) -> str:
    """An exception as one line: c10d errors carry a C++ stack trace after the message."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _wait_key(store, key: str, deadline: float | None = None) -> bytes:
    """store.get(key), waiting as long as it takes (until `deadline`, a time.monotonic() value) in rounds of a few
    minutes (each timed-out round logs a c10d warning); a store whose server (rank 0) is gone raises at once."""
    while True:
        try:
            store.wait([key], datetime.timedelta(seconds=300))
            return store.get(key)
        except Exception as e:                      # a wait timeout, or the server is gone
            try:
                store.num_keys()                    # raises when the connection is dead
            except Exception:
                raise ParallelError(f"the tensor-parallel group's rank 0 is gone ({_first_line(e)})") from None
            if deadline is not None and time.monotonic() > deadline:
                raise ParallelError(f"timed out waiting for {key!r} from rank 0") from None


# ---------------------------------------------------------------------------------------------- rank 0


class _State:
    """What shutdown needs, kept apart from the handle so a finalizer can hold it."""

    def __init__(self, procs, store):
        self.procs, self.store = procs, store
        self.seq = 0
        self.closed = False
        self.failed: str | None = None


def _shutdown(state: _State) -> None:
    if state.closed:
        return
    state.closed = True
    if state.failed is None and state.store is not None:
        try:
            state.seq += 1
            state.store.set(f"cmd/{state.seq}", pickle.dumps(("stop",)))
        except Exception:
            pass
    deadline = time.monotonic() + 10
    for p in state.procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in state.procs:
        if p.is_alive():
            p.terminate()
            p.join(2)
        if p.is_alive():
            p.kill()
            p.join(2)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


class ParallelGroup:
    """Rank 0's handle on the group (module docstring)."""

    def __init__(self, rank: int, world: int, procs: list, store):
        self.rank, self.world = rank, world
        self._state = _State(procs, store)
        self._finalizer = weakref.finalize(self, _shutdown, self._state)    # runs at GC and at interpreter exit

    # -- liveness
    def dead_ranks(self) -> list[str]:
        return [f"rank {i} (exit code {p.exitcode})" for i, p in enumerate(self._state.procs, 1) if not p.is_alive()]

    def check(self) -> None:
        st = self._state
        if st.failed is not None:
            raise ParallelError(f"the tensor-parallel group failed earlier and is stopped: {st.failed}")
        if st.closed:
            raise ParallelError("this LLM was closed: its tensor-parallel workers are stopped")
        dead = self.dead_ranks()
        if dead:
            raise self.fail(f"tensor-parallel worker {', '.join(dead)} died")

    def fail(self, why: str) -> ParallelError:
        """Mark the group failed, stop what is left, -> the error to raise."""
        self._state.failed = why
        _shutdown(self._state)
        return ParallelError(why)

    def send(self, cmd: tuple) -> None:
        self.check()
        st = self._state
        st.seq += 1
        st.store.set(f"cmd/{st.seq}", pickle.dumps(cmd))
        if st.seq > 1:
            st.store.delete_key(f"cmd/{st.seq - 1}")    # every follower read it: its step's collectives completed

    def run(self, fn, what: str):
        """fn() on rank 0 while the followers run their part; a failed collective -> ParallelError."""
        try:
            return fn()
        except ParallelError:
            raise
        except Exception as e:
            time.sleep(0.2)                             # a peer that just died: let its exit code land
            dead = self.dead_ranks()
            who = f"worker {', '.join(dead)} died" if dead else "a collective failed"
            raise self.fail(f"tensor-parallel {what}: {who} ({_first_line(e)})") from e

    def close(self) -> None:
        self._finalizer()

    # -- the engine
    def attach(self, llm) -> None:
        """After rank 0's engine exists: hand its cache layout to the followers, wait until they have built theirs,
        and route the engine's steps through `BroadcastingRunner`."""
        engine = engine_of(llm)
        st = self._state
        st.store.set("layout", pickle.dumps(engine.layout))
        deadline = time.monotonic() + 10 * _timeout()
        while int(st.store.add("ready", 0)) < self.world - 1:
            self.check()
            err = st.store.check(["error"]) and st.store.get("error").decode()
            if err:
                raise self.fail(f"a tensor-parallel worker failed to start: {err}")
            if time.monotonic() > deadline:
                raise self.fail("timed out waiting for the tensor-parallel workers to build their engines")
            time.sleep(0.01)
        self.run(lambda: _fused_per_rank(engine.runner), "start")
        if getattr(llm.model, "expert_store", None) is not None:    # FP8 kept (parallel/fp8.py), as one process says
            llm.weight_dtype = torch.float8_e4m3fn
        engine.runner = BroadcastingRunner(engine.runner, self)
        if engine.drafter is not None:                 # it was handed the runner before the wrapping
            engine.drafter.runner = engine.runner

    def stats(self, llm) -> list[dict]:
        """Every rank's resident weight bytes, KV cache bytes and communication seconds (rank order); `llm` is
        rank 0's LLM."""
        self.send(("stats",))
        return self.run(lambda: _gather_stats(_rank_stats(engine_of(llm).runner.inner)), "stats")

    def probe(self, numel: int, repeats: int = 50) -> float:
        """Median seconds of one all_reduce of `numel` fp32 values, all ranks ready (a barrier first): the
        collectives' own cost, without the waiting for a slower rank that the step's counters include."""
        self.send(("probe", numel, repeats))
        return self.run(lambda: _probe(numel, repeats), "probe")

    def use_fused(self, llm, on: bool) -> bool:
        """Switch every rank between the fused decode step and the module path (benchmarks and tests compare
        them) -> whether the fused step is now on (False when it does not qualify for this model)."""
        runner = engine_of(llm).runner.inner                   # under the BroadcastingRunner
        self.send(("fused", bool(on)))
        _set_fused(runner, on)
        self.run(dist.barrier, "use_fused")
        return runner.fused is not None

    def reset_comm(self) -> None:
        """Zero every rank's collective counters. Ends in a barrier: every command but "stop" has a collective, so
        when the next one is published all followers have read this one (`send` deletes it then)."""
        self.send(("reset_comm",))
        COMM.reset()
        self.run(dist.barrier, "reset_comm")


def engine_of(llm):
    return llm.engine


def _fused_per_rank(runner) -> None:
    """The engine built a FusedDecoder for the rank's model where its layers qualify (bf16 weights on the CPU, plain
    top-k routing): run it in halves with the collectives between them (parallel/fused.py). Every rank must take the
    same path (the collectives must match), so they agree first: the fused step runs only if it qualified on all.
    Ends in a collective: rank 0 calls it after the followers reported ready."""
    ok = torch.tensor([int(runner.fused is not None)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    runner.fused = ParallelFusedDecoder.from_fused(runner.fused) if int(ok) else None
    runner.parallel_fused = runner.fused                       # kept for use_fused(True)
    # MTP blocks: their fused rows (parallel/mtp.py runs them while the fused step is on); the same collectives as
    # their module path, so the ranks need not agree on it
    runner.parallel_fused_mtp = ([ParallelFusedMTPLayer.from_fused(f) for f in runner.fused_mtp]
                                 if runner.fused is not None and runner.fused_mtp else None)
    runner.fused_mtp = None


def _set_fused(runner, on: bool) -> None:
    runner.fused = runner.parallel_fused if on else None


def _rank_stats(runner) -> dict:
    cache = runner.cache
    kv = sum(t.numel() * t.element_size() for t in (cache.k_global, cache.v_global, cache.k_ring, cache.v_ring)
             if t is not None)
    lay = runner.layout
    return {"weights_bytes": resident_bytes(runner.model), "kv_cache_bytes": kv, "num_blocks": lay.num_blocks,
            "num_rings": lay.num_rings, "comm_seconds": COMM.seconds, "comm_calls": COMM.calls,
            "fused_steps": getattr(runner.parallel_fused, "steps", 0),
            "fused_mtp_steps": sum(f.steps for f in runner.parallel_fused_mtp or ())}


def _probe(numel: int, repeats: int) -> float:
    t = torch.zeros(numel)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _gather_stats(mine: dict) -> list[dict]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


class BroadcastingRunner:
    """Rank 0's runner: publishes each step's plan, then runs the same `ModelRunner.execute` as the followers.
    Anything else is the wrapped runner's."""

    def __init__(self, inner, group: ParallelGroup):
        self.inner, self.group = inner, group

    def execute(self, batch) -> torch.Tensor:
        self.group.send(("step", plan_of(batch)))
        return self.group.run(lambda: self.inner.execute(batch), "step")

    def fill_mtp_kv(self, layer: int, slices, hidden: torch.Tensor) -> None:
        hidden = hidden.contiguous()
        self.group.send(("mtp_fill", layer, slices_plan(slices), tuple(hidden.shape), hidden.dtype))
        self.group.run(lambda: (dist.broadcast(hidden, 0), mtp.fill_mtp_kv(self.inner, layer, slices, hidden)),
                       "MTP step")

    def execute_mtp(self, layer: int, slices, hidden: torch.Tensor, head_weight=None) -> torch.Tensor:
        assert head_weight is None, "a reduced draft vocabulary is refused under tensor parallelism (start)"
        hidden = hidden.contiguous()
        self.group.send(("mtp", layer, slices_plan(slices), tuple(hidden.shape), hidden.dtype))
        return self.group.run(lambda: (dist.broadcast(hidden, 0),
                                       mtp.execute_mtp(self.inner, layer, slices, hidden))[1], "MTP step")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------------------------- start


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _source_of(model, opts: dict):
    """-> (config, source to rebuild the reader in any process, shard dtype or None = the model's)."""
    from ..engine.llm import _resolve_dtype, _resolve_weight_dtype
    from ..model.mimo import MiMoForCausalLM
    device = torch.device(opts["device"])
    if isinstance(model, MiMoForCausalLM):
        if hasattr(model, "plan"):
            raise ValueError("this model is already one rank's shard")
        # Copies in shared memory: handing the model's own tensors to spawn would move their storage into shared
        # memory in place, freeing the memory that another engine built on the same model points into (raw
        # pointers of its fused decode step).
        sd = {k: torch.empty_like(v).share_memory_().copy_(v.detach()) if v.device.type == "cpu" else v.detach()
              for k, v in model.state_dict().items()}
        return model.config, ("state_dict", model.config, sd), None
    if isinstance(model, (str, Path)):
        from ..checkpoint.loader import _read_config, _resolve_path, _weight_map, stored_weight_dtype
        from ..engine.fp8_layout import wants_fp8
        root = _resolve_path(model)
        config = _read_config(root, _weight_map(root))
        compute = _resolve_dtype(opts["dtype"], device)
        weights = _resolve_weight_dtype(opts["weight_dtype"], compute, stored_weight_dtype(root), device)
        fp8 = wants_fp8(root, opts["weight_dtype"], compute, device)          # FP8 kept compressed (parallel/fp8.py)
        return config, ("path", str(root), fp8), weights
    raise ValueError(f"model must be a checkpoint path or a MiMoForCausalLM, got {type(model).__name__}")


def _reader(source, config):
    if source[0] == "state_dict":
        return StateDictReader(source[2])
    return CheckpointReader(Path(source[1]), config)


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def _init(rank: int, world: int, device: torch.device, init_method: str | None) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {} if init_method is None else {"init_method": init_method, "rank": rank, "world_size": world}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=_timeout()), **kw)


def start(model, tokenizer, world: Any, opts: dict):
    """LLM's entry for tensor_parallel_size != 1 -> (group, this rank's shard, tokenizer, per-rank kv_cache_memory).
    On a torchrun follower it never returns (module docstring)."""
    import inspect
    from ..engine.llm import LLM
    params = set(inspect.signature(LLM.__init__).parameters) - {"self", "model", "tokenizer", "tensor_parallel_size"}
    opts = {k: v for k, v in opts.items() if k in params}          # LLM's arguments, for the followers' engines
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {world!r}")
    spec = opts.get("speculative_config")
    if spec is not None:
        from ..engine.speculative import SpeculativeConfig
        spec = SpeculativeConfig.from_value(spec)
        if spec.draft_vocab is not None or spec.draft_vocab_size is not None:
            raise ValueError("a reduced draft vocabulary (draft_vocab / draft_vocab_size) is not supported with "
                             "tensor_parallel_size > 1 (the LM head is split by vocabulary)")
    if opts.get("memory_budget") is not None:
        raise ValueError("memory_budget (FP8 experts read from the files) is not supported with tensor_parallel_size "
                         "> 1: each rank already holds only its share of the experts")
    if opts.get("weight_dtype") in ("fp8", "float8", "float8_e4m3fn", torch.float8_e4m3fn):
        raise ValueError("with tensor_parallel_size > 1 pass weight_dtype='auto' (the default), which keeps an E4M3 "
                         "checkpoint's FP8 weights compressed on every rank, or 'bfloat16' to dequantise them")
    if dist.is_initialized():
        raise ValueError("a torch.distributed process group already exists in this process (another tensor-parallel "
                         "LLM not closed?)")
    device = torch.device(opts["device"])
    config, source, dtype = _source_of(model, opts)
    if spec is not None and not config.num_nextn_predict_layers:
        raise ValueError("speculative decoding with method 'mtp' needs a model with MTP layers "
                         "(num_nextn_predict_layers >= 1); this model has none")
    plan0 = ShardPlan(config, 0, world, mtp=spec is not None)     # checks the split before any process starts
    env = _torchrun_env()
    if plan0.replicated_kv and (env is None or env[0] == 0):
        print(f"mimoflash: tensor_parallel_size={world} exceeds the KV heads of an attention kind: each KV head is "
              "replicated on several ranks (docs/PARALLEL.md)", file=sys.stderr)
    procs = []
    if env is not None:
        rank, size = env
        if size != world:
            raise ValueError(f"tensor_parallel_size={world} but torchrun started WORLD_SIZE={size} ranks")
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = _rank_device(device, local)
        _init(rank, world, device, None)
        if rank != 0:
            code = _follow(rank, world, config, source, dtype, dict(opts, device=str(device)))
            raise SystemExit(code)
    else:
        port = _free_port()
        ctx = torch.multiprocessing.get_context("spawn")
        for r in range(1, world):
            p = ctx.Process(target=_follower_main, args=(r, world, port, config, source, dtype, opts), daemon=True,
                            name=f"mimoflash-tp-rank{r}")
            p.start()
            procs.append(p)
        try:
            device = _rank_device(device, 0)
            _init(0, world, device, f"tcp://127.0.0.1:{port}")
        except Exception as e:
            state = _State(procs, None)
            state.failed = "init"
            _shutdown(state)
            codes = ", ".join(f"rank {i}: exit code {p.exitcode}" for i, p in enumerate(procs, 1))
            raise ParallelError(f"the tensor-parallel workers did not join ({codes}): {_first_line(e)}") from e
    from torch.distributed.distributed_c10d import _get_default_store
    group = ParallelGroup(0, world, procs, _get_default_store())
    try:
        shard = build_shard(plan0, _reader(source, config), dtype or _model_dtype(source), device, _fp8(source))
    except BaseException:
        group.close()
        raise
    if tokenizer is None and source[0] == "path" and not opts.get("skip_tokenizer_init"):
        from ..tokenizer import Tokenizer, has_tokenizer
        if has_tokenizer(source[1]):
            tokenizer = Tokenizer.from_dir(source[1])
    kv = opts.get("kv_cache_memory")
    if kv is not None and kv > 0:
        kv = kv / world if kv <= 1 else int(kv) // world
    return group, shard, tokenizer, kv


def _fp8(source) -> bool:
    return source[0] == "path" and source[2]


def _model_dtype(source) -> torch.dtype:
    sd = source[2]
    return next((t.dtype for n, t in sd.items() if n.endswith("q_proj.weight")), torch.float32)


# ---------------------------------------------------------------------------------------------- followers


def _follower_main(rank, world, port, config, source, dtype, opts) -> None:
    """Entry of a spawned follower process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # Ctrl-C is rank 0's to handle; it then stops us
    device = _rank_device(torch.device(opts["device"]), rank)
    try:
        _init(rank, world, device, f"tcp://127.0.0.1:{port}")
    except Exception:
        traceback.print_exc()
        sys.exit(3)
    code = _follow(rank, world, config, source, dtype, dict(opts, device=str(device)))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)           # a dedicated process: skipping the interpreter's teardown makes close() quick


def _follow(rank, world, config, source, dtype, opts) -> int:
    """Build this rank's shard and engine, then run rank 0's commands until "stop" -> exit code."""
    from torch.distributed.distributed_c10d import _get_default_store
    from ..engine.llm import LLM
    store = _get_default_store()
    try:
        plan = ShardPlan(config, rank, world, mtp=opts.get("speculative_config") is not None)
        shard = build_shard(plan, _reader(source, config), dtype or _model_dtype(source), torch.device(opts["device"]),
                            _fp8(source))
        layout = pickle.loads(_wait_key(store, "layout", time.monotonic() + 10 * _timeout()))
        kw = dict(opts)
        # the same speculative config as rank 0, for the same cache layout (MTP rings, ring slack); this rank's
        # drafter is never called: rank 0's drafts reach it as "mtp" commands
        kw.update(kv_cache_memory=layout.total_bytes, tensor_parallel_size=1, progress=False,
                  skip_tokenizer_init=True, memory_budget=None)
        llm = LLM(shard, **kw)
        if llm.engine.layout != layout:
            raise ParallelError(f"rank {rank} planned a different KV cache than rank 0: {llm.engine.layout} vs "
                                f"{layout}")
    except BaseException as e:
        traceback.print_exc()
        try:
            store.set("error", f"rank {rank}: {type(e).__name__}: {e}")
        except Exception:
            pass
        return 2
    store.add("ready", 1)
    runner = llm.engine.runner
    try:
        _fused_per_rank(runner)
    except Exception as e:
        print(f"mimoflash tensor-parallel rank {rank}: {_first_line(e)}", file=sys.stderr)
        return 1
    seq = 0
    try:
        while True:
            seq += 1
            cmd = pickle.loads(_wait_key(store, f"cmd/{seq}"))
            if cmd[0] == "stop":
                break
            if cmd[0] == "step":
                runner.execute(batch_of(cmd[1]))
            elif cmd[0] in ("mtp", "mtp_fill"):
                _, layer, plan, shape, dtype = cmd
                hidden = torch.empty(shape, dtype=dtype, device=runner.device)
                dist.broadcast(hidden, 0)
                fn = mtp.execute_mtp if cmd[0] == "mtp" else mtp.fill_mtp_kv
                fn(runner, layer, slices_of(plan), hidden)
            elif cmd[0] == "stats":
                _gather_stats(_rank_stats(runner))
            elif cmd[0] == "probe":
                _probe(cmd[1], cmd[2])
            elif cmd[0] == "fused":
                _set_fused(runner, cmd[1])
                dist.barrier()
            elif cmd[0] == "reset_comm":
                COMM.reset()
                dist.barrier()
    except ParallelError as e:
        print(f"mimoflash tensor-parallel rank {rank}: {e}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    try:
        dist.destroy_process_group()
    except Exception:
        pass
    return 0
