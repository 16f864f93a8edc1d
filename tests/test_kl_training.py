"""The KL penalty in training: reference log-probs from the frozen initial policy (megatron/reference.py).

Policy level (one process, the tiny arithmetic model of tests/conftest.py): two optimizer steps on one
mini-batch; the logged ``loss/kl`` is 0 while the policy equals its target and, once it has moved,
equals the k3 estimator recomputed independently with ``transformers`` (the initial HF model for the
target, the policy's weights exported to HF names for π_θ). The trainer level (slow): a real ``train``
run with GRPO's KL logs ``loss/kl``, the reference pass's time and memory, and a resumed run still
measures the KL to the *initial* weights, not to its checkpoint.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

TEMPERATURE = 0.7


def samples_for(vocab: int, seed: int = 3):
    """Four groups of four rollouts with mixed rewards (one group all-correct), random tokens."""
    from real_megatron.megatron.batch import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for gid in range(4):
        prompt = torch.randint(3, vocab, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
        for k in range(4):
            response = torch.randint(3, vocab, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            out.append(Sample(prompt, response, 1.0 if gid == 3 else float(k % 2), gid))
    return out


def hf_logps(model, samples) -> list[torch.Tensor]:
    """Response log-probs at the sampling temperature with a transformers model, each rollout alone."""
    rows = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
            logits = model(ids).logits[0].double() / TEMPERATURE
            logp = torch.log_softmax(logits, dim=-1)[:-1].gather(1, ids[0, 1:, None])[:, 0]
            rows.append(logp[len(s.prompt_ids) - 1:])
    return rows


def k3_mean(logps, targets) -> float:
    per_rollout = [((t - lp).exp() - (t - lp) - 1).mean() for lp, t in zip(logps, targets, strict=True)]
    return float(torch.stack(per_rollout).mean())


@pytest.mark.parametrize("loss, hparams", [
    ("grpo", {"kl_coef": 0.5}),
    ("real", {"kl_coef": 0.5}),
    ("real", {"kl_coef": 0.5, "kl_target": "old"}),
])
def test_loss_kl_is_the_estimator_against_the_frozen_initial_policy(assets, loss, hparams):
    from transformers import AutoModelForCausalLM

    from real_megatron.convert import iter_hf_tensors, load_hf_into
    from real_megatron.hf_model import read_hf_config
    from real_megatron.losses import build_loss
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.policy import MegatronPolicy
    from real_megatron.megatron.reference import build_reference_policy, parameter_bytes

    base = assets["base"]
    hf = read_hf_config(base)
    initialize_parallel(hf_config=hf)
    chunks = build_model(hf, transformer_impl="local", wrap_ddp=True)
    load_hf_into(chunks, base)
    policy = MegatronPolicy(chunks, build_optimizer(chunks, lr=1e-2), loss=build_loss(loss, hparams),
                            temperature=TEMPERATURE, max_tokens_per_micro_batch=256)
    samples = samples_for(hf["vocab_size"])
    policy.set_old_logprobs(samples)
    ref = None
    if hparams.get("kl_target", "ref") == "ref":
        ref = build_reference_policy(hf, load_weights=lambda c: load_hf_into(c, base), transformer_impl="local",
                                     temperature=TEMPERATURE, max_tokens_per_micro_batch=256)
        assert parameter_bytes(ref.chunks) == sum(p.numel() * 4 for p in chunks[0].parameters())
        assert not any(p.requires_grad for p in ref.chunks[0].parameters())
        ref_logps, _ = ref.compute_logprobs(samples)
        for s, lp in zip(samples, ref_logps, strict=True):
            s.ref_logp = lp

    first = policy.train_step(samples)
    assert first["loss/kl"] < 1e-9, first["loss/kl"]  # the policy is its target before any update
    assert first["hook/trained_rollout_fraction"] == 1.0  # the all-correct group's KL is not skipped
    moved = {name: t for bucket in iter_hf_tensors(chunks, hf) for name, t in bucket}
    second = policy.train_step(samples)  # its forward runs on `moved`

    initial_model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    target = hf_logps(initial_model, samples)  # π_ref = π_old = the initial weights here
    current_model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    missing, unexpected = current_model.load_state_dict(moved, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    expected = k3_mean(hf_logps(current_model, samples), target)
    assert expected > 1e-3, expected  # the policy has moved: a nonzero KL
    assert math.isclose(second["loss/kl"], expected, rel_tol=1e-5), (second["loss/kl"], expected)
    if ref is not None:  # the reference model stayed frozen
        again, _ = ref.compute_logprobs(samples)
        assert all(torch.equal(a, b) for a, b in zip(again, ref_logps, strict=True))


# ---------------------------------------------------------------------------------------- the trainer
sys.path.insert(0, str(Path(__file__).parent))


@pytest.mark.slow
def test_grpo_training_run_logs_kl_to_the_initial_weights_also_after_resume(warm_assets, tmp_path):
    from test_trainer import overrides, rows_of, run_train

    run_dir = tmp_path / "grpo_kl"
    args = overrides(warm_assets, run_dir, **{"loss.name": "grpo", "loss.hparams": "{kl_coef: 0.05}",
                                              "train.steps": 1, "train.eval_every": 0})
    proc = run_train(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reference model for the KL term" in proc.stderr + proc.stdout
    proc = run_train([*args, "train.steps=2"])  # resumes from the checkpoint of rollout step 1
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in rows_of(run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss/kl"] < 1e-9  # the first update: the policy is still the initial model
    assert rows[1]["loss/kl"] > 0  # after one update
    # rollout step 2 after the resume: the reference is still the initial model, not the checkpoint
    assert rows[2]["loss/kl"] > 0 and rows[3]["loss/kl"] > 0
    for first, later in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert first["time/ref_logprob_s"] > 0 and later["time/ref_logprob_s"] == 0.0
    assert all(r["memory/ref_model_mb"] > 0 for r in rows)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
