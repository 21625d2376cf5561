"""`mimoflash <command>`: a thin dispatcher; each command's module parses its own flags.

Examples:
    mimoflash generate "def fibonacci(n):" --max-tokens 64
    mimoflash chat
    mimoflash inspect path/to/checkpoint --context 262144
    mimoflash train-tokenizer --input corpus/ --out tok/
    mimoflash prepare-data --input corpus/ --tokenizer tok/ --out data/
    mimoflash train --config tiny --data data/ --out runs/tiny
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module, function, one-line help)
COMMANDS = {
    "generate": ("mimoflash.engine.cli", "generate_main", "generate text for a prompt (default: the shipped model)"),
    "chat": ("mimoflash.engine.cli", "chat_main", "interactive terminal chat with streaming output"),
    "serve": ("mimoflash.serve.cli", "main", "OpenAI-compatible HTTP server with a web chat page"),
    "inspect": ("mimoflash.summary", "main", "parameter counts, KV-cache sizes and FP8 tensors of a checkpoint"),
    "train": ("mimoflash.train.train", "main", "train a MiMo-architecture model (next-token + MTP losses)"),
    "train-tokenizer": ("mimoflash.train.tokenizer_train", "main", "train a byte-level BPE tokenizer"),
    "prepare-data": ("mimoflash.train.data", "main", "tokenize a corpus into memory-mapped token shards"),
    "bench": ("mimoflash.bench", "main", "roofline, prefill/decode tokens/s and cost per million tokens; --plan"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once: appended when the help text does not already state it, and never for
    flags (store_true / store_false), whose 'default: True/False' reads backwards, nor for a default of None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if ("default:" in help_ or action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS)
                or not action.option_strings):
            return help_
        return f"{help_} (default: %(default)s)"


def usage_error(ap: argparse.ArgumentParser, message: str) -> None:
    """Refuse bad flags in one line (argparse's own `error` prints the whole multi-line usage first); exit 2."""
    ap.exit(2, f"{ap.prog}: error: {message}\n")


def _usage() -> str:
    lines = ["usage: mimoflash <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`mimoflash <command> --help` shows the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"mimoflash {__version__}")
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"mimoflash: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    # Idle OpenMP threads sleep instead of spinning. On a shared or busy CPU a spinning barrier waits for a
    # descheduled thread and decode ran 5-8x slower in our measurements; on an idle machine it costs nothing.
    # Must be set before torch initialises OpenMP, i.e. before the command module is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        print(f"mimoflash {cmd}: not available in this installation ({e})", file=sys.stderr)
        return 2
    try:
        result = fn(argv[1:])
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError) as e:
        # User-facing errors (bad flags, bad checkpoint, bad input) print one clear line, not a traceback.
        print(f"mimoflash {cmd}: error: {e}", file=sys.stderr)
        return 1
    return exit_code(result)


def exit_code(result: object) -> int:
    """A command's return value -> process exit status. Commands may return an int status, or anything else on
    success (`train` returns its summary dict, others None), which is 0: only a plain int is a status."""
    return result if type(result) is int else 0
