"""Rollout engines behind one interface (``base.py``): the embedded ``transformers`` engine (the
tested default) and SGLang servers (``sglang_engine.py``: a pool; ``sglang_client.py``: one server;
``sglang_weights.py``: where weights go to SGLang); and the rollout phase of a training
step over any of them (``collect.py``: generate, score, label; split into mini-batches)."""
from real_megatron.rollout.base import Completion, RolloutEngine, RolloutEngineError, SamplingParams

__all__ = ["Completion", "RolloutEngine", "RolloutEngineError", "SamplingParams"]
