"""Every `mimoflash` subcommand run the way a user runs it: a subprocess, its exit code, its stdout and stderr.

One module fixture builds a tiny run through the CLI itself (train-tokenizer -> prepare-data -> train, a few steps of
the `tiny` preset on a generated corpus, ~10 s); generate, chat and inspect then run on that checkpoint, so no test
depends on the shipped model or the network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDS = ["def", "return", "self", "value", "import", "class", "for", "in", "range", "print", "if", "else", "None",
         "list", "dict", "name", "path", "open", "read", "write", "hello", "world"]


def mimoflash(*args, input: bytes | None = None, cwd: Path | None = None, timeout: float = 180,
              **env) -> subprocess.CompletedProcess:
    """`python -m mimoflash ARGS` as a user runs it; stdout/stderr decoded with replacement (they are checked as text).
    `args` may hold bytes (an argument that is not UTF-8)."""
    e = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
             PYTHONPATH=str(REPO), **env)
    p = subprocess.run([sys.executable, "-m", "mimoflash", *args], input=input, capture_output=True, env=e,
                       cwd=cwd or REPO, timeout=timeout)
    p.stdout, p.stderr = (s.decode("utf-8", "replace") for s in (p.stdout, p.stderr))
    return p


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p


def refused(p: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """A clean refusal: the exit code, no traceback, and every needle in stderr. -> stderr."""
    assert p.returncode == code, f"exit {p.returncode} (want {code})\nstderr: {p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for n in needles:
        assert n in p.stderr, f"{n!r} not in stderr:\n{p.stderr[-3000:]}"
    return p.stderr


def write_corpus(root: Path, n_docs: int = 16, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(n_docs):
        lines = [f"def f{i}_{j}({rng.choice(WORDS)}):\n    " + " ".join(rng.choice(WORDS) for _ in range(8))
                 for j in range(40)]
        (root / f"mod{i:02d}.py").write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """train-tokenizer, prepare-data and train through the CLI; -> paths of the tokenizer, data, run and checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "corpus")
    p = ok(mimoflash("train-tokenizer", "--input", str(corpus), "--glob", "*.py", "--out", str(root / "tok"),
                     "--vocab-size", "512"))
    assert (root / "tok" / "tokenizer.json").exists(), p.stdout
    ok(mimoflash("prepare-data", "--input", str(corpus), "--glob", "*.py", "--tokenizer", str(root / "tok"),
                 "--out", str(root / "data"), "--val-fraction", "0.1"))
    assert {"train.bin", "val.bin", "meta.json"} <= {f.name for f in (root / "data").iterdir()}
    p = ok(mimoflash("train", "--config", "tiny", "--data", str(root / "data"), "--out", str(root / "run"),
                     "--no-progress", "--device", "cpu", "--max-steps", "4"))
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["val_loss"] > 0
    ckpt = root / "run" / "checkpoint"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists()
    return {"root": root, "tok": root / "tok", "data": root / "data", "run": root / "run", "ckpt": ckpt}


def steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------------------------------------- dispatcher, help


def test_top_level_help_version_and_unknown_command():
    p = ok(mimoflash())
    from mimoflash.cli import COMMANDS
    for cmd in COMMANDS:
        assert re.search(rf"^  {re.escape(cmd)}\s", p.stdout, re.M), p.stdout
    assert ok(mimoflash("--help")).stdout == p.stdout
    from mimoflash import __version__
    assert ok(mimoflash("--version")).stdout.strip() == f"mimoflash {__version__}"
    refused(mimoflash("genrate", "x"), 2, "unknown command 'genrate'")


