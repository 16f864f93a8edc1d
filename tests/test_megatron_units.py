"""Megatron glue, single process: log-probs/entropy, layout validation, Llama/Qwen2 build
(plans and packed rows: test_packing.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent / "megatron_workers"))
from common import TINY_QWEN2, fixed_full_state_dict, fixed_samples  # noqa: E402

from real_megatron.hf_model import LayoutError  # noqa: E402
from real_megatron.megatron.batch import Sample  # noqa: E402
from real_megatron.megatron.logprobs import vocab_parallel_logprobs  # noqa: E402


@pytest.mark.parametrize("chunk_rows", [1, 7, 4096])
def test_logprobs_and_entropy_match_log_softmax(chunk_rows):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 9, 50, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(0, 45, (4, 9), generator=g)
    logp, entropy = vocab_parallel_logprobs(logits, target, temperature=0.6, vocab_size=45, chunk_rows=chunk_rows)
    ref_logsm = torch.log_softmax(logits[..., :45] / 0.6, dim=-1)  # entries 45..49 are vocab padding
    ref = ref_logsm.gather(-1, target[..., None]).squeeze(-1)
    ref_entropy = -(ref_logsm.exp() * ref_logsm).sum(-1)
    assert torch.allclose(logp, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(entropy, ref_entropy, rtol=1e-12, atol=1e-12)
    w = torch.randn(4, 9, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((logp * w).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), logits)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert (grad[..., 45:] == 0).all()


def test_logprobs_bf16_logits_recompute_softmax_in_backward():
    # low-precision logits take the memory-lean path (softmax recomputed in backward, nothing kept)
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(3, 5, 40, generator=g)).to(torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, 40, (3, 5), generator=g)
    logp, _ = vocab_parallel_logprobs(logits, target, temperature=0.7, with_entropy=False, chunk_rows=4)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = torch.log_softmax(ref_logits / 0.7, -1).gather(-1, target[..., None]).squeeze(-1)
    assert logp.dtype == torch.float32
    assert torch.allclose(logp.double(), ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(3, 5, generator=g)
    (grad,) = torch.autograd.grad((logp * w).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref * w.double()).sum(), ref_logits)
    assert grad.dtype == torch.bfloat16
    assert torch.allclose(grad.double(), ref_grad, rtol=2e-2, atol=2e-3)


def test_logprobs_overwriting_the_logits_gives_the_same_values_and_gradient():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    hidden = torch.randn(4, 6, 8, generator=g)
    target = torch.randint(0, 28, (4, 6), generator=g)
    results = []
    for overwrite in (False, True):
        logits = hidden @ weight.t()  # like the output layer: its backward needs hidden and weight only
        logp, _ = vocab_parallel_logprobs(logits, target, temperature=0.8, vocab_size=28, chunk_rows=5,
                                          with_entropy=False, overwrite_logits=overwrite)
        (grad,) = torch.autograd.grad((logp * torch.arange(24.0).reshape(4, 6)).sum(), weight)
        results.append((logp.detach(), grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)


def test_logprobs_kept_softmax_refuses_a_second_backward():
    logits = torch.randn(2, 3, 10, requires_grad=True)
    logp, _ = vocab_parallel_logprobs(logits, torch.zeros(2, 3, dtype=torch.long))
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def test_logprobs_reject_bad_input():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vocab_parallel_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_logprobs(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))


def test_impossible_layout_fails_before_any_process_group(monkeypatch):
    from real_megatron.megatron.model import initialize_parallel

    if dist.is_initialized():  # an earlier in-process test's world of one: the check must see WORLD_SIZE=2
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    monkeypatch.setenv("WORLD_SIZE", "2")
    already = dist.is_initialized()
    with pytest.raises(LayoutError,
                       match=r"parallel.tp=3 does not divide num_attention_heads=4.*valid choices: \[1, 2\]"):
        initialize_parallel(tp=3, hf_config=TINY_QWEN2)
    with pytest.raises(LayoutError, match=r"parallel.pp=3 does not divide num_hidden_layers=4"):
        initialize_parallel(pp=3, hf_config=TINY_QWEN2)
    with pytest.raises(LayoutError, match="world size 2 is not divisible"):
        initialize_parallel(tp=4, hf_config=dict(TINY_QWEN2, num_key_value_heads=4))
    assert dist.is_initialized() == already


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM"])
def test_model_provider_builds_both_architectures(arch):
    from real_megatron.megatron.model import build_model, initialize_parallel, unwrap
    from real_megatron.megatron.sharding import full_parameter_shapes, gather_full_state_dict, load_full_state_dict

    hf = dict(TINY_QWEN2, architectures=[arch], tie_word_embeddings=arch == "LlamaForCausalLM")
    initialize_parallel(hf_config=hf)
    chunks = build_model(hf, transformer_impl="local")
    gpt = unwrap(chunks[0])
    names = {n for n, _ in gpt.named_parameters()}
    assert any(n.endswith("linear_qkv.bias") for n in names) == (arch == "Qwen2ForCausalLM")
    full = fixed_full_state_dict(hf)
    assert set(full) == set(full_parameter_shapes(hf))
    load_full_state_dict(chunks[0], full)
    back = gather_full_state_dict(chunks[0])
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    tokens = torch.randint(0, 300, (2, 10))
    logits = chunks[0](tokens, torch.arange(10)[None].expand(2, 10), None)
    assert logits.shape == (2, 10, 384)  # vocab 300 padded to a multiple of 128


def test_non_finite_step_is_skipped_and_weights_untouched():
    from real_megatron.losses import build_loss
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.policy import MegatronPolicy
    from real_megatron.megatron.sharding import gather_full_state_dict, load_full_state_dict

    initialize_parallel(hf_config=TINY_QWEN2)
    chunks = build_model(TINY_QWEN2, transformer_impl="local", wrap_ddp=True)
    full = fixed_full_state_dict(TINY_QWEN2)
    full["decoder.layers.1.mlp.linear_fc2.weight"][0, 0] = float("inf")
    load_full_state_dict(chunks[0], full)
    policy = MegatronPolicy(chunks, build_optimizer(chunks, lr=0.1), loss=build_loss("real"),
                            max_tokens_per_micro_batch=128)
    result = policy.train_step(fixed_samples())
    assert result["skipped"] == 1.0
    after = gather_full_state_dict(chunks[0])
    assert all(torch.equal(after[k], full[k]) for k in full)
    # and the same trainer does step once the weights are sane again
    full["decoder.layers.1.mlp.linear_fc2.weight"][0, 0] = 0.0
    load_full_state_dict(chunks[0], full)
    result = policy.train_step(fixed_samples())
    assert result["skipped"] == 0.0 and result["grad_norm"] > 0
    assert not torch.equal(gather_full_state_dict(chunks[0])["output_layer.weight"], full["output_layer.weight"])


def test_sft_step_lowers_cross_entropy_fused_or_not(monkeypatch):
    # the warm-up's cross-entropy goes through the hook like RL: with model.fused_output (the default)
    # no logits are made (logprobs.py is never called), and the losses equal Megatron's output layer's
    from real_megatron.losses import SFTLoss
    from real_megatron.megatron import hook
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.policy import MegatronPolicy
    from real_megatron.megatron.sharding import load_full_state_dict

    logits_calls = []
    monkeypatch.setattr(hook, "vocab_parallel_logprobs",
                        lambda *a, **k: logits_calls.append(1) or vocab_parallel_logprobs(*a, **k))
    initialize_parallel(hf_config=TINY_QWEN2)
    samples = [Sample(s.prompt_ids, s.response_ids, 1.0, s.group_id) for s in fixed_samples()]

    def sft_losses(**kw):
        chunks = build_model(TINY_QWEN2, transformer_impl="local", wrap_ddp=True)
        load_full_state_dict(chunks[0], fixed_full_state_dict(TINY_QWEN2))
        sft = MegatronPolicy(chunks, build_optimizer(chunks, lr=3e-3), loss=SFTLoss(), max_tokens_per_micro_batch=128,
                             **kw)
        return [sft.train_step(samples)["loss"] for _ in range(5)]

    fused = sft_losses()
    assert not logits_calls
    assert fused[-1] < fused[0] - 0.5, fused
    unfused = sft_losses(fused_output=False)
    assert logits_calls
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(fused, unfused, strict=True)), (fused, unfused)


def test_rope_base_is_read_from_transformers_5_rope_parameters(tmp_path):
    import transformers

    from real_megatron.hf_model import read_hf_config

    config = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=96, vocab_size=300, rope_theta=50000.0)
    config.save_pretrained(tmp_path)
    assert read_hf_config(tmp_path)["rope_theta"] == 50000.0  # transformers 5 keeps it in rope_parameters
    scaled = dict(TINY_QWEN2, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="RoPE scaling 'llama3'"):
        read_hf_config(scaled)
    # the one reader refuses MLP biases for every caller (before, only the converters did: the model provider
    # built a bias-free model and the biases were never loaded)
    with pytest.raises(ValueError, match="mlp_bias=True"):
        read_hf_config(dict(TINY_QWEN2, architectures=["LlamaForCausalLM"], mlp_bias=True))


def test_qkv_bias_rule_is_read_from_the_architecture_or_model_type():
    """One rule for the model provider and the converters' shapes (they disagreed on a Llama config that
    names only its model_type: the reader took it as Llama, the bias rule as Qwen2)."""
    from real_megatron.hf_model import has_qkv_bias
    from real_megatron.megatron.sharding import full_parameter_shapes

    bare = {k: v for k, v in TINY_QWEN2.items() if k not in ("architectures", "model_type")}
    cases = [(TINY_QWEN2, True), (dict(bare, model_type="llama"), False),
             (dict(bare, architectures=["LlamaForCausalLM"], attention_bias=True), True), (bare, True)]
    for hf, bias in cases:
        assert has_qkv_bias(hf) is bias, hf
        assert ("decoder.layers.0.self_attention.linear_qkv.bias" in full_parameter_shapes(hf)) is bias


def test_packed_row_logprobs_equal_each_sequence_run_alone():
    """16 rollouts back to back in one row: block-diagonal causal mask + RoPE restarting per slot give
    every sequence exactly what it gets alone (plain causal attention, positions 0…L−1)."""
    from real_megatron.losses import build_loss
    from real_megatron.megatron.logprobs import vocab_parallel_logprobs
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.packed_forward import run_packed
    from real_megatron.megatron.policy import MegatronPolicy
    from real_megatron.megatron.sharding import load_full_state_dict

    initialize_parallel(hf_config=TINY_QWEN2)
    chunks = build_model(TINY_QWEN2, transformer_impl="local", wrap_ddp=True)
    load_full_state_dict(chunks[0], fixed_full_state_dict(TINY_QWEN2))
    policy = MegatronPolicy(chunks, build_optimizer(chunks, lr=0.1), loss=build_loss("real"), temperature=0.7,
                            max_tokens_per_micro_batch=512)
    samples = fixed_samples()
    assert sum(len(rank) for rank in policy.plan(samples, sequence_level_groups=False).rank_micro_batches) == 1
    logps, entropies = policy.compute_logprobs(samples)
    chunks[0].eval()
    worst = 0.0
    with torch.no_grad():
        for s, lp, en in zip(samples, logps, entropies, strict=True):
            ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
            logits = chunks[0](ids, torch.arange(ids.shape[1])[None], None)
            ref, ref_en = vocab_parallel_logprobs(logits, torch.roll(ids, -1, 1), temperature=0.7, vocab_size=300)
            p, r = len(s.prompt_ids), len(s.response_ids)
            worst = max(worst, (lp - ref[0, p - 1:p + r - 1]).abs().max().item(),
                        (en - ref_en[0, p - 1:p + r - 1]).abs().max().item())
    assert worst < 1e-5, worst
    # RoPE is relative, so continuing positions would differ only by rounding: check the table the
    # packed forward used restarts at every slot
    from real_megatron.megatron.batch import build_micro_batch
    from real_megatron.megatron.model import unwrap

    rope = unwrap(chunks[0]).rotary_pos_emb
    used = []
    handle = rope.register_forward_hook(lambda module, args, out: used.append(out))
    batch = build_micro_batch(samples, [0, 1, 2])
    with torch.no_grad():
        run_packed(chunks[0], batch)
    handle.remove()
    table = rope.get_emb(64)
    assert len(used) == 1 and torch.equal(used[0], table[batch["position_ids"][0]])
    assert batch["position_ids"][0].tolist().count(0) == 3
    # the fused softmax kernel would ignore the block-diagonal mask: refused, not silently wrong
    config = unwrap(chunks[0]).config
    config.masked_softmax_fusion = True
    try:
        with pytest.raises(RuntimeError, match="masked_softmax_fusion=False"):
            run_packed(chunks[0], build_micro_batch(samples, [0, 1]))
    finally:
        config.masked_softmax_fusion = False
    chunks[0].train()
