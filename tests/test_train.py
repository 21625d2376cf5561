"""Trainer: losses fall, aux-loss-free balancing balances, resume after SIGKILL is exact, 2 ranks = 1 rank,
and the shipped default model loads and reproduces its model card's held-out loss."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mimoflash.config import MiMoConfig
from mimoflash.model.mimo import MiMoForCausalLM
from mimoflash.model.moe import Router
from mimoflash.train.balance import imbalance, update_expert_bias
from mimoflash.train.data import IGNORE_INDEX, TokenDataset
from mimoflash.train.train import (TrainConfig, find_checkpoint, load_config, lr_at, mtp_ahead_ids, step_losses,
                                   train)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "mimoflash" / "default_model"


def write_token_dir(root: Path, vocab: int = 512, n_train: int = 20000, n_val: int = 2000, seed: int = 0) -> Path:
    """A learnable synthetic corpus: documents of a noisy affine sequence (t+1 = 3t+7 mod V, sometimes random),
    separated by token 0, in prepare_data's layout."""
    rng = np.random.default_rng(seed)

    def stream(n):
        out = []
        while len(out) < n:
            t = int(rng.integers(1, vocab))
            for _ in range(int(rng.integers(20, 120))):
                out.append(t)
                t = int(rng.integers(1, vocab)) if rng.random() < 0.1 else (3 * t + 7) % (vocab - 1) + 1
            out.append(0)
        return np.asarray(out[:n], dtype=np.uint16)

    root.mkdir(parents=True, exist_ok=True)
    stream(n_train).tofile(root / "train.bin")
    stream(n_val).tofile(root / "val.bin")
    meta = {"dtype": "uint16", "vocab_size": vocab, "separator_id": 0, "separator_token": "<|endoftext|>",
            "train": {"file": "train.bin", "tokens": n_train}, "val": {"file": "val.bin", "tokens": n_val}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread, and on a shared 2-core machine OpenMP's spinning
    threads make small ops 100x slower when the cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_token_dir(tmp_path_factory.mktemp("tokens"))


def tiny() -> tuple[MiMoConfig, TrainConfig]:
    return load_config("tiny")


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55) and lr_at(cfg, 110) == pytest.approx(0.1)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(10, 120))


def test_mtp_ahead_ids_are_the_tokens_depth_plus_one_ahead(data_dir):
    ds = TokenDataset(data_dir, "train", seq_len=16, n_future=2)
    start = 1234
    inp, tgt = ds.batch_at([start])
    raw = torch.from_numpy(np.asarray(ds.tokens[start:start + 16 + 3], dtype=np.int64))
    for d in range(2):
        ahead = mtp_ahead_ids(tgt, d, fill_id=0)[0]
        want = raw[d + 1: d + 17]
        # equal wherever the depth's own target is defined (elsewhere any id is allowed)
        keep = tgt[0, d + 1] != IGNORE_INDEX
        assert torch.equal(ahead[keep], want[keep])


