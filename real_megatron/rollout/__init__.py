"""Rollout engines behind one interface (``base.py``): the embedded ``transformers`` engine (the
tested default) and SGLang (``sglang_engine.py``, GPU clusters)."""
from real_megatron.rollout.base import Completion, RolloutEngine, RolloutEngineError, SamplingParams

__all__ = ["Completion", "RolloutEngine", "RolloutEngineError", "SamplingParams"]
