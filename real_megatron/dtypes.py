"""Dtype names <-> torch dtypes, written once.

Used for ``model.dtype`` (train / sft), ``evaluate --dtype``, the converters' ``--dtype`` and the
dtype names sent to a rollout engine. Names are torch's own (``float32``, ``bfloat16``,
``float16``); ``fp32`` / ``bf16`` / ``fp16`` are accepted as short forms.
"""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name or short name; ValueError listing the choices otherwise."""
    full = SHORT_NAMES.get(name, name)
    if full not in DTYPES:
        raise ValueError(f"dtype {name!r}: choose one of {sorted(DTYPES)} (or {sorted(SHORT_NAMES)})")
    return DTYPES[full]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name HF config.json files and SGLang use)."""
    return str(dtype).removeprefix("torch.")
