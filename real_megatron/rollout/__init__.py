"""Rollout engines behind one interface (``base.py``): the embedded ``transformers`` engine (the
tested default) and SGLang (``sglang_engine.py``, GPU clusters); and the rollout phase of a training
step over any of them (``collect.py``: generate, score, label; split into mini-batches)."""
from real_megatron.rollout.base import Completion, RolloutEngine, RolloutEngineError, SamplingParams

__all__ = ["Completion", "RolloutEngine", "RolloutEngineError", "SamplingParams"]
