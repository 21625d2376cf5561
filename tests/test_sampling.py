"""SamplingParams validation and the sampler: greedy, the distributions temperature/top-k/top-p/min-p sample from
(statistically, 40k draws), penalties, seeds, logprobs."""

import math

import pytest
import torch

from mimoflash.engine.sampling import SampleRow, SamplingParams, apply_penalties, make_generator, sample

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"logprobs": -1}, "logprobs"), ({"seed": 1.5}, "seed"),
    ({"stop": [""]}, "stop"), ({"max_tokens": True}, "max_tokens"), ({"top_P": 0.9}, "top_P"),
    ({"max_new_tokens": 3}, "max_new_tokens"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict(kwargs)


def test_defaults_and_normalisation():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and p.top_k == 0 and p.max_tokens == 16 and p.temperature == 1.0
    assert SamplingParams(temperature=0).greedy and not p.needs_penalties
    with pytest.raises(ValueError, match="keyword"):
        SamplingParams(0.5)


def draw(params, n=40_000, logits=LOGITS, seed=0):
    """n samples from one row, drawn as n identical rows sharing one generator."""
    g = make_generator(seed)
    rows = [SampleRow(params, g)] * n
    toks = sample(logits.expand(n, -1).clone(), rows).token_ids
    return torch.bincount(torch.tensor(toks), minlength=logits.numel()).double() / n


def expected(logits, keep):
    p = torch.zeros_like(logits, dtype=torch.double)
    p[keep] = torch.softmax(logits[keep].double(), 0)
    return p


def assert_close_dist(freq, p, n=40_000):
    # 5 standard errors per bucket: fails by chance with probability << 1e-4
    tol = 5 * torch.sqrt(p * (1 - p) / n) + 1e-9
    assert torch.all((freq - p).abs() <= tol), (freq, p)
    assert torch.all(freq[p == 0] == 0), "sampled a token that should have been filtered out"


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_distribution(temperature):
    assert_close_dist(draw(SamplingParams(temperature=temperature)), expected(LOGITS / temperature, slice(None)))


def test_top_k_distribution():
    assert_close_dist(draw(SamplingParams(temperature=0.8, top_k=3)), expected(LOGITS / 0.8, slice(0, 3)))


def test_top_p_distribution():
    p = torch.softmax(LOGITS.double(), 0)               # 0.41, 0.25, 0.15, 0.09, ...
    cum = p.cumsum(0)
    k = int((cum < 0.8).sum()) + 1                      # smallest prefix with mass >= 0.8
    assert cum[k - 2] < 0.8 <= cum[k - 1]
    assert_close_dist(draw(SamplingParams(top_p=0.8)), expected(LOGITS, slice(0, k)))


def test_min_p_and_combination():
    p = torch.softmax(LOGITS.double(), 0)
    keep = p >= 0.3 * p.max()
    assert_close_dist(draw(SamplingParams(min_p=0.3)), expected(LOGITS, keep))
    # top_k then top_p: top-4 renormalised (0.455, 0.276, 0.167, 0.102) -> 2 tokens reach 0.73 >= top_p=0.7
    assert_close_dist(draw(SamplingParams(top_k=4, top_p=0.7)), expected(LOGITS, slice(0, 2)))


def test_greedy_is_argmax_and_ignores_randomness():
    lg = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    res = sample(lg, [SampleRow(SamplingParams(temperature=0), None)] * 5)
    assert res.token_ids == lg.argmax(-1).tolist()


def test_same_seed_same_tokens_regardless_of_batch():
    lg = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    alone = [sample(lg[2:3], [SampleRow(p, make_generator(42))]).token_ids[0] for _ in range(1)]
    g = make_generator(42)
    others = [SampleRow(SamplingParams(temperature=0.7), make_generator(i)) for i in range(6)]
    rows = others[:2] + [SampleRow(p, g)] + others[3:]
    batch = sample(lg, rows).token_ids
    assert batch[2] == alone[0]
    # and a sequence of draws matches too
    g1, g2 = make_generator(7), make_generator(7)
    seq1 = [sample(lg[:1], [SampleRow(p, g1)]).token_ids[0] for _ in range(20)]
    seq2 = [sample(lg[[3, 0]], [SampleRow(SamplingParams(), None), SampleRow(p, g2)]).token_ids[1] for _ in range(20)]
    assert seq1 == seq2 and len(set(seq1)) > 1


def test_penalties():
    lg = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    row = SampleRow(SamplingParams(repetition_penalty=2.0), None, prompt_token_ids=[0], output_token_ids=[1, 1])
    out = apply_penalties(lg.clone(), [row])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5, 3.0]]
    row = SampleRow(SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), None, [0], [1, 1, 3])
    out = apply_penalties(lg.clone(), [row])
    assert out.tolist() == [[2.0, -4.0, 1.0, -1.0, 3.0]]         # prompt tokens are not output tokens
    # greedy rows honour penalties too
    res = sample(lg, [SampleRow(SamplingParams(temperature=0, frequency_penalty=2.0), None, [], [4, 4])])
    assert res.token_ids == [0]


def test_logprobs_are_raw_model_logprobs_with_rank():
    lg = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    res = sample(lg, [SampleRow(SamplingParams(temperature=0, logprobs=2, repetition_penalty=2.0), None, [1], [])])
    lp = torch.log_softmax(lg[0], 0)
    chosen, rank, top = res.logprobs[0]
    assert res.token_ids == [3]                                  # the penalty moved the choice ...
    assert math.isclose(chosen, float(lp[3]), rel_tol=1e-6) and rank == 2   # ... but not the reported logprobs
    assert [t for t, _ in top] == [1, 3] and math.isclose(top[0][1], float(lp[1]), rel_tol=1e-6)
    assert sample(lg, [SampleRow(SamplingParams(), None)]).logprobs == [None]
