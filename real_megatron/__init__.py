"""real-megatron: REAL (Rewards as Labels) RLVR training on Megatron-Core."""

__version__ = "0.1.0"
