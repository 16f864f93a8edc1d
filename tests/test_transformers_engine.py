"""The embedded engine (``TransformersEngine``): step-by-step log-probs, batching, weight sync.

The log-probs it records step by step must equal what the engine used to compute from every
step's logits stacked (``output_logits=True``): the reference below asks the very same
``generate`` call for those logits, so the tokens are the engine's own and only the log-prob
computation differs. A real ``transformers`` Qwen2 with a tiny vocabulary (32 tokens, EOS one of
them) is used so some rollouts stop on EOS mid-batch and others run to ``max_new_tokens``.
"""
from __future__ import annotations

import types

import pytest
import torch

from real_megatron.rollout.base import SamplingParams
from real_megatron.rollout.transformers_engine import SampledTokenLogprobs, TransformersEngine

EOS, PAD = 2, 0
TINY_QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 32, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "tie_word_embeddings": False, "initializer_range": 0.3}
# prompts of different lengths, so every batch is left-padded
PROMPTS = [[1, 3], [4, 5, 6, 7, 1], [3], [6, 6, 5, 1]]
SAMPLED = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=10, seed=3)
# top_p that keeps only the most likely token: greedy decoding through the same sampling path
GREEDY = SamplingParams(temperature=0.7, top_p=1e-6, max_new_tokens=10, seed=3)


def make_engine(batch_size: int = 64, **kw) -> TransformersEngine:
    torch.manual_seed(0)  # the random init is the weights
    return TransformersEngine(TINY_QWEN2, eos_token_id=EOS, pad_token_id=PAD, batch_size=batch_size, **kw)


def stacked_logits_logprobs(engine: TransformersEngine, monkeypatch) -> list:
    """Make ``engine.model.generate`` also return every step's logits and compute the log-probs
    the old way from them (stack, fp32, / T, log_softmax, gather the sampled token). Returns a list
    that fills with one ([rows, steps] new tokens, [rows, steps] log-probs) per generate call."""
    calls = []
    real_generate = engine.model.generate

    def generate_with_logits(**kwargs):
        result = real_generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        new_tokens = result.sequences[:, kwargs["input_ids"].shape[1]:].cpu()
        logits = torch.stack(result.logits, dim=1).float().cpu() / kwargs["temperature"]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens[..., None]).squeeze(-1)
        calls.append((new_tokens, logp))
        return result.sequences

    monkeypatch.setattr(engine.model, "generate", generate_with_logits)
    return calls


def check_against_reference(completions, calls, batch_size: int) -> None:
    rows = [(tokens[r], logp[r]) for tokens, logp in calls for r in range(len(tokens))]
    assert len(rows) == len(completions) and all(len(tokens) <= batch_size for tokens, _ in calls)
    for completion, (tokens, logp) in zip(completions, rows, strict=True):
        kept = len(completion.token_ids)
        assert completion.token_ids == tokens[:kept].tolist()
        if completion.finish_reason == "stop":  # EOS kept, only padding after it
            assert completion.token_ids[-1] == EOS and EOS not in completion.token_ids[:-1]
            assert (tokens[kept:] == PAD).all()
        else:
            assert kept == len(tokens) and EOS not in completion.token_ids
        assert len(completion.logprobs) == kept
        # the same fp32 ops on the same logits rows: bitwise equal on the CPU
        torch.testing.assert_close(torch.tensor(completion.logprobs), logp[:kept], rtol=0, atol=0)


