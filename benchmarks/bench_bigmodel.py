"""Real layer shapes on a small machine: mimoflash vs transformers 5.23 on a synthetic block-FP8 checkpoint.

    python benchmarks/bench_bigmodel.py                          # writes /tmp/mimoflash-synth once (4.15 GB)
    python benchmarks/bench_bigmodel.py --checkpoint DIR --rounds 2 --new 32

The checkpoint has the release's tensor shapes and layout (hidden 4096, 64 query heads, vocab 152,576, dense FFN
16,384, experts of 2,048, block-FP8 128 x 128), cut to 2 layers, 32 experts top-8 and 1 MTP layer
(mimoflash/checkpoint/synthetic.py; `--layers/--experts` change that). Each engine loads it in a fresh child
process, one after the other (both at once would not fit in 24 GiB), and measures:
  * peak resident memory of the child (ru_maxrss) minus its RSS after `import torch` (the baseline), beside the
    checkpoint's file size;
  * greedy decode tokens/s of one sequence: `--new` tokens after a `--prompt`-token random prompt, EOS ignored,
    medians over `--repeats`. mimoflash: `LLM(path)` with its defaults, rate = (new - 1) / (last token - first
    token). transformers: `AutoModelForCausalLM.from_pretrained(path)`, which dequantises the FP8 weights to bf16
    on CPU, then `generate`; rate = (new - 1) / (time(new tokens) - time(1 token));
  * for mimoflash, the bandwidth bound: bytes a decode step reads (`mimoflash.bench.step_bytes`, at the dtype the
    engine holds the weights in: FP8 bytes and scales for FP8 weights) / the read bandwidth measured in the same
    child right after the decode runs (median of `--repeats`; after, so that its buffer is not in the peak), and
    the fraction reached.
`--rounds` > 1 alternates the two engines (ours, theirs, ours, ...) and reports medians over rounds. Seeded: the same
checkpoint and prompts every run. The last stdout line is one JSON object. Not run in CI (minutes, GBs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

OURS = r"""
import json, resource, statistics, sys, time
import torch
torch.ones(1).sum()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from mimoflash import kernels
from mimoflash.bench import read_bandwidth, step_bytes, weight_bytes
from mimoflash.engine.llm import LLM
from mimoflash.engine.sampling import SamplingParams
path, prompt, new, repeats, threads = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(threads); kernels.set_num_threads(threads)
t = time.perf_counter()
budget = sys.argv[6] if len(sys.argv) > 6 else None
llm = LLM(path, max_num_seqs=1, max_model_len=prompt + new + 16, skip_tokenizer_init=True, progress=False,
          **({"memory_budget": budget} if budget else {}))
load_s = time.perf_counter() - t
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ids = torch.randint(0, llm.model.config.vocab_size, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
rates, tokens = [], None
for _ in range(repeats):
    out = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)[0]
    rates.append(out.metrics.decode_tokens_per_s)
    tokens = out.outputs[0].token_ids
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# bandwidth only now: its buffer would raise the peak (ru_maxrss never goes down)
bw = statistics.median(read_bandwidth(256 << 20) for _ in range(repeats))
wb = weight_bytes(llm.model)
kv_dtype = llm.engine.config.kv_cache_dtype or llm.dtype
step = step_bytes(llm.model.config, wb, 1, prompt + new // 2, torch.empty((), dtype=kv_dtype).element_size())
stats = llm.expert_stats()
print(json.dumps({"peak_bytes": peak - base, "peak_abs_bytes": peak, "baseline_bytes": base,
                  "after_load_bytes": after_load - base, "load_s": load_s,
                  "decode_tok_s": statistics.median(rates), "rates": rates, "tokens": tokens,
                  "expert_stats": stats.as_dict() if stats is not None else None,
                  "weight_dtype": str(llm.weight_dtype).removeprefix("torch."), "weights": wb,
                  "bytes_per_token": step, "read_bandwidth": bw, "bound_tok_s": bw / step}))
"""

THEIRS = r"""
import json, resource, statistics, sys, time
import torch
torch.ones(1).sum()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import transformers
path, prompt, new, repeats, threads = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(threads)
transformers.logging.set_verbosity_error()
t = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
load_s = time.perf_counter() - t
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
vocab = model.config.vocab_size
ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
def run(n):
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t, out[0, prompt:].tolist()
run(2)
rates, tokens = [], None
for _ in range(repeats):
    t1, _ = run(1)
    tn, tokens = run(new)
    rates.append((new - 1) / (tn - t1))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_bytes": peak - base, "peak_abs_bytes": peak, "baseline_bytes": base,
                  "after_load_bytes": after_load - base, "load_s": load_s,
                  "decode_tok_s": statistics.median(rates), "rates": rates, "tokens": tokens,
                  "weight_dtype": dtype}))