def test_tiny_model_overfits_one_batch(data_dir):
    mcfg, cfg = tiny()
    torch.manual_seed(0)
    model = MiMoForCausalLM(mcfg)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    ds = TokenDataset(data_dir, "train", 32, mcfg.num_nextn_predict_layers)
    inp, tgt = ds.get_batch(4, torch.Generator().manual_seed(0))
    n_valid = (tgt != IGNORE_INDEX).sum(dim=(0, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    first = last = None
    for _ in range(60):
        main, mtp, _ = step_losses(model, inp, tgt, n_valid, mcfg.num_nextn_predict_layers, 0)
        (main + 0.3 * sum(mtp)).backward()
        opt.step()
        opt.zero_grad()
        vals = [main.item()] + [x.item() for x in mtp]
        first = first or vals
        last = vals
    assert len(last) == 3
    for a, b in zip(first, last):
        assert b < 0.5 * a, (first, last)


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    cfg = load_config("tiny")[0]
    router = Router(cfg)
    E, D = cfg.n_routed_experts, cfg.hidden_size
    with torch.no_grad():
        router.weight.normal_(0, 0.05)
        router.weight[:2] += 0.3           # experts 0 and 1 win for almost every token
    x = torch.randn(512, D) + 1.0
    loads = []
    for _ in range(300):
        idx, _, _ = router(x)
        counts = torch.bincount(idx.reshape(-1), minlength=E).double()
        loads.append(imbalance(counts[None]))
        update_expert_bias([router], counts[None], rate=0.01)
    # Skewed to start with (4.0 = everything on two experts), much closer to uniform (1.0) after balancing. The
    # toy tokens all have similar score profiles, so a fixed-step sign update settles around 1.65, not 1.0.
    assert loads[0] > 3.5, loads[0]
    assert max(loads[-50:]) < 2.0, loads[-50:]
    # selection only: the gating weights still come from the unbiased scores
    idx, w, scores = router(x)
    assert torch.allclose(w, scores.gather(1, idx) / scores.gather(1, idx).sum(-1, keepdim=True))


def test_grad_accumulation_matches_one_big_batch(data_dir, tmp_path):
    """batch 8 x 1 micro-step == batch 4 x 2 micro-steps (same rows: the generator draws them in order). The MTP
    weights are 0 because MTP targets near document ends are masked, so per-micro-batch normalisation differs."""
    runs = {}
    for bs, accum in ((8, 1), (4, 2)):
        mcfg, cfg = tiny()
        cfg.batch_size, cfg.grad_accum, cfg.max_steps, cfg.eval_every, cfg.ckpt_every_min = bs, accum, 4, 0, 0
        cfg.mtp_weights = [0.0]
        train(mcfg, cfg, data_dir, tmp_path / f"b{bs}", device="cpu", progress=False)
        runs[bs] = metrics(tmp_path / f"b{bs}")
    for a, b in zip(runs[8], runs[4]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["imbalance"] == pytest.approx(b["imbalance"])


def _cli(data_dir, out, *extra):
    return [sys.executable, "-m", "mimoflash.train.train", "--config", "tiny", "--data", str(data_dir),
            "--out", str(out), "--no-progress", "--device", "cpu", *extra]


def test_resume_after_sigkill_is_exact(data_dir, tmp_path):
    """A run killed with SIGKILL after a checkpoint and resumed reaches the same losses as an uninterrupted run."""
    common = ["--max-steps", "100000", "--ckpt-every-steps", "5", "--eval-every", "0", "--seq-aux-coef", "1e-3"]
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cli(data_dir, killed, *common), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = killed / "checkpoint" / "trainer_state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = find_checkpoint(killed)     # a kill between the two renames leaves checkpoint.old
    assert ckpt is not None, proc.stderr.read().decode()[-2000:]
    ckpt_step = torch.load(ckpt / "trainer_state.pt", weights_only=False)["step"]
    stop = ckpt_step + 6
    subprocess.run(_cli(data_dir, killed, *common, "--resume", "--stop-step", str(stop)), env=env, cwd=REPO,
                   check=True, capture_output=True)

    mcfg, cfg = tiny()
    cfg.max_steps, cfg.ckpt_every_steps, cfg.eval_every, cfg.seq_aux_coef = 100000, 0, 0, 1e-3
    train(mcfg, cfg, data_dir, tmp_path / "straight", stop_step=stop, device="cpu", progress=False)
    a, b = metrics(killed), metrics(tmp_path / "straight")
    assert [r["step"] for r in a] == list(range(1, stop + 1))
    for ra, rb in zip(a[ckpt_step:], b[ckpt_step:]):
        assert ra["loss"] == rb["loss"] and ra["mtp_loss"] == rb["mtp_loss"], (ra, rb)
    assert a[-1]["loss"] == b[-1]["loss"]


def test_sigterm_stops_after_the_step_with_a_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(data_dir, out, "--max-steps", "100000", "--ckpt-every-steps", "5", "--eval-every",
                                 "0"), env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while find_checkpoint(out) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == metrics(out)[-1]["step"] and 0 < state["step"] < 100000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(data_dir, tmp_path):
    # mtp_fraction 0.5 also checks that the MTP row subset is the same global rows in both layouts
    steps = ["--max-steps", "6", "--eval-every", "3", "--ckpt-every-steps", "0", "--ckpt-every-min", "0",
             "--mtp-fraction", "0.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "mimoflash.train.train", "--config", "tiny", "--data",
           str(data_dir), "--out", str(tmp_path / "ddp"), "--no-progress", "--device", "cpu", *steps]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    mcfg, cfg = tiny()
    cfg.max_steps, cfg.eval_every, cfg.ckpt_every_min, cfg.mtp_fraction = 6, 3, 0, 0.5
    single = train(mcfg, cfg, data_dir, tmp_path / "single", device="cpu", progress=False)
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "single")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-5)
        assert ra["mtp_loss"] == pytest.approx(rb["mtp_loss"], rel=1e-4, abs=1e-5)
        assert ra["imbalance"] == pytest.approx(rb["imbalance"], rel=1e-6)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], rel=1e-4)
    # the expert biases (moved by all-reduced loads) agree too
    from mimoflash.checkpoint.loader import load_model
    ddp_model = load_model(tmp_path / "ddp" / "checkpoint", torch.float32, "cpu")
    for (n, x), (_, y) in zip(ddp_model.named_buffers(), single["model"].named_buffers()):
        if n.endswith("e_score_correction_bias"):
            assert torch.allclose(x, y, atol=1e-7), n


