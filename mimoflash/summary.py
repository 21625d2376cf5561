"""`mimoflash inspect`: what a checkpoint is, computed from its config and safetensors headers only.

Nothing is loaded into memory, so this works on the real 309B checkpoint on a laptop: parameter counts come from
the config's shapes (docs/MODEL.md §4.2 inventory), FP8 status from each shard's header (dtype F8_E4M3 + a
`weight_scale_inv` sibling). KV figures use docs/MODEL.md §2.6: global layers cost nkv*(d+dv) elements per token forever;
sliding-window layers cost the same per token but only for the last `swa_keys` tokens of each sequence.

Example:
    mimoflash inspect tests/fixtures/mimo_v2_flash_config.json --context 262144
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from collections import Counter
from pathlib import Path

from .config import MiMoConfig


def _attn_params(cfg: MiMoConfig, sliding: bool) -> int:
    nq, nkv, d, dv = cfg.attn_shape(sliding)
    H = cfg.hidden_size
    return H * nq * d + H * nkv * d + H * nkv * dv + nq * dv * H + (nq if cfg.has_sinks(sliding) else 0)


def count_parameters(cfg: MiMoConfig) -> dict[str, int]:
    """Parameter counts (embeddings and lm_head included; the router correction bias is a buffer, not counted).
    `dense_linear`: the weights of the linears outside the experts (attention projections, dense MLPs, lm_head,
    MTP projections), the ones the CPU engine also keeps packed in panels (engine/cpu_layout.py, weight_panels)."""
    H = cfg.hidden_size
    emb = cfg.vocab_size * H
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * H
    total = active = emb + head + H                     # + final norm
    dense_linear = cfg.vocab_size * H                   # the lm_head, packed even when tied to the embedding
    for i in range(cfg.num_hidden_layers):
        sliding = cfg.is_sliding(i)
        layer = _attn_params(cfg, sliding) + 2 * H
        dense_linear += _attn_params(cfg, sliding) - (cfg.attn_shape(sliding)[0] if cfg.has_sinks(sliding) else 0)
        if cfg.is_moe(i):
            expert = 3 * H * cfg.moe_intermediate_size
            router = cfg.n_routed_experts * H
            total += layer + router + cfg.n_routed_experts * expert
            active += layer + router + cfg.num_experts_per_tok * expert
        else:
            total += layer + 3 * H * cfg.intermediate_size
            active += layer + 3 * H * cfg.intermediate_size
            dense_linear += 3 * H * cfg.intermediate_size
    mtp_one = 2 * H + 2 * H * H + H + _attn_params(cfg, True) + H + 3 * H * cfg.intermediate_size + H
    mtp_linear = 2 * H * H + _attn_params(cfg, True) - (cfg.attn_shape(True)[0] if cfg.has_sinks(True) else 0) \
        + 3 * H * cfg.intermediate_size
    return {"total": total, "active": active, "mtp_per_layer": mtp_one,
            "mtp_total": mtp_one * cfg.num_nextn_predict_layers,
            "dense_linear": dense_linear + mtp_linear * cfg.num_nextn_predict_layers}


def kv_report(cfg: MiMoConfig, context: int, batch: int, bytes_per_elem: int = 2) -> dict:
    """KV-cache bytes for `batch` sequences of `context` tokens, vs an all-global model of the same shape."""
    ga = [i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)]
    swa = [i for i in range(cfg.num_hidden_layers) if cfg.is_sliding(i)]
    _, nkv, d, dv = cfg.attn_shape(False)
    _, snkv, sd, sdv = cfg.attn_shape(True)
    ga_tok = nkv * (d + dv) * bytes_per_elem                 # per token per GA layer
    swa_tok = snkv * (sd + sdv) * bytes_per_elem            # per token per SWA layer (while in the window)
    swa_tokens = min(context, cfg.swa_keys)
    ours = batch * (len(ga) * ga_tok * context + len(swa) * swa_tok * swa_tokens)
    all_global = batch * cfg.num_hidden_layers * ga_tok * context
    return {
        "bytes_per_token_global_layers": len(ga) * ga_tok,
        "bytes_per_token_per_ga_layer": ga_tok,
        "bytes_per_token_per_swa_layer": swa_tok,
        "swa_fixed_bytes_per_sequence": len(swa) * swa_tok * cfg.swa_keys,
        "context": context, "batch": batch,
        "kv_bytes": ours, "kv_bytes_all_global": all_global,
        "ratio_all_global_over_ours": all_global / ours if ours else float("nan"),
        "bytes_per_token_at_context": ours / (batch * context),
        "bytes_per_token_all_global": all_global / (batch * context),
    }


def read_headers(path: Path) -> dict[str, dict]:
    """tensor name -> {"dtype", "shape", "file"} from the safetensors headers (no tensor data is read)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    out = {}
    for f in files:
        for name, info in _read_header(f).items():
            if name != "__metadata__":
                out[name] = {"dtype": info["dtype"], "shape": info["shape"], "file": f.name}
    return out


