"""The embedded engine's shared-prefill sampler (``TransformersEngine(share_prompt_prefill=True)``), which
``real-megatron compare``'s large final evaluation uses: one prefill per prompt, its KV cache repeated for
the prompt's samples, finished rows dropped from the batch.

It must sample from the same distribution as ``model.generate`` and record the same log-probs; it draws
other random numbers, so the checks are: greedy decoding gives ``generate``'s tokens exactly; every
recorded log-prob equals a teacher-forced forward pass over prompt + response; the first token's
frequencies over many samples match softmax(logits / T) and top-p never samples outside the nucleus.
"""
from __future__ import annotations

import pytest
import torch

from real_megatron.rollout.base import SamplingParams
from real_megatron.rollout.transformers_engine import TransformersEngine

EOS, PAD = 2, 0
TINY_QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 32, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "tie_word_embeddings": False, "initializer_range": 0.3}
PROMPTS = [[1, 3], [4, 5, 6, 7, 1], [3], [6, 6, 5, 1]]  # different lengths: every batch is left-padded


def engine(shared: bool, batch_size: int = 64) -> TransformersEngine:
    torch.manual_seed(0)  # the random init is the weights: both engines hold the same model
    return TransformersEngine(TINY_QWEN2, eos_token_id=EOS, pad_token_id=PAD, batch_size=batch_size,
                              share_prompt_prefill=shared)


@pytest.mark.parametrize("batch_size", [3, 8, 64])  # prompts split over chunks, and all in one
def test_greedy_tokens_equal_generate(batch_size):
    greedy = SamplingParams(temperature=0.7, top_p=1e-6, max_new_tokens=12, seed=3)
    reference = engine(False).generate(PROMPTS, 2, greedy)
    shared = engine(True, batch_size).generate(PROMPTS, 2, greedy)
    assert [c.prompt_index for c in shared] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [c.token_ids for c in shared] == [c.token_ids for c in reference]
    assert [c.finish_reason for c in shared] == [c.finish_reason for c in reference]
    assert {c.finish_reason for c in shared} == {"stop", "length"}, "the check needs rows of both kinds"
    for a, b in zip(shared, reference, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_recorded_logprobs_equal_a_teacher_forced_forward():
    eng = engine(True, batch_size=6)
    sampling = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=10, seed=5)
    completions = eng.generate(PROMPTS, 5, sampling)
    assert len(completions) == 20 and {c.finish_reason for c in completions} == {"stop", "length"}
    for c in completions:
        prompt = PROMPTS[c.prompt_index]
        assert len(c.token_ids) == len(c.logprobs) >= 1
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
        else:
            assert len(c.token_ids) == 10 and EOS not in c.token_ids
        with torch.no_grad():
            logits = eng.model(input_ids=torch.tensor([prompt + c.token_ids])).logits[0].float()
        logp = torch.log_softmax(logits / 0.7, dim=-1)[len(prompt) - 1:-1]
        expected = logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert c.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_a_seed_reproduces_its_samples_and_another_seed_does_not():
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=11)
    first = [c.token_ids for c in engine(True).generate(PROMPTS, 4, sampling)]
    again = [c.token_ids for c in engine(True).generate(PROMPTS, 4, sampling)]
    other = [c.token_ids for c in engine(True).generate(PROMPTS, 4, SamplingParams(1.0, 1.0, 8, seed=12))]
    assert first == again and first != other


@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_first_token_frequencies_match_the_sampling_distribution(top_p):
    """4,000 samples of one prompt's first token against softmax(logits / T), top-p applied as transformers'
    TopPLogitsWarper does. Tolerance: 0.035 per token, > 4 binomial standard errors (<= 0.0079 at n=4000)."""
    eng = engine(True, batch_size=1000)
    prompt = PROMPTS[1]
    with torch.no_grad():
        scaled = eng.model(input_ids=torch.tensor([prompt])).logits[0, -1].float() / 0.8
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        order = torch.argsort(probs, descending=True)
        before = torch.cumsum(probs[order], 0) - probs[order]  # mass of the more likely tokens
        nucleus = order[before < top_p]  # the smallest set of most likely tokens reaching top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[nucleus] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
        assert 1 < int(mask.sum()) < 32, "the check needs a nucleus that excludes some tokens"
    completions = eng.generate([prompt], 4000, SamplingParams(temperature=0.8, top_p=top_p, max_new_tokens=1, seed=2))
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in completions]), minlength=32).double()
    freq = counts / counts.sum()
    assert (freq - probs.double()).abs().max().item() < 0.035
    if top_p < 1.0:
        assert counts[probs == 0].sum().item() == 0  # never outside the nucleus
