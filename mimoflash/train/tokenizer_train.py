"""Train a small byte-level BPE tokenizer for from-scratch experiments.

The real MiMo-V2-Flash vocabulary has ~152k ids (docs/MODEL.md §5.1), far too many for a toy model trained on a few
megabytes of text, where most embedding rows would never see a gradient. This trains a vocabulary of the same
kind (byte-level BPE, the GPT-2/Qwen family) at a size that fits the corpus, with the ChatML and reasoning
markers our chat template uses.

Choices and reasons:
* Byte-level pre-tokenizer with all 256 byte symbols in the initial alphabet: any input, binary garbage
  included, encodes without an unknown token, and decoding is lossless.
* The special tokens are the first ids, in a fixed order (`SPECIAL_TOKENS`), so `<|endoftext|>` is 0,
  `<|im_start|>` 1, `<|im_end|>` 2, ... whatever the corpus. Data prepared with one tokenizer keeps its
  separator id when the tokenizer is retrained.
* `<think>`, `<tool_call>`, `<tool_response>` and their closers are single added tokens but are not marked
  special (Qwen3 does the same): servers decode with `skip_special_tokens=True`, and the reasoning and
  tool-call parsers need to see these markers in the text.
* Output is `tokenizer.json` + `tokenizer_config.json` in the Hugging Face layout, so both our `Tokenizer`
  and transformers' `AutoTokenizer` load it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mimoflash.tokenizer import DEFAULT_CHAT_TEMPLATE, ENDOFTEXT, IM_END, Tokenizer
from mimoflash.train.data import collect_files, progress_bar, read_document, skip_summary

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
# Markers that must survive decode(skip_special_tokens=True); see the module docstring.
MARKER_TOKENS = set(SPECIAL_TOKENS[3:])
# MiMo-V2-Flash's context length (docs/MODEL.md §1.1); only informs transformers' length warnings.
MODEL_MAX_LENGTH = 262144


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    progress: bool = True,
) -> Tokenizer:
    """Train byte-level BPE on `files` (one document each), write it to `out_dir` and return it loaded.

    Unreadable, binary and empty files are skipped and counted; raises `ValueError` if nothing is left.
    """
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("train_tokenizer got no input files")
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be at least {min_vocab} (256 bytes + {len(SPECIAL_TOKENS)} special)")

    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # our tqdm bar over files replaces the trainer's own
    )
    skipped: Counter = Counter()
    used = 0

    def documents() -> Iterator[str]:
        nonlocal used
        for path in _progress_iter(files, progress):
            text = read_document(path, skipped)
            if text is not None:
                used += 1
                yield text

    tok.train_from_iterator(documents(), trainer, length=len(files))
    print(f"trained on {used} files; skipped: {skip_summary(skipped)}")
    if used == 0:
        raise ValueError(f"no usable text in {len(files)} input files (skipped: {skip_summary(skipped)})")

    # The trainer marks all its special tokens special; unmark the markers (round trip through the JSON form,
    # since tokenizers has no setter for an added token's flags).
    spec = json.loads(tok.to_str())
    for entry in spec["added_tokens"]:
        if entry["content"] in MARKER_TOKENS:
            entry["special"] = False
    tok = _HFTokenizer.from_str(json.dumps(spec))
    for i, content in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(content) != i:
            raise RuntimeError(f"special token {content} got id {tok.token_to_id(content)}, not {i}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        # PreTrainedTokenizerFast loads a bare tokenizer.json in transformers 4.x and 5.x alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(e["id"]): {k: e[k] for k in ("content", "lstrip", "rstrip", "normalized", "single_word", "special")}
            for e in spec["added_tokens"]
        },
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return Tokenizer.from_dir(out_dir)


def _progress_iter(items: Sequence[Path], enable: bool) -> Iterator[Path]:
    bar = progress_bar(total=len(items), desc="reading", unit="file", enable=enable)
    for item in items:
        yield item
        bar.update(1)
    bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Train a byte-level BPE tokenizer on a text corpus.

    Example:
        mimoflash train-tokenizer --input src/ --glob '*.py' --out runs/tok --vocab-size 8192
    """
    from ..cli import HelpFormatter
    parser = argparse.ArgumentParser(prog="mimoflash train-tokenizer", description=main.__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--input", action="append", required=True, help="file or directory (repeatable)")
    parser.add_argument("--glob", default="*", help="file-name pattern for directories")
    parser.add_argument("--out", required=True, help="output directory for tokenizer.json/tokenizer_config.json")
    parser.add_argument("--vocab-size", type=int, default=8192,
                        help="ids in the vocabulary, special tokens and the 256 bytes included")
    parser.add_argument("--min-frequency", type=int, default=2, help="a pair seen fewer times is never merged")
    args = parser.parse_args(argv)

    files = collect_files(args.input, args.glob)
    if not files:
        parser.error(f"no files matching {args.glob!r} under {args.input}")
    tokenizer = train_tokenizer(files, args.out, args.vocab_size, args.min_frequency)
    print(f"vocab size {tokenizer.vocab_size} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