def _read_header(f: Path) -> dict:
    """One safetensors header (8-byte little-endian length, then that many bytes of JSON). A truncated or garbled
    file raises ValueError naming it."""
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{f}: not a safetensors file (only {len(head)} bytes; the header length is missing)")
        n = struct.unpack("<Q", head)[0]
        raw = fh.read(n)
    if len(raw) < n:
        raise ValueError(f"{f}: truncated safetensors header ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict) or not all(isinstance(v, dict) and "dtype" in v and "shape" in v
                                                   for k, v in header.items() if k != "__metadata__"):
            raise ValueError("not a JSON object of {name: {dtype, shape, data_offsets}}")
    except (ValueError, UnicodeDecodeError) as e:      # json.JSONDecodeError is a ValueError
        raise ValueError(f"{f}: unreadable safetensors header ({e})") from None
    return header


def fp8_report(headers: dict[str, dict]) -> dict:
    fp8 = [n for n, h in headers.items() if h["dtype"].startswith("F8")]
    patterns = Counter(re.sub(r"\.\d+\.", ".N.", n) for n in fp8)
    dtypes = Counter(h["dtype"] for h in headers.values())
    return {"num_tensors": len(headers), "dtypes": dict(dtypes), "num_fp8": len(fp8),
            "fp8_patterns": dict(sorted(patterns.items()))}


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b} B"


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> int:
    from .cli import HelpFormatter
    ap = argparse.ArgumentParser(prog="mimoflash inspect", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("path", help="checkpoint directory or a config.json file")
    ap.add_argument("--context", type=int, default=None,
                    help="tokens per sequence for the KV estimate (default: the model's context, "
                         "max_position_embeddings)")
    ap.add_argument("--batch", type=int, default=1, help="concurrent sequences for the KV estimate")
    ap.add_argument("--kv-bytes", type=int, default=2, help="bytes per cached element (2 = bf16)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    if (args.context is not None and args.context < 1) or args.batch < 1 or args.kv_bytes < 1:
        ap.error("--context, --batch and --kv-bytes must be >= 1")
    path = Path(args.path)
    if not path.exists():
        ap.error(f"{path} does not exist")
    cfg = MiMoConfig.from_file(path)
    if args.context is None:
        args.context = cfg.max_position_embeddings
    headers = read_headers(path) if path.is_dir() else {}
    if path.is_dir() and "num_nextn_predict_layers" not in json.loads((path / "config.json").read_text()):
        mtp_ids = {int(m[1]) for n in headers if (m := re.match(r"model\.mtp\.layers\.(\d+)\.", n))}
        cfg.num_nextn_predict_layers = len(mtp_ids)
    params = count_parameters(cfg)
    kv = kv_report(cfg, args.context, args.batch, args.kv_bytes)
    fp8 = fp8_report(headers) if headers else None
    report = {"config": {"layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                         "global_layers": [i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)],
                         "swa_keys": cfg.swa_keys, "experts": cfg.n_routed_experts,
                         "experts_per_token": cfg.num_experts_per_tok, "mtp_layers": cfg.num_nextn_predict_layers,
                         "vocab_size": cfg.vocab_size, "fp8_block": cfg.fp8_block_size},
              "parameters": params, "kv": kv, "fp8": fp8}
    if args.json:
        print(json.dumps(report))
        return 0
    c = report["config"]
    ga = c["global_layers"]
    print(f"MiMo config: {c['layers']} layers ({len(ga)} global at {ga}, {c['layers'] - len(ga)} sliding-window, "
          f"{c['swa_keys']} keys per SWA query), hidden {c['hidden_size']}, vocab {c['vocab_size']}")
    print(f"  MoE: {c['experts']} experts, {c['experts_per_token']} per token; MTP layers: {c['mtp_layers']}; "
          f"FP8 block: {c['fp8_block']}")
    print(f"Parameters: main total {_fmt_count(params['total'])}, active per token {_fmt_count(params['active'])}; "
          f"MTP {_fmt_count(params['mtp_total'])} ({_fmt_count(params['mtp_per_layer'])} per layer)")
    print(f"  dense linears (outside the experts; kept packed a second time on CPU with weight_panels): "
          f"{_fmt_count(params['dense_linear'])} = {_fmt_bytes(2 * params['dense_linear'])} in bf16")
    print(f"KV cache ({args.kv_bytes} bytes/elem): global layers {_fmt_bytes(kv['bytes_per_token_global_layers'])}"
          f"/token; SWA layers fixed {_fmt_bytes(kv['swa_fixed_bytes_per_sequence'])}/sequence")
    print(f"  context {args.context} x batch {args.batch}: {_fmt_bytes(kv['kv_bytes'])} "
          f"vs all-global {_fmt_bytes(kv['kv_bytes_all_global'])} ({kv['ratio_all_global_over_ours']:.2f}x smaller)")
    if fp8:
        print(f"Tensors: {fp8['num_tensors']} ({fp8['dtypes']}); FP8: {fp8['num_fp8']}")
        for pat, n in fp8["fp8_patterns"].items():
            print(f"  {n:6d} x {pat}")
    elif path.is_dir():
        print("Tensors: no safetensors files found")
    return 0
