"""LLM.generate folds each request's deltas once, when it finishes: the outputs must be exactly those of folding
every step's deltas as they come (the engine driven by hand), for requests that finish at different steps, with
n > 1, logprobs, stop strings and text."""

import torch

from mimoflash.engine.llm import LLM, collect
from mimoflash.engine.sampling import SamplingParams
from tests.conftest import make_model, tiny_config
from tests.test_engine import ByteTokenizer


def _fields(out):
    return (out.request_id, out.prompt, out.prompt_token_ids, out.finished,
            [(o.index, o.text, o.token_ids, o.finish_reason, o.stop_reason, o.logprobs) for o in out.outputs])


def test_generate_equals_per_step_fold():
    model = make_model(tiny_config(), seed=11)
    g = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(0, 256, (n,), generator=g).tolist()} for n in (3, 9, 5, 12)]
    params = [SamplingParams(temperature=0, max_tokens=4),
              SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=11, logprobs=2),
              SamplingParams(temperature=0.8, seed=1, max_tokens=9, stop=["e", "a"], skip_special_tokens=False),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)]

    ours = LLM(model, ByteTokenizer(), max_num_seqs=4, block_size=4).generate(prompts, params, use_tqdm=False)

    ref_llm = LLM(model, ByteTokenizer(), max_num_seqs=4, block_size=4)
    gids = [ref_llm.engine.add_request(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]
    deltas: dict[str, list] = {g: [] for g in gids}
    finished_at = {}
    step = 0
    while ref_llm.engine.has_unfinished_requests():
        step += 1
        for d in ref_llm.engine.step():
            deltas[d.request_id].append(d)
            if d.finished:
                finished_at[d.request_id] = step
    ref = [collect(deltas[g]) for g in gids]

    assert len(set(finished_at.values())) > 1, "the requests should finish at different steps"
    assert [_fields(o) for o in ours] == [_fields(o) for o in ref]
    assert all(o.metrics is not None for o in ours)
    assert len(ours[1].outputs) == 2 and all(len(o.logprobs) == len(o.token_ids) for o in ours[1].outputs)
    assert all(o.text == ByteTokenizer().decode(o.token_ids, skip_special_tokens=True) for o in ours[3].outputs)
