"""llama.cpp's MTP drafting on the shipped model, beside mimoflash's: decode tokens/s with drafting on and off in each
engine, batch 1, greedy, one thread.

    python benchmarks/bench_llamacpp_mtp.py                       # 4 prompts x 3 repeats (~1-2 minutes once built)
    python benchmarks/bench_llamacpp_mtp.py --prompts 8 --repeats 5

llama.cpp is the copy vendored in llama-cpp-python (built by benchmarks/bench_llamacpp.py's helpers, in the same build
directory; this script adds the llama-completion and llama-speculative-simple targets). Its MiMo MTP graph asserts a
fused `attn_qkv` tensor in each MTP layer ("MIMO2 MTP requires fused attn_qkv"), as the released MiMo checkpoints
store `qkv_proj`; the shipped checkpoint stores q/k/v separately, as transformers' MiMo does. So the GGUF used here
is converted from a copy of the shipped checkpoint whose MTP layers' q/k/v weights are concatenated into `qkv_proj`
(rows q, k, v: the layout the converter and the graph expect); the main layers are unchanged.

What is measured, prompts from benchmarks/bench_mtp.py, variants interleaved prompt by prompt (order rotating each
repeat), medians:
  * llama.cpp off: `llama-completion` (`-n` new tokens, `--temp 0`, `--ignore-eos`, `-t 1`): its "eval time" line
    (decode runs after the prompt) -> tokens/s;
  * llama.cpp k = 1, 3: `llama-speculative-simple --spec-type draft-mtp --spec-draft-n-max k` (greedy, same
    options): its "decoded N tokens in T seconds" line and n_drafted / n_accept (acceptance). It stops at the first
    verify step that reaches `-n`, so it may decode up to k tokens more; its greedy text starts with off's;
  * mimoflash off (the default engine, multi-step decoding), off1 (one step per call) and k = 3 with the 1024-token
    draft vocabulary (docs/MTP.md), measured as benchmarks/bench_mtp.py does (decode tokens/s, prefill excluded).
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import BUILD, LLAMA_BUILD_DIRS, _median, _run, ensure_llamacpp, source_dir, to_gguf  # noqa: E402
from bench_mtp import PROMPTS, run_one  # noqa: E402

import mimoflash  # noqa: E402
from mimoflash import LLM, SamplingParams  # noqa: E402

MTP_TARGETS = ("llama-completion", "llama-speculative-simple")


def ensure_targets(jobs: int, nice: int) -> Path:
    bindir = ensure_llamacpp(BUILD, jobs, nice)
    missing = [t for t in MTP_TARGETS if not (bindir / t).is_file()]
    if missing:
        subprocess.run(["nice", "-n", str(nice), "cmake", "--build", str(BUILD / LLAMA_BUILD_DIRS["noamx"]),
                        "--target", *missing, "-j", str(jobs)], check=True)
    return bindir


def fused_qkv_copy(src: Path, out: Path) -> Path:
    """A copy of the checkpoint whose MTP layers store `self_attn.qkv_proj` (q, k, v rows concatenated), the form
    llama.cpp's MiMo MTP graph requires; rewritten only when the source is newer."""
    st = out / "model.safetensors"
    if st.is_file() and st.stat().st_mtime > (src / "model.safetensors").stat().st_mtime:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for p in src.glob("*.json"):
        shutil.copy(p, out / p.name)
    sd = load_file(str(src / "model.safetensors"))
    for name in [n for n in sd if n.startswith("model.mtp.") and n.endswith("self_attn.q_proj.weight")]:
        pre = name.removesuffix("q_proj.weight")
        sd[pre + "qkv_proj.weight"] = torch.cat([sd.pop(f"{pre}{p}_proj.weight") for p in "qkv"]).contiguous()
    save_file(sd, str(st), metadata={"format": "pt"})
    return out


def _num(pattern: str, text: str, what: str) -> list[str]:
    m = re.search(pattern, text, re.S)
    if m is None:
        raise RuntimeError(f"no {what} line in llama.cpp's output:\n{text[-2000:]}")
    return m.groups()


def _logged(cmd: list[str], pattern: str, what: str, tries: int = 3) -> tuple[list[str], str]:
    """-> (the groups of `pattern` in the run's output, the output). llama.cpp's log is written by a thread of its own
    and a run occasionally exits before its last lines are out; such a run is repeated (up to `tries` times)."""
    for _ in range(tries - 1):
        out = _run(cmd)
        m = re.search(pattern, out, re.S)
        if m is not None:
            return list(m.groups()), out
    out = _run(cmd)
    return _num(pattern, out, what), out


def llama_off(bindir: Path, gguf: Path, prompt: str, n: int) -> tuple[float, str]:
    cmd = [str(bindir / "llama-completion"), "-m", str(gguf), "-p", prompt, "-n", str(n), "-t", "1", "-tb", "1",
           "--temp", "0", "--ignore-eos", "-no-cnv"]
    (ms, runs), out = _logged(cmd, r"eval time =\s+([\d.]+) ms /\s+(\d+) runs", "eval time")
    return int(runs) / (float(ms) / 1e3), out