@pytest.mark.parametrize("sampling", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_step_by_step_logprobs_equal_the_stacked_logits_computation(sampling, monkeypatch):
    plain = make_engine(batch_size=5).generate(PROMPTS, 3, sampling)
    engine = make_engine(batch_size=5)
    calls = stacked_logits_logprobs(engine, monkeypatch)
    completions = engine.generate(PROMPTS, 3, sampling)
    assert len(calls) == 3  # 12 rollouts in chunks of 5, 5, 2
    check_against_reference(completions, calls, batch_size=5)
    # asking for the logits changes nothing the engine returns
    assert [(c.token_ids, c.logprobs, c.finish_reason) for c in completions] == \
        [(c.token_ids, c.logprobs, c.finish_reason) for c in plain]
    if sampling is SAMPLED:  # the case this test is about: EOS mid-batch next to rows that run on
        reasons = {c.finish_reason for c in completions}
        assert reasons == {"stop", "length"}, reasons
        rows = [row for tokens, _ in calls for row in tokens]
        # some row has padding after its EOS
        assert any(len(c.token_ids) < len(row) for c, row in zip(completions, rows, strict=True))


def test_logprobs_see_the_raw_logits_even_if_the_checkpoint_asks_for_a_repetition_penalty(tmp_path, monkeypatch):
    # a generation_config.json processor would run before the recorder and change what it sees
    source = make_engine()
    source.model.generation_config.repetition_penalty = 5.0
    source.model.save_pretrained(tmp_path)
    assert "repetition_penalty" in (tmp_path / "generation_config.json").read_text()
    engine = TransformersEngine(tmp_path, eos_token_id=EOS, pad_token_id=PAD, load_weights_from=str(tmp_path))
    calls = stacked_logits_logprobs(engine, monkeypatch)
    check_against_reference(engine.generate(PROMPTS, 2, SAMPLED), calls, batch_size=64)


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_greedy_results_do_not_depend_on_the_batch_size(batch_size):
    whole = make_engine(batch_size=64).generate(PROMPTS, 2, GREEDY)
    chunked = make_engine(batch_size=batch_size).generate(PROMPTS, 2, GREEDY)
    assert [c.prompt_index for c in chunked] == [i for i in range(len(PROMPTS)) for _ in range(2)]
    assert [(c.prompt_index, c.token_ids, c.finish_reason) for c in chunked] == \
        [(c.prompt_index, c.token_ids, c.finish_reason) for c in whole]
    # padding widths differ between chunkings: the same numbers up to float rounding
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)


def test_recorder_drops_a_step_generate_undid():
    # generate may run one step past the stop and undo it (deferred stop checks): 3 calls, 2 tokens
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5)
    tokens = torch.tensor([[4, 1], [0, 3]])
    recorder = SampledTokenLogprobs(temperature=0.5, max_new_tokens=3)
    prompt = torch.zeros(2, 1, dtype=torch.long)
    for step in range(3):
        recorder(torch.cat([prompt, tokens[:, :step]], dim=1), logits[step])
    expected = torch.log_softmax(logits[:2] / 0.5, dim=-1).gather(-1, tokens.T[..., None]).squeeze(-1).T
    torch.testing.assert_close(recorder.finish(tokens), expected, rtol=0, atol=0)


def test_bad_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size .* must be >= 1, got 0"):
        make_engine(batch_size=0)


def test_the_engine_factory_uses_rollout_embedded_batch_size(tmp_path):
    from real_megatron.components import make_engine as run_make_engine  # the factory train and evaluate use
    from real_megatron.config import load_config

    make_engine().model.config.save_pretrained(tmp_path)
    cfg = load_config(None, ["rollout.embedded_batch_size=5"])
    tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)
    assert run_make_engine(cfg.rollout, tmp_path, tokenizer, dtype=cfg.model.dtype).batch_size == 5


def test_background_engine_on_shared_cores_warns_with_the_fix(monkeypatch, caplog):
    """Generation beside training on the CPU with more threads than cores (measured: S = 1 slower than S = 0):
    one warning naming the thread count to set; none when the threads fit or on a GPU."""
    import logging
    import os

    from real_megatron.components import warn_if_cores_oversubscribed

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    caplog.set_level(logging.WARNING, logger="real_megatron")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    warn_if_cores_oversubscribed(torch.device("cpu"))
    assert len(caplog.records) == 1 and "2 processes x 2 threads on 2 cores" in caplog.text
    assert "OMP_NUM_THREADS=1" in caplog.text
    caplog.clear()
    warn_if_cores_oversubscribed(torch.device("cuda", 0))  # a GPU trains: the cores only feed it
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    warn_if_cores_oversubscribed(torch.device("cpu"))  # one thread each on two cores: fits
    assert not caplog.records
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two trainer ranks and the engine: 3 threads on 2 cores
    warn_if_cores_oversubscribed(torch.device("cpu"))
    assert "3 processes x 1 threads on 2 cores" in caplog.text
