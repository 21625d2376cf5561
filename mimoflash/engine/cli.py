"""`mimoflash generate` and `mimoflash chat`: thin command-line fronts over `LLM`.

Examples:
    mimoflash generate "def fibonacci(n):" --max-tokens 64 --temperature 0
    mimoflash generate --model ckpt/ "Once upon a time" --n 2 --seed 1 --json
    mimoflash generate --model ckpt-without-tokenizer/ --token-ids 1,2,3 --json
    mimoflash chat --model ckpt/ --system "You are terse."

Both default to the model shipped with the package (`mimoflash.default.default_model()`). Text streams to stdout;
the stats line (tokens, decode tokens/s, time to first token) goes to stderr so that stdout stays pipeable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from .sampling import SamplingParams


def _resolve_model(path: str | None) -> str:
    if path:
        return path
    try:
        from ..default import default_model
    except ImportError as e:
        raise ValueError(f"no --model given and the default model is not available in this installation ({e})")
    return default_model()          # raises FileNotFoundError with the fix when the files are missing


def _add_common(ap: argparse.ArgumentParser, max_tokens: int) -> None:
    ap.add_argument("--model", help="checkpoint directory (default: the model shipped with mimoflash)")
    ap.add_argument("--dtype", default="auto",
                    help="compute dtype: auto | float32 | bfloat16 (auto: float32 on CPU, bf16 on GPU)")
    ap.add_argument("--weight-dtype", default="auto",
                    help="matmul weight storage: auto | float32 | bfloat16 (auto: a bf16/FP8 checkpoint stays bf16 on "
                         "CPU with float32 compute, through mimoflash's CPU kernels)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="KV cache storage (auto = the compute dtype; bfloat16 halves the cache under fp32 compute)")
    ap.add_argument("--no-weight-panels", dest="weight_panels", action="store_false",
                    help="CPU bf16 weights: skip the packed copy of the dense linears (saves their size in RAM; "
                         "batched decoding and prefill run slower)")
    ap.add_argument("--huge-pages", action="store_true",
                    help="CPU: weights and KV cache on 2 MB transparent huge pages where Linux allows (same results; "
                         "fewer TLB misses, within noise on the benchmark machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-cache-memory", type=float, default=None,
                    help="KV cache budget: bytes, or a fraction of RAM when <= 1 (default: what max_num_seqs needs)")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and the kernels' pool (default: torch's, usually the core count)")
    g = ap.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _params(a: argparse.Namespace, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
                          frequency_penalty=a.frequency_penalty, seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos,
                          **extra)


def _load(a: argparse.Namespace, max_num_seqs: int = 4):
    import torch

    from .llm import LLM
    if a.threads:
        torch.set_num_threads(a.threads)
    path = _resolve_model(a.model)
    t0 = time.perf_counter()
    llm = LLM(path, dtype=a.dtype, weight_dtype=a.weight_dtype, kv_cache_dtype=a.kv_cache_dtype, device=a.device,
              max_num_seqs=max_num_seqs,
              kv_cache_memory=int(a.kv_cache_memory) if a.kv_cache_memory and a.kv_cache_memory > 1
              else a.kv_cache_memory, max_model_len=a.max_model_len, weight_panels=a.weight_panels,
              huge_pages=a.huge_pages, progress=True)
    print(f"loaded {path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return llm


def _stats(m) -> str:
    if m is None:
        return ""
    ttft = f"{m.time_to_first_token * 1e3:.0f} ms" if m.time_to_first_token is not None else "-"
    rate = f"{m.decode_tokens_per_s:.1f} tok/s" if m.decode_tokens_per_s else "- tok/s"
    return f"[{m.prompt_tokens} prompt + {m.generated_tokens} generated tokens | {rate} | TTFT {ttft}]"


def generate_main(argv: list[str] | None = None) -> int:
    """mimoflash generate [--model PATH] "prompt" [sampling flags] [--json]"""
    ap = argparse.ArgumentParser(prog="mimoflash generate", description="Generate text for one prompt.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("prompt", nargs="?", help="prompt text ('-' reads stdin)")
    ap.add_argument("--token-ids", help="comma-separated prompt token ids (for checkpoints without a tokenizer)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    ap.add_argument("--n", type=int, default=1, help="number of samples")
    ap.add_argument("--logprobs", type=int, default=None, help="return the top-N logprobs per token (JSON)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_common(ap, max_tokens=128)
    a = ap.parse_args(argv)
    if (a.prompt is None) == (a.token_ids is None):
        ap.error("give exactly one of a prompt or --token-ids")
    params = _params(a, n=a.n, logprobs=a.logprobs)          # validate flags before loading the model
    llm = _load(a)
    if a.token_ids is not None:
        try:
            prompt = {"prompt_token_ids": [int(t) for t in a.token_ids.split(",") if t.strip()]}
        except ValueError:
            raise ValueError(f"--token-ids must be comma-separated integers, got {a.token_ids!r}")
    else:
        text = sys.stdin.read() if a.prompt == "-" else a.prompt
        prompt = llm._chat_prompt([{"role": "user", "content": text}], True, None) if a.chat else text

    if a.json or a.n > 1:
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        if a.json:
            doc = {"prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids,
                   "outputs": [{"index": o.index, "text": o.text, "token_ids": o.token_ids,
                                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                                "logprobs": None if o.logprobs is None else
                                [{str(t): asdict(lp) for t, lp in e.items()} for e in o.logprobs]}
                               for o in out.outputs],
                   "metrics": asdict(out.metrics) if out.metrics else None}
            print(json.dumps(doc, ensure_ascii=False))
        else:
            for o in out.outputs:
                print(f"--- sample {o.index} ({o.finish_reason}) ---\n{o.text}")
        print(_stats(out.metrics), file=sys.stderr)
        return 0
    last = None
    for delta in llm.generate_stream(prompt, params):
        sys.stdout.write(delta.outputs[0].text)
        sys.stdout.flush()
        last = delta
    if llm.tokenizer is None:
        print("(no tokenizer in this checkpoint: use --json to see the token ids)", file=sys.stderr)
    print(file=sys.stdout)
    print(_stats(last.metrics if last else None), file=sys.stderr)
    return 0


CHAT_HELP = "commands: /reset clears the conversation, /system TEXT sets the system prompt, /exit quits"


def chat_main(argv: list[str] | None = None, input_fn=input) -> int:
    """mimoflash chat [--model PATH]: interactive chat with streaming output and a stats line per reply."""
    ap = argparse.ArgumentParser(prog="mimoflash chat", description="Interactive terminal chat.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--enable-thinking", action="store_true", help="let the model reason in <think> first")
    _add_common(ap, max_tokens=512)
    a = ap.parse_args(argv)
    params = _params(a)
    llm = _load(a, max_num_seqs=1)
    if llm.tokenizer is None:
        raise ValueError("chat needs a tokenizer; this checkpoint has none (use `mimoflash generate --token-ids`)")
    system = a.system
    history: list[dict] = []
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input_fn("\n> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            print(f"(system prompt {'set' if system else 'cleared'})", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply, last = "", None
        try:
            for delta in llm.chat_stream(messages, params, enable_thinking=a.enable_thinking or None):
                sys.stdout.write(delta.outputs[0].text)
                sys.stdout.flush()
                reply += delta.outputs[0].text
                last = delta
        except KeyboardInterrupt:                    # Ctrl-C stops this reply (the stream aborts), not the chat
            print("\n(interrupted)", file=sys.stderr)
        history.append({"role": "assistant", "content": reply})
        print(file=sys.stdout)
        print(_stats(last.metrics if last and last.finished else None), file=sys.stderr)
