"""`mimoflash serve [MODEL]`: load a model, build the app, run uvicorn.

    mimoflash serve                                   # the shipped model on http://127.0.0.1:8000
    mimoflash serve path/to/ckpt --port 9000 --api-key secret --served-model-name mimo
    mimoflash serve --max-num-seqs 32 --max-waiting 128 --mtp 2

The model is loaded and run by an engine process of its own (engine_core.py); this process serves HTTP. SIGTERM or
Ctrl-C: uvicorn stops accepting connections, lets in-flight requests finish for `--graceful-timeout` seconds, cancels
the rest (their caches are freed), then the engine process stops and this one exits 0.
"""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import sys

from ..cli import HelpFormatter, usage_error


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mimoflash serve", formatter_class=HelpFormatter,
                                 description="OpenAI-compatible HTTP server with a web chat page at /.")
    ap.add_argument("model", nargs="?", help="checkpoint directory (default: the model shipped with mimoflash)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server on the network")
    ap.add_argument("--port", type=int, default=8000, help="TCP port")
    ap.add_argument("--api-key", default=os.environ.get("MIMOFLASH_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1 routes (default: $MIMOFLASH_API_KEY, else none)")
    ap.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's folder name, "
                                                "'mimoflash-default' for the shipped model)")
    ap.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (the batch)")
    ap.add_argument("--max-waiting", type=int, default=64,
                    help="sequences that may wait beyond the batch; more get HTTP 429")
    ap.add_argument("--max-n", type=int, default=16, help="largest n (choices per request) accepted")
    ap.add_argument("--max-model-len", type=int, default=None, help="longest sequence in tokens (default: the "
                                                                     "model's context)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step (prefill chunk)")
    ap.add_argument("--num-scheduler-steps", type=int, default=8, metavar="N",
                    help="decode up to N tokens per engine step when nothing needs the scheduler in between (the same "
                         "output; a streamed chunk then carries up to N tokens); 1 = one token per step and chunk")
    ap.add_argument("--kv-cache-memory", type=float, default=None,
                    help="KV cache budget: bytes, or a fraction of RAM when <= 1")
    ap.add_argument("--dtype", default="auto", help="compute dtype: auto | float32 | bfloat16")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, ...")
    ap.add_argument("--lm-head-fp8", action="store_true",
                    help="CPU, float32 compute: quantise the LM head to block-FP8 at load (half its bytes per token; "
                         "the logits become the quantised head's, so output can differ; docs/BIG_MODEL.md)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                    help="split the model over N processes on this host, or join a torchrun launch (docs/PARALLEL.md)")
    ap.add_argument("--mtp", type=int, default=None, metavar="K",
                    help="MTP speculative decoding with K draft tokens per step (needs an engine with MTP support "
                         "and a checkpoint with MTP heads)")
    ap.add_argument("--price-input", type=float, default=0.10, help="USD per million prompt tokens, for usage.cost")
    ap.add_argument("--price-output", type=float, default=0.30,
                    help="USD per million completion tokens, for usage.cost")
    ap.add_argument("--stream-interval", type=int, default=1, metavar="N",
                    help="streaming: at least N tokens per SSE chunk after the first; fewer, larger chunks cost the "
                         "server and its clients less CPU when many streams run")
    ap.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body accepted")
    ap.add_argument("--graceful-timeout", type=float, default=10.0,
                    help="seconds in-flight requests get to finish on SIGTERM before they are cancelled")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generator shared by unseeded requests")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def llm_kwargs_for_mtp(k: int | None) -> dict:
    """LLM keyword arguments that turn MTP on, if this engine supports it; ValueError otherwise."""
    if not k:
        return {}
    from ..engine.llm import LLM
    if "speculative_config" not in inspect.signature(LLM.__init__).parameters:
        raise ValueError("--mtp: this engine has no MTP speculative decoding (LLM(speculative_config=...))")
    return {"speculative_config": {"method": "mtp", "num_speculative_tokens": k}}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if not 0 <= a.port <= 65535:
        usage_error(ap, f"--port must be in [0, 65535], got {a.port}")
    for name in ("max_num_seqs", "max_n", "max_body_bytes", "max_num_batched_tokens", "tensor_parallel_size",
                 "stream_interval", "num_scheduler_steps"):
        if getattr(a, name) < 1:
            usage_error(ap, f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.max_waiting < 0:
        usage_error(ap, f"--max-waiting must be >= 0, got {a.max_waiting}")
    if a.mtp is not None and a.mtp < 1:
        usage_error(ap, f"--mtp must be >= 1, got {a.mtp}")
    if a.price_input < 0 or a.price_output < 0:
        usage_error(ap, "prices must be >= 0")
    if a.api_key is not None and not a.api_key:
        usage_error(ap, "--api-key must not be empty")
    try:
        import uvicorn
        from .app import build_app
    except ImportError as e:
        raise RuntimeError(f"the server needs its extra: pip install 'mimoflash[serve]' ({e})")
    from .engine_core import EngineSpec
    from .engine_loop import EngineLoop

    if a.model:
        path = a.model
        name = a.served_model_name or os.path.basename(os.path.normpath(path))
    else:
        from ..default import default_model
        path = default_model()
        name = a.served_model_name or "mimoflash-default"
    extra = llm_kwargs_for_mtp(a.mtp)
    kv = a.kv_cache_memory
    if kv is not None and kv > 1:
        kv = int(kv)
    spec = EngineSpec(str(path), dict(dtype=a.dtype, device=a.device, max_num_seqs=a.max_num_seqs,
                                      max_model_len=a.max_model_len, max_num_batched_tokens=a.max_num_batched_tokens,
                                      kv_cache_memory=kv, seed=a.seed, progress=False,
                                      tensor_parallel_size=a.tensor_parallel_size,
                                      num_scheduler_steps=a.num_scheduler_steps, lm_head_fp8=a.lm_head_fp8,
                                      **extra))
    engine_loop = EngineLoop(spec, max_waiting=a.max_waiting)
    engine_loop.start()                       # the engine process loads the model; its errors end the command here
    try:
        app = build_app(engine_loop, _tokenizer(path), served_model_name=name, api_key=a.api_key, max_n=a.max_n,
                        max_body_bytes=a.max_body_bytes, price_input_per_m=a.price_input,
                        price_output_per_m=a.price_output, mtp=a.mtp, stream_interval=a.stream_interval)
        print(f"mimoflash serve: model {name!r} from {path}; page at http://{a.host}:{a.port}/ , "
              f"OpenAI API at http://{a.host}:{a.port}/v1", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                                timeout_graceful_shutdown=a.graceful_timeout, access_log=a.log_level == "debug")
        # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler that was installed
        # before it: this one, so that a completed shutdown exits 0 instead of dying by the signal.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        _Server = _server_class()
        _Server(config, on_exit=lambda: engine_loop.drain(0.8 * a.graceful_timeout)).run()
    finally:
        engine_loop.close()                   # a no-op after a normal shutdown; else the engine must not outlive us
    return 0


def _tokenizer(path: str):
    """The checkpoint's tokenizer for the server process (chat templates, encoding), or None when it has none."""
    from ..tokenizer import Tokenizer, has_tokenizer
    return Tokenizer.from_dir(path) if has_tokenizer(path) else None


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, which also tells the engine loop to wind down when a shutdown signal arrives: requests
        not finished within the graceful period are aborted by the engine, so their streams end normally."""

        def __init__(self, config, on_exit):
            super().__init__(config)
            self._on_exit = on_exit

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                self._on_exit()
            super().handle_exit(sig, frame)

    return Server
