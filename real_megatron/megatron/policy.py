"""The policy on Megatron-Core: old log-probs, and one optimizer update per mini-batch.

    policy = MegatronPolicy(chunks, build_optimizer(chunks, lr=2e-6), loss_name="real", hparams={"tau": 0.5},
                            temperature=0.6, micro_batch_rollouts=8)
    logps, entropies = policy.compute_logprobs(samples)          # old log-probs at the sampling temperature
    result = policy.train_step(samples)                          # one optimizer step over a mini-batch

Every rank calls both with the same ``samples`` (the trainer broadcasts rollouts); results are
returned on every rank. The optimizer itself is built in ``optimizer.py``.
"""
from __future__ import annotations

import logging
from functools import partial

import torch

from real_megatron.distributed import compute_device, world_min, world_sum
from real_megatron.losses import (
    PPO_FAMILY,
    REAL_FAMILY,
    check_loss_name,
    group_advantages,
    loss_normalizer,
    score_weights,
)
from real_megatron.megatron.batch import (
    Sample,
    build_micro_batch,
    cp_chunk_indices,
    padded_length,
    plan_micro_batches,
    split_for_cp,
)
from real_megatron.megatron.hook import SFT, LossContext, forward_step, logprob_step
from real_megatron.megatron.model import model_hf_config, unwrap

log = logging.getLogger("real_megatron")


