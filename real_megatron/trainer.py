"""The RL loop — Algorithm 1 of the paper — on Megatron-Core.

    real-megatron train --config examples/configs/tiny_cpu.yaml [section.key=value ...]
    torchrun --nproc-per-node 2 -m real_megatron train --config FILE parallel.tp=2

One rollout step (``Trainer.step``, one method per phase):

1. rank 0 samples ``train.rollout_batch_prompts`` prompts and ``rollout.n`` responses each with
   the rollout engine, scores them in the reward worker pool (labels: reward ≥ threshold);
2. the rollouts are broadcast; every rank recomputes the old log-probs with the Megatron model
   at the sampling temperature (the authors do the same, docs/method.md §3; the engine's own
   log-probs are only a drift metric);
3. ``rollout_batch_prompts / mini_batch_prompts`` optimizer updates through the loss hook
   (groups kept whole, or the exact mode when a group has to be split);
4. the new weights go to the engine in HF names, bucket by bucket, without touching disk;
5. evaluation every ``train.eval_every`` rollout steps, a checkpoint every ``train.save_every``.

Metrics: one row per optimizer step in ``<run_dir>/metrics.jsonl``; ``step`` counts optimizer
steps. Rollout-level numbers (reward, lengths, times of the rollout phase) describe the batch the
step trained on; ``time/rollout_s``, ``time/reward_s``, ``time/logprob_s`` (and ``time/ref_logprob_s``,
the frozen reference model's forward pass when the loss has a KL to it) are on the first row
of a rollout batch and ``time/sync_s`` on its last (0.0 on the others), so sums over rows are
true totals. An evaluation before training is logged as its own row with ``step`` 0.

With ``train.max_staleness`` S ≥ 1, phase 1 runs ahead on rank 0 (``rollout/producer.py``): the engine generates
and the reward workers score batch k+1 … k+S while phases 2–4 run on batch k, and phase 4 waits until the
batches that need the older weights are out. Each row then has ``rollout/staleness_mean`` / ``_max`` (weight
versions between the sampling weights and the trained ones), ``time/wait_rollout_s`` (the trainer's wait for its
batch) and ``time/engine_idle_s`` (the engine's wait for new weights), and a checkpoint holds the batches
generated but not yet trained.

Resume: a rerun with the same ``run_dir`` continues from ``checkpoints/latest``, at any TP/PP/DP
(checkpoints are resharded on load, ``checkpoint.py``); SIGINT/SIGTERM finish the current rollout
step, save, and exit with 128 + signal number.

The loop only reads the run's parts (``parts.py`` builds them); the command-line wrapper shared with
``sft`` is ``job_runner.py``.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch

from real_megatron.config import RunConfig, config_to_dict
from real_megatron.distributed import any_rank, broadcast_object
from real_megatron.job_runner import JobFailed, run_job
from real_megatron.parts import EngineSyncError, RunParts, build_parts

log = logging.getLogger("real_megatron")
PENDING_FILE = "pending_rollouts.pt"  # a checkpoint's batches generated ahead and not yet trained (max_staleness ≥ 1)


class RolloutFailed(JobFailed):
    """The rollout engine or the reward pool failed; the run saved what it safely could."""


class Trainer:
    """The RL loop over a run's parts; ``run()`` executes it."""

    def __init__(self, parts: RunParts):
        self.parts = parts
        self.cfg = parts.cfg
        self.rank = parts.rank
        self.updates_per_rollout = self.cfg.train.rollout_batch_prompts // self.cfg.train.mini_batch_prompts
        self.rollout_step = 0
        self.skipped_steps = 0
        self._stop_signal: int | None = None
        self.staleness = self.cfg.train.max_staleness
        self.producer = None  # rank 0 with max_staleness >= 1: rollout/producer.AheadProducer
        self._pending: dict[int, dict] = {}  # batches a checkpoint held, given to the producer when it starts
        self._sampler_after_taken = None  # the prompt sampler's state after the last batch taken (max_staleness >= 1)

    # ------------------------------------------------------------------ state
    @property
    def optimizer_steps_done(self) -> int:
        """Optimizer updates completed so far (the metrics' ``step``): rollout steps × updates per rollout."""
        return self.rollout_step * self.updates_per_rollout

    def save(self) -> Path:
        from real_megatron.megatron.dist_state import save_training_state

        p = self.parts
        pending, write_pending = self._pending_to_save()
        meta = {"layout": p.layout, "rollout_step": self.rollout_step, "optimizer_step": self.optimizer_steps_done,
                "skipped_steps": self.skipped_steps, "config": config_to_dict(self.cfg),
                "sampler": self._sampler_state(pending), "pending_rollouts": sorted(pending)}
        meta = broadcast_object(meta)  # rank 0 owns the sampler
        path = p.ckpt.save(self.rollout_step, meta, lambda d: save_training_state(p.chunks, p.optimizer, d),
                           write_pending)
        if self.rank == 0:
            log.info("checkpoint saved: %s", path)
        return path

    def _pending_to_save(self):
        """Rank 0 with a producer: the batches generated ahead and not yet trained, and the writer that puts them
        into the checkpoint; ``({}, None)`` otherwise."""
        if self.producer is None:
            return {}, None
        pending = self.producer.pending()

        def write(directory: Path) -> None:
            torch.save(pending, directory / PENDING_FILE)

        return pending, write if pending else None

    def _sampler_state(self, pending: dict):
        """The prompt sampler's state a resume continues from: after the last batch generated and kept (the one in
        flight is generated again), or the sampler's own state in the synchronous loop."""
        if self.producer is not None:
            return pending[max(pending)]["sampler_after"] if pending else self._sampler_after_taken
        return self.parts.sampler.state_dict() if self.parts.sampler is not None else None

    def restore(self) -> bool:
        """Load ``checkpoints/latest`` (a reshardable checkpoint, at any layout); False when there is none."""
        from real_megatron.megatron.dist_state import load_training_state

        p = self.parts
        latest = p.ckpt.latest()
        if latest is None:
            return False
        meta = p.ckpt.load(latest, layout=p.layout, read_state=lambda d: load_training_state(p.chunks, p.optimizer, d))
        self.rollout_step = int(meta["rollout_step"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        if p.sampler is not None and meta.get("sampler") is not None:
            p.sampler.load_state_dict(meta["sampler"])
        if self.rank == 0 and meta.get("pending_rollouts"):
            self._pending = torch.load(latest / PENDING_FILE, weights_only=False)
            if sorted(self._pending) != meta["pending_rollouts"]:
                raise JobFailed(f"{latest / PENDING_FILE} does not hold the batches its meta.json lists")
        if self.rank == 0:
            log.info("resumed from %s (rollout step %d)", latest, self.rollout_step)
        return True

    # ------------------------------------------------------------------ one rollout step
    def step(self) -> None:
        """One rollout step: the five phases of the module docstring, then its metric rows."""
        samples, rollout_metrics = self._rollouts()
        self._old_logprobs(samples, rollout_metrics)
        self._ref_logprobs(samples, rollout_metrics)
        rows = self._updates(samples, rollout_metrics)
        try:
            rows[-1]["time/sync_s"], waited = self._sync_to_engine()
            if waited:  # waiting for the producer before the push is waiting for rollouts too
                rows[0]["time/wait_rollout_s"] += waited
        except EngineSyncError as err:  # the step trained: keep it, then stop with the engine named
            self.rollout_step += 1
            self._log_rows(rows)
            path = self.save()
            raise RolloutFailed(f"sending the weights of rollout step {self.rollout_step} to the engine failed: {err}. "
                                f"The state after rollout step {self.rollout_step} was saved to {path}; fix the "
                                "engine and rerun the same command to resume") from err
        self.rollout_step += 1
        self._evaluate_if_due(rows[-1])
        self._log_rows(rows)

    def _rollouts(self):
        """Phase 1. Rank 0 samples and scores a batch (or takes it from the producer); every rank gets
        ``(samples, metrics)``, each sample carrying its engine's log-probs. A failure on rank 0 reaches every
        rank, which save the last consistent state and raise ``RolloutFailed``."""
        from real_megatron.megatron.batch import Sample

        p = self.parts
        payload = None
        if self.rank == 0:
            try:
                payload = self._collect_rollouts() if self.producer is None else self._take_rollouts()
                if p.colocated:  # hand the GPU memory to training until the weights come back
                    p.engine.release_memory(p.memory_tags)
            except Exception as err:  # engine/reward failure: every rank must hear about it
                log.exception("rollout failed")
                payload = {"error": f"{type(err).__name__}: {err}"}
        payload = broadcast_object(payload)
        if "error" in payload:
            if self.rollout_step == 0:  # nothing trained yet: no checkpoint, the fixed command starts afresh
                raise RolloutFailed(f"rollout step 1 failed: {payload['error']}. Nothing was trained, so no "
                                    "checkpoint was written; fix the cause and rerun the same command")
            path = self.save()  # the weights are those of the last completed step: safe to keep
            raise RolloutFailed(f"rollout step {self.rollout_step + 1} failed: {payload['error']}. The state after "
                                f"rollout step {self.rollout_step} was saved to {path}; fix the engine and rerun the "
                                "same command to resume")
        if not payload["records"]:
            raise RolloutFailed("the rollout engine returned no non-empty response in a whole batch")
        samples = [Sample(r.prompt_ids, r.response_ids, r.reward, r.group_id, engine_logp=r.engine_logprobs)
                   for r in payload["records"]]
        return samples, payload["metrics"]

    def _collect_rollouts(self, step: int | None = None) -> dict:
        """Rank 0: sample the next prompts, generate ``rollout.n`` responses each, score them — batch ``step``
        (default: the current rollout step; the producer thread calls it for the batches ahead)."""
        from real_megatron.rollout import SamplingParams
        from real_megatron.rollout.collect import collect_rollouts

        cfg, p = self.cfg, self.parts
        step = self.rollout_step if step is None else step
        batch = p.sampler.next_batch()
        sampler_after = p.sampler.state_dict() if self.staleness else None
        sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed * 1_000_003 + step)
        records, metrics = collect_rollouts(
            engine=p.engine, reward_pool=p.reward_pool, tokenizer=p.tokenizer, prompts=batch,
            prompt_ids=[p.train_ids[r.index] for r in batch], n=cfg.rollout.n, sampling=sampling,
            first_group_id=step * cfg.train.rollout_batch_prompts)
        payload = {"records": records, "metrics": metrics}
        if sampler_after is not None:
            payload["sampler_after"] = sampler_after
        return payload

    def _take_rollouts(self) -> dict:
        """Rank 0, max_staleness ≥ 1: this step's batch from the producer, with how stale it is and how long the
        trainer and the engine waited."""
        payload, waited = self.producer.take(self.rollout_step)
        self._sampler_after_taken = payload["sampler_after"]
        # each rollout's staleness counts its oldest token (an engine that records token versions), else the batch's
        oldest = [min(r.engine_versions) if r.engine_versions else payload["version"] for r in payload["records"]]
        staleness = [float(self.rollout_step - v) for v in oldest]
        if not all(0 <= s <= self.staleness for s in staleness):  # the configured bound, checked where it matters
            raise RuntimeError(f"batch {self.rollout_step} holds tokens sampled by weight version {min(oldest)}: "
                               f"{max(staleness):g} versions old, beyond train.max_staleness={self.staleness}")
        idle, self.producer.engine_idle_s = self.producer.engine_idle_s, 0.0
        metrics = {**payload["metrics"], "rollout/staleness_mean": sum(staleness) / max(len(staleness), 1),
                   "rollout/staleness_max": max(staleness, default=0.0), "time/wait_rollout_s": waited,
                   "time/engine_idle_s": idle}
        return {"records": payload["records"], "metrics": metrics}

    def _start_producer(self) -> None:
        """Rank 0, max_staleness ≥ 1: start generating ahead from the current step, with the batches a checkpoint
        held (the engine holds the weights of this step)."""
        from real_megatron.rollout.producer import AheadProducer

        if self.rank != 0 or not self.staleness:
            return
        if self._pending:  # the prompt sampler continues after the last batch the checkpoint kept
            self.parts.sampler.load_state_dict(self._pending[max(self._pending)]["sampler_after"])
        self._sampler_after_taken = self.parts.sampler.state_dict()
        self.producer = AheadProducer(self._collect_rollouts, staleness=self.staleness, start=self.rollout_step,
                                      end=self.cfg.train.steps, engine_version=self.rollout_step,
                                      pending=self._pending, partial=self.cfg.rollout.partial)
        self._pending = {}
        self.producer.start()

    def _old_logprobs(self, samples, rollout_metrics: dict) -> None:
        """Phase 2. The old log-probs (and entropy) of every rollout under the current weights, at the sampling
        temperature; adds ``train/entropy``, the engine drift and ``time/logprob_s`` to ``rollout_metrics``."""
        t0 = time.perf_counter()
        entropies = self.parts.policy.set_old_logprobs(samples)
        tokens = sum(len(e) for e in entropies)
        rollout_metrics["train/entropy"] = float(sum(e.double().sum() for e in entropies) / max(tokens, 1))
        if all(s.engine_logp is not None for s in samples):
            diff = torch.cat([torch.tensor(s.engine_logp, dtype=torch.float64) - s.old_logp.double() for s in samples])
            rollout_metrics["rollout/logprob_abs_diff_mean"] = float(diff.abs().mean())
            if self.staleness or self.parts.loss.corrects_behaviour:
                rollout_metrics.update(self._behaviour_metrics(samples, -diff))
        rollout_metrics["time/logprob_s"] = time.perf_counter() - t0

    def _behaviour_metrics(self, samples, token_log_ratio: torch.Tensor) -> dict:
        """How far the sampling engine μ is from π_old (``losses/behaviour.py``): the k3 KL(μ‖π_old) per token and the
        importance weights at the loss's level (per token, or length-normalised per rollout) before the correction,
        with the fraction the correction truncates or masks."""
        from real_megatron.losses.behaviour import BehaviourCorrection, behaviour_kl
        from real_megatron.megatron.policy import behaviour_log_ratios

        loss = self.parts.loss
        correction = loss.behaviour if loss.behaviour is not None else BehaviourCorrection("none", 2.0)
        ratios = behaviour_log_ratios(samples) if loss.sequence_level else token_log_ratio
        stats = correction.stats(ratios)
        mu = torch.cat([torch.as_tensor(s.engine_logp, dtype=torch.float64) for s in samples])
        old = torch.cat([s.old_logp.double() for s in samples])
        return {"rollout/behaviour_kl": behaviour_kl(old, mu),
                **{f"rollout/behaviour_{k}": v for k, v in stats.items()}}

    def _ref_logprobs(self, samples, rollout_metrics: dict) -> None:
        """Phase 2b (a KL to the reference only): every sample's ``ref_logp`` from the frozen initial model, at
        the sampling temperature; adds ``time/ref_logprob_s`` and ``memory/ref_model_mb``."""
        p = self.parts
        if p.ref_policy is None:
            return
        t0 = time.perf_counter()
        ref_logps, _ = p.ref_policy.compute_logprobs(samples)
        for s, lp in zip(samples, ref_logps, strict=True):
            s.ref_logp = lp
        rollout_metrics["time/ref_logprob_s"] = time.perf_counter() - t0
        rollout_metrics["memory/ref_model_mb"] = p.ref_model_mb

    def _updates(self, samples, rollout_metrics: dict) -> list[dict]:
        """Phase 3. One optimizer update per mini-batch of whole prompts; one metrics row per update."""
        from real_megatron.rollout.collect import split_mini_batches

        rows = []
        for j, mini_batch in enumerate(split_mini_batches(samples, self.cfg.train.mini_batch_prompts)):
            t0 = time.perf_counter()
            result = self.parts.policy.train_step(mini_batch)
            self.skipped_steps += int(result.get("skipped", 0.0) > 0)
            row = {k: v for k, v in rollout_metrics.items() if not k.startswith("time/")}
            row.update({
                "rollout_step": self.rollout_step + 1,
                "train/loss": result["loss"],
                "train/grad_norm": result["grad_norm"],
                "train/skipped_steps": float(self.skipped_steps),
                **{k: v for k, v in result.items() if k.startswith(("hook/", "loss/", "diag/"))},
                "time/update_s": time.perf_counter() - t0,
                "time/sync_s": 0.0,
            })
            for key in ("time/rollout_s", "time/reward_s", "time/logprob_s") + (
                    ("time/ref_logprob_s",) if self.parts.ref_policy is not None else ()) + (
                    ("time/wait_rollout_s", "time/engine_idle_s") if self.staleness else ()):
                row[key] = rollout_metrics.get(key, 0.0) if j == 0 else 0.0
            rows.append(row)
        return rows

    def _sync_to_engine(self) -> tuple[float, float]:
        """Phase 4. The new weights to the engine (a colocated SGLang engine gets its memory back around it).
        Returns the seconds of the sync and of the wait before it (for the batches that need the older weights)."""
        p = self.parts
        waited = 0.0
        if self.producer is not None:  # the batches that need the older weights go out first
            t0 = time.perf_counter()
            self.producer.before_push(self.rollout_step + 1)
            waited = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.rank == 0 and p.colocated:
            p.engine.resume_memory(["weights"])  # weights first, then KV cache / CUDA graphs (SGLang's order)
        p.sync_weights(version=self.rollout_step + 1)
        if self.rank == 0 and p.colocated:
            p.engine.resume_memory([t for t in p.memory_tags if t != "weights"])
        if self.producer is not None:
            self.producer.pushed(self.rollout_step + 1)
        return time.perf_counter() - t0, waited

    def _evaluate_if_due(self, last_row: dict) -> None:
        """Phase 5 (rank 0): an evaluation every ``train.eval_every`` rollout steps and after the last one,
        into the step's last row. (The checkpoint half of phase 5 is ``run``'s: it also follows signals.)"""
        cfg = self.cfg
        due = cfg.train.eval_every and (self.rollout_step % cfg.train.eval_every == 0
                                        or self.rollout_step == cfg.train.steps)
        if self.rank == 0 and self.parts.eval_records and due:
            t0 = time.perf_counter()
            last_row.update(self.parts.evaluate())
            last_row["time/eval_s"] = time.perf_counter() - t0

    def _log_rows(self, rows: list[dict]) -> None:
        """Rank 0: the step's rows, numbered by optimizer step, with the data-skip counts on each."""
        if self.rank != 0:
            return
        skips = {f"data/skipped_{k}": float(v) for k, v in self.parts.data_skipped.items()}
        first = self.optimizer_steps_done - len(rows) + 1
        for i, row in enumerate(rows):
            self.parts.logger.log(first + i, {**row, **skips})

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame):
        self._stop_signal = signum
        log.warning("signal %d: finishing the current rollout step, then saving and exiting", signum)

    def run(self) -> int:
        cfg, p = self.cfg, self.parts
        try:
            resumed = self.restore() if p.resuming else False
            if not resumed and self.rank == 0:
                log.info("initial weights from %s", p.initial_weights)
            if self.rank == 0:
                p.open_metrics(cfg.train.steps * self.updates_per_rollout, start_step=self.optimizer_steps_done)
            try:
                p.sync_weights(version=self.rollout_step)
            except EngineSyncError as err:
                raise RolloutFailed(f"the rollout engine did not take the starting weights: {err}; fix the engine "
                                    "and rerun the same command") from err
            if self.rank == 0 and not resumed and p.eval_records and cfg.train.eval_every:
                p.logger.log(0, {**p.evaluate(), "rollout_step": 0})
            self._start_producer()
            return self._loop()
        finally:
            if self.producer is not None:
                self.producer.stop()
            p.close()

    def _loop(self) -> int:
        cfg, p = self.cfg, self.parts
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.rollout_step < cfg.train.steps:
                self.step()
                stop = any_rank(self._stop_signal is not None)
                if stop or self.rollout_step % cfg.train.save_every == 0 or self.rollout_step == cfg.train.steps:
                    self.save()
                if stop:
                    signum = self._stop_signal or signal.SIGTERM
                    if self.rank == 0:
                        print(f"stopped by signal {signum} after rollout step {self.rollout_step}; checkpoint saved. "
                              f"Rerun the same command to resume.", flush=True)
                    return 128 + int(signum)
            p.export_hf(p.run_dir / "hf_final")
            if self.rank == 0:
                print(f"run directory: {p.run_dir}\nmetrics: {p.run_dir / 'metrics.jsonl'}\n"
                      f"final model (HF): {p.run_dir / 'hf_final'}", flush=True)
            return 0
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def train(cfg: RunConfig) -> int:
    """``real-megatron train`` on a loaded config: build the run's parts, run the loop; the exit code."""
    from real_megatron.losses import build_loss

    return Trainer(build_parts(cfg, build_loss(cfg.loss.name, cfg.loss.hparams))).run()


def main(argv=None) -> int:
    return run_job(argv, "real-megatron train", "RL training with REAL (or a baseline loss) on Megatron-Core", train)
