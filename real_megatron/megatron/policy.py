"""The policy on Megatron-Core: old log-probs, and one optimizer update per mini-batch.

    policy = MegatronPolicy(chunks, build_optimizer(chunks, lr=2e-6), loss=build_loss("real", {"tau": 0.5}),
                            temperature=0.6, max_tokens_per_micro_batch=16384)
    entropies = policy.set_old_logprobs(samples)                # old log-probs at the sampling temperature
    result = policy.train_step(samples)                          # one optimizer step over a mini-batch

Every rank calls both with the same ``samples`` (the trainer broadcasts rollouts); results are
returned on every rank. The optimizer itself is built in ``optimizer.py``; how rollouts become
packed micro-batches is ``batch.py``'s docstring. The policy asks its loss object (``losses/base.py``)
everything loss-specific; it never asks the loss's name.

A mini-batch's forward/backward has three parts: ``_prepare`` (what the whole mini-batch fixes: the
denominator, advantages, the rollouts that need no gradient, the micro-batch plan, and in the exact mode
the weights ∂L/∂s̄), ``_run`` (Megatron's schedule over this rank's micro-batches, through the hook) and
``_reduce`` (what the last stage saw, summed over ranks, into the mini-batch's metrics).

Two shortcuts, each leaving the loss and gradient what they would be without it (tested):

* rollouts whose gradient is exactly zero whatever the parameters (``PolicyLoss.zero_gradient_rollouts``:
  REAL's non-contributing groups, PPO-family rollouts with advantage 0; none when a KL term is on) are not
  run; the denominator, advantages and group metrics still count them
  (``hook/trained_rollout_fraction`` = share that ran). ``loss/score_mean*`` are over the rollouts
  that ran: the others' s̄ is never computed, which is the saving.
* the exact mode needs every rollout's s̄ under the current parameters; when the parameters have
  not changed since ``set_old_logprobs`` computed the old log-probs (it stamps each sample with the
  policy's ``version``: the first mini-batch of a rollout batch), every s̄ is 0 and the extra forward
  pass is skipped (``hook/extra_forward`` = 0).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch

from real_megatron.distributed import compute_device, world_min, world_sum
from real_megatron.losses import PolicyLoss
from real_megatron.megatron.batch import Plan, Sample, build_micro_batch, plan_micro_batches, slot_rows, split_for_cp
from real_megatron.megatron.diag_capture import grad_factor, reduce_diagnostics
from real_megatron.megatron.hook import LossContext, forward_step, logprob_step
from real_megatron.megatron.model import model_hf_config, unwrap
from real_megatron.megatron.update_size import UPDATE_SIZE_KEY, relative_update, snapshot, trainable_parameters

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


@dataclass
class _MiniBatch:
    """What one mini-batch fixes before its micro-batches run (``MegatronPolicy._prepare``)."""

    samples: list
    rewards: torch.Tensor  # [n] float32
    group_ids: torch.Tensor  # [n] long
    lengths: torch.Tensor  # [n] response lengths
    normalizer: float
    advantages: torch.Tensor | None
    no_gradient: torch.Tensor  # [n] bool: no loss term and no gradient whatever the parameters
    trained: list  # the sample indices that run
    plan: Plan | None  # None when nothing runs
    weights: torch.Tensor | None  # [n] ∂L/∂s̄ in the exact mode
    extra_forward: bool
    behaviour_log_ratio: torch.Tensor | None = None  # [n] mean log π_old − log μ per rollout, when corrected


def behaviour_log_ratios(samples: list[Sample]) -> torch.Tensor:
    """``[n]`` float64: each sample's mean over its response of log π_old − log μ (``old_logp`` and the engine's
    ``engine_logp``): the length-normalised log importance weight of ``losses/behaviour.py``."""
    out = torch.zeros(len(samples), dtype=torch.float64)
    for i, s in enumerate(samples):
        if s.engine_logp is None or len(s.engine_logp) != len(s.response_ids):
            raise ValueError(f"sample {i} has no engine log-probs for its response: correcting for the behaviour "
                             "policy needs them (the rollout engine returns them with each response)")
        out[i] = (s.old_logp.double() - torch.as_tensor(s.engine_logp, dtype=torch.float64)).mean()
    return out


class MegatronPolicy:
    """The model chunks and optimizer of this rank, driven through Megatron's forward/backward schedule.

    ``loss``: the loss object of the run (``losses.build_loss``, or ``losses.SFTLoss``); None for a
    forward-only policy (the frozen reference model), which only computes log-probs. ``fused_output``:
    log-probs from the output layer's input without the logits (``fused_output.py``), else through
    Megatron's output layer; every forward (training, old log-probs, the exact mode's extra pass) uses it.
    ``log_update_size``: each optimizer step's ``diag/update_rel_norm`` (``update_size.py``; it holds a copy
    of the rank's parameters during the step)."""

    def __init__(self, chunks, optimizer, *, loss: PolicyLoss | None, temperature: float = 1.0,
                 max_tokens_per_micro_batch: int = 16384, max_rollouts_per_micro_batch: int | None = None,
                 force_exact: bool = False, pad_id: int = 0, skip_zero_gradient: bool = True,
                 skip_fresh_exact_forward: bool = True, fused_output: bool = True, log_update_size: bool = False):
        self.chunks = chunks
        self.log_update_size = log_update_size  # diag/update_rel_norm per step (update_size.py; a parameter copy)
        self._sized_params = trainable_parameters(chunks) if log_update_size else []  # listed once, not per step
        self.optimizer = optimizer
        self.loss = loss
        # plain cross-entropy (SFT) is at temperature 1: the rollout temperature belongs to the RL objective
        self.temperature = float(temperature) if loss is None or loss.at_sampling_temperature else 1.0
        self.max_tokens_per_micro_batch = int(max_tokens_per_micro_batch)
        self.max_rollouts_per_micro_batch = max_rollouts_per_micro_batch
        self.force_exact = force_exact
        self.pad_id = pad_id
        self.skip_zero_gradient = skip_zero_gradient
        self.skip_fresh_exact_forward = skip_fresh_exact_forward
        self.fused_output = fused_output  # model.fused_output: hook.py's two ways to the log-probs
        self.version = 0  # optimizer steps taken by this object: tells whether old log-probs are still current
        gpt = unwrap(chunks[0])
        if gpt.config.calculate_per_token_loss:
            raise ValueError("calculate_per_token_loss must be False: the hook's scale factor cancels "
                             "Megatron's micro-batch and data-parallel averaging itself (see hook.py)")
        self.vocab_size = model_hf_config(chunks[0])["vocab_size"]  # unpadded: the padding rows are masked
        # sequence parallelism scatters a row over the TP ranks: slots are padded to a multiple of tp
        self.multiple = gpt.config.tensor_model_parallel_size if gpt.config.sequence_parallel else 1
        self.last_mode: str | None = None

    # ------------------------------------------------------------------ helpers
    def plan(self, samples, *, sequence_level_groups: bool, include=None, force_exact: bool = False):
        lay = _Layout()
        return plan_micro_batches(samples, dp_size=lay.dp, max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
                                  sequence_level_groups=sequence_level_groups, force_exact=force_exact, cp=lay.cp,
                                  multiple=self.multiple,
                                  max_rollouts_per_micro_batch=self.max_rollouts_per_micro_batch,
                                  fixed_row_length=lay.pp > 1, include=include)

    def _micro_batches(self, samples, plan, lay: _Layout, behaviour: bool = False):
        """This rank's micro-batches (on the compute device, split for CP) and the row length for the schedule;
        ``behaviour``: with the engine's log-probs (a loss that corrects for the behaviour policy)."""
        device = compute_device()
        batches = []
        for mb in plan.rank_micro_batches[lay.dp_rank]:
            batch = build_micro_batch(samples, mb, align=plan.align, row_length=plan.row_length, pad_id=self.pad_id,
                                      behaviour=behaviour)
            batches.append({k: v.to(device) for k, v in split_for_cp(batch, lay.cp, lay.cp_rank).items()})
        return batches, max(plan.micro_batch_length(samples, mb) for mb in plan.rank_micro_batches[lay.dp_rank])

    def _schedule(self, step_func, batches, seq_len, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        # one packed row per micro-batch; seq_length sizes the pipeline's p2p buffers (rows share it under PP)
        get_forward_backward_func()(
            forward_step_func=step_func, data_iterator=iter(batches), model=self.chunks,
            num_microbatches=len(batches), seq_length=seq_len, micro_batch_size=1, forward_only=forward_only)

    def _context(self, samples, **kw) -> LossContext:
        lay = _Layout()
        device = compute_device()
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        return LossContext(loss=self.loss, temperature=self.temperature, vocab_size=self.vocab_size,
                           rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32, device=device),
                           group_ids=torch.tensor([s.group_id for s in samples], dtype=torch.long, device=device),
                           tp_group=lay.tp_group, cp_group=lay.cp_group, cp_size=lay.cp,
                           fused_output=self.fused_output, **kw)

    # ------------------------------------------------------------------ forward only
    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample], include=None):
        """Per-response-token log-probs and entropies for every sample, on every rank (lists of [r] tensors).

        ``include``: run only these sample indices (the others come back as zeros)."""
        lay = _Layout()
        for chunk in self.chunks:
            chunk.eval()
        plan = self.plan(samples, sequence_level_groups=False, include=include)
        batches, seq_len = self._micro_batches(samples, plan, lay)
        ctx = self._context(samples, normalizer=1.0, advantages=None, weights=None, scale=1.0)
        self._schedule(partial(logprob_step, ctx), batches, seq_len, forward_only=True)
        longest = max(len(s.response_ids) for s in samples)
        out = torch.zeros(2, len(samples), longest, dtype=torch.float64)
        if lay.reporter:
            for rec in ctx.records:
                batch = rec["batch"]
                index, valid = slot_rows(batch["segment"], batch["sample_index"].numel())
                # each position's place in its sequence (CP ranks hold two chunks of every sequence)
                where = batch["position_ids"].reshape(-1)[index].cpu()
                values = [rec["logp"].reshape(-1)[index].double().cpu(),
                          rec["entropy"].reshape(-1)[index].double().cpu()]
                for slot, i in enumerate(batch["sample_index"].tolist()):
                    s = samples[i]
                    p, r = len(s.prompt_ids), len(s.response_ids)
                    # the label of position p-1+t is response token t
                    t = where[slot] - (p - 1)
                    keep = valid[slot].cpu() & (t >= 0) & (t < r)
                    for j in range(2):
                        out[j, i, t[keep]] = values[j][slot][keep]
        world_sum(out)  # each (sample, position) is filled by exactly one rank
        for chunk in self.chunks:
            chunk.train()
        logps = [out[0, i, :len(s.response_ids)].float() for i, s in enumerate(samples)]
        entropies = [out[1, i, :len(s.response_ids)].float() for i, s in enumerate(samples)]
        return logps, entropies

    def set_old_logprobs(self, samples: list[Sample]) -> list[torch.Tensor]:
        """Compute and set every sample's ``old_logp`` under the current weights, stamped with this policy's
        ``version`` (the exact mode's shortcut reads it); returns the entropies (lists of [r] tensors)."""
        logps, entropies = self.compute_logprobs(samples)
        for s, lp in zip(samples, logps, strict=True):
            s.old_logp, s.old_logp_version = lp, self.version  # current until the next optimizer step
        return entropies

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, samples: list[Sample]) -> dict:
        """Forward/backward over the mini-batch's micro-batches, then one optimizer step (or a counted skip)."""
        metrics = self.forward_backward(samples)
        metrics.update(self.apply_gradients(metrics["loss"]))
        return metrics

    def forward_backward(self, samples: list[Sample]) -> dict:
        """Accumulate the mini-batch loss's gradient into the grad buffers; return the loss and its metrics."""
        mini = self._prepare(samples)
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = {"hook/trained_rollout_fraction": len(mini.trained) / len(mini.samples),
                   "hook/exact_mode": float(mini.weights is not None), "hook/extra_forward": float(mini.extra_forward)}
        if mini.plan is None:  # nothing has a gradient: the loss is 0 (the step still runs: Adam's moments, decay)
            metrics.update({"loss": 0.0, "response_tokens": float(mini.lengths.sum()), "hook/micro_batches": 0.0})
            if self.loss.group_metrics:
                metrics.update(self.loss.batch_metrics(torch.zeros(len(mini.samples), dtype=torch.float64),
                                                       mini.rewards, mini.group_ids, self._ran(mini), {},
                                                       mini.behaviour_log_ratio))
                metrics.update(self._diagnostics([], _Layout(), mini))  # gradient mass 0
            return metrics
        records = self._run(mini)
        metrics.update(self._reduce(mini, records))
        return metrics

    def _prepare(self, samples: list[Sample]) -> _MiniBatch:
        """The whole mini-batch's denominator, advantages, idle rollouts, micro-batch plan and exact weights."""
        loss = self.loss
        if not loss.needs_old_logp:  # e.g. cross-entropy: the hook's s̄ bookkeeping reads zeros
            samples = [s if s.old_logp is not None else
                       Sample(s.prompt_ids, s.response_ids, s.reward, s.group_id, torch.zeros(len(s.response_ids)))
                       for s in samples]
        if any(s.old_logp is None for s in samples):
            raise ValueError("every sample needs old_logp (set_old_logprobs at the sampling temperature first)")
        n = len(samples)
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        group_ids = torch.tensor([s.group_id for s in samples], dtype=torch.long)
        lengths = torch.tensor([len(s.response_ids) for s in samples])
        normalizer = loss.normalizer(lengths, rewards, group_ids)
        advantages = loss.advantages(rewards, group_ids)
        # rollouts whose gradient is exactly zero are not run (see the module docstring)
        no_gradient = loss.zero_gradient_rollouts(rewards, group_ids, advantages=advantages,
                                                  has_ref=any(s.ref_logp is not None for s in samples))
        idle = no_gradient if self.skip_zero_gradient else torch.zeros(n, dtype=torch.bool)
        trained = (~idle).nonzero().flatten().tolist()
        mini = _MiniBatch(samples, rewards, group_ids, lengths, normalizer, advantages, no_gradient, trained,
                          plan=None, weights=None, extra_forward=False)
        if loss.corrects_behaviour:
            mini.behaviour_log_ratio = behaviour_log_ratios(samples)
        if not trained:
            return mini
        mini.plan = self.plan(samples, sequence_level_groups=loss.couples_groups, include=trained,
                              force_exact=self.force_exact)
        if mini.plan.mode != self.last_mode:  # said once per run, and when it changes
            log.info("loss hook: %s mode (%s)", mini.plan.mode, mini.plan.reason)
            self.last_mode = mini.plan.mode
        if mini.plan.mode == "exact":
            # w_k = ∂L/∂s̄_k from every rollout's score under the current parameters; the idle
            # rollouts' w is 0 whatever their score, so 0 stands in for it
            scores = torch.zeros(n, dtype=torch.float64)
            fresh = self.skip_fresh_exact_forward and all(samples[i].old_logp_version == self.version for i in trained)
            if not fresh:  # parameters moved since the old log-probs: one forward pass over the trained rollouts
                logps, _ = self.compute_logprobs(samples, include=trained)
                for i in trained:
                    scores[i] = (logps[i].double() - samples[i].old_logp.double()).mean()
            mini.weights, _, _ = loss.score_weights(scores, rewards.double(), group_ids, mini.behaviour_log_ratio)
            mini.extra_forward = not fresh
        return mini

    def _run(self, mini: _MiniBatch) -> list[dict]:
        """Megatron's schedule over this rank's micro-batches through the hook; the last stage's records."""
        lay = _Layout()
        batches, seq_len = self._micro_batches(mini.samples, mini.plan, lay, behaviour=self.loss.corrects_behaviour)
        ctx = self._context(mini.samples, normalizer=mini.normalizer, advantages=mini.advantages,
                            weights=mini.weights, scale=float(len(batches) * lay.dp))
        self._schedule(partial(forward_step, ctx), batches, seq_len, forward_only=False)
        return ctx.records

    def _reduce(self, mini: _MiniBatch, records: list[dict]) -> dict:
        """What the last stage saw (``records``), summed over all ranks, as the mini-batch's metrics."""
        lay = _Layout()
        n = len(mini.samples)
        keys = self.loss.token_metric_keys
        summary = torch.zeros(3 + n, dtype=torch.float64)  # loss, tokens run, #micro-batches, scores[n]
        token_sums = torch.zeros(len(keys), dtype=torch.float64)
        if lay.reporter:
            for rec in records:
                summary[0] += float(rec["share"])
                summary[1] += float(rec["tokens"])
                summary[2] += 1
                if lay.cp_rank == 0:
                    summary[3 + rec["sample_index"].cpu()] = rec["scores"].double().cpu()
                for j, key in enumerate(keys):
                    token_sums[j] += rec["metrics"].get(key, 0.0)
        world_sum(summary)
        world_sum(token_sums)
        kl = self._reduce_kl(mini, records, lay)
        scores = summary[3:]
        metrics = {"loss": summary[0].item(), "response_tokens": float(mini.lengths.sum()),
                   "hook/micro_batches": float(sum(len(rank) for rank in mini.plan.rank_micro_batches))}
        if not self.loss.group_metrics or not torch.isfinite(scores).all():
            return metrics  # no group metrics (a non-finite step is skipped by apply_gradients)
        token_means = token_sums / max(summary[2].item(), 1.0)
        metrics.update(self.loss.batch_metrics(scores, mini.rewards, mini.group_ids, self._ran(mini),
                                               {key: token_means[j].item() for j, key in enumerate(keys)},
                                               mini.behaviour_log_ratio))
        metrics.update(self._diagnostics(records, lay, mini))
        if mini.weights is not None:  # the shares Σ w·s̄ are not the loss: the loss of the scores the update saw is
            metrics["loss"] = self.loss.exact_loss_value(scores, mini.rewards.double(), mini.group_ids, kl,
                                                         mini.behaviour_log_ratio)
        if kl is not None:
            metrics["loss/kl"] = kl.mean().item()
        return metrics

    @staticmethod
    def _ran(mini: _MiniBatch) -> torch.Tensor:
        ran = torch.zeros(len(mini.samples), dtype=torch.bool)
        ran[mini.trained] = True
        return ran

    def _reduce_kl(self, mini: _MiniBatch, records, lay: _Layout):
        """Each rollout's token-mean KL ``[n]`` summed over ranks (CP ranks hold parts of it), or None when the
        loss has no KL term. Every rollout runs when it has (``zero_gradient_rollouts``)."""
        if not self.loss.kl_applies(any(s.ref_logp is not None for s in mini.samples)):
            return None
        kl = torch.zeros(len(mini.samples), dtype=torch.float64)
        if lay.reporter:
            for rec in records:
                if rec["kl"] is not None:
                    kl[rec["sample_index"].cpu()] += rec["kl"].double().cpu()
        world_sum(kl)
        return kl

    def _diagnostics(self, records, lay: _Layout, mini: _MiniBatch) -> dict:
        """``diag/*`` ratio-bin and gradient-domination metrics of the whole mini-batch (diag_capture.py)."""
        if not self.loss.diagnostics:
            return {}
        return reduce_diagnostics(records, reporter=lay.reporter, lengths=mini.lengths,
                                  positive=self.loss.positive(mini.rewards), carries=~mini.no_gradient,
                                  factor=grad_factor(unwrap(self.chunks[0]).config))

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
            skipped = {"grad_norm": float("nan"), "skipped": 1.0}
            return {**skipped, UPDATE_SIZE_KEY: 0.0} if self.log_update_size else skipped
        before = snapshot(self._sized_params)
        ok, grad_norm, _ = self.optimizer.step()
        self.version += int(bool(ok))
        metrics = {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "skipped": 0.0 if ok else 1.0}
        if self.log_update_size:
            metrics[UPDATE_SIZE_KEY] = relative_update(self._sized_params, before)
        return metrics

