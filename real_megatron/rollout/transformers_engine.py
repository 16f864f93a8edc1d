"""The embedded rollout engine: batched sampling with a ``transformers`` model in this process.

It is the default engine (CPU laptops, tests, small GPU runs). The model is built from the HF
config only; its weights come from the trainer through ``update_weights`` (HF names, full
tensors, straight from the Megatron model in memory), so nothing touches disk between steps.

Sampling is ``model.generate`` with temperature / top-p / max new tokens, stopping at EOS. The
random stream of one call is seeded from ``SamplingParams.seed`` in a private generator scope,
so a call is reproducible given the weights — which is what makes a resumed run sample exactly
what an uninterrupted run would have sampled.

The engine's per-token log-probs are recorded step by step by :class:`SampledTokenLogprobs`
(a logits processor), so a call's memory is O(batch × new tokens) on top of the model and its
KV cache, never O(batch × new tokens × vocabulary) as when every step's logits are kept.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import transformers

from real_megatron.rollout.base import Completion, RolloutEngine, RolloutEngineError, SamplingParams


class SampledTokenLogprobs:
    """A ``generate`` logits processor recording log p(sampled token) under softmax(raw logits / T).

    The semantics are the trainer's (log-probs at the sampling temperature over the full
    vocabulary, top-p not renormalised), so ``rollout/logprob_abs_diff_mean`` compares like with
    like; with ``top_p = 1`` this is exactly the distribution sampled from. ``generate`` runs custom
    processors before its temperature / top-p warpers, so ``scores`` here are the raw fp32 logits.

    Call t gets the logits of step t while ``input_ids`` ends with the token of step t-1, so each
    call first gathers the previous step's token from the log-softmax it kept. Memory: one
    [batch, vocab] step plus one [batch, max_new_tokens] buffer, allocated once — per-step small
    tensors kept alive between the big per-step ones would fragment the CPU heap (glibc) until
    resident memory grew with the steps again. :meth:`finish` takes the generated tokens
    [batch, steps] (the last step's token is only known then) and returns [batch, steps] fp32.
    """

    def __init__(self, temperature: float, max_new_tokens: int):
        self.temperature = float(temperature)
        self.max_new_tokens = int(max_new_tokens)
        self._pending: torch.Tensor | None = None  # [batch, vocab] log-softmax of the step whose token is unknown
        self._logp: torch.Tensor | None = None  # [batch, max_new_tokens]; columns [0, _known) are filled
        self._known = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._pending is None:
            self._logp = torch.empty(scores.shape[0], self.max_new_tokens, dtype=torch.float32, device=scores.device)
        else:
            self._record(input_ids[:, -1:])
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _record(self, token: torch.Tensor) -> None:
        if self._known == self.max_new_tokens:
            raise RolloutEngineError(f"log-prob recorder: generate ran past max_new_tokens={self.max_new_tokens}")
        self._logp[:, self._known] = self._pending.gather(-1, token).squeeze(-1)
        self._known += 1

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        steps = new_tokens.shape[1]
        # one call per step: the pending step is the last one; a step generate ran and then undid
        # (deferred stop checks, one call more than tokens) is pending instead, and dropped
        if self._known == steps - 1:
            self._record(new_tokens[:, -1:].to(self._pending.device))
        if self._known != steps:
            raise RolloutEngineError(f"log-prob recorder saw {self._known} steps, generate returned {steps} tokens")
        self._pending = None
        return self._logp[:, :steps].cpu()


class TransformersEngine(RolloutEngine):
    """``generate`` / ``update_weights`` over ``transformers.AutoModelForCausalLM``.

    ``hf_config``: a HF config dict or a directory with ``config.json``; ``eos_token_id`` and
    ``pad_token_id`` come from the tokenizer (the trainer's); ``batch_size``: sequences per
    ``model.generate`` call (prompts × n are cut into such chunks, in order; ``rollout.embedded_batch_size``).

    The model's own ``generation_config`` (e.g. a ``generation_config.json`` with a repetition
    penalty) is replaced by transformers' neutral defaults: sampling is temperature / top-p /
    max new tokens / EOS only, as the trainer's log-probs assume.
    """

    def __init__(self, hf_config, *, eos_token_id: int, pad_token_id: int, dtype=torch.float32,
                 device: str | torch.device = "cpu", batch_size: int = 64, load_weights_from: str | None = None):
        if isinstance(hf_config, dict):
            config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items()
                                                          if k not in ("architectures",)}) \
                if "model_type" in hf_config else None
            if config is None:
                raise ValueError("hf_config dict needs a 'model_type' (e.g. 'qwen2', 'llama')")
            config.architectures = hf_config.get("architectures")
        else:
            config = transformers.AutoConfig.from_pretrained(hf_config)
        self.device = torch.device(device)
        self.dtype = dtype
        if load_weights_from:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(load_weights_from, dtype=dtype)
        else:
            self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.to(self.device).eval()
        self.model.generation_config = transformers.GenerationConfig()
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size (sequences per generate call) must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        params = dict(self.model.named_parameters())
        # tied embeddings: lm_head.weight is the embedding's tensor and never arrives separately
        self._expected = {n for n in params if not (n == "lm_head.weight" and self.model.config.tie_word_embeddings)}
        self._tensors = {**params, **dict(self.model.named_buffers())}

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], version: int | None = None) -> None:
        """Copy HF-named full tensors (in buckets) into the model; every parameter must arrive exactly once.
        (``version`` is not recorded: this engine samples each batch with one version.)"""
        seen = set()
        for name, tensor in (pair for bucket in buckets for pair in bucket):
            target = self._tensors.get(name)
            if target is None or name not in self._expected:
                raise RolloutEngineError(f"weight sync: the rollout model has no parameter {name!r}")
            if tuple(tensor.shape) != tuple(target.shape):
                raise RolloutEngineError(f"weight sync: {name} has shape {tuple(tensor.shape)}, the rollout model "
                                         f"expects {tuple(target.shape)}")
            if name in seen:
                raise RolloutEngineError(f"weight sync: {name} arrived twice in one update")
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            seen.add(name)
        missing = self._expected - seen
        if missing:
            raise RolloutEngineError(f"weight sync: {len(missing)} parameters never arrived, "
                                     f"e.g. {sorted(missing)[:3]}")

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        for i, ids in enumerate(prompt_token_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} has no tokens")
        # prompt-major order: request j is prompt j // n
        requests = [(i, list(ids)) for i, ids in enumerate(prompt_token_ids) for _ in range(n)]
        out: list[Completion] = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(sampling.seed))
            if self.device.type == "cuda":
                torch.cuda.manual_seed(int(sampling.seed))
            for start in range(0, len(requests), self.batch_size):
                out.extend(self._generate_chunk(requests[start:start + self.batch_size], sampling))
        return out

    def _generate_chunk(self, requests, sampling: SamplingParams) -> list[Completion]:
        input_ids, attention = self._left_padded(requests)
        recorder = SampledTokenLogprobs(sampling.temperature, sampling.max_new_tokens)
        try:
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                **self._generate_kwargs(sampling), logits_processor=transformers.LogitsProcessorList([recorder]))
            new_tokens = sequences[:, input_ids.shape[1]:]
            token_logp = recorder.finish(new_tokens)
        except Exception as err:  # surface as an engine error, with the cause attached
            raise RolloutEngineError(f"transformers generate failed: {type(err).__name__}: {err}") from err
        return self._completions(requests, new_tokens.cpu(), token_logp)

    def _left_padded(self, requests) -> tuple[torch.Tensor, torch.Tensor]:
        """[len(requests), longest prompt] token ids and attention mask; left padding, so every
        prompt ends at the same position, where generation starts."""
        width = max(len(ids) for _, ids in requests)
        input_ids = torch.full((len(requests), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(requests), width), dtype=torch.long)
        for row, (_, ids) in enumerate(requests):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        return input_ids, attention

    def _generate_kwargs(self, sampling: SamplingParams) -> dict:
        return {"do_sample": True, "temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
                "top_k": 0, "max_new_tokens": int(sampling.max_new_tokens), "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}

    def _completions(self, requests, new_tokens: torch.Tensor, token_logp: torch.Tensor) -> list[Completion]:
        """Cut each row at its first EOS (kept) and drop the padding after it; ``new_tokens`` and
        ``token_logp`` are [len(requests), steps]."""
        completions = []
        for row, (prompt_index, _) in enumerate(requests):
            tokens = new_tokens[row].tolist()
            stop = tokens.index(self.eos_token_id) + 1 if self.eos_token_id in tokens else None
            kept = tokens[:stop] if stop is not None else tokens
            completions.append(Completion(prompt_index=prompt_index, token_ids=kept,
                                          finish_reason="stop" if stop is not None else "length",
                                          logprobs=token_logp[row, :len(kept)].tolist()))
        return completions