def test_only_mtp_trains_heads_and_freezes_the_main_model(data_dir, tmp_path):
    mcfg, cfg = tiny()
    cfg.max_steps, cfg.eval_every, cfg.ckpt_every_min = 8, 0, 0
    base = train(mcfg, cfg, data_dir, tmp_path / "base", device="cpu", progress=False)["model"]
    from mimoflash.train.train import main
    summary = main(["--config", "tiny", "--only-mtp", "--init", str(tmp_path / "base" / "checkpoint"),
                    "--data", str(data_dir), "--out", str(tmp_path / "mtp"), "--max-steps", "30", "--lr", "3e-3",
                    "--no-progress", "--device", "cpu", "--ckpt-every-min", "0", "--eval-every", "0",
                    "--acceptance-batches", "2"])
    from mimoflash.checkpoint.loader import load_model
    after = load_model(tmp_path / "mtp" / "checkpoint", torch.float32, "cpu")
    for (n, p), (_, q) in zip(base.state_dict().items(), after.state_dict().items()):
        if n.startswith("model.mtp."):
            continue
        assert torch.equal(p, q), f"{n} changed under --only-mtp"
    before_acc, after_acc = summary["acceptance_before"], summary["acceptance_after"]
    assert len(after_acc["mtp_acc"]) == 2
    assert sum(after_acc["mtp_acc"]) > sum(before_acc["mtp_acc"])
    assert 1.0 <= after_acc["accept_length"] <= 3.0


def test_extend_window_appends_the_tokens_after_the_window(data_dir):
    from mimoflash.train.distill import extend_window
    ds = TokenDataset(data_dir, "train", 16, 3)
    starts = [0, 100, 4321]
    inp, tgt = ds.batch_at(starts)
    ext = extend_window(inp, tgt, 3, ds.separator_id)                                  # (B, 19)
    raw = torch.from_numpy(np.stack([np.asarray(ds.tokens[s:s + 19], dtype=np.int64) for s in starts]))
    # Equal up to a masked token (one after a document boundary), which is replaced by the separator id.
    differs = ext != raw
    assert not differs[:, :17].any()
    assert (ext[differs] == ds.separator_id).all()


def test_distill_loss_is_zero_only_when_the_head_matches_the_teacher():
    from mimoflash.train.distill import distill_loss
    g = torch.Generator().manual_seed(0)
    B, T, V, depth = 2, 6, 11, 1
    main_ext = torch.randn(B, T + 2, V, generator=g)
    targets = torch.randint(1, V, (B, 3, T), generator=g)
    targets[0, depth + 1, 2] = IGNORE_INDEX
    n_valid = (targets[:, depth + 1] != IGNORE_INDEX).sum()
    exact = main_ext[:, depth + 1: depth + 1 + T].clone()
    assert float(distill_loss(exact, main_ext, depth, targets, n_valid)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(exact + 0.0 * exact + torch.randn(B, T, V, generator=g), main_ext, depth, targets,
                              n_valid)) > 0.01
    # The masked position does not count: changing the head's logits there leaves the loss unchanged.
    moved = exact.clone()
    moved[0, 2] += 5.0 * torch.randn(V, generator=g)
    assert float(distill_loss(moved, main_ext, depth, targets, n_valid)) == pytest.approx(0.0, abs=1e-6)


