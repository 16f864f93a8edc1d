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

``share_prompt_prefill=True`` (used by ``real-megatron compare``'s large final evaluation) samples
through :meth:`TransformersEngine._generate_shared` instead of ``model.generate``: each prompt's
forward pass runs once and its KV cache is repeated for its ``n`` samples, and a row that has
emitted EOS leaves the batch at once. Same distribution (temperature, then top-p exactly as
transformers' ``TopPLogitsWarper``, then one draw by inverse CDF) and the same log-prob semantics;
a different random stream from ``model.generate``'s, so the two paths draw different samples from
one seed. With many samples per prompt it costs several times less: the prompt is most of the
tokens a short response's forward passes see, and a batch no longer runs until its longest row.
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


class _PreallocatedLayer(transformers.DynamicLayer):
    """A KV-cache layer with room for ``capacity`` positions, written in place: ``DynamicLayer`` concatenates
    the whole cache at every step, a copy that costs as much as the tiny models' forward pass itself."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self._length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            batch, heads, _, dim = key_states.shape
            self._keys = key_states.new_zeros(batch, heads, self.capacity, dim)
            self._values = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])
            self.is_initialized = True
        end = self._length + key_states.shape[-2]
        if end > self.capacity:
            raise RolloutEngineError(f"KV cache: {end} positions, room for {self.capacity}")
        self._keys[:, :, self._length:end] = key_states
        self._values[:, :, self._length:end] = value_states
        self._length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._keys = self._keys.repeat_interleave(repeats, dim=0)
        self._values = self._values.repeat_interleave(repeats, dim=0)
        self.keys, self.values = self._keys[:, :, :self._length], self._values[:, :, :self._length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self.keys, self.values = self._keys[:, :, :self._length], self._values[:, :, :self._length]


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
                 device: str | torch.device = "cpu", batch_size: int = 64, load_weights_from: str | None = None,
                 share_prompt_prefill: bool = False):
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
        self.share_prompt_prefill = bool(share_prompt_prefill)
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
            if self.share_prompt_prefill:
                # whole prompts per chunk: max(1, batch_size // n) prompts, i.e. about batch_size rows
                per_chunk = max(1, self.batch_size // n)
                for start in range(0, len(prompt_token_ids), per_chunk):
                    chunk = [(start + j, list(ids)) for j, ids in enumerate(prompt_token_ids[start:start + per_chunk])]
                    out.extend(self._generate_shared(chunk, n, sampling))
                return out
            for start in range(0, len(requests), self.batch_size):
                out.extend(self._generate_chunk(requests[start:start + self.batch_size], sampling))
        return out

    def _generate_shared(self, prompts, n: int, sampling: SamplingParams) -> list[Completion]:
        """``n`` samples of each ``(prompt_index, ids)`` in ``prompts``: one prefill per prompt, its KV cache
        repeated ``n`` times, finished rows dropped from the batch after every step. Prompt-major output."""
        try:
            return self._decode_shared(prompts, n, sampling)
        except RolloutEngineError:
            raise
        except Exception as err:
            raise RolloutEngineError(f"transformers decode failed: {type(err).__name__}: {err}") from err

    def _decode_shared(self, prompts, n: int, sampling: SamplingParams) -> list[Completion]:
        input_ids, attention = self._left_padded(prompts)
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        steps = int(sampling.max_new_tokens)
        layers = self.model.config.get_text_config(decoder=True).num_hidden_layers
        cache = transformers.Cache(layers=[_PreallocatedLayer(input_ids.shape[1] + steps) for _ in range(layers)])
        position = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=position,
                            past_key_values=cache, use_cache=True).logits[:, -1, :]
        rows = len(prompts) * n
        logits = logits.repeat_interleave(n, dim=0)
        attention = attention.repeat_interleave(n, dim=0)
        cache.batch_repeat_interleave(n)
        tokens = torch.full((rows, steps), self.pad_token_id, dtype=torch.long)
        token_logp = torch.zeros(rows, steps, dtype=torch.float32)
        length = torch.full((rows,), steps, dtype=torch.long)  # a row that never emits EOS runs to max_new_tokens
        stopped = torch.zeros(rows, dtype=torch.bool)
        batch_rows = torch.arange(rows)  # output row of each batch row
        active = torch.ones(rows, dtype=torch.bool)  # batch rows still generating (finished ones wait to be dropped)
        temperature, top_p = float(sampling.temperature), float(sampling.top_p)
        for t in range(steps):
            scaled = logits.float() / temperature
            logp = torch.log_softmax(scaled, dim=-1)
            if top_p < 1.0:  # transformers' TopPLogitsWarper on the scaled logits, min_tokens_to_keep = 1
                sorted_logits, sorted_idx = torch.sort(scaled, descending=False)
                remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
                remove_sorted[..., -1:] = False
                remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
                probs = torch.softmax(scaled.masked_fill(remove, -float("inf")), dim=-1)
            else:
                probs = logp.exp()
            # inverse CDF: the first token whose cumulative probability exceeds u ~ U[0, total) (a zero-probability
            # token never does); one uniform per row, cheaper than torch.multinomial at these sizes
            cdf = probs.double().cumsum(dim=-1)
            u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)  # [batch, 1]
            sampled, sampled_logp = nxt[:, 0].cpu(), logp.gather(-1, nxt)[:, 0].cpu()
            out_rows = batch_rows[active]
            tokens[out_rows, t] = sampled[active]
            token_logp[out_rows, t] = sampled_logp[active]
            ended = active & (sampled == self.eos_token_id)
            length[batch_rows[ended]] = t + 1
            stopped[batch_rows[ended]] = True
            active &= ~ended
            live = int(active.sum())
            if t == steps - 1 or live == 0:
                break
            if live < 0.75 * len(active):  # drop the finished rows (a copy of the cache: not after every EOS)
                keep = active.nonzero()[:, 0]
                batch_rows, active = batch_rows[keep], active[keep]
                keep = keep.to(self.device)
                cache.batch_select_indices(keep)
                attention, nxt = attention[keep], nxt[keep]
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
            position = attention.sum(-1, keepdim=True) - 1
            logits = self.model(input_ids=nxt, attention_mask=attention, position_ids=position,
                                past_key_values=cache, use_cache=True).logits[:, -1, :]
        completions = []
        for row in range(rows):
            kept = int(length[row])
            completions.append(Completion(prompt_index=prompts[row // n][0], token_ids=tokens[row, :kept].tolist(),
                                          finish_reason="stop" if bool(stopped[row]) else "length",
                                          logprobs=token_logp[row, :kept].tolist()))
        return completions

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
