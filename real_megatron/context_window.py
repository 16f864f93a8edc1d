"""The context rule, written once: a prompt of P tokens may be followed by up to N generated tokens only
when P + N <= the model's context, ``max_position_embeddings`` of its HF config.

Used by config validation (``train`` / ``sft``: ``data.max_prompt_length`` + ``rollout.max_new_tokens``,
and + ``eval.max_new_tokens`` when there are eval files) before anything starts, and by ``evaluate``
for every prompt of every benchmark file before any generation. Beyond the context, a rotary-embedding
model keeps generating at positions it was never trained on, without any error: the rule exists so
that never happens silently. A config without ``max_position_embeddings`` states no limit.
"""
from __future__ import annotations


def model_context(hf_config: dict) -> int | None:
    """The model's context in tokens, or None when its config does not state one."""
    context = hf_config.get("max_position_embeddings")
    return int(context) if context else None


def context_overflow(prompt_tokens: int, max_new_tokens: int, hf_config: dict) -> str | None:
    """None when ``prompt_tokens + max_new_tokens`` fit the model's context; else why not, with the numbers
    (callers prefix what the two numbers are and add the fix)."""
    context = model_context(hf_config)
    if context is None or prompt_tokens + max_new_tokens <= context:
        return None
    return (f"{prompt_tokens} + {max_new_tokens} = {prompt_tokens + max_new_tokens} tokens exceeds the model's context "
            f"(max_position_embeddings={context})")


def context_fix(prompt_tokens: int, new_tokens_name: str, prompt_name: str, hf_config: dict) -> str:
    """The fix for an overflow, as advice that can be followed: lower ``new_tokens_name`` to what is left after
    the prompt, or — when the prompt alone fills the context — lower ``prompt_name`` first."""
    context = model_context(hf_config)
    room = context - prompt_tokens
    if room < 1:
        return (f"the prompt alone ({prompt_tokens} tokens) fills the model's context of {context}: lower "
                f"{prompt_name} below {context} (and leave room for {new_tokens_name}), or use a model with a longer "
                "context")
    return f"lower {new_tokens_name} to <= {room} or {prompt_name}"