"""


def child(code: str, args, path: Path) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    out = subprocess.run([sys.executable, "-c", code, str(path), str(args.prompt), str(args.new),
                          str(args.repeats), str(args.threads), args.memory_budget or ""], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/mimoflash-synth", help="synthetic checkpoint (written if absent)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per engine per round (median)")
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the two engines (median)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--memory-budget", default=None, help="mimoflash's --memory-budget (e.g. 3G); default none")
    args = ap.parse_args()
    path = Path(args.checkpoint)
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, "-m", "mimoflash.checkpoint.synthetic", "--out", str(path), "--layers",
                        str(args.layers), "--experts", str(args.experts), "--seed", str(args.seed)], check=True)
    files = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    engines = {"mimoflash": OURS} if args.no_hf else {"mimoflash": OURS, "transformers": THEIRS}
    runs = {k: [] for k in engines}
    for r in range(args.rounds):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            runs[name].append(child(engines[name], args, path))
            print(f"round {r + 1}: {name} done ({runs[name][-1]['decode_tok_s']:.2f} tok/s)", file=sys.stderr)
    res = {}
    for name, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("peak_bytes", "after_load_bytes", "load_s",
                                                                 "decode_tok_s")}
        res[name] = {**rs[-1], **med, "peak_over_files": med["peak_bytes"] / files}
        res[name].pop("rates")
    gb = 1e9
    cfg = json.loads((path / "config.json").read_text())
    print(f"checkpoint {path}: {files / gb:.2f} GB of files, {cfg['num_hidden_layers']} layers, "
          f"{cfg['n_routed_experts']} experts top-{cfg['num_experts_per_tok']}, hidden {cfg['hidden_size']}, "
          f"vocab {cfg['vocab_size']}, block-FP8; {args.threads} threads; prompt {args.prompt}, {args.new} new "
          f"tokens, greedy; medians of {args.repeats} x {args.rounds}")
    print(f"{'engine':<14}{'weights':>10}{'load s':>8}{'peak GB':>9}{'peak/files':>12}{'decode tok/s':>14}")
    for name, r in res.items():
        print(f"{name:<14}{r['weight_dtype']:>10}{r['load_s']:>8.1f}{r['peak_bytes'] / gb:>9.2f}"
              f"{r['peak_over_files']:>12.2f}{r['decode_tok_s']:>14.2f}")
    o = res["mimoflash"]
    print(f"mimoflash: {o['bytes_per_token'] / gb:.3f} GB read per token at {o['weight_dtype']}; read bandwidth "
          f"{o['read_bandwidth'] / gb:.1f} GB/s -> bound {o['bound_tok_s']:.2f} tok/s; reached "
          f"{o['decode_tok_s'] / o['bound_tok_s']:.0%}")
    if o.get("expert_stats"):
        st = o["expert_stats"]
        print(f"mimoflash expert store: {st['touched']} expert reads over {st['steps']} steps, "
              f"{st['bytes_read'] / gb:.2f} GB read from the mapped files, hit rate {st['hit_rate']:.0%}, "
              f"resident {st['resident_bytes'] / gb:.2f} GB"
              f" (budget {args.memory_budget or 'none'})")
    if "transformers" in res:
        a, b = o["tokens"], res["transformers"]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"greedy tokens: the first {same} of {len(a)} agree (bf16 vs FP8-exact arithmetic may split near-ties "
              f"of a random model)")
        res["agreeing_greedy_tokens"] = same
    print(json.dumps({"bench": "bigmodel", "checkpoint_bytes": files, "threads": args.threads,
                      "prompt": args.prompt, "new": args.new, **res}))


if __name__ == "__main__":
    main()
