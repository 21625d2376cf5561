"""Shared fixtures: tiny MiMo configs that exercise the hybrid pattern, sinks, MoE routing and MTP (docs/MODEL.md §7)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from mimoflash.config import MiMoConfig
from mimoflash.model.mimo import MiMoForCausalLM

# Tiny test matmuls gain nothing from a second thread, and on a shared, busy CPU an OpenMP barrier waiting for a
# descheduled thread made engine tests ~100x slower (0.14 s vs 22 s for one generate call).
torch.set_num_threads(1)


def tiny_config(**overrides) -> MiMoConfig:
    """docs/MODEL.md §7.1 tiny config: 8 layers [GA, SWA x4, GA, SWA x2], layer 0 dense, 8 experts top-2, window 4."""
    base = dict(vocab_size=512, hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1,
                head_dim=48, v_head_dim=32, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=48,
                swa_v_head_dim=32, intermediate_size=256, moe_intermediate_size=64, n_routed_experts=8,
                num_experts_per_tok=2, sliding_window_size=4, max_position_embeddings=512,
                num_nextn_predict_layers=1, torch_dtype="float32")
    base.update(overrides)
    return MiMoConfig(**base)


@torch.no_grad()
def make_model(config: MiMoConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> MiMoForCausalLM:
    """Random model whose routing is not near-tied (docs/MODEL.md §7.2): router ~ N(0,1), sinks ~ N(0,1), bias ~ N(0,0.1)."""
    g = torch.Generator().manual_seed(seed)
    model = MiMoForCausalLM(config)
    model.init_weights(std=0.05, generator=g)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight") or name.endswith("attention_sink_bias"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.cast(dtype).eval()


@pytest.fixture
def tiny_cfg() -> MiMoConfig:
    return tiny_config()


@pytest.fixture
def tiny_model(tiny_cfg) -> MiMoForCausalLM:
    return make_model(tiny_cfg)


@contextlib.contextmanager
def kernel_threads(n: int):
    """The kernels' thread pool at n threads for a block, back to 1 (the tests' default) after."""
    from mimoflash import kernels
    kernels.set_num_threads(n)
    try:
        yield
    finally:
        kernels.set_num_threads(1)


def run_portable(test_file: str, select: str) -> None:
    """Runs the tests of test_file matching `-k select` in a child pytest with MIMOFLASH_KERNELS_PORTABLE=1 (the
    kernels' portable C loops, what a machine without AVX2 runs); fails with the child's output if they fail."""
    env = dict(os.environ, MIMOFLASH_KERNELS_PORTABLE="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k", select],
                       env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
