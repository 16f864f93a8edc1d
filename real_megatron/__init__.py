"""real-megatron: REAL (Rewards as Labels) RLVR training on Megatron-Core."""
import warnings

__version__ = "0.1.0"

# Megatron-Core warns once per module (eight times per process) that Transformer Engine and Apex are
# missing and it falls back to PyTorch: expected on the CPU, where this stack uses Megatron's local
# layers on purpose. ``parts.describe`` says it once, in its own words, in a run's first lines.
warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed", category=UserWarning)
# Megatron-Core 0.16.1's checkpointing calls torch APIs that torch 2.13 deprecates: nothing a user can act on
for _message in (r"`load_state_dict` is deprecated", r"Please use DTensor instead and we are deprecating ShardedTensor",
                 r"`torch.distributed.all_gather_into_tensor` is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=FutureWarning)
