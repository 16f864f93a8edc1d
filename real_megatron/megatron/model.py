"""Megatron-Core model provider: a ``GPTModel`` for Qwen2 / Llama built from a HF ``config.json``.

    from real_megatron.megatron.model import initialize_parallel, build_model
    initialize_parallel(tp=2, pp=1, cp=1, seed=1234)       # under torchrun (gloo on CPU, nccl on GPU)
    chunks = build_model(hf_config_dict, dtype=torch.float32, wrap_ddp=True)

The local (pure PyTorch) layer spec runs on the CPU; the Transformer Engine spec is used when
``transformer_engine`` imports (GPU) unless ``transformer_impl="local"``. The vocabulary is padded
to a multiple of ``vocab_divisible_by * tp`` (Megatron-LM's convention, 128 by default); padded
entries never receive probability (``logprobs.py`` masks them), so results do not depend on TP.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from real_megatron.distributed import world
from real_megatron.hf_model import check_layout, has_qkv_bias, head_dim, num_kv_heads, read_hf_config
from real_megatron.megatron.cpu import enable_cpu_support

VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's default: the vocabulary is padded to a multiple of this times TP


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def initialize_parallel(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234, hf_config=None) -> int:
    """Create the default process group (from torchrun's env, or a 1-process group) and Megatron's groups.

    With ``hf_config`` the layout is checked against the model and the world size *before* any
    process group exists (``hf_model.check_layout``: a ``LayoutError`` naming the field and valid choices).
    Returns the data-parallel size.
    """
    from megatron.core import parallel_state, tensor_parallel

    _, world_size = world()
    if hf_config is not None:
        check_layout(read_hf_config(hf_config), tp=tp, pp=pp, cp=cp, world_size=world_size)
    enable_cpu_support()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" not in os.environ:
            # plain `python`: a world of one on a free local port. The environment is left alone:
            # setting MASTER_PORT/RANK here would leak into every subprocess this one starts
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return parallel_state.get_data_parallel_world_size()


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def transformer_config(hf: dict, *, dtype=torch.float32, sequence_parallel=False, recompute_activations=False,
                       calculate_per_token_loss=False):
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    heads = hf["num_attention_heads"]
    kwargs = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=num_kv_heads(hf),
        kv_channels=head_dim(hf),
        ffn_hidden_size=hf["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=has_qkv_bias(hf),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        calculate_per_token_loss=calculate_per_token_loss,
        # softmax in fp32 and fp32 residual keep float32 runs bit-comparable with transformers
        attention_softmax_in_fp32=True,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # what Megatron turns its default "full" into, without its deprecation warning
    )
    if recompute_activations:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kwargs)


def uses_transformer_engine(transformer_impl: str = "auto") -> bool:
    """Whether ``transformer_impl`` ("auto" | "local" | "transformer_engine") builds Transformer Engine layers."""
    if transformer_impl == "transformer_engine" and not te_available():
        raise RuntimeError("model.transformer_impl=transformer_engine needs a GPU and `pip install -e .[gpu]` "
                           "(transformer-engine); use transformer_impl=local on the CPU")
    return transformer_impl == "transformer_engine" or (transformer_impl == "auto" and te_available())


def layer_spec(transformer_impl: str = "auto"):
    from megatron.core.models.gpt import gpt_layer_specs

    if uses_transformer_engine(transformer_impl):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_model(hf_config, *, dtype=torch.float32, transformer_impl: str = "auto", wrap_ddp: bool = False,
                sequence_parallel: bool = False, recompute_activations: bool = False,
                vocab_divisible_by: int = VOCAB_DIVISIBLE_BY, use_distributed_optimizer: bool = False):
    """Build this rank's model chunk(s) (a list with one chunk; virtual pipelining is not used)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    hf = read_hf_config(hf_config)
    config = transformer_config(hf, dtype=dtype, sequence_parallel=sequence_parallel,
                                recompute_activations=recompute_activations)
    spec = layer_spec(transformer_impl)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(hf["vocab_size"], tp, vocab_divisible_by),
        max_sequence_length=hf.get("max_position_embeddings", 4096),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=int(hf.get("rope_theta", 10000)),
        rotary_percent=1.0,
        parallel_output=True,
    )
    model.hf_config = hf  # the provider's input travels with the model (weight export, checkpoints)
    # packed rows run as THD sequences on TE's attention, with a block-diagonal mask on the local spec
    model.uses_transformer_engine = uses_transformer_engine(transformer_impl)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if wrap_ddp:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer)
        model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        model.hf_config = hf
        from megatron.core.distributed import finalize_model_grads

        # the schedule calls these: DP/CP gradient reduction (+ tied-embedding sync across PP
        # stages) after the last micro-batch, and no gradient sync during accumulation
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = model.no_sync
    return [model]


def unwrap(chunk):
    """The GPTModel inside a DDP (or other) wrapper."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_hf_config(chunk) -> dict:
    """The HF config a model chunk was built from (``build_model`` attaches it to the GPTModel)."""
    hf = getattr(unwrap(chunk), "hf_config", None)
    if hf is None:
        raise ValueError("the model has no hf_config: build it with real_megatron.megatron.model.build_model")
    return hf
