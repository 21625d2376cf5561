"""mimoflash vs llama.cpp on the same weights, CPU: batch-1 decode (bf16, and FP8 vs Q8_0), prefill, 16 sequences.

    python benchmarks/bench_llamacpp.py                    # first run builds llama.cpp (~15 min on 2 idle cores)
    python benchmarks/bench_llamacpp.py --repeats 5 --threads 1 2
    python benchmarks/bench_llamacpp.py --models shipped --repeats 1     # quick look

llama.cpp: the copy vendored in llama-cpp-python 0.3.36's source distribution (it runs the `mimo2` architecture),
fetched with `pip download --no-binary :all:` into build/llamacpp/ (git-ignored), configured with the instruction
sets named and AMX off (LLAMA_FLAGS["noamx"], in build/llamacpp/build-noamx; `--llama-flags native` =
`-DGGML_NATIVE=ON` in build/llamacpp/cmake-build) and `-DLLAMA_CURL=OFF`, and built (`llama-bench`,
`llama-batched-bench`) under `nice -n 15`; a later run reuses the build, the converted GGUF files and the saved
checkpoints. Why not -march=native: on a Xeon that advertises AMX inside a VM that does not keep the tile state,
llama.cpp's AMX kernels (used for Q8_0 once a prompt has been processed) die of an illegal instruction; the named
sets keep AVX-512 (BF16, VNNI, VBMI) and drop AMX, which is llama.cpp's fastest working build there (see
benchmarks/RESULTS.md). The llama.cpp tools run without this process's OMP_WAIT_POLICY (PASSIVE, for mimoflash):
with it llama.cpp's OpenMP threads sleep at every graph node's barrier. The checkpoints are written with
`mimoflash.save_model` and converted by the vendored `convert_hf_to_gguf.py` to bf16 and Q8_0 GGUF files, with two
local patches applied to the build directory's copy only (see `patch_converter`): an unknown BPE pre-tokenizer
hash falls back to "gpt-2" (the tokenizer's identity does not matter for speed: llama-bench feeds token ids), and
`partial_rotary_factor` is also read per layer type from `rope_parameters` (where transformers writes it).
`--no-mtp` is passed for models with fewer than the 3 MTP layers the converter assumes for MiMo.

Models: "mimo128m" = benchmarks/bench_decode.py's seeded MiMo-shaped model (hidden 512, 8 layers, 16 experts top-2,
vocab 32k, window 128), "shipped" = mimoflash.default_model(). mimoflash loads the same saved checkpoint (bf16
weights; what LLM() does with it on CPU). The random model is run without a tokenizer (its ids exceed the
borrowed tokenizer's vocabulary); the shipped model with its tokenizer, so detokenization is part of its steps.

What is measured, per model, per thread count, the engines alternating (their order flipping every repeat),
`--repeats` times, medians reported:
  * batch-1 decode tok/s (bf16 weights for both; with --fp8 / --q8, the defaults, also mimoflash on a block-FP8
    copy of the checkpoint (mimoflash.save_model fp8=True, 128 x 128 blocks) beside llama.cpp's Q8_0 file, both
    about one byte per weight; Q8_0 quantises its output tensor too, so by default (`--fp8-head`) the FP8 engine's
    LM head is block-FP8 as well, LLM(lm_head_fp8=True), and `--no-fp8-head` keeps the release format's bf16
    head; the table and the JSON line say which): llama-bench `tg96` at depth 32 (`-p 0 -n 96 -d 32`, one
    repetition per call after its warm-up) vs mimoflash: a 32-token prompt, 96 new tokens, greedy, rate = 95 /
    (time of the last token - time of the first), through LLMEngine.step() (scheduler, runner, sampling, output
    objects; prefill excluded), with LLM's multi-step decoding (up to 8 decode steps per engine step;
    `--num-scheduler-steps`);
  * prefill tok/s of a 512-token prompt (`-p 512 -n 0` vs 512 / time to first token) at the largest thread count
    (mimoflash's warm-up includes one such prefill, as each llama-bench run warms up first);
  * 16-sequence aggregate decode tok/s (`llama-batched-bench -npp 32 -ntg 96 -npl 16`, S_TG vs 16 x 95 tokens over
    the span in which all 16 decode) at the largest thread count;
  * the read-bandwidth bound: bytes one mimoflash decode step reads (touched weights + attended K/V,
    mimoflash.bench.step_bytes) / the read rate of the last-level cache measured in the same run
    (kernels.read_sum: a threaded, vectorised re-read of min(step bytes, profile_step_split.LLC_PROBE_BYTES), at
    each thread count, the fastest), as tok/s; each bf16 engine's fraction of it (llama.cpp's bf16 file holds the
    same weights; the FP8 and Q8_0 copies read about half the bytes, so their bound is about twice this one). The
    rate over a buffer as large as all the weights (memory, where the L3 cannot keep them) is printed too; see
    LLC_PROBE_BYTES there for why it is no bound.
A table, then ONE JSON line. Not part of CI (it builds a C++ project and runs for many minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import bench_config, build_model, run_ours  # noqa: E402
from profile_step_split import LLC_PROBE_BYTES, read_bandwidth, step_bytes, weight_bytes  # noqa: E402

from mimoflash import bench, kernels  # noqa: E402
from mimoflash.checkpoint.fp8 import FP8_DTYPE  # noqa: E402
from mimoflash.checkpoint.loader import load_model  # noqa: E402
from mimoflash.checkpoint.saver import save_model  # noqa: E402
from mimoflash.default import default_model  # noqa: E402
from mimoflash.engine.llm import LLM  # noqa: E402
from mimoflash.engine.sampling import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "llamacpp"
LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-bench", "llama-batched-bench")
# llama.cpp's build: the instruction sets named, not -DGGML_NATIVE=ON. -march=native also turns on AMX, and llama.cpp's
# AMX kernels (the Q8_0 path once a prompt has been processed) die of an illegal instruction (tileloadd) in VMs
# that advertise amx_tile without keeping the tile configuration; without AMX the Q8_0 file runs (via AVX512-VNNI).
# Everything else -march=native would enable on an AVX-512 Xeon stays on. On a CPU without AVX-512, pass
# --llama-flags native (a separate build directory per flag set).
LLAMA_FLAGS = {
    "noamx": ["-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_BMI2=ON",
              "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AVX_VNNI=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON",
              "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
              "-DGGML_AMX_BF16=OFF"],
    "native": ["-DGGML_NATIVE=ON"],
}
LLAMA_BUILD_DIRS = {"noamx": "build-noamx", "native": "cmake-build"}
CONVERTER_MTP_LAYERS = 3                     # what the vendored converter assumes for MiMo


# ------------------------------------------------------------------------------------------------ llama.cpp build
def source_dir(build: Path) -> Path:
    return build / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"


def ensure_llamacpp(build: Path, jobs: int, nice: int, flags: str = "noamx") -> Path:
    """-> the directory of the built binaries; downloads, configures and builds only what is missing."""
    cmake_dir = build / LLAMA_BUILD_DIRS[flags]
    bindir = cmake_dir / "bin"
    if all((bindir / t).is_file() for t in TARGETS):
        return bindir
    build.mkdir(parents=True, exist_ok=True)
    sdist = build / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(build)], check=True)
    src = source_dir(build)
    if not (src / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tf:
            tf.extractall(build, filter="data")
    niced = ["nice", "-n", str(nice)]
    if not (cmake_dir / "build.ninja").is_file() and not (cmake_dir / "Makefile").is_file():
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(niced + ["cmake", "-S", str(src), "-B", str(cmake_dir), *gen,
                                "-DCMAKE_BUILD_TYPE=Release", *LLAMA_FLAGS[flags], "-DLLAMA_CURL=OFF",
                                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    print(f"building llama.cpp ({', '.join(TARGETS)}) in {cmake_dir} with -j{jobs} under nice "
          f"-n {nice}; this takes a while", file=sys.stderr)
    subprocess.run(niced + ["cmake", "--build", str(cmake_dir), "--target", *TARGETS, "-j", str(jobs)],
                   check=True)
    return bindir


PATCHES = [   # (file under the llama.cpp tree, original text, replacement); applied once, to the build's copy
    ("conversion/base.py",
     '            raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")',
     '            res = "gpt-2"   # local patch (mimoflash benchmark): '
     'a speed comparison needs no exact pre-tokenizer'),
    ("conversion/mimo.py",
     'rope_dim = int(self.hparams["head_dim"] * self.rope_parameters["partial_rotary_factor"])',
     'rope_dim = int(self.hparams["head_dim"] * self.rope_parameters.get("partial_rotary_factor",   # local patch\n'
     '            self.rope_parameters.get("full_attention", {}).get("partial_rotary_factor")))'),
]


def patch_converter(src: Path) -> None:
    for rel, old, new in PATCHES:
        path = src / rel
        text = path.read_text()
        if new in text:
            continue
        if old not in text:
            raise RuntimeError(f"{path}: the text to patch was not found (a different llama.cpp version?)")
        path.write_text(text.replace(old, new))


def to_gguf(src: Path, model_dir: Path, out: Path, outtype: str, mtp_layers: int) -> Path:
    """Convert a saved checkpoint (cached: redone only when the checkpoint is newer than the GGUF file)."""
    weights = max((p.stat().st_mtime for p in model_dir.glob("*.safetensors")), default=0)
    if out.is_file() and out.stat().st_mtime > weights:
        return out
    patch_converter(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
           "--outtype", outtype]
    if mtp_layers < CONVERTER_MTP_LAYERS:
        cmd.append("--no-mtp")
    r = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    return out


# ------------------------------------------------------------------------------------------------ llama.cpp runs
LLAMA_TIMEOUT_S = 300


def _llama(cmd: list[str]) -> subprocess.CompletedProcess:
    """One llama.cpp tool run; a hang (LLAMA_TIMEOUT_S) is a RuntimeError, as a crash is to the callers."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}   # mimoflash's, not llama.cpp's: its
    try:                                    # OpenMP threads meet at a barrier per graph node; passive = sleeping there
        return subprocess.run(cmd, capture_output=True, text=True, timeout=LLAMA_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(cmd)} ran over {LLAMA_TIMEOUT_S} s") from e


