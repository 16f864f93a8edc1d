"""Fixtures shared by the multi-process Megatron tests: a tiny Qwen2 config, fixed weights, a fixed mini-batch."""
from __future__ import annotations

import torch

TINY_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
}


def fixed_full_state_dict(hf: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    from real_megatron.megatron.sharding import full_parameter_shapes

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in full_parameter_shapes(hf).items():
        if name.endswith("layernorm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.08 * torch.randn(shape, generator=g)
    return out


def fixed_samples(seed: int = 1, vocab: int = 300):
    """Five groups of sizes 3, 4, 2, 5, 2 with different prompt/response lengths and mixed rewards."""
    from real_megatron.megatron.batch import Sample

    g = torch.Generator().manual_seed(seed)
    samples = []
    for gid, size in enumerate([3, 4, 2, 5, 2]):
        prompt = torch.randint(1, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for k in range(size):
            resp_len = int(torch.randint(1, 12, (1,), generator=g))
            response = torch.randint(1, vocab, (resp_len,), generator=g).tolist()
            reward = float(k % 2 == 0) if gid != 2 else 1.0  # group 2 is all-correct
            old = -4.0 - torch.rand(resp_len, generator=g)  # old log-probs: s̄ far from 0
            samples.append(Sample(prompt_ids=prompt, response_ids=response, reward=reward, group_id=100 + gid,
                                  old_logp=old))
    return samples