def _option_entries(help_text: str) -> dict[str, str]:
    """argparse help -> {"--flag": its help text, without the metavar}. argparse puts the help after two or more
    spaces on the option's line, or on the indented lines below it."""
    entries, cur = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (?:-\w, )?(--[\w-]+)(.*)$", line)
        if m:
            cur = m[1]
            parts = re.split(r"\s{2,}", m[2], maxsplit=1)            # [metavar, help] or [metavar]
            entries[cur] = parts[1].strip() if len(parts) > 1 else ""
        elif cur and line.startswith(" " * 10):
            entries[cur] = (entries[cur] + " " + line.strip()).strip()
        else:
            cur = None
    return entries


COMMANDS = ["generate", "chat", "inspect", "train", "train-tokenizer", "prepare-data"]


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """`mimoflash CMD --help` of every command, run once."""
    return {cmd: ok(mimoflash(cmd, "--help")).stdout for cmd in COMMANDS}


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(helps, cmd):
    assert helps[cmd].startswith(f"usage: mimoflash {cmd}"), helps[cmd][:200]


@pytest.mark.parametrize("cmd", ["generate", "chat", "inspect", "train"])
def test_help_gives_every_option_a_text_and_at_most_one_default(helps, cmd):
    entries = _option_entries(helps[cmd])
    assert "--model" in entries or cmd in ("inspect", "train")
    for flag, text in entries.items():
        assert text, f"{cmd} {flag} has no help text"
        assert text.count("default:") <= 1, f"{cmd} {flag} states its default twice: {text}"
        assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text, \
            f"{cmd} {flag}: {text}"
    if cmd in ("generate", "chat"):
        for flag in ("--max-tokens", "--top-k", "--seed", "--device", "--max-model-len"):
            assert "default" in entries[flag], f"{flag} does not say its default: {entries[flag]}"
        assert "kept by default" in entries["--no-weight-panels"]


def test_exit_code_of_non_int_results_is_zero():
    from mimoflash.cli import exit_code
    assert exit_code({"step": 3}) == 0 and exit_code(None) == 0 and exit_code(3) == 3 and exit_code(0) == 0


# ---------------------------------------------------------------------------------------------- train


def test_train_refuses_an_existing_run_unless_resume_or_overwrite(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run["run"], out)
    base = ["train", "--config", "tiny", "--data", str(run["data"]), "--out", str(out), "--no-progress",
            "--device", "cpu"]
    before = (out / "metrics.jsonl").read_text()
    refused(mimoflash(*base, "--max-steps", "2"), 2, "already holds a run", "--resume", "--overwrite")
    assert (out / "metrics.jsonl").read_text() == before            # nothing was touched
    refused(mimoflash(*base, "--resume", "--overwrite"), 2, "give one")
    ok(mimoflash(*base, "--max-steps", "6", "--resume"))
    assert steps(out) == [1, 2, 3, 4, 5, 6]                          # continued from step 4
    (out / "notes.txt").write_text("mine")
    ok(mimoflash(*base, "--max-steps", "2", "--overwrite"))
    assert steps(out) == [1, 2] and (out / "notes.txt").read_text() == "mine"   # only the run's own files replaced


def test_train_exit_code_is_zero_for_zero_steps_and_only_mtp(run, tmp_path):
    p = ok(mimoflash("train", "--config", "tiny", "--data", str(run["data"]), "--out", str(tmp_path / "zero"),
                     "--no-progress", "--device", "cpu", "--max-steps", "0"))
    assert json.loads(p.stdout.strip().splitlines()[-1])["step"] == 0
    p = ok(mimoflash("train", "--config", "tiny", "--only-mtp", "--init", str(run["ckpt"]), "--data", str(run["data"]),
                     "--out", str(tmp_path / "mtp"), "--no-progress", "--device", "cpu", "--max-steps", "2",
                     "--acceptance-batches", "1"))
    assert "MTP acceptance after" in p.stdout