def _run(cmd: list[str]) -> str:
    """-> stdout, then stderr (llama.cpp's log writes results to one and progress to the other)."""
    r = _llama(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return r.stdout + "\n" + r.stderr


def llama_bench(bindir: Path, gguf: Path, threads: int, prompt: int, gen: int, depth: int) -> float:
    r = _llama([str(bindir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
                "-n", str(gen), "-d", str(depth), "-r", "1", "-o", "json"])
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed on {gguf}:\n{r.stderr[-3000:]}")
    (row,) = json.loads(r.stdout)                   # -o json: the results alone on stdout
    return float(row["avg_ts"])


def llama_batched(bindir: Path, gguf: Path, threads: int, prompt: int, gen: int, seqs: int, tries: int = 5) -> float:
    """S_TG of `llama-batched-bench`. Its result line goes through llama.cpp's asynchronous logger, which the tool
    does not flush before exiting: about one run in three prints nothing on this machine. Such a run is repeated
    (up to `tries` times); a run that prints is taken as it is."""
    ctx = seqs * (prompt + gen + 16)                # split per sequence unless the cache is unified
    cmd = [str(bindir / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-c", str(ctx), "-b", "2048",
           "-ub", "512", "-npp", str(prompt), "-ntg", str(gen), "-npl", str(seqs), "--output-format", "jsonl"]
    for _ in range(tries):
        out = _run(cmd)
        rows = [json.loads(line[line.index("{"):]) for line in out.splitlines() if '"speed_tg"' in line]
        if len(rows) == 1:
            return float(rows[0]["speed_tg"])
    raise RuntimeError(f"llama-batched-bench printed no result line in {tries} runs:\n{out[-3000:]}")


# ------------------------------------------------------------------------------------------------ mimoflash runs
def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    kernels.set_num_threads(n)           # the runner reads torch's count once, at start


def ours_prefill(llm: LLM, prompt: list[int]) -> float:
    eng = llm.engine
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    req = eng.scheduler.waiting[-1]
    while eng.has_unfinished_requests():
        eng.step()
    return len(prompt) / (req.first_token_time - req.arrival_time)


# ------------------------------------------------------------------------------------------------ models
def fp8_copy(src: Path, name: str) -> Path:
    """The checkpoint re-saved with block-FP8 weights (128 x 128 blocks, the release's format; mimoflash.save_model
    fp8=True), once: what mimoflash decodes from FP8 beside llama.cpp's Q8_0 file (both ~1 byte per weight)."""
    d = BUILD / "models" / f"{name}-fp8"
    if not (d / "config.json").is_file():
        tok = src if (src / "tokenizer.json").is_file() else None
        save_model(load_model(src, dtype=torch.bfloat16), d, dtype=torch.bfloat16, fp8=True, tokenizer_dir=tok)
    return d


def prepare_models(names: list[str]) -> dict[str, dict]:
    """-> name -> {dir, mtp_layers, tokenizer}; the random model is saved once (seeded, so identical each run)."""
    out = {}
    for name in names:
        if name == "mimo128m":
            d = BUILD / "models" / "mimo128m"
            if not (d / "model.safetensors").is_file():
                save_model(build_model(bench_config()), d, dtype=torch.bfloat16, tokenizer_dir=default_model())
            out[name] = {"dir": d, "mtp_layers": 0, "tokenizer": False}
        elif name == "shipped":
            d = Path(default_model())
            mtp = json.loads((d / "config.json").read_text()).get("num_nextn_predict_layers", 0)
            out[name] = {"dir": d, "mtp_layers": mtp, "tokenizer": True}
        else:
            raise ValueError(f"unknown model {name!r}")
    return out


def _median(xs: list[float]) -> float:
    """Median of the runs that produced a figure (NaN marks a failed llama.cpp run); NaN if none did."""
    ok = [x for x in xs if x == x]
    return statistics.median(ok) if ok else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mimo128m", "shipped"], choices=["mimo128m", "shipped"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--q8", dest="q8", action="store_true", default=True,
                    help="also run llama.cpp on the Q8_0 file (the default)")
    ap.add_argument("--no-q8", dest="q8", action="store_false", help="skip llama.cpp's Q8_0 runs")
    ap.add_argument("--fp8", dest="fp8", action="store_true", default=True,
                    help="also decode (batch 1) with mimoflash from a block-FP8 copy of the checkpoint (the default)")
    ap.add_argument("--no-fp8", dest="fp8", action="store_false", help="skip mimoflash's FP8 runs")
    ap.add_argument("--fp8-head", action=argparse.BooleanOptionalAction, default=True,
                    help="the FP8 engine's LM head in block-FP8 too (LLM(lm_head_fp8=True)), like Q8_0's output "
                         "tensor (the default); --no-fp8-head keeps it bf16, as the FP8 checkpoint stores it")
    ap.add_argument("--llama-flags", choices=sorted(LLAMA_FLAGS), default="noamx",
                    help="llama.cpp's build: instruction sets named without AMX (default; see LLAMA_FLAGS), or "
                         "-DGGML_NATIVE=ON")
    ap.add_argument("--num-scheduler-steps", type=int, default=None, metavar="N",
                    help="mimoflash's decode steps per engine step (default: LLM's, multi-step runs of up to 8; 1 = "
                         "one step per call, the engine's behaviour before multi-step decoding)")
    ap.add_argument("--build-jobs", type=int, default=2)
    ap.add_argument("--build-nice", type=int, default=15)
    a = ap.parse_args(argv)
    if a.num_scheduler_steps is not None and a.num_scheduler_steps < 1:
        ap.error("--num-scheduler-steps must be >= 1")
    steps = {} if a.num_scheduler_steps is None else {"num_scheduler_steps": a.num_scheduler_steps}
    bindir = ensure_llamacpp(BUILD, a.build_jobs, a.build_nice, a.llama_flags)
    load_before = os.getloadavg()
    src = source_dir(BUILD)
    models = prepare_models(a.models)
    top = max(a.threads)
    results: dict[str, dict] = {}
    expert_mb: dict[str, float] = {}
    table = []
    for mname, m in models.items():
        ggufs = {"bf16": to_gguf(src, m["dir"], BUILD / "gguf" / f"{mname}-bf16.gguf", "bf16", m["mtp_layers"])}
        if a.q8:
            ggufs["q8_0"] = to_gguf(src, m["dir"], BUILD / "gguf" / f"{mname}-q8_0.gguf", "q8_0", m["mtp_layers"])
        set_threads(top)
        llm = LLM(str(m["dir"]), skip_tokenizer_init=not m["tokenizer"], max_num_seqs=a.concurrency,
                  max_model_len=max(a.prefill_len, a.prompt_len + a.new_tokens) + 16,
                  max_num_batched_tokens=max(a.prefill_len, a.concurrency * a.prompt_len), progress=False, **steps)
        num_steps = llm.engine.config.num_scheduler_steps
        assert llm.weight_dtype == torch.bfloat16 and llm.engine.runner.fused is not None, \
            "the CPU kernels did not build: see mimoflash/kernels"
        llm8 = None
        if a.fp8:
            llm8 = LLM(str(fp8_copy(m["dir"], mname)), skip_tokenizer_init=not m["tokenizer"], max_num_seqs=1,
                       max_model_len=a.prompt_len + a.new_tokens + 16, progress=False, lm_head_fp8=a.fp8_head,
                       **steps)
            assert llm8.weight_dtype == FP8_DTYPE and llm8.engine.runner.fused is not None, \
                "the FP8 copy did not load as FP8 with the fused decode step"
        V = llm.model.config.vocab_size
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, V, (a.prompt_len,), generator=g).tolist() for _ in range(a.concurrency)]
        long_prompt = torch.randint(3, V, (a.prefill_len,), generator=g).tolist()
        run_ours(llm, prompts[:1], 8)              # warm-up (llama-bench warms up in each of its processes too)
        ours_prefill(llm, long_prompt)
        if llm8 is not None:        # a whole run: its first one ran ~40% slower after 8 tokens only (the bf16
            run_ours(llm8, prompts[:1], a.new_tokens)       # engine's warm-up has its 512-token prefill)
        wbytes = weight_bytes(llm.model)
        res: dict[str, list[float]] = {}
        bw: dict[int, list[float]] = {t: [] for t in a.threads}          # the cache's rate (the bound)
        bw_mem: dict[int, list[float]] = {t: [] for t in a.threads}      # a buffer as large as the weights
        kv_elt = torch.empty(0, dtype=llm.engine.layout.dtype).element_size()
        step_b = step_bytes(llm.model, a.prompt_len + a.new_tokens // 2, kv_elt)
        cfg = llm.model.config        # the routed experts' share of a step: other experts each step, not cached
        expert_b = step_b - bench.step_bytes(cfg, bench.weight_bytes(llm.model), 1, a.prompt_len + a.new_tokens // 2,
                                             kv_elt, experts_per_layer=0)

        def ours(kind: str, t: int, q: str) -> float:
            set_threads(t)
            eng = llm8 if q == "fp8" else llm
            if kind == "tg":
                return run_ours(eng, prompts[:1], a.new_tokens)[0]
            if kind == "pp":
                return ours_prefill(eng, long_prompt)
            return run_ours(eng, prompts, a.new_tokens)[0]

        def theirs(kind: str, t: int, q: str) -> float:
            if kind == "tg":
                return llama_bench(bindir, ggufs[q], t, 0, a.new_tokens, a.prompt_len)
            if kind == "pp":
                return llama_bench(bindir, ggufs[q], t, a.prefill_len, 0, 0)
            return llama_batched(bindir, ggufs[q], t, a.prompt_len, a.new_tokens, a.concurrency)

        jobs = [("tg", t) for t in a.threads] + [("pp", top), ("b16", top)]
        for rep in range(a.repeats):
            for t in a.threads:
                set_threads(t)
                bw[t].append(read_bandwidth(min(step_b, LLC_PROBE_BYTES)))
                bw_mem[t].append(read_bandwidth(wbytes))
            for kind, t in jobs:
                engines = ["mimoflash bf16"] + (["mimoflash fp8"] if llm8 is not None and kind == "tg" else []) \
                    + [f"llama.cpp {q}" for q in ggufs]
                for eng in (engines if rep % 2 == 0 else engines[::-1]):
                    who, q = eng.split()
                    try:
                        v = ours(kind, t, q) if who == "mimoflash" else theirs(kind, t, q)
                    except RuntimeError as e:        # a llama.cpp run that failed: reported, left out of the medians
                        if who == "mimoflash":
                            raise
                        print(f"[{mname}] {kind} {t} {eng} failed: {str(e)[:400]}", file=sys.stderr)
                        v = float("nan")
                    res.setdefault(f"{kind}|{t}|{eng}", []).append(v)
            print(f"[{mname}] repeat {rep + 1}/{a.repeats}: "
                  + ", ".join(f"{k}={v[-1]:.0f}" for k, v in res.items()), file=sys.stderr)
        med = {k: _median(v) for k, v in res.items()}
        bpt = step_b
        mres = {"params_M": round(sum(p.numel() for p in llm.model.parameters()) / 1e6, 1),
                "bytes_per_token_MB": round(bpt / 1e6, 2), "threads": {}}

        def paired(kind: str, t: int, a_eng: str, b_eng: str) -> float:
            """The ratio per repeat (the two ran back to back), median: less exposed to the machine drifting."""
            return round(_median([x / y for x, y in zip(res[f"{kind}|{t}|{a_eng}"], res[f"{kind}|{t}|{b_eng}"])]), 3)

        for kind, t in jobs:
            ours_v = med[f"{kind}|{t}|mimoflash bf16"]
            entry = {"mimoflash": round(ours_v, 1)}
            for q in ggufs:
                v = med[f"{kind}|{t}|llama.cpp {q}"]
                entry[f"llama_{q}"] = round(v, 1)
                entry[f"ratio_vs_{q}"] = round(ours_v / v, 3)
                entry[f"ratio_vs_{q}_paired"] = paired(kind, t, "mimoflash bf16", f"llama.cpp {q}")
            fp8_v = med.get(f"{kind}|{t}|mimoflash fp8", float("nan"))
            if f"{kind}|{t}|mimoflash fp8" in med:
                entry["mimoflash_fp8"] = round(fp8_v, 1)
                if "q8_0" in ggufs:
                    entry["fp8_ratio_vs_q8_0"] = round(fp8_v / entry["llama_q8_0"], 3)
                    entry["fp8_ratio_vs_q8_0_paired"] = paired(kind, t, "mimoflash fp8", "llama.cpp q8_0")
            label = {"tg": "decode b=1", "pp": f"prefill {a.prefill_len}", "b16": f"decode {a.concurrency} seqs"}[kind]
            if kind == "tg":
                bw_t = max(bw[t])
                bound = bw_t / bpt
                entry.update(read_GBps=round(bw_t / 1e9, 2), bound_tok_s=round(bound, 1),
                             weights_read_GBps=round(statistics.median(bw_mem[t]) / 1e9, 2),
                             weights_rate_tok_s=round(statistics.median(bw_mem[t]) / bpt, 1),
                             # the rest at the cache's rate, the routed experts at the memory rate: an estimate
                             cache_and_memory_tok_s=round(1 / ((bpt - expert_b) / bw_t
                                                               + expert_b / statistics.median(bw_mem[t])), 1),
                             fraction_of_bound=round(ours_v / bound, 3),
                             llama_bf16_fraction_of_bound=round(entry["llama_bf16"] / bound, 3))
            else:
                bound = float("nan")
            mres["threads"].setdefault(str(t), {})[kind] = entry
            table.append((mname, label, t, ours_v, entry["llama_bf16"], entry["ratio_vs_bf16"], fp8_v,
                          entry.get("llama_q8_0", float("nan")), entry.get("fp8_ratio_vs_q8_0", float("nan")),
                          bound, ours_v / bound))
        results[mname] = mres
        expert_mb[mname] = expert_b / 1e6
        del llm, llm8

    print(f"\nmimoflash vs llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON}'s vendored copy, build {a.llama_flags}), "
          f"same weights, medians of {a.repeats}, prompt {a.prompt_len}, new {a.new_tokens}, mimoflash "
          f"num_scheduler_steps {num_steps}, mf fp8 with a {'block-FP8' if a.fp8_head else 'bf16'} LM head; tok/s")
    print(f"{'model':<10}{'measure':<18}{'thr':>4}{'mf bf16':>9}{'llama bf16':>11}{'ratio':>7}{'mf fp8':>9}"
          f"{'llama q8_0':>11}{'ratio':>7}{'bound':>7}{'mf/bnd':>7}")
    for r in table:
        print(f"{r[0]:<10}{r[1]:<18}{r[2]:>4}{r[3]:>9.1f}{r[4]:>11.1f}{r[5]:>6.2f}x{r[6]:>9.1f}{r[7]:>11.1f}"
              f"{r[8]:>6.2f}x{r[9]:>7.0f}{r[10]:>7.2f}")
    print("ratio = mimoflash / llama.cpp (bf16 / bf16, FP8 / Q8_0); bound = the cache's read rate (kernels.read_sum "
          f"over min(step bytes, {LLC_PROBE_BYTES >> 20} MiB), that thread count, fastest) / bytes a mimoflash bf16 "
          "decode step reads; mf/bnd = mimoflash bf16's share of it")
    for mname, mres in results.items():
        for t, d in mres["threads"].items():
            tg = d["tg"]
            print(f"{mname} {t} thread(s): read {tg['read_GBps']} GB/s from cache, {tg['weights_read_GBps']} GB/s over "
                  f"all the weights ({mres['bytes_per_token_MB']} MB a step -> {tg['bound_tok_s']:.0f} and "
                  f"{tg['weights_rate_tok_s']:.0f} tok/s; the routed experts' {expert_mb[mname]:.1f} MB at memory "
                  f"speed and the rest from cache: {tg['cache_and_memory_tok_s']:.0f} tok/s)")
    print(f"load average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "load_avg_start": load_before[0],
                      "load_avg_end": os.getloadavg()[0], "llama_cpp_python": LLAMA_CPP_PYTHON,
                      "llama_flags": LLAMA_FLAGS[a.llama_flags], "repeats": a.repeats, "prompt_len": a.prompt_len,
                      "new_tokens": a.new_tokens, "prefill_len": a.prefill_len, "concurrency": a.concurrency,
                      "num_scheduler_steps": num_steps, "fp8_lm_head": "fp8" if a.fp8_head else "bf16",
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "models": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
