"""`mimoflash generate` and `mimoflash chat`: thin command-line fronts over `LLM`.

Examples:
    mimoflash generate "def fibonacci(n):" --max-tokens 64 --temperature 0
    mimoflash generate --model ckpt/ "Once upon a time" --n 2 --seed 1 --json
    mimoflash generate --model ckpt-without-tokenizer/ --token-ids 1,2,3 --json
    mimoflash chat --model ckpt/ --system "You are terse."

Both default to the model shipped with the package (`mimoflash.default.default_model()`). Text streams to stdout;
the stats line (tokens, decode tokens/s, time to first token) and notices go to stderr so that stdout stays pipeable.

Seeds: without `--seed` a fresh random seed is drawn for every run (as vLLM does), so two runs sample differently;
the seed used is printed on the stats line and recorded in `--json` output, and passing it back as `--seed`
reproduces the run. Greedy decoding (`--temperature 0`) does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from dataclasses import asdict

from ..cli import HelpFormatter, usage_error
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
    ap.add_argument("--model", help="checkpoint directory or hub repo id (default: the model shipped with mimoflash)")
    ap.add_argument("--dtype", default="auto",
                    help="compute dtype: auto | float32 | bfloat16 (auto: float32 on CPU, bf16 on GPU)")
    ap.add_argument("--weight-dtype", default="auto",
                    help="matmul weight storage: auto | float32 | bfloat16 | fp8 (auto on CPU: a bf16 checkpoint stays "
                         "bf16 and a block-FP8 one stays FP8, with float32 compute through mimoflash's CPU kernels)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="KV cache storage (auto = the compute dtype; bfloat16 halves the cache under fp32 compute)")
    ap.add_argument("--no-weight-panels", dest="weight_panels", action="store_false",
                    help="CPU bf16 weights: do not keep the packed copy of the dense linears that is kept by default "
                         "(saves their size in RAM; batched decoding and prefill run slower)")
    ap.add_argument("--huge-pages", action="store_true",
                    help="CPU: weights and KV cache on 2 MB transparent huge pages where Linux allows (same results; "
                         "fewer TLB misses, within noise on the benchmark machine)")
    ap.add_argument("--memory-budget", default=None, metavar="SIZE",
                    help="FP8 checkpoints: bound the process's resident memory (e.g. 24G); routed experts beyond it "
                         "are read from the checkpoint files when needed (slower). Default: no bound, or what is "
                         "free when the files exceed the available RAM")
    ap.add_argument("--lm-head-fp8", action="store_true",
                    help="CPU, float32 compute: quantise the LM head to block-FP8 at load (E4M3, 128x128 tile scales, "
                         "as llama.cpp's Q8_0 quantises its output tensor): half the head's bytes per token, but the "
                         "logits become the quantised head's, so output can differ (docs/BIG_MODEL.md)")
    ap.add_argument("--device", default="cpu", help="torch device to run on: cpu, cuda, cuda:1, ...")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                    help="split the model over N processes on this host, or join a torchrun launch (docs/PARALLEL.md)")
    ap.add_argument("--kv-cache-memory", type=float, default=None,
                    help="KV cache budget: bytes, or a fraction of RAM when <= 1 (default: what max_num_seqs needs)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="longest sequence (prompt + generated tokens) in tokens (default: the model's context, "
                         "max_position_embeddings in its config.json)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and the kernels' pool, >= 1 (default: torch's, usually the core count)")
    ap.add_argument("--num-scheduler-steps", type=int, default=8, metavar="N",
                    help="decode up to N tokens per engine step when nothing needs the scheduler in between: the same "
                         "output, less per-token Python (docs/ENGINE.md); 1 = one token per step")
    ap.add_argument("--mtp", type=int, default=0, metavar="K",
                    help="MTP speculative decoding: the model's MTP layers draft up to K tokens per step that the main "
                         "model verifies (same greedy output, same sampling distribution; docs/MTP.md); 0 = off")
    ap.add_argument("--mtp-adaptive", action="store_true",
                    help="with --mtp: choose the number of drafts each step from the measured acceptance and step "
                         "times (fewer or none where verifying costs more than it saves)")
    g = ap.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate per reply")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min_p x the top token's probability; 0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the prompt or output; 1 = off")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted from the logit of every token already generated")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="in [-2, 2]: subtracted once per earlier occurrence of a generated token")
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: a fresh random seed per run, printed so the run can be repeated)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")


def _check_common(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Flag values argparse cannot check by type alone; refused before the model is loaded."""
    if a.threads is not None and a.threads < 1:
        usage_error(ap, f"--threads must be >= 1, got {a.threads}")
    if a.num_scheduler_steps < 1:
        usage_error(ap, f"--num-scheduler-steps must be >= 1, got {a.num_scheduler_steps}")
    if a.max_model_len is not None and a.max_model_len < 2:
        usage_error(ap, f"--max-model-len must be >= 2 (a prompt token and a generated one), got {a.max_model_len}")
    if a.kv_cache_memory is not None and a.kv_cache_memory <= 0:
        usage_error(ap, f"--kv-cache-memory must be > 0, got {a.kv_cache_memory}")
    if a.tensor_parallel_size < 1:
        usage_error(ap, f"--tensor-parallel-size must be >= 1, got {a.tensor_parallel_size}")
    if not 0 <= a.mtp <= 16:
        usage_error(ap, f"--mtp must be in [0, 16] (0 = off), got {a.mtp}")
    if a.mtp_adaptive and not a.mtp:
        usage_error(ap, "--mtp-adaptive needs --mtp K (the most drafts per step)")


