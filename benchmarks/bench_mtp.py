"""MTP speculative decoding on the shipped model: tokens per verify step, decode speedup over the same engine without
MTP, and the speedup this machine allows from bytes read (docs/MTP.md).

    python benchmarks/bench_mtp.py                   # full run (~5-10 minutes on 2 busy cores)
    python benchmarks/bench_mtp.py --repeats 1 --prompts 4 --no-batch     # quick look
    python benchmarks/bench_mtp.py --repeats 5 --split                    # the documented figures (~2-3 minutes)

What is measured, in one process, variants interleaved prompt by prompt (their order rotating every repeat), medians:
  * batch 1, greedy, `--max-tokens` (128) new tokens for each of 16 Python prompts written for this benchmark (the
    shipped model was trained on the Python standard library; these are not from it): decode tokens/s =
    (generated - 1) / (finish - first token), prefill excluded; tokens per verify step; acceptance per draft position;
  * the bytes bound of each MTP variant: (tokens per verify step x bytes read by a one-token step) / (bytes read by
    a verify step + bytes read by the drafts), counted from the weight shapes (bf16 matmul weights, fp32 router and
    norms), the K/V each sequence attends to (fp32 cache), and the experts the verify steps actually routed (the
    distinct experts of each MoE layer per step, read from the fused step's choices): a verify step of k + 1 tokens
    routes to more experts than one token does;
  * batch 8 and 16 (all 16 prompts, `max_num_seqs` 8 / 16): aggregate decode tokens/s with MTP off and adaptive,
    and their ratio per process CPU second (steadier on a shared machine), after one run per engine that is
    reported as the cold ratio (adaptive's first measurements fall in it);
  * temperature 0.7 (seeded), batch 1: decode tokens/s off, k = 3 (reduced vocabulary) and adaptive, interleaved;
    their engines start cold (adaptive measures its costs in this run);
  * with `--split`, after the table: each fixed-depth variant's decoding timed again with a wrapper around the
    kernels' calls (whole cycles in one call; otherwise main layers, LM head, draft passes, argmax; the rest of the
    engine's decode steps is Python), in microseconds per verification cycle, and Python's share of a cycle.
Variants: off (the engine's default, up to 8 decode steps per call: multi-step decoding); off1 (one step per call,
as the engine's own speculative steps run; "vs off1" compares with it); k = 1, 2, 3 drafts with the full draft
vocabulary; k = 1 and 3 with a reduced draft vocabulary (the `--draft-vocab` lowest token ids, a BPE vocabulary's
first merges, or with `--draft-vocab-from stdlib` the most frequent tokens of the Python standard library's own
source, the training distribution); adaptive (k <= 3, reduced vocabulary). `--variants` picks some of them.
The last stdout line is one JSON object. OMP_WAIT_POLICY defaults to PASSIVE; `--threads` (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import mimoflash
from mimoflash import LLM, SamplingParams
from mimoflash.engine.speculative import token_counts
from mimoflash.model.layers import MLP
from mimoflash.model.moe import MoE

PROMPTS = [
    "def median_of_three(a, b, c):\n",
    "class BankAccount:\n    def __init__(self, owner, balance=0):\n",
    "def parse_csv_line(line, sep=','):\n    fields = []\n",
    "import json\n\ndef load_settings(path):\n",
    "def count_vowels(text):\n    \"\"\"Return the number of vowels in text.\"\"\"\n",
    "class Matrix:\n    def __init__(self, rows):\n        self.rows = rows\n\n    def transpose(self):\n",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n",
    "def flatten(nested):\n    result = []\n    for item in nested:\n",
    "import os\n\ndef total_size(directory):\n",
    "def is_palindrome(word):\n",
    "class TodoList:\n    def __init__(self):\n        self.items = []\n\n    def add(self, item):\n",
    "def word_frequencies(text):\n    counts = {}\n",
    "def celsius_to_fahrenheit(c):\n",
    "def merge_sorted(left, right):\n    out = []\n    i = j = 0\n",
    "class Timer:\n    def __enter__(self):\n",
    "def chunk(seq, size):\n    \"\"\"Yield successive chunks of seq.\"\"\"\n",
]


def stdlib_counts(tokenizer, vocab_size: int, max_bytes: int = 4 << 20) -> torch.Tensor:
    """Token counts over the standard library's .py files (sorted paths, up to max_bytes of text)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text, size = [], 0
    for p in sorted(root.glob("*.py")):
        t = p.read_text(errors="replace")
        text.append(t)
        size += len(t)
        if size >= max_bytes:
            break
    ids = [i for t in text for i in tokenizer.encode(t)]
    return token_counts(ids, vocab_size)


