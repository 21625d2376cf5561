#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the main job: a code completion with the model shipped in the
# package, printing the prompt, the completion and the speed. Extra arguments replace the demo and go to
# `mimoflash generate` (e.g. `bash scripts/quickstart.sh "def add(a, b):" --temperature 0`).
#
# The shipped model is a demo, not an assistant: 15M parameters with MiMo-V2-Flash's architecture, trained from
# scratch for a few CPU hours on the Python standard library's source. It continues Python code and nothing else.
# At temperature 1 it rambles; greedy decoding (--temperature 0) with a mild --repetition-penalty keeps it from
# looping, and stopping at the first blank line (--stop) keeps one short block. Prompts that end inside a line
# (here after `open(path`) work best: the tokenizer merges a line's indentation with the next word.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
    echo "Demo: the shipped 15M-parameter Python code-completion model (MiMo-V2-Flash architecture, trained on the" \
         "Python standard library) completes a function, greedily. It writes plausible-looking code, not correct code." >&2
    set -- $'def read_lines(path):\n    """Return the lines of a text file."""\n    with open(path' \
        --echo --temperature 0 --repetition-penalty 1.2 --max-tokens 64 --stop $'\n\n'
fi
exec .venv/bin/mimoflash generate "$@"