def test_grow_mtp_heads_keeps_every_weight_and_copies_the_last_head():
    from mimoflash.train.distill import grow_mtp_heads
    mcfg, _ = tiny()
    model = MiMoForCausalLM(mcfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    grown = grow_mtp_heads(model, 3, "copy")
    old, new = model.state_dict(), grown.state_dict()
    assert grown.config.num_nextn_predict_layers == 3
    assert all(torch.equal(old[k], new[k]) for k in old)
    for k, t in old.items():
        if k.startswith("model.mtp.layers.1."):
            assert torch.equal(new[k.replace("layers.1.", "layers.2.")], t)
    fresh = grow_mtp_heads(model, 3, "fresh")
    assert not torch.equal(fresh.state_dict()["model.mtp.layers.2.eh_proj.weight"], old["model.mtp.layers.1.eh_proj.weight"])
    with pytest.raises(ValueError, match="shrinking"):
        grow_mtp_heads(model, 1)


def test_distill_cli_lowers_the_kl_grows_heads_and_freezes_the_main_model(data_dir, tmp_path):
    """`mimoflash train --only-mtp --distill --mtp-heads 3` as a user runs it: exit 0, 3 MTP heads, the logged
    distillation loss (KL to the main model) falls, the main model is bit-identical, and acceptance against the
    main model's own greedy tokens rises."""
    mcfg, cfg = tiny()
    cfg.max_steps, cfg.eval_every, cfg.ckpt_every_min = 8, 0, 0
    base = train(mcfg, cfg, data_dir, tmp_path / "base", device="cpu", progress=False)["model"]
    out = tmp_path / "distill"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "mimoflash", "train", "--config", "tiny", "--only-mtp", "--distill",
                        "--mtp-heads", "3", "--init", str(tmp_path / "base" / "checkpoint"), "--data", str(data_dir),
                        "--out", str(out), "--max-steps", "40", "--lr", "3e-3", "--no-progress", "--device", "cpu",
                        "--ckpt-every-min", "0", "--eval-every", "0", "--acceptance-batches", "2"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [m for m in metrics(out) if "mtp_loss" in m]
    assert len(recs[0]["mtp_loss"]) == 3
    first = np.mean([m["mtp_loss"] for m in recs[:5]], axis=0)
    last = np.mean([m["mtp_loss"] for m in recs[-5:]], axis=0)
    assert (last < 0.8 * first).all(), (first, last)
    from mimoflash.checkpoint.loader import load_model
    after = load_model(out / "checkpoint", torch.float32, "cpu")
    assert after.config.num_nextn_predict_layers == 3
    new = after.state_dict()
    for n, p in base.state_dict().items():
        if not n.startswith("model.mtp."):
            assert torch.equal(p, new[n]), f"{n} changed under --only-mtp --distill"
    acc = json.loads((out / "mtp_acceptance.json").read_text())
    assert len(acc["after"]["mtp_acc_model"]) == 3
    assert sum(acc["after"]["mtp_acc_model"]) > sum(acc["before"]["mtp_acc_model"])
    assert json.loads((out / "train_config.json").read_text())["train"]["distill"] is True


def test_distill_without_only_mtp_is_a_usage_error(data_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mimoflash", "train", "--config", "tiny", "--distill", "--data",
                        str(data_dir), "--out", str(tmp_path / "x"), "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--distill needs --only-mtp" in r.stderr
    assert "Traceback" not in r.stderr


def test_replay_cycle_counts_tokens_per_verify_step():
    from mimoflash.train.evaluate import _replay_cycle
    # positions 0..5; depth hits per position (2 depths)
    hits = torch.tensor([[1, 1], [0, 0], [0, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    # start 0: run 2 -> emit 3, jump to 3: run 1 -> emit 2, jump to 5: run 2 -> emit 3; 8 tokens in 3 steps
    assert _replay_cycle(hits, 0, 2) == (8, 3)
    # one draft: 0: 2 tokens -> 2: 1 -> 3: 2 -> 5: 2; 7 tokens in 4 steps
    assert _replay_cycle(hits, 0, 1) == (7, 4)


def test_greedy_acceptance_scores_the_models_own_continuation(data_dir):
    from mimoflash.train.evaluate import greedy_acceptance, mtp_acceptance
    mcfg, cfg = tiny()
    model = MiMoForCausalLM(mcfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    g = greedy_acceptance(model, TokenDataset(data_dir, "val", 32, 2), n_prompts=4, prompt_len=8, new_tokens=12)
    assert g["main_acc"] == pytest.approx(1.0)         # the continuation is the main model's own greedy output
    assert len(g["mtp_acc"]) == 2 and all(1.0 <= t <= 1.0 + k for k, t in enumerate(g["tokens_per_step"], 1))
    a = mtp_acceptance(model, TokenDataset(data_dir, "val", 32, 2), 4, 2)
    assert 1.0 <= a["accept_length_model"] <= 3.0 and len(a["mtp_acc_model"]) == 2


def test_heldout_acceptance_equals_mtp_acceptance_on_the_same_windows(data_dir):
    from mimoflash.train.evaluate import heldout_acceptance, mtp_acceptance
    mcfg, _ = tiny()
    model = MiMoForCausalLM(mcfg)
    model.init_weights(generator=torch.Generator().manual_seed(1))
    ds = TokenDataset(data_dir, "val", 32, 2)
    tokens = torch.from_numpy(np.asarray(ds.tokens[:6 * 32 + 3], dtype=np.int64))     # 6 windows + targets
    assert heldout_acceptance(model, tokens, 32, ds.separator_id) == mtp_acceptance(model, ds, 6, 1)


# ----------------------------------------------------------------------------------------- the shipped model

needs_default = pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists(),
                                   reason="mimoflash/default_model/ has not been exported yet "
                                          "(scripts/train_default_model.sh)")


@needs_default
def test_default_model_reproduces_card_heldout_loss():
    from mimoflash.checkpoint.loader import load_model
    from mimoflash.default import default_model
    from mimoflash.train.evaluate import heldout_loss, read_tokens

    card = json.loads((DEFAULT_MODEL / "heldout.json").read_text())
    model = load_model(default_model(), torch.float32, "cpu")
    assert 10e6 <= sum(p.numel() for p in model.parameters()) <= 40e6
    tokens = read_tokens(DEFAULT_MODEL / card["file"], card["dtype"])
    assert len(tokens) == card["tokens"]
    loss = heldout_loss(model, tokens, card["seq_len"])
    assert loss == pytest.approx(card["loss"], rel=0.01)
    assert f"{card['loss']:.3f}" in (DEFAULT_MODEL / "README.md").read_text()


@needs_default
def test_default_model_has_three_mtp_heads_with_the_cards_acceptance():
    """The shipped MTP heads are the measured ones (heldout.json's acceptance is recomputed), and the card describes
    its corpus without any path of the machine it was trained on."""
    from mimoflash.checkpoint.loader import load_model
    from mimoflash.train.evaluate import heldout_acceptance, read_tokens

    card = json.loads((DEFAULT_MODEL / "heldout.json").read_text())
    model = load_model(DEFAULT_MODEL, torch.float32, "cpu")
    assert model.config.num_nextn_predict_layers == 3
    acc = heldout_acceptance(model, read_tokens(DEFAULT_MODEL / card["file"], card["dtype"]), card["seq_len"],
                             card["separator_id"])
    for key in ("mtp_acc", "mtp_acc_model"):
        assert len(acc[key]) == 3
        assert acc[key] == pytest.approx(card["mtp_acceptance"][key], abs=2e-3), key
    text = (DEFAULT_MODEL / "README.md").read_text()
    assert "PSF" in text and "3 heads" in text
    for root in ("/root/", "/home/", "/work/", "/tmp/", "/usr/", ".pyenv"):
        assert root not in text, root
        assert root not in (DEFAULT_MODEL / "training_metrics.json").read_text(), root


@needs_default
def test_default_model_logits_match_transformers():
    transformers = pytest.importorskip("transformers")
    from mimoflash.checkpoint.loader import load_model
    from mimoflash.train.evaluate import read_tokens

    ours = load_model(DEFAULT_MODEL, torch.float32, "cpu").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    tokens = read_tokens(DEFAULT_MODEL / "heldout.bin")
    ids = torch.stack([tokens[i * 300: i * 300 + 200] for i in range(2)])      # (2, 200): longer than the window
    with torch.no_grad():
        a = ours(ids)
        b = hf(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-3 * max(1.0, float(b.abs().max()))
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.999
