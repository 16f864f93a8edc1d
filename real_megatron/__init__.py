"""real-megatron: REAL (Rewards as Labels) RLVR training on Megatron-Core."""
import warnings

__version__ = "0.1.0"

# Megatron-Core warns once per module (eight times per process) that Transformer Engine and Apex are
# missing and it falls back to PyTorch: expected on the CPU, where this stack uses Megatron's local
# layers on purpose. ``parts.build_parts`` says it once, in its own words, in a run's first lines.
warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed", category=UserWarning)