def llama_mtp(bindir: Path, gguf: Path, prompt: str, n: int, k: int) -> tuple[float, float, str]:
    cmd = [str(bindir / "llama-speculative-simple"), "-m", str(gguf), "-p", prompt, "-n", str(n), "-t", "1",
           "-tb", "1", "--temp", "0", "--ignore-eos", "--spec-type", "draft-mtp", "--spec-draft-n-max", str(k)]
    pattern = r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s.*n_drafted = (\d+).*n_accept\s+= (\d+)"
    (rate, drafted, accepted), out = _logged(cmd, pattern, "decoded / n_drafted / n_accept")
    return float(rate), int(accepted) / max(int(drafted), 1), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--jobs", type=int, default=2, help="build parallelism")
    ap.add_argument("--nice", type=int, default=15, help="build niceness")
    ap.add_argument("--no-mimoflash", action="store_true", help="llama.cpp only")
    a = ap.parse_args(argv)
    if a.repeats < 1 or not 1 <= a.prompts <= len(PROMPTS) or a.max_tokens < 8:
        ap.error(f"--repeats >= 1, 1 <= --prompts <= {len(PROMPTS)}, --max-tokens >= 8")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    bindir = ensure_targets(a.jobs, a.nice)
    ckpt = fused_qkv_copy(Path(mimoflash.default_model()), BUILD / "models" / "shipped-mtp-qkv")
    gguf = to_gguf(source_dir(BUILD), ckpt, BUILD / "gguf" / "shipped-mtp-qkv-bf16.gguf", "bf16", 3)
    path = mimoflash.default_model()
    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    llms = {} if a.no_mimoflash else {
        "mimoflash off": LLM(path, max_num_seqs=1, progress=False),
        "mimoflash off1": LLM(path, max_num_seqs=1, progress=False, num_scheduler_steps=1),
        "mimoflash k3+vocab": LLM(path, max_num_seqs=1, progress=False,
                                  speculative_config={"num_speculative_tokens": 3, "draft_vocab_size": 1024})}
    def off(p):
        r, out = llama_off(bindir, gguf, p, a.max_tokens)
        return r, None, out

    runs = {"llama.cpp off": off,
            "llama.cpp k1": lambda p: llama_mtp(bindir, gguf, p, a.max_tokens, 1),
            "llama.cpp k3": lambda p: llama_mtp(bindir, gguf, p, a.max_tokens, 3)}
    for name, llm in llms.items():
        runs[name] = lambda p, llm=llm: (run_one(llm, p, sp)[0], None, None)
    names = list(runs)
    res = {n: {"rate": [], "acc": []} for n in names}
    prompts = PROMPTS[:a.prompts]
    same_text = True
    for n in names:                                                          # warm-up
        runs[n](prompts[0])
    for rep in range(a.repeats):
        for i, p in enumerate(prompts):
            shift = (rep + i) % len(names)
            texts = {}
            for n in names[shift:] + names[:shift]:
                rate, acc, out = runs[n](p)
                res[n]["rate"].append(rate)
                if acc is not None:
                    res[n]["acc"].append(acc)
                if out is not None:             # stdout (prompt, then the generated text) comes first in `out`
                    texts[n] = out.split(p, 1)[1][:100] if p in out else None
            # greedy drafting must not change the text: the same first 100 generated characters
            same_text &= None not in texts.values() and len(set(texts.values())) == 1
        print(f"repeat {rep + 1}/{a.repeats} done", file=sys.stderr)
    rate = {n: _median(res[n]["rate"]) for n in names}
    table = []
    for n in names:
        row = {"variant": n, "decode_tok_s": round(rate[n], 1),
               "vs_off": round(rate[n] / rate[n.split()[0] + " off"], 3)}
        if n.startswith("mimoflash"):
            row["vs_one_step"] = round(rate[n] / rate["mimoflash off1"], 3)
        if res[n]["acc"]:
            row["acceptance"] = round(_median(res[n]["acc"]), 3)
        table.append(row)
    print(f"{'variant':<22}{'decode tok/s':>14}{'vs off':>9}{'vs off1':>9}{'acceptance':>12}")
    for r in table:
        print(f"{r['variant']:<22}{r['decode_tok_s']:>14}{r['vs_off']:>9}{r.get('vs_one_step', ''):>9}"
              f"{r.get('acceptance', ''):>12}")
    print(f"llama.cpp greedy text unchanged by MTP drafting (first 100 generated characters): {same_text}")
    print(json.dumps({"bench": "llamacpp_mtp", "prompts": a.prompts, "repeats": a.repeats,
                      "max_tokens": a.max_tokens, "threads": 1, "same_text": same_text, "table": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
