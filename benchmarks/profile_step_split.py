"""Where a batch-1 decode step's time goes: bytes read at the memory bandwidth vs everything else.

    python benchmarks/profile_step_split.py                          # both models, 1 thread (about a minute)
    python benchmarks/profile_step_split.py --threads 2 --repeats 5 --steps 1 8

One request, a 32-token prompt, 96 new tokens, greedy, through `LLMEngine.step()` as `LLM.generate` drives it, with
one decode step per call (`--steps 1`) and with multi-step runs of up to N steps per call (`--steps N`, the engine's
num_scheduler_steps; the settings alternate, run by run). Each stage is wrapped with a timer (the wrappers are
attributes set on this run's objects and removed afterwards; none of the engine's code changes), prefill's step is
dropped, and the medians per decoded token (a call's parts divided by the tokens it produced) over the calls of each
run, then the median over `--repeats` runs, are reported. A clock read costs microseconds in a VM: the cost of a
timed call is measured at the start and taken out of the part that made it and the part that encloses it (and
reported apart). One step per call:

  schedule          Scheduler.schedule()                  who runs, how many tokens
  prepare           ModelRunner.prepare()                 slices -> positions, block tables, ring slots (metadata)
  layer kernels     kernels.decode_layer(), every layer    the weights and K/V read here
  forward glue      FusedDecoder.forward() - the kernels   embedding row, RoPE table lookup, argument marshalling
  lm_head kernel    the lm_head product                    the other big weight read
  logits glue       model.logits() - the lm_head kernel    final norm, .float()
  execute other     runner.execute() - the above           the rest of the runner's Python
  sampling          LLMEngine._choose_tokens()             SampleRow objects, greedy argmax / sampling
  detokenize        LLMEngine._process_token()             incremental detokenizer, stop strings, logprobs
  postprocess       Scheduler.postprocess() - detokenize   append the token, token-level stops
  outputs           LLMEngine._group_output()              RequestOutput / CompletionOutput objects per step
  step other        step() - everything above

A greedy multi-step run (docs/ENGINE.md, "Multi-step decoding") replaces prepare ... sampling by:
  plan              ModelRunner._decode_run_args()        every step's metadata and kernel arguments, made up front
  C loop            kernels.decode_steps()                 the steps' layers, lm_head and argmax in one call
  run other         execute_greedy_steps() - the above    the run's argument arrays
and postprocess / detokenize cover the run's tokens (Scheduler.finish_steps); the layer and lm_head kernels run
inside the C loop, untimed apart, so the loop is what is set against the bytes at the bandwidth.

The bandwidth time is what the step's bytes cost at the read bandwidth measured in the same run (kernels.read_sum,
a threaded vector re-read of min(step bytes, 16 MiB): the last-level cache's rate, see LLC_PROBE_BYTES; the same
thread count and clock): the touched weights (attention, dense MLP,
2 chosen experts per MoE layer, router, norms, lm_head, one embedding row; not the MTP blocks, which plain decode
skips) and the K/V attended at the mean context (mimoflash.bench.step_bytes). "kernels over bandwidth" =
(layer + lm_head kernel time) - bandwidth time: what the kernels lose to compute, latency and threading; "outside
the kernels" is everything else in the step.
Clock: with one thread, the calling thread's CPU time (time.thread_time), so that time the OS gives to other
processes on a shared machine is not counted; wall-clock with more threads (the pool's workers are other threads).
Models: "mimo128m" (bench_decode.py's seeded MiMo-shaped model, bf16, no tokenizer) and "shipped"
(mimoflash.default_model(), with its tokenizer, so detokenization is measured). The last stdout line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import bench_config, build_model  # noqa: E402

from mimoflash import bench, kernels  # noqa: E402
from mimoflash.default import default_model  # noqa: E402
from mimoflash.engine.llm import LLM  # noqa: E402
from mimoflash.engine.sampling import SamplingParams  # noqa: E402

PARTS = ["schedule", "prepare", "layer kernels", "forward glue", "lm_head kernel", "logits glue", "execute other",
         "sampling", "plan", "C loop", "run other", "detokenize", "postprocess", "outputs", "step other"]


CLOCK = time.perf_counter          # main() switches to time.thread_time for --clock cpu
# The read rate is measured on a buffer of at most this many bytes, re-read: larger than the per-core L2 caches,
# small enough for the last-level cache to keep. A step's bytes cannot arrive faster than that level delivers a plain
# sequential re-read, so the bandwidth time is a lower bound on the kernels' time. (A buffer as large as all the
# weights reads at memory speed where the shared L3 cannot keep it, and the steps beat that rate: the dense weights,
# read every step, stay cached.)
LLC_PROBE_BYTES = 16 << 20


def weight_bytes(model) -> int:
    """Bytes of the weights a decode step can touch (not the MTP blocks, which plain decode skips)."""
    wb = bench.weight_bytes(model)
    return wb["dense"] + wb["experts"] + wb["embedding"]


def step_bytes(model, context: int, kv_elt: int) -> int:
    """Bytes one single-sequence decode step reads at `context` tokens (mimoflash.bench.step_bytes)."""
    return int(bench.step_bytes(model.config, bench.weight_bytes(model), 1, context, kv_elt))


def read_bandwidth(nbytes: int, reps: int = 7) -> float:
    """Bytes per second that kernels.read_sum reads over a buffer of `nbytes` (at least 1 MiB; threaded over the
    kernels' pool at its current thread count), the fastest of `reps` re-reads after one that faults the pages in,
    on this run's clock: what the level of the memory hierarchy that holds `nbytes` can give, not what it gave on
    average."""
    return bench.read_bandwidth(max(nbytes, 1 << 20), reps, fastest=True, clock=CLOCK)


class StepTimer:
    """Wraps the stages of one engine's step with timers; `steps` collects one dict of raw seconds per step."""

    def __init__(self, llm: LLM):
        self.eng = eng = llm.engine
        self.steps: list[dict[str, float]] = []
        self.cur: dict[str, float] = {}
        runner = eng.runner
        lm = llm.model.lm_head
        lm_ptrs = {lm.weight.data_ptr()}
        if getattr(lm, "_panels", None) is not None:
            lm_ptrs.add(lm._panels.wp.data_ptr())
        self._saved_kernels = {k: getattr(kernels, k) for k in ("decode_layer", "linear_panels", "linear_bf16w",
                                                                 "decode_steps")}
        self._objs = []                       # (object, attribute) pairs set on instances, deleted in close()

        def timed(key, fn):
            def w(*args, **kw):
                t = CLOCK()
                try:
                    return fn(*args, **kw)
                finally:
                    self.cur[key] = self.cur.get(key, 0.0) + CLOCK() - t
                    self.cur["n " + key] = self.cur.get("n " + key, 0) + 1
            return w

        def on(obj, name, key):
            setattr(obj, name, timed(key, getattr(obj, name)))
            self._objs.append((obj, name))

        kernels.decode_layer = timed("layer kernels", self._saved_kernels["decode_layer"])

        def lm_timed(fn, ptr_of):
            def w(*args):
                t = CLOCK()
                y = fn(*args)
                if ptr_of(args) in lm_ptrs:
                    self.cur["lm_head kernel"] = self.cur.get("lm_head kernel", 0.0) + CLOCK() - t
                    self.cur["n lm_head kernel"] = self.cur.get("n lm_head kernel", 0) + 1
                return y
            return w

        kernels.linear_panels = lm_timed(self._saved_kernels["linear_panels"], lambda a: a[1].data_ptr())
        kernels.linear_bf16w = lm_timed(self._saved_kernels["linear_bf16w"], lambda a: a[1].data_ptr())
        kernels.decode_steps = timed("C loop", self._saved_kernels["decode_steps"])
        on(eng.scheduler, "schedule", "schedule")
        on(runner, "prepare", "prepare")
        on(runner, "execute", "execute")
        on(runner, "execute_greedy_steps", "greedy run")
        on(runner, "_decode_run_args", "plan")
        if runner.fused is not None:
            on(runner.fused, "forward", "fused forward")
        on(llm.model, "logits", "logits")
        on(eng, "_choose_tokens", "sampling")
        on(eng.scheduler, "postprocess", "postprocess+")
        on(eng, "_process_token", "detokenize")
        on(eng, "_group_output", "outputs")
        step = eng.step

        def timed_step():
            self.cur = {}
            before = sum(len(r.output_token_ids) for r in eng.scheduler.running)
            t = CLOCK()
            out = step()
            self.cur["step"] = CLOCK() - t
            self.cur["n tokens"] = sum(len(o.token_ids) for d in out for o in d.outputs) or (
                sum(len(r.output_token_ids) for r in eng.scheduler.running) - before)
            self.steps.append(self.cur)
            return out

        eng.step = timed_step
        self._objs.append((eng, "step"))

        # What one timed call costs: `inside` is the part of it a wrapper counts in its own time, `outside` the rest,
        # which lands in the enclosing part. Both are removed in split() (a clock read costs microseconds in a VM).
        noop = timed("cal", lambda: None)
        self.cur = {}
        n = 2000
        t = CLOCK()
        for _ in range(n):
            noop()
        whole = (CLOCK() - t) / n
        self.inside = self.cur["cal"] / n
        self.outside = max(whole - self.inside, 0.0)
        self.cur = {}

    def close(self) -> None:
        for k, v in self._saved_kernels.items():
            setattr(kernels, k, v)
        for obj, name in self._objs:
            delattr(obj, name)                 # the class's method shows through again

    # Which timed part encloses which (for the timer overhead each call leaves in its enclosing part).
    PARENT = {"layer kernels": "fused forward", "lm_head kernel": "logits", "prepare": "execute",
              "fused forward": "execute", "logits": "execute", "detokenize": "postprocess+", "schedule": "step",
              "execute": "step", "sampling": "step", "postprocess+": "step", "outputs": "step",
              "plan": "greedy run", "C loop": "greedy run", "greedy run": "step"}

    def split(self, raw: dict[str, float]) -> dict[str, float]:
        """Raw inclusive seconds of one step() call -> the parts (exclusive) per token it produced, the timers' own
        cost removed."""
        g = {k: v for k, v in raw.items() if not k.startswith("n ")}
        calls = {k: raw.get("n " + k, 1 if k == "step" else 0) for k in g}
        for k in g:
            g[k] -= calls[k] * self.inside
        for k, parent in self.PARENT.items():
            if k in g and parent in g:
                g[parent] -= calls[k] * self.outside
        get = g.get
        out = {"schedule": get("schedule", 0), "prepare": get("prepare", 0), "layer kernels": get("layer kernels", 0),
               "forward glue": get("fused forward", 0) - get("layer kernels", 0),
               "lm_head kernel": get("lm_head kernel", 0), "logits glue": get("logits", 0) - get("lm_head kernel", 0),
               "sampling": get("sampling", 0), "detokenize": get("detokenize", 0),
               "postprocess": get("postprocess+", 0) - get("detokenize", 0), "outputs": get("outputs", 0)}
        out["execute other"] = get("execute", 0) - get("prepare", 0) - get("fused forward", 0) - get("logits", 0)
        out.update({"plan": get("plan", 0), "C loop": get("C loop", 0),
                    "run other": get("greedy run", 0) - get("plan", 0) - get("C loop", 0)})
        out["step other"] = (get("step", 0) - sum(out[k] for k in ("schedule", "sampling", "postprocess", "detokenize",
                                                                    "outputs"))
                             - get("execute", 0) - get("greedy run", 0))
        out["step"] = get("step", 0)
        out["timer overhead"] = sum(calls[k] for k in g) * (self.inside + self.outside)
        n = max(1, raw.get("n tokens", 1))
        return {k: v / n for k, v in out.items()}


def profile(llm: LLM, prompt: list[int], new: int, repeats: int, steps: list[int]) -> dict[int, dict[str, float]]:
    """-> {num_scheduler_steps: median ms per decoded token of every part (and 'step')}; the settings alternate
    run by run, their order flipping every repeat."""
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    timer = StepTimer(llm)
    per_run: dict[int, list] = {n: [] for n in steps}
    try:
        for r in range(repeats):
            for n in (steps if r % 2 == 0 else steps[::-1]):
                llm.engine.config.num_scheduler_steps = n
                timer.steps.clear()
                llm.engine.add_request(prompt, sp)
                while llm.engine.has_unfinished_requests():
                    llm.engine.step()
                decode = [timer.split(s) for s in timer.steps[1:]]     # the first step is the prompt's prefill
                # each call weighs by its tokens: the median token's call (a run cut short counts for less)
                weights = [max(1, s.get("n tokens", 1)) for s in timer.steps[1:]]
                per_run[n].append({k: _weighted_median([d[k] for d in decode], weights) for k in decode[0]})
    finally:
        timer.close()
    return {n: {k: 1e3 * statistics.median(r[k] for r in runs) for k in runs[0]} for n, runs in per_run.items()}


def _weighted_median(xs: list[float], ws: list[int]) -> float:
    """The median of xs with x_i counted w_i times."""
    return statistics.median([x for x, w in zip(xs, ws) for _ in range(w)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mimo128m", "shipped"], choices=["mimo128m", "shipped"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 8],
                    help="num_scheduler_steps settings to profile side by side (1 = one decode step per call)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None,
                    help="cpu = the calling thread's CPU time (time.thread_time: time the OS gave to other processes "
                         "is not counted; only meaningful with --threads 1), wall = time.perf_counter; default: cpu "
                         "with one thread, wall otherwise")
    a = ap.parse_args(argv)
    if min(a.steps) < 1:
        ap.error("--steps: each setting must be >= 1")
    a.clock = a.clock or ("cpu" if a.threads == 1 else "wall")
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu counts the calling thread only: use it with --threads 1")
    global CLOCK
    CLOCK = time.thread_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    out = {"threads": a.threads, "repeats": a.repeats, "clock": a.clock, "steps": a.steps, "models": {}}
    for name in a.models:
        if name == "mimo128m":
            llm = LLM(build_model(bench_config()).cast(torch.bfloat16), max_num_seqs=1, max_model_len=512)
        else:
            llm = LLM(default_model(), max_num_seqs=1, max_model_len=512, progress=False)
        assert llm.engine.runner.fused is not None, "the fused decode path is not in use (CPU kernels unavailable?)"
        kernels.set_num_threads(a.threads)
        V = llm.model.config.vocab_size
        prompt = torch.randint(3, V, (a.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        profile(llm, prompt, 8, 1, a.steps)                                 # warm-up
        lay = llm.engine.layout
        ctx = a.prompt_len + a.new_tokens // 2
        kv_elt = torch.empty(0, dtype=lay.dtype).element_size()
        total_b = step_bytes(llm.model, ctx, kv_elt)
        probe = min(total_b, LLC_PROBE_BYTES)
        bw = read_bandwidth(probe)
        per_steps = profile(llm, prompt, a.new_tokens, a.repeats, a.steps)
        bw = max([bw, read_bandwidth(probe), read_bandwidth(probe)])
        weight_b = total_b - bench.kv_bytes_per_sequence(llm.model.config, ctx, kv_elt)
        bw_ms = {"weights at bandwidth": weight_b / bw * 1e3, "K/V at bandwidth": (total_b - weight_b) / bw * 1e3}
        lm_b = llm.model.lm_head.weight.numel() * llm.model.lm_head.weight.element_size()
        res = out["models"][name] = {"read_GBps": round(bw / 1e9, 2), "read_probe_MB": round(probe / 1e6, 1),
                                     "bytes_per_token_MB": round(total_b / 1e6, 3),
                                     "bandwidth_ms": {k: round(v, 4) for k, v in bw_ms.items()}, "steps": {}}
        kern, rates = {}, {}
        for n, ms in per_steps.items():
            # the weight-reading kernels: timed apart with one step per call, inside the C loop of a greedy run
            kern[n] = ms["layer kernels"] + ms["lm_head kernel"] + ms["C loop"]
            rates[n] = ({"lm_head kernel": lm_b / ms["lm_head kernel"] / 1e6,           # GB/s each kernel reads at
                         "layer kernels": (total_b - lm_b) / ms["layer kernels"] / 1e6} if ms["layer kernels"] else
                        {"C loop": total_b / ms["C loop"] / 1e6} if ms["C loop"] else {})
            res["steps"][n] = {"ms_per_token": {k: round(v, 4) for k, v in ms.items()},
                               "tok_s": round(1e3 / ms["step"], 1), "kernels_ms": round(kern[n], 4),
                               "kernel_read_GBps": {k: round(v, 2) for k, v in rates[n].items()},
                               "kernels_over_bandwidth_ms": round(kern[n] - sum(bw_ms.values()), 4),
                               "outside_kernels_ms": round(ms["step"] - kern[n], 4),
                               "outside_kernels_fraction": round((ms["step"] - kern[n]) / ms["step"], 3)}
        cols = list(per_steps)
        print(f"\n{name}: ms per decoded token ({a.threads} thread(s), medians of {a.repeats} runs x "
              f"{a.new_tokens - 1} tokens, {a.clock} clock); read bandwidth {bw / 1e9:.1f} GB/s over "
              f"{probe / 1e6:.0f} MB re-read, {total_b / 1e6:.2f} MB per token")
        print(f"  {'part':<28}" + "".join(f"{f'N={n} ms':>12}{'of step':>9}" for n in cols))
        for k in PARTS:
            if not any(per_steps[n][k] for n in cols) and k not in ("C loop", "layer kernels"):
                continue
            cells = "".join(f"{per_steps[n][k]:>12.3f}{per_steps[n][k] / per_steps[n]['step']:>9.1%}" for n in cols)
            extra = "".join(f"  (N={n} reads at {rates[n][k]:.1f} GB/s)" for n in cols if k in rates[n])
            print(f"  {k:<28}{cells}{extra}")
        print(f"  {'= step (per token)':<28}" + "".join(f"{per_steps[n]['step']:>12.3f}{'':>9}" for n in cols))
        print(f"  {'= tok/s':<28}" + "".join(f"{1e3 / per_steps[n]['step']:>12.1f}{'':>9}" for n in cols))
        print(f"  {'(timers, removed above)':<28}" + "".join(f"{per_steps[n]['timer overhead']:>12.3f}{'':>9}"
                                                            for n in cols))
        for k, v in bw_ms.items():
            print(f"  {k:<28}" + "".join(f"{v:>12.3f}{v / per_steps[n]['step']:>9.1%}" for n in cols))
        over = {n: kern[n] - sum(bw_ms.values()) for n in cols}
        print(f"  {'kernels over bandwidth':<28}" + "".join(f"{over[n]:>12.3f}{over[n] / per_steps[n]['step']:>9.1%}"
                                                           for n in cols))
        print(f"  {'outside the kernels':<28}" + "".join(
            f"{per_steps[n]['step'] - kern[n]:>12.3f}{(per_steps[n]['step'] - kern[n]) / per_steps[n]['step']:>9.1%}"
            for n in cols))
        del llm
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
