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

Resume: a rerun with the same ``run_dir`` continues from ``checkpoints/latest``, at any TP/PP/DP
(checkpoints are resharded on load, ``checkpoint.py``); SIGINT/SIGTERM finish the current rollout
step, save, and exit with 128 + signal number.

The set-up pieces (model directory, tokenizer, prompt files, the engine factory) are in
``components.py``; the command-line wrapper shared with ``sft`` is ``job_runner.py``.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import torch

from real_megatron.components import (check_data_files, load_initial_weights, load_prompt_files, load_tokenizer,
                                      make_engine, pad_id_of, read_model_dir)
from real_megatron.config import ConfigError, RunConfig, config_to_dict, save_config, validate_config
from real_megatron.distributed import any_rank, barrier, broadcast_object, world
from real_megatron.dtypes import torch_dtype
from real_megatron.job_runner import JobFailed, run_job

log = logging.getLogger("real_megatron")


class RolloutFailed(JobFailed):
    """The rollout engine or the reward pool failed; the run saved what it safely could."""


class Trainer:
    """Everything a run holds; ``run()`` executes the loop. Used by ``train`` and, with the SFT loss, ``sft``."""

    def __init__(self, cfg: RunConfig, *, loss=None):
        from real_megatron.checkpoint import CheckpointManager
        from real_megatron.megatron.cpu import enable_cpu_support
        from real_megatron.megatron.model import build_model, initialize_parallel
        from real_megatron.megatron.optimizer import build_optimizer
        from real_megatron.megatron.policy import MegatronPolicy

        self.cfg = cfg
        self.hf = read_model_dir(cfg)
        check_data_files(cfg)
        _, world_size = world()
        validate_config(cfg, world_size=world_size, hf_config=self.hf)
        enable_cpu_support()
        initialize_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.seed, self.hf)
        self.rank, self.world_size = world()
        self.run_dir = Path(cfg.run_dir)
        self.chunks = build_model(self.hf, dtype=torch_dtype(cfg.model.dtype),
                                  transformer_impl=cfg.model.transformer_impl, wrap_ddp=True, sequence_parallel=cfg.model.sequence_parallel,
                                  recompute_activations=cfg.model.recompute_activations,
                                  use_distributed_optimizer=cfg.optim.use_distributed_optimizer)
        self.ckpt = CheckpointManager(self.run_dir, rank=self.rank, world_size=self.world_size, barrier=barrier,
                                      broadcast=broadcast_object)
        # Initial weights go in BEFORE the optimizer is built: with bf16 params (and with the
        # distributed optimizer) Megatron's optimizer copies the weights into fp32 master params
        # when it is built, and its first step would write those (random) masters back.
        # A resumed run gets its masters from the checkpoint's optimizer state instead.
        self.resuming = self.ckpt.latest() is not None
        self.initial_weights = None if self.resuming else load_initial_weights(cfg, self.chunks)
        o = cfg.optim
        self.optimizer = build_optimizer(self.chunks, lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
                                         adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                                         use_distributed_optimizer=o.use_distributed_optimizer)
        self.tokenizer = load_tokenizer(cfg.model.hf_dir)
        from real_megatron.losses import build_loss

        self.loss = loss if loss is not None else build_loss(cfg.loss.name, cfg.loss.hparams)
        self.policy = MegatronPolicy(self.chunks, self.optimizer, loss=self.loss, temperature=cfg.rollout.temperature,
                                     max_tokens_per_micro_batch=cfg.train.max_tokens_per_micro_batch,
                                     max_rollouts_per_micro_batch=cfg.train.micro_batch_rollouts or None,
                                     pad_id=pad_id_of(self.tokenizer))
        self.ref_policy, self.ref_model_mb = self._reference_policy()
        # what a checkpoint records and a resume compares (TP/PP/CP/DP may change; the optimizer kind and dtype not)
        self.layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "cp": cfg.parallel.cp,
                       "dp": self.world_size // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp),
                       "world_size": self.world_size, "distributed_optimizer": cfg.optim.use_distributed_optimizer,
                       "dtype": cfg.model.dtype}
        self.updates_per_rollout = cfg.train.rollout_batch_prompts // cfg.train.mini_batch_prompts
        self.rollout_step = 0
        self.skipped_steps = 0
        self.sampler = None
        self.engine = None
        self.reward_pool = None
        self.logger = None
        self._stop_signal: int | None = None
        # colocated SGLang: release its memory during training (rollout.sglang_release_memory)
        self._colocated = cfg.rollout.engine == "sglang" and cfg.rollout.sglang_release_memory
        self._memory_tags: list[str] = []  # set with the engine: what is released and resumed

    def _reference_policy(self):
        """The frozen initial model for a KL to the reference (``megatron/reference.py``), or ``(None, 0.0)``
        when the loss needs none. Initial weights even on a resumed run (the checkpoint is the policy's)."""
        from real_megatron.megatron.reference import build_reference_policy, parameter_bytes

        if not self.loss.needs_reference:
            return None, 0.0
        cfg = self.cfg
        ref = build_reference_policy(self.hf, load_weights=lambda chunks: load_initial_weights(cfg, chunks),
                                     dtype=torch_dtype(cfg.model.dtype), transformer_impl=cfg.model.transformer_impl,
                                     sequence_parallel=cfg.model.sequence_parallel, temperature=cfg.rollout.temperature,
                                     max_tokens_per_micro_batch=cfg.train.max_tokens_per_micro_batch,
                                     max_rollouts_per_micro_batch=cfg.train.micro_batch_rollouts or None,
                                     pad_id=self.policy.pad_id)
        mb = parameter_bytes(ref.chunks) / 2**20
        log.info("reference model for the KL term (kl_target=ref): frozen initial weights, %.1f MB of parameters "
                 "on rank %d, one extra forward pass per rollout step", mb, self.rank)
        return ref, mb

    # ------------------------------------------------------------------ state
    @property
    def optimizer_steps_done(self) -> int:
        """Optimizer updates completed so far (the metrics' ``step``): rollout steps × updates per rollout."""
        return self.rollout_step * self.updates_per_rollout

    def save(self) -> Path:
        from real_megatron.megatron.dist_state import save_training_state

        meta = {"layout": self.layout, "rollout_step": self.rollout_step, "optimizer_step": self.optimizer_steps_done,
                "skipped_steps": self.skipped_steps, "config": config_to_dict(self.cfg),
                "sampler": self.sampler.state_dict() if self.sampler is not None else None}
        meta = broadcast_object(meta)  # rank 0 owns the sampler
        path = self.ckpt.save(self.rollout_step, meta, lambda d: save_training_state(self.chunks, self.optimizer, d))
        if self.rank == 0:
            log.info("checkpoint saved: %s", path)
        return path

    def restore(self) -> bool:
        """Load ``checkpoints/latest``: a reshardable checkpoint at any layout, a per-rank one (the
        format before) at its own layout, which is then rewritten in the reshardable format."""
        from real_megatron.checkpoint import PER_RANK_FORMAT
        from real_megatron.megatron.dist_state import load_training_state
        from real_megatron.megatron.optimizer import load_optimizer_state

        latest = self.ckpt.latest()
        if latest is None:
            return False
        per_rank = self.ckpt.format_of(latest) == PER_RANK_FORMAT
        if per_rank:
            meta, state = self.ckpt.load_per_rank(latest, layout=self.layout)
            for chunk, sd in zip(self.chunks, state["model"]):
                chunk.load_state_dict(sd)
            load_optimizer_state(self.optimizer, state["optimizer"])
        else:
            meta = self.ckpt.load(latest, layout=self.layout,
                                  read_state=lambda d: load_training_state(self.chunks, self.optimizer, d))
        self.rollout_step = int(meta["rollout_step"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        if self.sampler is not None and meta.get("sampler") is not None:
            self.sampler.load_state_dict(meta["sampler"])
        if per_rank:
            self.save()  # the same step in the reshardable format
        if self.rank == 0:
            log.info("resumed from %s (rollout step %d)", latest, self.rollout_step)
        return True

    # ------------------------------------------------------------------ set-up on rank 0
    def setup_rollout_side(self, sampler_batch: int | None = None) -> None:
        """Rank 0: load and encode the train/eval prompts, build the prompt sampler (``sampler_batch``
        prompts per draw, default ``train.rollout_batch_prompts``), the rollout engine and the reward pool."""
        from real_megatron.data import PromptSampler, encode_prompt
        from real_megatron.rewards import RewardPool

        cfg = self.cfg
        read = {"tokenizer": self.tokenizer, "max_prompt_length": cfg.data.max_prompt_length,
                "on_bad_row": cfg.data.on_bad_row}
        self.train_records, skipped = load_prompt_files(cfg.data.train_files, **read)
        self.eval_records = []
        if cfg.data.eval_files:
            self.eval_records, eval_skipped = load_prompt_files(cfg.data.eval_files, **read)
            skipped = {k: skipped.get(k, 0) + eval_skipped.get(k, 0) for k in {*skipped, *eval_skipped}}
            if cfg.eval.max_prompts:  # the first N of each file (each file is one benchmark)
                taken: dict[str, int] = {}
                kept = []
                for r in self.eval_records:
                    taken[r.source_file] = taken.get(r.source_file, 0) + 1
                    if taken[r.source_file] <= cfg.eval.max_prompts:
                        kept.append(r)
                self.eval_records = kept
        self.data_skipped = skipped
        if skipped:
            log.warning("data: skipped rows %s (data.on_bad_row=skip)", skipped)
        if len(self.train_records) < cfg.train.rollout_batch_prompts:
            raise ConfigError(f"train.rollout_batch_prompts={cfg.train.rollout_batch_prompts} exceeds the "
                              f"{len(self.train_records)} training prompts")
        self.train_ids = [encode_prompt(self.tokenizer, r.messages) for r in self.train_records]
        self.eval_ids = [encode_prompt(self.tokenizer, r.messages) for r in self.eval_records]
        self.sampler = PromptSampler(self.train_records, sampler_batch or cfg.train.rollout_batch_prompts,
                                     seed=cfg.seed)
        self.engine = make_engine(cfg.rollout, cfg.model.hf_dir, self.tokenizer, dtype=cfg.model.dtype)
        if self._colocated:  # what is released during training and resumed after the sync
            self._memory_tags = self.engine.memory_tags()
        self.reward_pool = RewardPool(num_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s,
                                      answer_after_think=cfg.data.answer_after_think)

    def open_metrics(self, total_steps: int, *, start_step: int = 0, fresh: bool = False) -> None:
        """Rank 0: write ``<run_dir>/config.yaml`` and open the metrics log (JSONL, wandb, progress bar).
        Rows after ``start_step`` are dropped (a resume logs them again); ``fresh`` drops every row."""
        from real_megatron.metrics import MetricsLogger

        cfg = self.cfg
        save_config(cfg, self.run_dir / "config.yaml")
        self.logger = MetricsLogger(self.run_dir, total_steps=total_steps, start_step=start_step, fresh=fresh,
                                    wandb_mode=cfg.logging.wandb_mode, wandb_project=cfg.logging.wandb_project,
                                    config=config_to_dict(cfg), progress_bar=cfg.logging.progress_bar)

    def export_hf(self, out_dir: Path) -> Path | None:
        """Write the current weights as a HF directory in ``model.dtype``, atomically (every rank
        calls; rank 0 writes and gets the path).

        From the Megatron model itself, not the rollout engine: an SGLang engine's weights live in
        another process. Config, generation config and chat template come from ``model.hf_dir``,
        the tokenizer files from the run's tokenizer.
        """
        from real_megatron.convert import save_hf_from_model

        return save_hf_from_model(self.chunks, out_dir, side_files_from=self.cfg.model.hf_dir, hf_config=self.hf,
                                  tokenizer=self.tokenizer, dtype=torch_dtype(self.cfg.model.dtype))

    def sync_weights(self) -> float:
        """Push the current Megatron weights to the engine (on rank 0) in HF names, in the buckets
        ``iter_hf_tensors`` makes (the engine sends each as it comes, no re-bucketing); every rank takes
        part (TP shards are gathered, PP stages sent). Returns the seconds it took."""
        from real_megatron.convert import iter_hf_tensors

        t0 = time.perf_counter()
        buckets = iter_hf_tensors(self.chunks, self.hf, bucket_bytes=self.cfg.rollout.weight_bucket_mb << 20)
        if self.rank == 0:
            self.engine.update_weights(buckets)
        else:
            for _ in buckets:  # drive the collectives
                pass
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ evaluation (rank 0)
    def evaluate(self) -> dict:
        from real_megatron.evaluate import evaluate_prompts
        from real_megatron.rollout import SamplingParams

        e = self.cfg.eval
        sampling = SamplingParams(temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                                  seed=self.cfg.seed * 7919 + 104729)  # the same samples' seeds at every eval
        result = evaluate_prompts(self.engine, self.reward_pool, self.tokenizer, self.eval_records, self.eval_ids,
                                  samples=e.samples, sampling=sampling)
        row = {"eval/pass@1": result["pass@1"], f"eval/pass@{e.samples}": result[f"pass@{e.samples}"],
               "eval/response_length_mean": result["response_length_mean"]}
        files = list(dict.fromkeys(r.source_file for r in self.eval_records))
        if len(files) > 1:  # several benchmarks: each one's pass@1, and the average is their mean (Table 1)
            per_file = {}
            unique = len({Path(f).stem for f in files}) == len(files)  # else name them by their whole path
            for f in files:
                correct = [c for r, c in zip(self.eval_records, result["correct_per_problem"]) if r.source_file == f]
                per_file[Path(f).stem if unique else f] = sum(correct) / (len(correct) * e.samples)
            row.update({f"eval/{stem}/pass@1": v for stem, v in per_file.items()})
            row["eval/pass@1"] = sum(per_file.values()) / len(per_file)
        return row

    # ------------------------------------------------------------------ one rollout step
    def step(self) -> None:
        """One rollout step: the five phases of the module docstring, then its metric rows."""
        records, rollout_metrics = self._rollouts()
        samples = self._old_logprobs(records, rollout_metrics)
        self._ref_logprobs(samples, rollout_metrics)
        rows = self._updates(records, samples, rollout_metrics)
        rows[-1]["time/sync_s"] = self._sync_to_engine()
        self.rollout_step += 1
        self._evaluate_if_due(rows[-1])
        self._log_rows(rows)

    def _rollouts(self):
        """Phase 1. Rank 0 samples and scores a batch; every rank gets ``(records, metrics)``. A failure on
        rank 0 reaches every rank, which save the last consistent state and raise ``RolloutFailed``."""
        payload = None
        if self.rank == 0:
            try:
                payload = self._collect_rollouts()
                if self._colocated:  # hand the GPU memory to training until the weights come back
                    self.engine.release_memory(self._memory_tags)
            except Exception as err:  # engine/reward failure: every rank must hear about it
                log.exception("rollout failed")
                payload = {"error": f"{type(err).__name__}: {err}"}
        payload = broadcast_object(payload)
        if "error" in payload:
            path = self.save()  # the weights are those of the last completed step: safe to keep
            raise RolloutFailed(f"rollout step {self.rollout_step + 1} failed: {payload['error']}. The state after "
                                f"rollout step {self.rollout_step} was saved to {path}; fix the engine and rerun the "
                                "same command to resume")
        if not payload["records"]:
            raise RolloutFailed("the rollout engine returned no non-empty response in a whole batch")
        return payload["records"], payload["metrics"]

    def _collect_rollouts(self) -> dict:
        """Rank 0: sample the next prompts, generate ``rollout.n`` responses each, score them."""
        from real_megatron.rollout import SamplingParams
        from real_megatron.rollout.collect import collect_rollouts

        cfg = self.cfg
        batch = self.sampler.next_batch()
        sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.rollout.max_new_tokens,
                                  seed=cfg.seed * 1_000_003 + self.rollout_step)
        records, metrics = collect_rollouts(
            engine=self.engine, reward_pool=self.reward_pool, tokenizer=self.tokenizer, prompts=batch,
            prompt_ids=[self.train_ids[r.index] for r in batch], n=cfg.rollout.n, sampling=sampling,
            first_group_id=self.rollout_step * cfg.train.rollout_batch_prompts)
        return {"records": records, "metrics": metrics}

    def _old_logprobs(self, records, rollout_metrics: dict) -> list:
        """Phase 2. The old log-probs (and entropy) of every rollout under the current weights, at the sampling
        temperature; adds ``train/entropy``, the engine drift and ``time/logprob_s`` to ``rollout_metrics``."""
        from real_megatron.megatron.batch import Sample

        t0 = time.perf_counter()
        samples = [Sample(r.prompt_ids, r.response_ids, r.reward, r.group_id) for r in records]
        entropies = self.policy.set_old_logprobs(samples)
        logps = [s.old_logp for s in samples]
        tokens = sum(len(e) for e in entropies)
        rollout_metrics["train/entropy"] = float(sum(e.double().sum() for e in entropies) / max(tokens, 1))
        engine_lp = [r.engine_logprobs for r in records]
        if all(lp is not None for lp in engine_lp):
            diff = torch.cat([torch.tensor(e, dtype=torch.float64) - lp.double() for e, lp in zip(engine_lp, logps)])
            rollout_metrics["rollout/logprob_abs_diff_mean"] = float(diff.abs().mean())
        rollout_metrics["time/logprob_s"] = time.perf_counter() - t0
        return samples

    def _ref_logprobs(self, samples, rollout_metrics: dict) -> None:
        """Phase 2b (a KL to the reference only): every sample's ``ref_logp`` from the frozen initial model, at
        the sampling temperature; adds ``time/ref_logprob_s`` and ``memory/ref_model_mb``."""
        if self.ref_policy is None:
            return
        t0 = time.perf_counter()
        ref_logps, _ = self.ref_policy.compute_logprobs(samples)
        for s, lp in zip(samples, ref_logps):
            s.ref_logp = lp
        rollout_metrics["time/ref_logprob_s"] = time.perf_counter() - t0
        rollout_metrics["memory/ref_model_mb"] = self.ref_model_mb

    def _updates(self, records, samples, rollout_metrics: dict) -> list[dict]:
        """Phase 3. One optimizer update per mini-batch of whole prompts; one metrics row per update."""
        from real_megatron.rollout.collect import split_mini_batches

        index_of = {id(r): i for i, r in enumerate(records)}
        rows = []
        for j, mb in enumerate(split_mini_batches(records, self.cfg.train.mini_batch_prompts)):
            t0 = time.perf_counter()
            result = self.policy.train_step([samples[index_of[id(r)]] for r in mb])
            self.skipped_steps += int(result.get("skipped", 0.0) > 0)
            row = {k: v for k, v in rollout_metrics.items() if not k.startswith("time/")}
            row.update({
                "rollout_step": self.rollout_step + 1,
                "train/loss": result["loss"],
                "train/grad_norm": result["grad_norm"],
                "train/skipped_steps": float(self.skipped_steps),
                **{k: v for k, v in result.items() if k.startswith("hook/")},
                **{k: v for k, v in result.items() if k.startswith("loss/")},
                **{k: v for k, v in result.items() if k.startswith("diag/")},
                "time/update_s": time.perf_counter() - t0,
                "time/sync_s": 0.0,
            })
            for key in ("time/rollout_s", "time/reward_s", "time/logprob_s") + (
                    ("time/ref_logprob_s",) if self.ref_policy is not None else ()):
                row[key] = rollout_metrics.get(key, 0.0) if j == 0 else 0.0
            rows.append(row)
        return rows

    def _sync_to_engine(self) -> float:
        """Phase 4. The new weights to the engine (a colocated SGLang engine gets its memory back around it)."""
        t0 = time.perf_counter()
        if self.rank == 0 and self._colocated:
            self.engine.resume_memory(["weights"])  # weights first, then KV cache / CUDA graphs (SGLang's order)
        self.sync_weights()
        if self.rank == 0 and self._colocated:
            self.engine.resume_memory([t for t in self._memory_tags if t != "weights"])
        return time.perf_counter() - t0

    def _evaluate_if_due(self, last_row: dict) -> None:
        """Phase 5 (rank 0): an evaluation every ``train.eval_every`` rollout steps and after the last one,
        into the step's last row. (The checkpoint half of phase 5 is ``run``'s: it also follows signals.)"""
        cfg = self.cfg
        due = cfg.train.eval_every and (self.rollout_step % cfg.train.eval_every == 0
                                        or self.rollout_step == cfg.train.steps)
        if self.rank == 0 and self.eval_records and due:
            t0 = time.perf_counter()
            last_row.update(self.evaluate())
            last_row["time/eval_s"] = time.perf_counter() - t0

    def _log_rows(self, rows: list[dict]) -> None:
        """Rank 0: the step's rows, numbered by optimizer step, with the data-skip counts on each."""
        if self.rank != 0:
            return
        skips = {f"data/skipped_{k}": float(v) for k, v in self.data_skipped.items()}
        first = self.optimizer_steps_done - len(rows) + 1
        for i, row in enumerate(rows):
            self.logger.log(first + i, {**row, **skips})

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame):
        self._stop_signal = signum
        log.warning("signal %d: finishing the current rollout step, then saving and exiting", signum)

    def run(self) -> int:
        cfg = self.cfg
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.setup_rollout_side()
        resumed = self.restore() if self.resuming else False
        if not resumed and self.rank == 0:
            log.info("initial weights from %s", self.initial_weights)
        if self.rank == 0:
            self.open_metrics(cfg.train.steps * self.updates_per_rollout, start_step=self.optimizer_steps_done)
        self.sync_weights()
        if self.rank == 0 and not resumed and self.eval_records and cfg.train.eval_every:
            self.logger.log(0, {**self.evaluate(), "rollout_step": 0})

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
            self.export_hf(self.run_dir / "hf_final")
            if self.rank == 0:
                print(f"run directory: {self.run_dir}\nmetrics: {self.run_dir / 'metrics.jsonl'}\n"
                      f"final model (HF): {self.run_dir / 'hf_final'}", flush=True)
            return 0
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.close()

    def close(self):
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if self.reward_pool is not None:
            self.reward_pool.close()
            self.reward_pool = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def main(argv=None) -> int:
    return run_job(argv, "real-megatron train", "RL training with REAL (or a baseline loss) on Megatron-Core",
                   lambda cfg: Trainer(cfg).run())