# ------------------------------------------------------------------------------------------------ bytes


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class Bytes:
    """Bytes a step reads, from the shapes: weights (as stored) and the K/V attended to."""

    def __init__(self, model, layout):
        self.model, self.cfg, self.layout = model, model.config, layout
        self.elem = layout.elem_bytes

    def _attn(self, attn) -> int:
        return _nbytes(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                       attn.attention_sink_bias)

    def _kv(self, attn, keys: int) -> int:
        return keys * attn.num_kv_heads * (attn.head_dim + attn.v_head_dim) * self.elem

    def main_step(self, rows: int, context: int, experts_per_layer: list[int]) -> int:
        """One sequence feeding `rows` tokens at context `context`; experts_per_layer: distinct experts routed."""
        mm, total, e = self.model.model, 0, iter(experts_per_layer)
        for layer in mm.layers:
            a = layer.self_attn
            keys = min(context + rows, a.window_keys or 1 << 62)
            total += self._attn(a) + self._kv(a, keys)
            total += _nbytes(layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if isinstance(layer.mlp, MoE):
                ex = layer.mlp.experts
                per = (ex.gate_proj.numel() + ex.up_proj.numel() + ex.down_proj.numel()) // ex.gate_proj.shape[0]
                total += _nbytes(layer.mlp.gate.weight) + next(e) * per * ex.gate_proj.element_size()
            else:
                total += _nbytes(layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight)
        total += _nbytes(mm.norm.weight, self.model.lm_head.weight)
        total += rows * self.cfg.hidden_size * mm.embed_tokens.weight.element_size()
        return total

    def draft_pass(self, layer, head_rows: int) -> int:
        """One MTP block drafting one token (its K/V window, a head of `head_rows` vocabulary rows)."""
        a = layer.self_attn
        m: MLP = layer.mlp
        return (_nbytes(layer.eh_proj.weight, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
                        layer.enorm.weight, layer.hnorm.weight, layer.input_layernorm.weight,
                        layer.pre_mlp_layernorm.weight, layer.final_layernorm.weight)
                + self._attn(a) + self._kv(a, a.window_keys) + head_rows * self.model.lm_head.weight.shape[1]
                * self.model.lm_head.weight.element_size())


def record_experts(llm) -> list:
    """Wrap the runner so that every main step appends (rows, [distinct experts per MoE layer]); a run of speculative
    cycles in one C call (ModelRunner.spec_cycles) appends one entry per cycle's verification, read from the expert
    ids each cycle wrote (the run's fp8_layout.RunExperts)."""
    from mimoflash import kernels
    runner, log = llm.engine.runner, []
    inner, inner_cycles = runner.execute, runner.spec_cycles
    fused = runner.fused
    moe_layers = [i for i, layer in enumerate(llm.model.model.layers) if isinstance(layer.mlp, MoE)]
    top_k = llm.model.config.num_experts_per_tok

    def spec_cycles(req, n, state, *args, **kw):
        rows = int(state[kernels.SPEC_DEPTH]) + 1                  # (the call writes the next depth there)
        got = inner_cycles(req, n, state, *args, **kw)
        if got is not None:
            ids = fused.loop_args(rows, n)[3].ids                  # cycle c's layer l's (rows, top_k) ids
            log.extend((rows, [len(set(ids[c, i, :rows * top_k].tolist())) for i in moe_layers]) for c in range(got[0]))
        return got

    def execute(batch):
        out = inner(batch)
        rows = sum(it.num_tokens for it in batch.items)
        if fused is not None and rows in fused._chosen and all(it.num_tokens <= runner.max_rows for it in batch.items):
            ch = fused._chosen[rows]
            log.append((rows, [int(ch[i].unique().numel()) for i in moe_layers]))
        return out
    runner.execute = execute
    runner.spec_cycles = spec_cycles
    return log


def cycle_split(llm, prompts, sp) -> dict:
    """Where a speculative engine's decoding spends its time: a timing wrapper around the C calls (runs of whole
    cycles in one call; otherwise the main model's fused layers and embedding, its LM head, the draft passes, the
    argmax) in real runs of `prompts`; the rest of the engine's decode steps is Python (scheduling, metadata,
    verification, bookkeeping, the calls' wrappers). -> microseconds per verification (a cycle: verify, accept,
    draft) of each part (prefill steps left out), and tokens per cycle. The wrappers add ~1 us a call."""
    from mimoflash import kernels
    from mimoflash.engine import cpu_layout
    parts = {"whole cycles (C)": ["spec_cycles"], "main layers (C)": ["decode_layer", "embed_bf16"],
             "LM heads (C)": ["linear_panels", "linear_bf16w"],
             "draft passes (C)": ["mtp_chain", "mtp_pass"], "argmax (C)": ["argmax_rows"]}
    spent = {k: 0.0 for k in parts}
    saved = []
    for part, names in parts.items():
        for name in names:
            inner = getattr(kernels, name)

            def timed(*args, _inner=inner, _part=part, **kw):
                t = time.perf_counter()
                try:
                    return _inner(*args, **kw)
                finally:
                    spent[_part] += time.perf_counter() - t
            saved.append((name, inner))
            setattr(kernels, name, timed)
    engine, total = llm.engine, [0.0]
    step = engine.step

    def timed_step():                                   # decode steps only: a prompt's prefill is left out
        prefill, before = bool(engine.scheduler.waiting), dict(spent)
        t = time.perf_counter()
        try:
            return step()
        finally:
            if prefill:
                spent.update(before)
            else:
                total[0] += time.perf_counter() - t
    engine.step = timed_step
    tokens = cycles = 0
    try:
        for p in prompts:
            got = llm.generate([p], sp, use_tqdm=False)[0]
            tokens += len(got.outputs[0].token_ids) - 1                                   # after prefill
            cycles += got.metrics.verify_steps
    finally:
        for name, inner in saved:
            setattr(kernels, name, inner)
        del engine.step
    assert cpu_layout.kernels is kernels                 # the layout's products went through the wrappers above
    out = {k: round(v / cycles * 1e6, 1) for k, v in spent.items()}
    out["Python"] = round((total[0] - sum(spent.values())) / cycles * 1e6, 1)
    out["cycle"] = round(total[0] / cycles * 1e6, 1)
    out["tokens_per_cycle"] = round(tokens / cycles, 3)
    return out


# ------------------------------------------------------------------------------------------------ runs


def run_one(llm, prompt, sp):
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    m = out.metrics
    return m.decode_tokens_per_s, m.tokens_per_verify_step, m.acceptance_per_position, len(out.outputs[0].token_ids)


def run_batch(llm, prompts, sp) -> float:
    return run_batch_cpu(llm, prompts, sp)[0]


def run_batch_cpu(llm, prompts, sp) -> tuple[float, float]:
    """-> (aggregate decode tokens per wall second, generated tokens per process CPU second). On a machine shared
    with other jobs the CPU-time rate is the steadier one (wall time also measures the others)."""
    cpu = time.process_time()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    cpu = time.process_time() - cpu
    firsts = [o.metrics.time_to_first_token for o in outs]
    # aggregate decode rate: tokens after each request's first, over the span from the first first-token to the end
    gen = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    span = max(o.metrics.total_time for o in outs) - min(firsts)
    return gen / span, sum(len(o.outputs[0].token_ids) for o in outs) / cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--draft-vocab", type=int, default=1024, help="size of the reduced draft vocabulary")
    ap.add_argument("--draft-vocab-from", choices=["ids", "stdlib"], default="ids",
                    help="which tokens: the lowest ids (a BPE vocabulary's first merges; default) or the most frequent "
                         "in the Python standard library's source")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-batch", action="store_true", help="skip the batch 8/16 and temperature runs")
    ap.add_argument("--no-batch1", action="store_true", help="skip the batch-1 greedy table")
    ap.add_argument("--split", action="store_true",
                    help="after the table, where the MTP variants' steps spend their time (C calls vs Python) and "
                         "what they would reach with no Python at all")
    ap.add_argument("--variants", nargs="+", metavar="NAME",
                    help="batch-1 variants besides off (default: all of off1 k1 k2 k3 k1+vocab k3+vocab adaptive)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    path = mimoflash.default_model()
    base = LLM(path, max_num_seqs=1, progress=False)
    reduced = {"draft_vocab_size": a.draft_vocab}
    if a.draft_vocab_from == "stdlib":
        reduced["draft_vocab_counts"] = stdlib_counts(base.tokenizer, base.model.config.vocab_size)
    specs = {"off": None,
             "off1": None,
             "k1": {"num_speculative_tokens": 1},
             "k2": {"num_speculative_tokens": 2},
             "k3": {"num_speculative_tokens": 3},
             "k1+vocab": {"num_speculative_tokens": 1, **reduced},
             "k3+vocab": {"num_speculative_tokens": 3, **reduced},
             "adaptive": {"num_speculative_tokens": 3, "adaptive": True, **reduced}}
    if a.variants:
        unknown = sorted(set(a.variants) - set(specs))
        if unknown:
            ap.error(f"--variants: unknown {unknown}; known: {sorted(specs)}")
        specs = {n: s for n, s in specs.items() if n == "off" or n in a.variants}
    # off1: plain decoding one step per engine call, as an MTP engine steps while it drafts (the default engine,
    # "off", runs up to 8 decode steps per call: multi-step decoding)
    llms = {n: (base if n == "off" else LLM(path, max_num_seqs=1, progress=False, speculative_config=s,
                                            num_scheduler_steps=1 if n == "off1" else 8))
            for n, s in specs.items()}
    logs = {n: record_experts(llm) for n, llm in llms.items()}
    prompts = PROMPTS[:a.prompts]
    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    names = list(specs)
    res = {n: {"rate": [], "tps": [], "acc": []} for n in names}
    for n in names:                                                     # warm-up (kernels, tables)
        run_one(llms[n], prompts[0], sp)
    for rep in range(0 if a.no_batch1 else a.repeats):
        for i, p in enumerate(prompts):
            shift = (rep + i) % len(names)
            for n in names[shift:] + names[:shift]:
                rate, tps, acc, _ = run_one(llms[n], p, sp)
                res[n]["rate"].append(rate)
                if tps is not None:
                    res[n]["tps"].append(tps)
                    res[n]["acc"].append(acc)
        print(f"repeat {rep + 1}/{a.repeats} done", file=sys.stderr)

    by = Bytes(base.model, base.engine.layout)
    mean_ctx = 16 + a.max_tokens // 2
    top_k = base.model.config.num_experts_per_tok
    n_moe = sum(isinstance(layer.mlp, MoE) for layer in base.model.model.layers)
    one = by.main_step(1, mean_ctx, [top_k] * n_moe)
    off_rate = statistics.median(res["off"]["rate"]) if res["off"]["rate"] else None
    table, summary = [], {}
    for n in (names if off_rate else []):
        rate = statistics.median(res[n]["rate"])
        row = {"variant": n, "decode_tok_s": round(rate, 1), "speedup": round(rate / off_rate, 3)}
        if res.get("off1", {}).get("rate"):
            row["vs_one_step"] = round(rate / statistics.median(res["off1"]["rate"]), 3)
        if specs[n] is not None and res[n]["tps"]:
            tps = statistics.median(res[n]["tps"])
            depth = max(len(x) for x in res[n]["acc"])
            acc = [round(statistics.median(x[j] for x in res[n]["acc"] if len(x) > j), 3) for j in range(depth)]
            steps = [s for s in logs[n] if s[0] > 1]
            verify = statistics.mean(by.main_step(r, mean_ctx, ex) for r, ex in steps) if steps else one
            drafter = llms[n].engine.drafter
            head = drafter.vocab.numel() if drafter.vocab is not None else base.model.config.vocab_size
            layers = llms[n].model.mtp_layers()
            k = specs[n]["num_speculative_tokens"]
            mean_k = statistics.mean(r - 1 for r, _ in steps) if steps else k
            drafts = mean_k * by.draft_pass(layers[0], head)
            bound = tps * one / (verify + drafts)
            if drafter.adaptive is not None:                 # its choice alone (depth 0: it stopped drafting)
                row["settled_depth"] = drafter.adaptive.best.get(1)
            row.update(tokens_per_verify=round(tps, 3), acceptance=acc, bound=round(bound, 3),
                       of_bound=round(rate / off_rate / bound, 3),
                       experts_per_verify=round(statistics.mean(statistics.mean(ex) for _, ex in steps), 2)
                       if steps else None)
        table.append(row)
        summary[n] = row
    print(f"\nbatch 1, greedy, {a.max_tokens} tokens, {len(prompts)} prompts x {a.repeats} repeats, {a.threads} "
          f"thread(s); medians; one-token step reads {one / 1e6:.2f} MB")
    print(f"{'variant':10} {'tok/s':>8} {'speedup':>8} {'vs off1':>8} {'tok/verify':>10} {'bound':>6} {'of bound':>8} "
          f"{'experts/layer':>13}  acceptance by position")
    for r in table:
        print(f"{r['variant']:10} {r['decode_tok_s']:8.1f} {r['speedup']:8.3f} {r.get('vs_one_step', '-'):>8} "
              f"{r.get('tokens_per_verify', '-'):>10} "
              f"{r.get('bound', '-'):>6} {r.get('of_bound', '-'):>8} {str(r.get('experts_per_verify', '-')):>13}  "
              f"{r.get('acceptance', '')}"
              + (f" (settled on depth {r['settled_depth']})" if "settled_depth" in r else ""))

    out = {"bench": "mtp", "threads": a.threads, "max_tokens": a.max_tokens, "prompts": len(prompts),
           "draft_vocab": [a.draft_vocab, a.draft_vocab_from],
           "repeats": a.repeats, "batch1": summary}
    if a.split and off_rate:
        # the share of a cycle's engine steps spent outside the kernels' calls
        split = {}
        for n in [n for n in names if specs[n] is not None and not (specs[n].get("adaptive"))]:
            sp_n = cycle_split(llms[n], prompts, sp)
            sp_n["python_share"] = round(sp_n["Python"] / sp_n["cycle"], 3)
            split[n] = sp_n
        print("\nwhere decoding's time goes (us per verification cycle; C = the kernels' calls, Python = the rest):")
        for n, v in split.items():
            print(f"{n:10} " + ", ".join(f"{k} {x}" for k, x in v.items()))
        out["split"] = split
    if not a.no_batch:
        bat = {}
        for bs in (8, 16):
            off = LLM(path, max_num_seqs=bs, progress=False)
            on = LLM(path, max_num_seqs=bs, progress=False,
                     speculative_config={"num_speculative_tokens": 3, "adaptive": True, **reduced})
            # One warm-up run each, interleaved, reported as the cold ratio: adaptive's first measurements and trials
            # (paid once per engine) fall in it; the repeats after it give the steady-state rates.
            cold = [run_batch_cpu(llm, PROMPTS[:16], sp) for llm in (off, on)]
            r_off, r_on, c_off, c_on = [], [], [], []
            for rep in range(a.repeats):
                for n, llm, acc, cacc in ((("off", off, r_off, c_off), ("adaptive", on, r_on, c_on))
                                          [::1 if rep % 2 == 0 else -1]):
                    wall, cpu = run_batch_cpu(llm, PROMPTS[:16], sp)
                    acc.append(wall)
                    cacc.append(cpu)
            bat[bs] = {"off_tok_s": round(statistics.median(r_off), 1), "adaptive_tok_s": round(statistics.median(r_on), 1),
                       "ratio": round(statistics.median(y / x for x, y in zip(r_off, r_on)), 3),
                       "cpu_ratio": round(statistics.median(y / x for x, y in zip(c_off, c_on)), 3),
                       "cold_ratio": round(cold[1][0] / cold[0][0], 3), "cold_cpu_ratio": round(cold[1][1] / cold[0][1], 3),
                       "settled_depth": on.engine.drafter.adaptive.best.get(bs)}
            print(f"batch {bs:2d}: off {bat[bs]['off_tok_s']} tok/s, adaptive {bat[bs]['adaptive_tok_s']} tok/s, "
                  f"median paired ratio {bat[bs]['ratio']} (per CPU second: {bat[bs]['cpu_ratio']}); adaptive settled "
                  f"on depth {bat[bs]['settled_depth']}; first (cold) run {bat[bs]['cold_ratio']} (per CPU second: "
                  f"{bat[bs]['cold_cpu_ratio']})")
        spt = SamplingParams(temperature=0.7, max_tokens=a.max_tokens, ignore_eos=True, seed=1)
        tvar = {"off": base,
                "k3+vocab": LLM(path, max_num_seqs=1, progress=False,
                                speculative_config={"num_speculative_tokens": 3, **reduced}),
                "adaptive": LLM(path, max_num_seqs=1, progress=False,
                                speculative_config={"num_speculative_tokens": 3, "adaptive": True, **reduced})}
        t_rate = {n: [] for n in tvar}
        t_tps = {n: [] for n in tvar}
        for rep in range(a.repeats):              # interleaved prompt by prompt, the order rotating; cold engines
            for i, p in enumerate(prompts):       # (adaptive's first run is in these figures)
                tn = list(tvar)
                shift = (rep + i) % len(tn)
                for n in tn[shift:] + tn[:shift]:
                    rate, tps, _, _ = run_one(tvar[n], p, spt)
                    t_rate[n].append(rate)
                    if tps:                            # requests that verified drafts
                        t_tps[n].append(tps)
        temp = {n: {"decode_tok_s": round(statistics.median(t_rate[n]), 1),
                    "speedup": round(statistics.median(y / x for x, y in zip(t_rate["off"], t_rate[n])), 3)}
                for n in tvar}
        for n in tvar:
            if n != "off" and t_tps[n]:
                temp[n]["tokens_per_verify"] = round(statistics.median(t_tps[n]), 3)
        temp["adaptive"]["settled_depth"] = tvar["adaptive"].engine.drafter.adaptive.best.get(1)
        print("temperature 0.7 (seeded), batch 1: " + ", ".join(
            f"{n} {v['decode_tok_s']} tok/s ({v['speedup']}x" + (f", {v['tokens_per_verify']} tokens per verify step)"
                                                                 if "tokens_per_verify" in v else ")")
            for n, v in temp.items()) + f"; adaptive settled on depth {temp['adaptive']['settled_depth']}")
        out.update(batch=bat, temperature_0_7=temp)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