def _draw_seed(a: argparse.Namespace) -> int:
    """The run's seed: --seed, or a fresh random one (vLLM's behaviour: unseeded runs differ from run to run)."""
    if a.seed is None:
        a.seed = secrets.randbelow(2 ** 31)
    return a.seed


def _params(a: argparse.Namespace, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
                          frequency_penalty=a.frequency_penalty, seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos,
                          **extra)


def _load(a: argparse.Namespace, max_num_seqs: int = 4, seed: int = 0):
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
              huge_pages=a.huge_pages, memory_budget=a.memory_budget, seed=seed, progress=True,
              tensor_parallel_size=a.tensor_parallel_size, num_scheduler_steps=a.num_scheduler_steps,
              lm_head_fp8=a.lm_head_fp8, speculative_config={"method": "mtp", "num_speculative_tokens": a.mtp, "adaptive": a.mtp_adaptive}
              if a.mtp else None)
    print(f"loaded {path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return llm


def context_limit(llm) -> int:
    """Tokens one sequence may hold (prompt + output): max_model_len, or less if the KV cache holds fewer."""
    sched = llm.engine.scheduler.config.max_model_len
    return min(sched, llm.engine.kv.layout.token_capacity)


def clean_text(text: str, what: str) -> str:
    """Text from argv or stdin that held bytes which are not UTF-8 (Python keeps them as lone surrogates, which no
    tokenizer accepts) -> the same text with each bad byte replaced by U+FFFD, and a notice on stderr."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    print(f"({what} contained bytes that are not valid UTF-8; each was replaced by U+FFFD)", file=sys.stderr)
    return fixed


def _read_stdin() -> str:
    return sys.stdin.buffer.read().decode("utf-8", "surrogateescape")


def _stats(m, seed: int | None = None) -> str:
    if m is None:
        return ""
    ttft = f"{m.time_to_first_token * 1e3:.0f} ms" if m.time_to_first_token is not None else "-"
    rate = f"{m.decode_tokens_per_s:.1f} tok/s" if m.decode_tokens_per_s else "- tok/s"
    tail = f" | seed {seed}" if seed is not None else ""
    if getattr(m, "verify_steps", 0):
        acc = ", ".join(f"{x:.2f}" for x in m.acceptance_per_position)
        tail = f" | {m.tokens_per_verify_step:.2f} tokens per verify step (acceptance by draft {acc})" + tail
    return f"[{m.prompt_tokens} prompt + {m.generated_tokens} generated tokens | {rate} | TTFT {ttft}{tail}]"


def _context_notice(finish_reason: str | None, prompt_tokens: int, generated: int, max_tokens: int,
                    limit: int) -> str | None:
    """A reply that ended as "length" before --max-tokens did so at the end of the context: say so."""
    if finish_reason == "length" and generated < max_tokens:
        return (f"(stopped at the context limit: {prompt_tokens} prompt + {generated} generated tokens fill the "
                f"{limit}-token context, before --max-tokens {max_tokens})")
    return None


def generate_main(argv: list[str] | None = None) -> int:
    """mimoflash generate [--model PATH] "prompt" [sampling flags] [--json]"""
    ap = argparse.ArgumentParser(prog="mimoflash generate", description="Generate text for one prompt.",
                                 formatter_class=HelpFormatter)
    ap.add_argument("prompt", nargs="?", help="prompt text ('-' reads stdin)")
    ap.add_argument("--token-ids", help="comma-separated prompt token ids (for checkpoints without a tokenizer)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    ap.add_argument("--n", type=int, default=1, help="number of samples")
    ap.add_argument("--logprobs", type=int, default=None,
                    help="include the top-N log-probabilities of every generated token (needs --json)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    ap.add_argument("--echo", action="store_true", help="print the prompt before the generated text (text prompts without --chat)")
    _add_common(ap, max_tokens=128)
    a = ap.parse_args(argv)
    if (a.prompt is None) == (a.token_ids is None):
        usage_error(ap, "give exactly one of a prompt or --token-ids")
    if a.logprobs is not None and not a.json:
        usage_error(ap, "--logprobs needs --json (the log-probabilities are part of the JSON output)")
    if a.token_ids is not None and a.chat:
        usage_error(ap, "--chat formats a text prompt; it cannot be combined with --token-ids")
    _check_common(ap, a)
    token_ids = None
    if a.token_ids is not None:
        try:
            token_ids = [int(t) for t in a.token_ids.split(",") if t.strip()]
        except ValueError:
            usage_error(ap, f"--token-ids must be comma-separated integers, got {a.token_ids!r}")
    seed = _draw_seed(a)
    params = _params(a, n=a.n, logprobs=a.logprobs)          # validate flags before loading the model
    text = None
    if token_ids is None:
        text = clean_text(_read_stdin() if a.prompt == "-" else a.prompt, "the prompt")
    llm = _load(a)
    if token_ids is not None:
        prompt = {"prompt_token_ids": token_ids}
    elif llm.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer, so a text prompt cannot be encoded: give the prompt as "
                         "token ids instead, e.g. `--token-ids 1,2,3 --json`")
    else:
        prompt = llm._chat_prompt([{"role": "user", "content": text}], True, None) if a.chat else text
    limit = context_limit(llm)
    echo = text if a.echo and not a.chat and text is not None else ""

    if a.json or a.n > 1:
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        if a.json:
            doc = {"prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids, "seed": seed,
                   "outputs": [{"index": o.index, "text": o.text, "token_ids": o.token_ids,
                                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                                "logprobs": None if o.logprobs is None else
                                [{str(t): asdict(lp) for t, lp in e.items()} for e in o.logprobs]}
                               for o in out.outputs],
                   "metrics": asdict(out.metrics) if out.metrics else None}
            print(json.dumps(doc, ensure_ascii=False))
        else:
            for o in out.outputs:
                print(f"--- sample {o.index} ({o.finish_reason}) ---\n{echo}{o.text}")
        for o in out.outputs:
            note = _context_notice(o.finish_reason, len(out.prompt_token_ids), len(o.token_ids), a.max_tokens, limit)
            if note:
                print(f"sample {o.index}: {note}" if a.n > 1 else note, file=sys.stderr)
        print(_stats(out.metrics, seed if a.temperature > 0 else None), file=sys.stderr)
        return 0
    last, generated = None, 0
    sys.stdout.write(echo)
    for delta in llm.generate_stream(prompt, params):
        sys.stdout.write(delta.outputs[0].text)
        sys.stdout.flush()
        generated += len(delta.outputs[0].token_ids)
        last = delta
    print(file=sys.stdout)
    if llm.tokenizer is None:
        print("(no tokenizer in this checkpoint: use --json to see the token ids)", file=sys.stderr)
    if last is not None:
        note = _context_notice(last.outputs[0].finish_reason, len(last.prompt_token_ids), generated, a.max_tokens,
                               limit)
        if note:
            print(note, file=sys.stderr)
    print(_stats(last.metrics if last else None, seed if a.temperature > 0 else None), file=sys.stderr)
    return 0


CHAT_HELP = "commands: /reset clears the conversation, /system TEXT sets the system prompt, /exit quits"


def _fit_history(llm, system: str | None, history: list[dict], reserve: int, limit: int,
                 enable_thinking) -> tuple[list[int] | None, int]:
    """Drop the oldest turns until the prompt plus `reserve` reply tokens fits in `limit` tokens; the system prompt
    and the newest (user) message always stay. -> (prompt token ids, number of messages dropped), or (None, 0)
    when the newest message alone does not leave room for one reply token."""
    dropped = 0
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = llm._chat_prompt(messages, True, enable_thinking)["prompt_token_ids"]
        if len(ids) + reserve <= limit:
            return ids, dropped
        if len(history) == 1:
            return (ids, dropped) if len(ids) < limit else (None, 0)
        # drop the oldest user turn and the assistant reply that followed it (a pair keeps roles alternating)
        n = 2 if len(history) >= 3 and history[1]["role"] == "assistant" else 1
        del history[:n]
        dropped += n


def chat_main(argv: list[str] | None = None, input_fn=None) -> int:
    """mimoflash chat [--model PATH]: interactive chat with streaming output and a stats line per reply.

    The conversation is kept in the context: when the next prompt would leave less than --max-tokens (at most half
    the context) for the reply, the oldest turns are dropped, keeping the system prompt, with a notice. A single
    message too long for the context is refused and the session goes on."""
    ap = argparse.ArgumentParser(prog="mimoflash chat", description="Interactive terminal chat. " + CHAT_HELP + ".",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--enable-thinking", action="store_true", help="let the model reason in <think> first")
    _add_common(ap, max_tokens=512)
    a = ap.parse_args(argv)
    _check_common(ap, a)
    if input_fn is None:
        input_fn = input
        # undecodable input bytes become lone surrogates (replaced with a notice below) instead of an exception
        if hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="surrogateescape")
    # An explicit --seed fixes every reply's sampling; otherwise the session's shared generator gets a fresh seed.
    session_seed = a.seed if a.seed is not None else secrets.randbelow(2 ** 31)
    params = _params(a)
    llm = _load(a, max_num_seqs=1, seed=session_seed)
    if llm.tokenizer is None:
        raise ValueError("chat needs a tokenizer; this checkpoint has none (use `mimoflash generate --token-ids`)")
    limit = context_limit(llm)
    reserve = min(a.max_tokens, limit // 2)
    system = clean_text(a.system, "the system prompt") if a.system else None
    history: list[dict] = []
    print(f"{CHAT_HELP} (seed {session_seed})", file=sys.stderr)
    while True:
        try:
            line = input_fn("\n> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = clean_text(line, "your message").strip()
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
        ids, dropped = _fit_history(llm, system, history, reserve, limit, a.enable_thinking or None)
        if ids is None:
            history.pop()
            print(f"(message not sent: it is too long for the model's {limit}-token context; send a shorter one)",
                  file=sys.stderr)
            continue
        if dropped:
            print(f"(context full: dropped the {dropped} oldest message{'s' if dropped > 1 else ''} of the "
                  f"conversation; /reset starts afresh)", file=sys.stderr)
        reply, last, generated = "", None, 0
        try:
            for delta in llm.generate_stream({"prompt_token_ids": ids}, params):
                sys.stdout.write(delta.outputs[0].text)
                sys.stdout.flush()
                reply += delta.outputs[0].text
                generated += len(delta.outputs[0].token_ids)
                last = delta
        except KeyboardInterrupt:                    # Ctrl-C stops this reply (the stream aborts), not the chat
            print("\n(interrupted)", file=sys.stderr)
        except ValueError as e:                      # a request the engine refuses ends this turn, not the chat
            history.pop()
            print(f"\n(message not sent: {e})", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})
        print(file=sys.stdout)
        if last is not None and last.finished:
            note = _context_notice(last.outputs[0].finish_reason, len(ids), generated, a.max_tokens, limit)
            if note:
                print(note, file=sys.stderr)
        print(_stats(last.metrics if last and last.finished else None), file=sys.stderr)
