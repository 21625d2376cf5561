"""Data pipeline: prepare_data files and split, target alignment and masking, sampler determinism."""

import json
import random

import numpy as np
import pytest
import torch

from mimoflash.tokenizer import Tokenizer
from mimoflash.train.data import IGNORE_INDEX, TokenDataset, collect_files, main as prepare_main, prepare_data
from mimoflash.train.tokenizer_train import train_tokenizer


def write_docs(root, n_docs, seed=0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "δέλτα", "缓存", "🙂", "return", "x = 1"]
    paths = []
    for i in range(n_docs):
        # Each document is unique (its index is in it) so the split can be checked by content.
        text = f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "\n"
        p = root / f"d{i:03d}.txt"
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "docs").mkdir()
    files = write_docs(root / "docs", 40)
    train_tokenizer(files, root / "tok", vocab_size=350, progress=False)
    return root, files


def split_docs(tok, path, sep):
    ids = np.fromfile(path, dtype=np.uint16).tolist()
    assert not ids or ids[-1] == sep
    docs, cur = [], []
    for i in ids:
        if i == sep:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


def test_prepare_data_counts_and_disjoint_split(corpus, tmp_path):
    root, files = corpus
    meta = prepare_data(files, root / "tok", tmp_path / "out", val_fraction=0.1, seed=3, progress=False)
    tok = Tokenizer.from_dir(root / "tok")
    sep = tok.token_to_id("<|endoftext|>")
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["separator_id"] == sep == 0 and meta["vocab_size"] == tok.vocab_size
    assert (meta["train"]["docs"], meta["val"]["docs"]) == (36, 4)

    texts = {p.read_text(encoding="utf-8") for p in files}
    train = split_docs(tok, tmp_path / "out" / "train.bin", sep)
    val = split_docs(tok, tmp_path / "out" / "val.bin", sep)
    assert len(train) == 36 and len(val) == 4
    assert set(train) | set(val) == texts and not set(train) & set(val)  # whole documents, disjoint
    for split, docs in (("train", train), ("val", val)):
        assert meta[split]["tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)
        assert (tmp_path / "out" / f"{split}.bin").stat().st_size == 2 * meta[split]["tokens"]

    # Same seed -> same bytes; another seed -> another split.
    prepare_data(files, root / "tok", tmp_path / "again", val_fraction=0.1, seed=3, progress=False)
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "again" / f).read_bytes()
    prepare_data(files, root / "tok", tmp_path / "other", val_fraction=0.1, seed=4, progress=False)
    assert set(split_docs(tok, tmp_path / "other" / "val.bin", sep)) != set(val)


def test_prepare_cli_skips_and_errors(corpus, tmp_path, capsys):
    root, _ = corpus
    (tmp_path / "in" / ".git").mkdir(parents=True)
    write_docs(tmp_path / "in", 5)
    (tmp_path / "in" / ".git" / "HEAD.txt").write_text("ref: hidden")
    (tmp_path / "in" / "bin.txt").write_bytes(b"\x00abc")
    (tmp_path / "in" / "empty.txt").write_text("  \n")
    assert len(collect_files([tmp_path / "in"], "*.txt")) == 7  # hidden dir excluded
    argv = ["--input", str(tmp_path / "in"), "--glob", "*.txt", "--tokenizer", str(root / "tok"),
            "--out", str(tmp_path / "out"), "--val-fraction", "0.2"]
    assert prepare_main(argv) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped_files"] == {"binary": 1, "empty": 1}
    assert (meta["train"]["docs"], meta["val"]["docs"]) == (4, 1)
    assert "train: 4 docs" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        collect_files([tmp_path / "missing"])
    with pytest.raises(ValueError, match="no input files"):
        prepare_data([], root / "tok", tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="no training documents"):
        prepare_data([tmp_path / "in" / "bin.txt"], root / "tok", tmp_path / "x", progress=False)


def write_stream(d, tokens, sep=0, split="train"):
    np.asarray(tokens, dtype=np.uint16).tofile(d / f"{split}.bin")
    (d / "meta.json").write_text(json.dumps({"dtype": "uint16", "separator_id": sep}))


def test_targets_and_boundary_masking(tmp_path):
    #           0   1   2  3   4   5   6   7  8   9  10
    stream = [10, 11, 12, 0, 20, 21, 22, 23, 0, 30, 31]
    write_stream(tmp_path, stream)
    ds = TokenDataset(tmp_path, "train", seq_len=4, n_future=2)
    x, y = ds.batch_at([0, 4])
    assert x.dtype == y.dtype == torch.int64 and x.shape == (2, 4) and y.shape == (2, 3, 4)
    M = IGNORE_INDEX
    assert x.tolist() == [[10, 11, 12, 0], [20, 21, 22, 23]]
    # Row 0: main target (never masked; the separator is a valid target). Rows 1, 2: MTP heads, masked when a
    # separator lies strictly between the input position and the target.
    assert y[0].tolist() == [
        [11, 12, 0, 20],
        [12, 0, M, 21],
        [0, M, M, 22],
    ]
    assert y[1].tolist() == [
        [21, 22, 23, 0],
        [22, 23, 0, M],
        [23, 0, M, M],
    ]
    # A window needs 4 + 1 + 2 = 7 tokens, so starts 0..4 are the valid ones.
    with pytest.raises(IndexError):
        ds.batch_at([5])
    # Without MTP heads there is one target row, equal to the shifted input.
    ds0 = TokenDataset(tmp_path, "train", seq_len=4, n_future=0)
    x0, y0 = ds0.batch_at([2])
    assert y0.tolist() == [[stream[3:7]]]


def test_get_batch_deterministic_and_resumable(tmp_path):
    write_stream(tmp_path, np.arange(1, 500) % 97)
    ds = TokenDataset(tmp_path, "train", seq_len=16, n_future=1)
    g1, g2 = torch.Generator().manual_seed(123), torch.Generator().manual_seed(123)
    a, b = ds.get_batch(8, g1), ds.get_batch(8, g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    state = g1.get_state()
    nxt = ds.get_batch(8, g1)
    g3 = torch.Generator()
    g3.set_state(state)  # what a resumed run does
    again = ds.get_batch(8, g3)
    assert torch.equal(nxt[0], again[0]) and torch.equal(nxt[1], again[1])
    assert not torch.equal(a[0], nxt[0])
    # Every window is contiguous in the stream, and the main target is the input shifted by one.
    assert torch.equal(a[1][:, 0, :-1], a[0][:, 1:])


def test_eval_batches_sequential(tmp_path):
    write_stream(tmp_path, list(range(1, 42)), split="val")  # 41 tokens, no separators
    ds = TokenDataset(tmp_path, "val", seq_len=8, n_future=1)
    batches = list(ds.iter_eval_batches(batch_size=2))
    # (41 - 1 - 1) // 8 = 4 windows -> two batches of two.
    assert [x.shape[0] for x, _ in batches] == [2, 2]
    assert batches[0][0][1].tolist() == list(range(9, 17))
    assert batches[1][1][1, 1].tolist() == list(range(27, 35))  # MTP target of window 3
    assert len(list(ds.iter_eval_batches(batch_size=1, max_batches=3))) == 3
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenDataset(tmp_path, "val", seq_len=40, n_future=1)
    with pytest.raises(FileNotFoundError):
        TokenDataset(tmp_path, "train", seq_len=4)