def test_train_ctrl_c_checkpoints_and_exits_zero(run, tmp_path):
    out = tmp_path / "long"
    e = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "mimoflash", "train", "--config", "tiny", "--data", str(run["data"]),
                             "--out", str(out), "--no-progress", "--device", "cpu", "--max-steps", "100000",
                             "--ckpt-every-steps", "2"], env=e, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "trainer_state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert b"Traceback" not in stderr and b"checkpoint saved, continue with --resume" in stderr
    assert json.loads(stdout.decode().strip().splitlines()[-1])["step"] == steps(out)[-1]


class _RunsCode:
    """Unpickling this calls os.system: what a tampered trainer_state.pt could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tampered_trainer_state_is_refused_not_executed(run, tmp_path):
    import torch

    from mimoflash.train.train import load_trainer_state
    out = tmp_path / "run"
    shutil.copytree(run["run"], out)
    state_file = out / "checkpoint" / "trainer_state.pt"
    good = load_trainer_state(state_file)                              # the real state loads safely
    assert good["step"] == 4 and "optimizer" in good
    marker = tmp_path / "pwned"
    torch.save({**good, "extra": _RunsCode(marker)}, state_file)
    refused(mimoflash("train", "--config", "tiny", "--data", str(run["data"]), "--out", str(out), "--no-progress",
                      "--device", "cpu", "--max-steps", "6", "--resume"), 1, "refused", str(state_file))
    with pytest.raises(ValueError, match="refused"):
        load_trainer_state(state_file)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- generate


def test_generate_text_json_and_seeds(run):
    m = str(run["ckpt"])
    p = ok(mimoflash("generate", "--model", m, "def f0_1(", "--max-tokens", "6", "--temperature", "0", "--echo"))
    assert p.stdout.startswith("def f0_1(") and len(p.stdout) > len("def f0_1(")
    assert re.search(r"\[\d+ prompt \+ 6 generated tokens \|", p.stderr), p.stderr
    assert "context limit" not in p.stderr                            # a cut by --max-tokens is not flagged
    common = ["generate", "--model", m, "def", "--max-tokens", "8", "--json", "--temperature", "1.0"]
    a, b = (json.loads(ok(mimoflash(*common)).stdout) for _ in range(2))
    assert isinstance(a["seed"], int) and a["seed"] != b["seed"]        # unseeded: a fresh seed per run
    again = json.loads(ok(mimoflash(*common, "--seed", str(a["seed"]), "--logprobs", "2")).stdout)
    assert again["seed"] == a["seed"] and again["outputs"][0]["token_ids"] == a["outputs"][0]["token_ids"]
    lp = again["outputs"][0]["logprobs"]
    assert len(lp) == len(a["outputs"][0]["token_ids"]) and all(len(e) >= 2 for e in lp)


def test_generate_refuses_bad_flags_in_one_line(run):
    m = str(run["ckpt"])
    for args, needle in [(["--threads", "0"], "--threads must be >= 1"), (["--threads", "-2"], "--threads"),
                         (["--logprobs", "2"], "--logprobs needs --json")]:
        err = refused(mimoflash("generate", "--model", m, "x", *args), 2, needle)
        assert len(err.strip().splitlines()) == 1, err
    refused(mimoflash("generate", "--model", m, "x", "--top-p", "0"), 1, "top_p")


def test_generate_non_utf8_prompt_is_replaced_with_a_notice(run):
    m = str(run["ckpt"])
    for args, stdin in [([b"def \xff\xfe(", "--json"], None), (["-", "--json"], b"def \xc3(x):\n")]:
        p = ok(mimoflash("generate", "--model", m, *args, "--max-tokens", "3", "--temperature", "0", input=stdin))
        assert "not valid UTF-8" in p.stderr and "\ufffd" in json.loads(p.stdout)["prompt"]


def test_generate_flags_a_cut_at_the_context_end(run):
    p = ok(mimoflash("generate", "--model", str(run["ckpt"]), "--token-ids", "5,6,7,8", "--max-model-len", "10",
                     "--max-tokens", "50", "--ignore-eos", "--temperature", "0", "--json"))
    out = json.loads(p.stdout)["outputs"][0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 6
    assert "stopped at the context limit" in p.stderr and "10-token context" in p.stderr


def test_without_tokenizer_text_prompts_and_chat_point_to_token_ids(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(run["ckpt"] / f, bare / f)
    refused(mimoflash("generate", "--model", str(bare), "hello"), 1, "no tokenizer", "--token-ids")
    refused(mimoflash("chat", "--model", str(bare), input=b"hi\n"), 1, "chat needs a tokenizer", "--token-ids")
    p = ok(mimoflash("generate", "--model", str(bare), "--token-ids", "1,2,3", "--max-tokens", "4", "--json"))
    assert len(json.loads(p.stdout)["outputs"][0]["token_ids"]) == 4


def test_mistyped_model_path_is_not_sent_to_the_hub(run, tmp_path):
    (tmp_path / "runs" / "small").mkdir(parents=True)
    err = refused(mimoflash("generate", "--model", "runs/smal", "x", cwd=tmp_path), 1,
                  "runs/smal: checkpoint directory does not exist", "did you mean runs/small?")
    assert "hub" not in err
    refused(mimoflash("generate", "--model", "nosuch-owner/nosuch-model", "x", cwd=tmp_path), 1,
            "nosuch-owner/nosuch-model: checkpoint directory does not exist",
            "not a downloadable hub repo id either")


# ---------------------------------------------------------------------------------------------- chat


def test_chat_session_survives_bad_bytes_long_messages_and_a_full_context(run):
    words = " ".join(["value"] * 12)
    script = b"\n".join([b"hello there", b"bad \xff byte", words.encode(), words.encode(), words.encode(),
                         (" ".join(["world"] * 300)).encode(), b"/system be brief", b"/reset", b"again", b"/exit"])
    p = ok(mimoflash("chat", "--model", str(run["ckpt"]), "--max-model-len", "64", "--max-tokens", "6",
                     "--temperature", "0", "--ignore-eos", input=script + b"\n"))
    err = p.stderr
    assert "/reset" in err                                            # the commands are announced
    assert "your message contained bytes that are not valid UTF-8" in err
    assert re.search(r"context full: dropped the \d+ oldest messages?", err), err
    assert "too long for the model's 64-token context" in err
    assert "(system prompt set)" in err and "(conversation cleared)" in err
    replies = re.findall(r"\[\d+ prompt \+ 6 generated tokens", err)
    assert len(replies) == 6, err                                      # every message but the over-long one


# ---------------------------------------------------------------------------------------------- inspect


def test_inspect_uses_the_models_own_context(run):
    cfg = json.loads((run["ckpt"] / "config.json").read_text())
    p = ok(mimoflash("inspect", str(run["ckpt"])))
    assert f"context {cfg['max_position_embeddings']} x batch 1" in p.stdout
    doc = json.loads(ok(mimoflash("inspect", str(run["ckpt"]), "--json")).stdout)
    assert doc["kv"]["context"] == cfg["max_position_embeddings"]
    doc = json.loads(ok(mimoflash("inspect", str(run["ckpt"]), "--json", "--context", "100")).stdout)
    assert doc["kv"]["context"] == 100


def test_inspect_names_a_truncated_file(run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(run["ckpt"] / "config.json", bad / "config.json")
    data = (run["ckpt"] / "model.safetensors").read_bytes()
    for cut, needle in [(100, "truncated safetensors header"), (5, "header length is missing")]:
        (bad / "model.safetensors").write_bytes(data[:cut])
        refused(mimoflash("inspect", str(bad)), 1, str(bad / "model.safetensors"), needle)
    refused(mimoflash("inspect", str(tmp_path / "nope")), 2, "does not exist")


# ---------------------------------------------------------------------------------------------- Python API


def test_tokenizer_says_what_is_wrong_with_undecodable_text(run):
    from mimoflash.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(run["tok"])
    bad = b"def \xff(".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode(bad)
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode_batch(["ok", bad])
