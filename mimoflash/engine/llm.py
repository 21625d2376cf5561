"""`LLM`: the vLLM-shaped offline API.

    from mimoflash import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", dtype="auto", max_num_seqs=16, kv_cache_memory=2 << 30)
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text, outs[0].metrics.decode_tokens_per_s)
    for delta in llm.generate_stream("Tell me a story", SamplingParams(max_tokens=200)):
        print(delta.outputs[0].text, end="", flush=True)

`model` is a checkpoint directory or an already built `MiMoForCausalLM` (tests, notebooks); `tokenizer` is optional
either way. A checkpoint without tokenizer files still runs from `{"prompt_token_ids": [...]}` prompts, with empty
`text` (vLLM's skip_tokenizer_init). A built model is left as it was: the engine casts, moves and re-lays out its
own copy of the module tree (`engine.cpu_layout.engine_copy`: new module and parameter objects over the same
storages; what it re-lays out is new memory), and `llm.model` is that copy. The storages it keeps are shared, so
an in-place edit of your model's weights afterwards reaches the engine only partly: build a new `LLM` instead.

Dtypes. `dtype` is the compute dtype (activations, KV cache): "auto" = float32 on CPU, bfloat16 on CUDA.
`kv_cache_dtype` stores the KV cache in another dtype: "bfloat16" halves its bytes under fp32 compute (keys and
values rounded once when stored, read back exactly); "auto" = the compute dtype.
`weight_panels` (CPU, bf16 weights): also keep the dense linears packed in panels, the layout the many-row
products of batched decoding and prefill run fastest on (engine/cpu_layout.py); False saves that copy's memory.
`huge_pages` (CPU, off by default): put the weights, those copies and the KV pools on 2 MB transparent huge pages
where Linux allows (engine/hugepages.py): fewer TLB misses while a decode step streams them; results are identical
either way. On the benchmark machine the decode rates stayed within noise of the default (docs/ENGINE.md §8).
`tensor_parallel_size=N` splits the model over N processes with torch.distributed (heads, experts, vocabulary;
docs/PARALLEL.md): N-1 workers started on this host, or the ranks of a `torchrun` launch; `close()` stops them.
`speculative_config` turns on MTP speculative decoding (vLLM's shape): {"method": "mtp", "num_speculative_tokens": k,
"adaptive": True} lets the model's MTP layers draft up to k tokens per step that the main model verifies in the next
step; greedy output is the same token for token, sampled output has the same distribution (docs/MTP.md). Each output's
`.metrics` then reports verify_steps, accepted_tokens and acceptance_per_position.
`num_scheduler_steps` (8 by default): where every running request decodes and nothing needs the scheduler in
between (no MTP drafting, no waiting requests, ...), one engine step decodes up to that many tokens per request
(greedy ones in a single C call), with the same outputs as one token per step; a streamed delta then carries up to
that many tokens. 1 = one token per step (docs/ENGINE.md, "Multi-step decoding").
`weight_dtype` is how the matmul weights are stored: "auto" keeps a bf16 checkpoint's weights in bf16 on CPU when
computing in fp32 (engine/cpu_layout.py: half the bytes per decoded token, same result as the fp32 model up to
summation order), keeps a block-FP8 checkpoint's FP8 weights in FP8 with their scales there (engine/fp8_layout.py:
the fp32 dequantisation's result up to rounding order, experts read from the files when routed; "fp8" asks
for it, "bfloat16" dequantises to bf16 at load instead), and equals `dtype` otherwise (fp32 checkpoints, CUDA, or
without the CPU kernels). `memory_budget` (FP8 checkpoints; bytes or "24G") bounds the process's resident memory:
experts beyond it are re-read from the files when routed (docs/BIG_MODEL.md).
`lm_head_fp8` (CPU, float32 compute; off by default): quantise the LM head at load time to block-FP8 (E4M3, one
scale per 128 x 128 tile, the release's format; engine/fp8_layout.py `quantize_lm_head`), as llama.cpp's Q8_0
files quantise their output tensor: half the head's bytes per decoded token (the natural pairing with an FP8
checkpoint, whose head is bf16), but the logits become the dequantised head's, so outputs can differ from the bf16
head's. Not with tensor parallelism or a reduced MTP draft vocabulary (docs/BIG_MODEL.md).
Measured with benchmarks/bench_decode.py on an AVX2 CPU without native bf16 (docs/ENGINE.md, README): bf16 weights
with fp32 compute are the fastest for one and for many requests; all-bf16 compute (`dtype="bfloat16"`) is
compute-bound here (torch converts on the fly) and slower.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..model.mimo import MiMoForCausalLM
from .cpu_layout import engine_copy, matmul_weight_dtype
from .engine import EngineConfig, LLMEngine
from .request import CompletionOutput, RequestOutput
from .sampling import SamplingParams
from .speculative import SpeculativeConfig

PromptType = str | dict[str, Any]


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, field: str = "dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"{field} must be one of {sorted(_DTYPE_NAMES)} or 'auto', got {dtype!r}")
    return _DTYPE_NAMES[dtype]


def _resolve_weight_dtype(weight_dtype, compute: torch.dtype, stored: torch.dtype, device: torch.device) -> torch.dtype:
    """-> storage dtype of the matmul weights. Only fp32 compute on bf16 weights (CPU) differs from `compute`."""
    if weight_dtype in (None, "auto"):
        from .. import kernels
        keep_bf16 = (device.type == "cpu" and compute == torch.float32 and stored == torch.bfloat16
                     and kernels.available())
        return torch.bfloat16 if keep_bf16 else compute
    w = _resolve_dtype(weight_dtype, device, "weight_dtype")
    if w != compute and not (w == torch.bfloat16 and compute == torch.float32 and device.type == "cpu"):
        raise ValueError(f"weight_dtype={weight_dtype!r} with dtype {compute}: weights must match the compute dtype, "
                         "except bfloat16 weights with float32 compute on CPU")
    return w


class LLM:
    def __init__(self, model: str | Path | MiMoForCausalLM, tokenizer: Any = None, *, dtype: str | torch.dtype = "auto",
                 weight_dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu", max_num_seqs: int = 16,
                 kv_cache_memory: int | float | None = None, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 512, enable_chunked_prefill: bool = True, block_size: int = 16,
                 seed: int = 0, attention_impl: str = "fast", skip_tokenizer_init: bool = False,
                 kv_cache_dtype: str | torch.dtype = "auto", weight_panels: bool = True, huge_pages: bool = False,
                 progress: bool = True, memory_budget: int | str | None = None,
                 speculative_config: dict | SpeculativeConfig | None = None, tensor_parallel_size: int = 1,
                 num_scheduler_steps: int = 8, lm_head_fp8: bool = False):
        if not isinstance(lm_head_fp8, bool):
            raise ValueError(f"lm_head_fp8 must be True or False, got {lm_head_fp8!r}")
        if lm_head_fp8 and tensor_parallel_size != 1:
            raise ValueError("lm_head_fp8=True is not supported with tensor_parallel_size > 1 (each rank holds a bf16 "
                             "slice of the vocabulary)")
        self._parallel = None
        if tensor_parallel_size != 1:           # this rank's shard; workers started or joined (parallel/group.py)
            from ..parallel.group import start
            self._parallel, model, tokenizer, kv_cache_memory = start(model, tokenizer, tensor_parallel_size,
                                                                      dict(locals()))
        device = torch.device(device)
        spec = SpeculativeConfig.from_value(speculative_config)        # checked before any loading
        if lm_head_fp8:
            from .fp8_layout import check_lm_head_fp8
            check_lm_head_fp8(device, _resolve_dtype(dtype, device))
            if spec is not None and (spec.draft_vocab is not None or spec.draft_vocab_size is not None):
                raise ValueError("lm_head_fp8=True with a reduced MTP draft vocabulary is not supported (the draft "
                                 "head is a bf16 slice of the LM head's rows)")
        kv_dtype = None if kv_cache_dtype in (None, "auto") else _resolve_dtype(kv_cache_dtype, device,
                                                                                 "kv_cache_dtype")
        if isinstance(model, torch.nn.Module) and memory_budget is not None:
            raise ValueError("memory_budget applies to a checkpoint path (an FP8 checkpoint's experts are read from "
                             "its files), not to a built model")
        if isinstance(model, torch.nn.Module):          # a built MiMoForCausalLM (or a test double)
            model = engine_copy(model)                  # the caller's model stays as it was (see the docstring)
            stored = matmul_weight_dtype(model)
            compute = _resolve_dtype(dtype, device)
            weights = _resolve_weight_dtype(weight_dtype, compute, stored, device)
            if weights != stored:
                model = model.cast(weights)
            model = model.to(device).eval()
        elif isinstance(model, (str, Path)):
            from ..checkpoint.loader import load_model, stored_weight_dtype
            from . import fp8_layout
            path = Path(model)
            compute = _resolve_dtype(dtype, device)
            if fp8_layout.wants_fp8(path, weight_dtype, compute, device):     # FP8 kept as shipped (fp8_layout.py)
                kv_bytes = int(kv_cache_memory) if kv_cache_memory and kv_cache_memory > 1 else 0
                model, weight_panels = fp8_layout.load_fp8(path, memory_budget, kv_bytes, weight_panels, progress)
                weights = torch.float8_e4m3fn
            else:
                if memory_budget is not None:
                    raise ValueError("memory_budget bounds the experts read from an FP8 checkpoint's files: it needs "
                                     "an E4M3 checkpoint on CPU with float32 compute (weight_dtype 'auto' or 'fp8')")
                weights = _resolve_weight_dtype(weight_dtype, compute, stored_weight_dtype(path), device)
                model = load_model(path, dtype=weights, device=device, progress=progress).eval()
            if tokenizer is None and not skip_tokenizer_init:
                from ..tokenizer import Tokenizer, has_tokenizer
                if has_tokenizer(path):
                    tokenizer = Tokenizer.from_dir(path)
        else:
            raise ValueError(f"model must be a checkpoint path or a MiMoForCausalLM, got {type(model).__name__}")
        if lm_head_fp8:                                 # explicit module swap (fp8_layout.quantize_lm_head)
            from .fp8_layout import quantize_lm_head
            quantize_lm_head(model)
        self.model, self.tokenizer = model, (None if skip_tokenizer_init else tokenizer)
        self.dtype, self.weight_dtype = compute, weights
        self.expert_store = getattr(model, "expert_store", None)     # FP8 checkpoints: experts read when routed
        self.engine = LLMEngine(model, self.tokenizer, EngineConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill, max_model_len=max_model_len,
            kv_cache_memory=kv_cache_memory, block_size=block_size, attention_impl=attention_impl, seed=seed,
            dtype=compute, kv_cache_dtype=kv_dtype, weight_panels=weight_panels,
            huge_pages=huge_pages, speculative=spec, num_scheduler_steps=num_scheduler_steps))
        if self._parallel is not None:
            self._parallel.attach(self)

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (also done when the LLM is garbage collected and at exit);
        a no-op for a single-process LLM."""
        if self._parallel is not None:
            self._parallel.close()

    def check_workers(self) -> None:
        """Tensor parallelism: raise `mimoflash.parallel.ParallelError` if a worker process died (steps check it
        themselves; an idle server calls this); a no-op for a single-process LLM."""
        if self._parallel is not None:
            self._parallel.check()

    def get_tokenizer(self):
        return self.tokenizer

    def expert_stats(self):
        """FP8 checkpoints: the expert store's counters (engine/expert_store.ExpertStats: experts touched, bytes
        read and cache hits, for the last model forward and in total); None for other models."""
        return None if self.expert_store is None else self.expert_store.stats()

    # ------------------------------------------------------------------ inputs
    def _prompt_ids(self, prompt: PromptType) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as {'prompt_token_ids': [...]}")
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                    raise ValueError("prompt_token_ids must be a list of ints")
                return list(ids), prompt.get("prompt")
            if "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
        raise ValueError(f"a prompt must be a str or a dict with 'prompt_token_ids' or 'prompt', got "
                         f"{type(prompt).__name__}")

    @staticmethod
    def _params(sp, count: int) -> list[SamplingParams]:
        if sp is None:
            sp = SamplingParams()
        if isinstance(sp, dict):
            sp = SamplingParams.from_dict(sp)
        if isinstance(sp, SamplingParams):
            return [sp] * count
        sp = [SamplingParams.from_dict(s) if isinstance(s, dict) else s for s in sp]
        if len(sp) != count:
            raise ValueError(f"got {len(sp)} sampling params for {count} prompts")
        return sp

    def _add(self, prompts: Sequence[PromptType], params: list[SamplingParams]) -> list[str]:
        prepared = [self._prompt_ids(p) for p in prompts]            # validate everything before queueing
        ids = []
        try:
            for (tok, text), sp in zip(prepared, params):
                ids.append(self.engine.add_request(tok, sp, prompt=text))
        except Exception:
            for gid in ids:
                self.engine.abort_request(gid)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise
        return ids

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: PromptType | Sequence[PromptType], sampling_params=None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in prompt order."""
        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        if not prompts:
            return []
        if any(isinstance(p, int) for p in prompts):
            raise ValueError("a list of ints is ambiguous: pass {'prompt_token_ids': [...]} for token prompts")
        gids = self._add(prompts, self._params(sampling_params, len(prompts)))
        final = self._run(gids, use_tqdm and len(gids) > 1)
        return [final[g] for g in gids]

    def _run(self, gids: list[str], progress: bool) -> dict[str, RequestOutput]:
        # A request's deltas are kept and folded once, when it finishes: folding every step ran right after the
        # step's weight reads, with the caches cold, tens of microseconds a step (benchmarks/profile_step_split.py).
        # The same folds in the same order, so the outputs are the same.
        acc: dict[str, RequestOutput] = {}
        pending: dict[str, list[RequestOutput]] = {}
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(gids), desc="generate", unit="req", file=sys.stderr, dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    pending.setdefault(delta.request_id, []).append(delta)
                    if delta.finished:
                        for d in pending.pop(delta.request_id):
                            _accumulate(acc, d)
                        if bar is not None:
                            bar.update(1)
            for deltas in pending.values():
                for d in deltas:
                    _accumulate(acc, d)
        except BaseException:
            for g in gids:
                self.engine.abort_request(g)
            raise
        finally:
            if bar is not None:
                bar.close()
        return acc

    def generate_stream(self, prompt: PromptType, sampling_params=None) -> Iterator[RequestOutput]:
        """Yield delta outputs (new text / token ids per sample) as they are produced; the last has finished=True.
        Closing the iterator early aborts the request and frees its cache."""
        (gid,) = self._add([prompt], self._params(sampling_params, 1))
        done = False
        try:
            while not done and self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    if delta.request_id == gid:
                        done = delta.finished
                        yield delta
        finally:
            if not done:
                self.engine.abort_request(gid)
                while self.engine.has_unfinished_requests():      # drain so the cache is returned now
                    self.engine.step()

    # ------------------------------------------------------------------ chat
    def _chat_prompt(self, messages: list[dict], add_generation_prompt: bool, enable_thinking) -> dict:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (with a chat template); this model has none")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  enable_thinking=enable_thinking)
        ids = text if isinstance(text, list) else self.tokenizer.encode(text)
        return {"prompt_token_ids": ids, "prompt": text if isinstance(text, str) else None}

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, *, use_tqdm: bool = True,
             add_generation_prompt: bool = True, enable_thinking: bool | None = None) -> list[RequestOutput]:
        """`messages` is one conversation (list of {"role", "content"}) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self._chat_prompt(c, add_generation_prompt, enable_thinking) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_stream(self, messages: list[dict], sampling_params=None, *, enable_thinking: bool | None = None
                    ) -> Iterator[RequestOutput]:
        return self.generate_stream(self._chat_prompt(messages, True, enable_thinking), sampling_params)


def _accumulate(acc: dict[str, RequestOutput], delta: RequestOutput) -> None:
    """Fold a delta into the running full output of its group."""
    cur = acc.get(delta.request_id)
    if cur is None:
        acc[delta.request_id] = cur = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [],
                                                    False)
    by_index = {o.index: o for o in cur.outputs}
    for o in delta.outputs:
        c = by_index.get(o.index)
        if c is None:
            c = CompletionOutput(o.index, "", [], None, None, [] if o.logprobs is not None else None)
            cur.outputs.append(c)
            by_index[o.index] = c
        c.text += o.text
        c.token_ids.extend(o.token_ids)
        if o.logprobs is not None:
            c.logprobs = (c.logprobs or []) + list(o.logprobs)
        c.finish_reason, c.stop_reason = o.finish_reason, o.stop_reason
    cur.outputs.sort(key=lambda o: o.index)
    cur.finished, cur.metrics = delta.finished, delta.metrics or cur.metrics


def collect(deltas: Iterable[RequestOutput]) -> RequestOutput:
    """Fold a stream of deltas of one request into its full output."""
    acc: dict[str, RequestOutput] = {}
    for d in deltas:
        _accumulate(acc, d)
    (out,) = acc.values()
    return out