class _Layout:
    """This rank's coordinates in the parallel layout (read from Megatron's parallel_state)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.cp = ps.get_context_parallel_world_size()
        self.cp_rank = ps.get_context_parallel_rank()
        self.dp = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.last_stage = ps.is_pipeline_last_stage()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.cp_group = ps.get_context_parallel_group()
        # one rank per (dp, cp) coordinate reports what the last stage computed
        self.reporter = self.last_stage and self.tp_rank == 0


class MegatronPolicy:
    """The model chunks and optimizer of this rank, driven through Megatron's forward/backward schedule."""

    def __init__(self, chunks, optimizer, *, loss_name: str, hparams: dict | None = None, temperature: float = 1.0,
                 micro_batch_rollouts: int = 8, force_exact: bool = False, pad_id: int = 0):
        check_loss_name(loss_name, extra=(SFT,))  # the SFT warm-up runs through the same hook
        self.chunks = chunks
        self.optimizer = optimizer
        self.loss_name = loss_name
        self.hparams = dict(hparams or {})
        self.temperature = float(temperature)
        self.micro_batch_rollouts = int(micro_batch_rollouts)
        self.force_exact = force_exact
        self.pad_id = pad_id
        gpt = unwrap(chunks[0])
        if gpt.config.calculate_per_token_loss:
            raise ValueError("calculate_per_token_loss must be False: the hook's scale factor cancels "
                             "Megatron's micro-batch and data-parallel averaging itself (see hook.py)")
        self.vocab_size = model_hf_config(chunks[0])["vocab_size"]  # unpadded: the padding rows are masked
        self.last_mode: str | None = None

    # ------------------------------------------------------------------ helpers
    def _micro_batches(self, samples, plan, lay: _Layout):
        rows = max(len(mb) for rank in plan.rank_micro_batches for mb in rank)
        seq_len = padded_length(samples, lay.cp)
        mine = plan.rank_micro_batches[lay.dp_rank]
        device = compute_device()
        batches = [{k: v.to(device) for k, v in split_for_cp(
            build_micro_batch(samples, mb, rows=rows, seq_len=seq_len, pad_id=self.pad_id), lay.cp, lay.cp_rank).items()}
            for mb in mine]
        return batches, rows, seq_len

    def _run(self, step_func, batches, rows, seq_len, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        get_forward_backward_func()(
            forward_step_func=step_func, data_iterator=iter(batches), model=self.chunks,
            num_microbatches=len(batches), seq_length=seq_len, micro_batch_size=rows, forward_only=forward_only)

    def _context(self, samples, **kw) -> LossContext:
        lay = _Layout()
        device = compute_device()
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        return LossContext(loss_name=self.loss_name, hparams=self.hparams, temperature=self.temperature,
                           vocab_size=self.vocab_size,
                           rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32, device=device),
                           group_ids=torch.tensor([s.group_id for s in samples], dtype=torch.long, device=device),
                           tp_group=lay.tp_group, cp_group=lay.cp_group, cp_size=lay.cp, **kw)

    # ------------------------------------------------------------------ forward only
    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample]):
        """Per-response-token log-probs and entropies for every sample, on every rank (lists of [r] tensors)."""
        lay = _Layout()
        for chunk in self.chunks:
            chunk.eval()
        plan = plan_micro_batches(samples, dp_size=lay.dp, micro_batch_rollouts=self.micro_batch_rollouts,
                                  sequence_level_groups=False)
        batches, rows, seq_len = self._micro_batches(samples, plan, lay)
        ctx = self._context(samples, normalizer=1.0, advantages=None, weights=None, scale=1.0)
        self._run(partial(logprob_step, ctx), batches, rows, seq_len, forward_only=True)
        longest = max(len(s.response_ids) for s in samples)
        out = torch.zeros(2, len(samples), longest, dtype=torch.float64)
        if lay.reporter:
            keep = cp_chunk_indices(seq_len, lay.cp, lay.cp_rank)
            for rec in ctx.records:
                batch = rec["batch"]
                for row, i in enumerate(batch["sample_index"].tolist()):
                    if i < 0:
                        continue
                    s = samples[i]
                    p, r = len(s.prompt_ids), len(s.response_ids)
                    full = torch.zeros(2, seq_len, dtype=torch.float64)
                    full[0, keep] = rec["logp"][row].double().cpu()
                    full[1, keep] = rec["entropy"][row].double().cpu()
                    out[:, i, :r] = full[:, p - 1:p + r - 1]
        world_sum(out)  # each (sample, position) is filled by exactly one rank
        for chunk in self.chunks:
            chunk.train()
        logps = [out[0, i, :len(s.response_ids)].float() for i, s in enumerate(samples)]
        entropies = [out[1, i, :len(s.response_ids)].float() for i, s in enumerate(samples)]
        return logps, entropies

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, samples: list[Sample]) -> dict:
        """Forward/backward over the mini-batch's micro-batches, then one optimizer step (or a counted skip)."""
        metrics = self.forward_backward(samples)
        metrics.update(self.apply_gradients(metrics["loss"]))
        return metrics

    def forward_backward(self, samples: list[Sample]) -> dict:
        """Accumulate the mini-batch loss's gradient into the grad buffers; return the loss and its metrics."""
        lay = _Layout()
        if self.loss_name == SFT:  # cross-entropy needs no old log-probs
            samples = [s if s.old_logp is not None else
                       Sample(s.prompt_ids, s.response_ids, s.reward, s.group_id, torch.zeros(len(s.response_ids)))
                       for s in samples]
        if any(s.old_logp is None for s in samples):
            raise ValueError("every sample needs old_logp (compute_logprobs at the sampling temperature first)")
        plan = plan_micro_batches(samples, dp_size=lay.dp, micro_batch_rollouts=self.micro_batch_rollouts,
                                  sequence_level_groups=self.loss_name in REAL_FAMILY, force_exact=self.force_exact)
        if plan.mode != self.last_mode:
            log.info("loss hook: %s mode (%s)", plan.mode, plan.reason)
            self.last_mode = plan.mode
        n = len(samples)
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        group_ids = torch.tensor([s.group_id for s in samples], dtype=torch.long)
        lengths = torch.tensor([len(s.response_ids) for s in samples])
        resp_mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).float()
        hp = {k: v for k, v in self.hparams.items() if k not in ("advantages", "normalizer")}
        if self.loss_name == SFT:
            normalizer = float(lengths.sum())
        else:
            normalizer = loss_normalizer(self.loss_name, mask=resp_mask, rewards=rewards, group_ids=group_ids, **hp)
        advantages = group_advantages(rewards, group_ids, hp.get("adv_eps", 1e-6)) if self.loss_name in PPO_FAMILY else None

        weights, exact_loss, exact_metrics = None, None, None
        if plan.mode == "exact":
            # w_k = ∂L/∂s̄_k from every rollout's score under the current parameters
            logps, _ = self.compute_logprobs(samples)
            scores = torch.stack([(lp.double() - s.old_logp.double()).mean() for lp, s in zip(logps, samples)])
            weights, exact_loss, exact_metrics = score_weights(self.loss_name, scores=scores, rewards=rewards.double(),
                                                               group_ids=group_ids, **hp)

        batches, rows, seq_len = self._micro_batches(samples, plan, lay)
        ctx = self._context(samples, normalizer=normalizer, advantages=advantages, weights=weights,
                            scale=float(len(batches) * lay.dp))
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._run(partial(forward_step, ctx), batches, rows, seq_len, forward_only=False)

        # ---- reduce what the last stage saw, over all ranks
        summary = torch.zeros(3 + n, dtype=torch.float64)  # loss, tokens, #micro-batches, scores[n]
        ppo_keys = ("clip_fraction", "clip_fraction_low", "clip_fraction_high", "ratio_mean")
        ppo_sums = torch.zeros(len(ppo_keys), dtype=torch.float64)
        if lay.reporter:
            for rec in ctx.records:
                summary[0] += float(rec["share"])
                summary[1] += float(rec["tokens"])
                summary[2] += 1
                if lay.cp_rank == 0:
                    summary[3 + rec["sample_index"].cpu()] = rec["scores"].double().cpu()
                for j, key in enumerate(ppo_keys):
                    ppo_sums[j] += rec["metrics"].get(key, 0.0)
        world_sum(summary)
        world_sum(ppo_sums)
        loss = exact_loss.item() if exact_loss is not None else summary[0].item()
        scores = summary[3:]

        metrics = {"loss": loss,
                   "response_tokens": summary[1].item(), "hook/exact_mode": float(plan.mode == "exact")}
        if self.loss_name == SFT or not torch.isfinite(scores).all():
            pass  # no group metrics (a non-finite step is skipped by apply_gradients)
        elif self.loss_name in REAL_FAMILY:
            _, _, group_metrics = score_weights(self.loss_name, scores=scores, rewards=rewards.double(),
                                                group_ids=group_ids, **hp)
            metrics.update({f"loss/{k}": v for k, v in (exact_metrics or group_metrics).items()})
        else:
            # token-level metrics: the mean over micro-batches (and CP ranks) of each micro-batch's value
            micro_count = max(summary[2].item(), 1.0)
            metrics.update({f"loss/{key}": (ppo_sums[j] / micro_count).item() for j, key in enumerate(ppo_keys)})
            metrics["loss/score_mean"] = scores.mean().item()
        return metrics

    def apply_gradients(self, loss: float) -> dict:
        """One optimizer step, or — on a non-finite loss or gradient anywhere — a skip that keeps the weights."""
        finite = torch.tensor([float(torch.isfinite(torch.tensor(loss)))], dtype=torch.float64)
        # one fused norm per gradient tensor, no copies (an fp32 norm overflowing to inf means
        # gradients beyond ~1e19: treated as non-finite too)
        grads = [g for chunk in self.chunks for p in chunk.parameters()
                 if (g := getattr(p, "main_grad", None)) is not None]
        grad_sq = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum().cpu() if grads else torch.zeros(())
        finite *= float(torch.isfinite(grad_sq).all())
        world_min(finite)
        if finite.item() < 1:
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            log.warning("non-finite loss or gradients: optimizer step skipped, weights unchanged")
            return {"grad_norm": float("nan"), "skipped": 1.0}
        ok, grad_norm, _ = self.optimizer.step()
        return {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "skipped": 0.0 if ok else 1.0}

