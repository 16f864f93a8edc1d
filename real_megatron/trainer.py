"""The RL loop — Algorithm 1 of the paper — on Megatron-Core.

    real-megatron train --config examples/configs/tiny_cpu.yaml [section.key=value ...]
    torchrun --nproc-per-node 2 -m real_megatron train --config FILE parallel.tp=2

One rollout step:

1. rank 0 samples ``train.rollout_batch_prompts`` prompts and ``rollout.n`` responses each with
   the rollout engine, scores them in the reward worker pool (labels: reward ≥ threshold);
2. the rollouts are broadcast; every rank recomputes the old log-probs with the Megatron model
   at the sampling temperature (the authors do the same; the engine's own log-probs are only a
   drift metric);
3. ``rollout_batch_prompts / mini_batch_prompts`` optimizer updates through the loss hook
   (groups kept whole, or the exact mode when a group has to be split);
4. the new weights go to the engine in HF names, bucket by bucket, without touching disk;
5. evaluation every ``train.eval_every`` rollout steps, a checkpoint every ``train.save_every``.

Metrics: one row per optimizer step in ``<run_dir>/metrics.jsonl``; ``step`` counts optimizer
steps. Rollout-level numbers (reward, lengths, times of the rollout phase) describe the batch the
step trained on; ``time/rollout_s``, ``time/reward_s``, ``time/logprob_s`` are on the first row
of a rollout batch and ``time/sync_s`` on its last (0.0 on the others), so sums over rows are
true totals. An evaluation before training is logged as its own row with ``step`` 0.

Resume: a rerun with the same ``run_dir`` continues from ``checkpoints/latest``; SIGINT/SIGTERM
finish the current rollout step, save, and exit with 128 + signal number.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from real_megatron.config import ConfigError, RunConfig, config_to_dict, load_config, save_config, validate_config
from real_megatron.distributed import any_rank, barrier, broadcast_object, world

log = logging.getLogger("real_megatron")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RolloutFailed(RuntimeError):
    """The rollout engine or the reward pool failed; the run saved what it safely could."""


# ----------------------------------------------------------------------------- set-up pieces


def read_model_dir(cfg: RunConfig) -> dict:
    """The HF config of ``model.hf_dir``, checked before anything starts."""
    from real_megatron.megatron.model import read_hf_config

    if not cfg.model.hf_dir:
        raise ConfigError("model.hf_dir is empty: point it at a HF model directory (config.json + tokenizer)")
    path = Path(cfg.model.hf_dir)
    if not (path / "config.json").exists():
        raise ConfigError(f"model.hf_dir={path}: no config.json there; give a HF model directory")
    return read_hf_config(path / "config.json")


def check_data_files(cfg: RunConfig) -> None:
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: give one or more parquet/JSONL prompt files")
    for field_name in ("train_files", "eval_files"):
        for f in getattr(cfg.data, field_name):
            if not Path(f).exists():
                raise ConfigError(f"data.{field_name}: {f} does not exist")


def load_prompt_files(files, *, tokenizer, max_prompt_length: int, on_bad_row: str):
    """All records of several files as one list (indices renumbered), plus the skip counts."""
    from real_megatron.data import load_prompts

    records, skipped = [], {}
    for f in files:
        part = load_prompts(f, max_prompt_length=max_prompt_length, tokenizer=tokenizer, on_bad_row=on_bad_row)
        for reason, count in part.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        records.extend(part)
    for i, r in enumerate(records):
        r.index = i
    if not records:
        raise ConfigError(f"no usable prompts in {list(files)} (skipped: {skipped})")
    return records, skipped


def load_tokenizer(hf_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    if tok.eos_token_id is None:
        raise ConfigError(f"the tokenizer in {hf_dir} has no eos_token: generation could never stop")
    return tok


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def make_engine(cfg: RunConfig, hf_dir, tokenizer):
    """Rank 0's rollout engine; weights arrive from the trainer right after."""
    dtype = DTYPES[cfg.model.dtype]
    if cfg.rollout.engine == "embedded":
        from real_megatron.rollout.transformers_engine import TransformersEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return TransformersEngine(hf_dir, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id_of(tokenizer),
                                  dtype=dtype, device=device, batch_size=cfg.rollout.embedded_batch_size)
    from real_megatron.rollout.sglang_engine import SGLangEngine

    r = cfg.rollout
    common = {"eos_token_id": tokenizer.eos_token_id, "weight_sync": r.sglang_weight_sync,
              "tp_size": r.sglang_tp_size, "bucket_bytes": r.weight_bucket_mb << 20}
    if r.sglang_url:
        engine = SGLangEngine(r.sglang_url, **common)
        if r.sglang_weight_sync == "distributed":  # join the {trainer rank 0 + SGLang ranks} broadcast group
            # NCCL between GPUs; gloo when the trainer runs on the CPU (what the CPU tests exercise)
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            engine.init_weights_update_group(os.environ.get("MASTER_ADDR", "127.0.0.1"), r.sglang_master_port,
                                             backend=backend)
        return engine
    return SGLangEngine(engine_kwargs={"model_path": str(hf_dir), "tp_size": r.sglang_tp_size}, **common)


def sync_weights(chunks, hf: dict, engine, rank: int, bucket_bytes: int = 512 << 20) -> float:
    """Push the current Megatron weights to the engine (rank 0) in HF names; every rank takes part."""
    from real_megatron.convert import iter_hf_tensors

    t0 = time.perf_counter()
    pairs = (pair for bucket in iter_hf_tensors(chunks, hf, bucket_bytes=bucket_bytes) for pair in bucket)
    if rank == 0:
        engine.update_weights(pairs)
    else:
        for _ in pairs:  # drive the collectives
            pass
    return time.perf_counter() - t0


def load_initial_weights(cfg: RunConfig, chunks) -> str:
    from real_megatron.convert import load_hf_into, load_megatron_checkpoint_into

    if cfg.model.megatron_dir:
        load_megatron_checkpoint_into(chunks, cfg.model.megatron_dir)
        return cfg.model.megatron_dir
    load_hf_into(chunks, cfg.model.hf_dir)
    return cfg.model.hf_dir


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Everything a run holds; ``run()`` executes the loop. Used by ``train`` and, with the SFT loss, ``sft``."""

    def __init__(self, cfg: RunConfig, *, loss_name: str | None = None):
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
        self.chunks = build_model(self.hf, dtype=DTYPES[cfg.model.dtype], transformer_impl=cfg.model.transformer_impl,
                                  wrap_ddp=True, sequence_parallel=cfg.model.sequence_parallel,
                                  recompute_activations=cfg.model.recompute_activations,
                                  use_distributed_optimizer=cfg.optim.use_distributed_optimizer)
        from real_megatron.checkpoint import CheckpointManager

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
        self.policy = MegatronPolicy(self.chunks, self.optimizer, loss_name=loss_name or cfg.loss.name,
                                     hparams=cfg.loss.hparams, temperature=cfg.rollout.temperature,
                                     micro_batch_rollouts=cfg.train.micro_batch_rollouts,
                                     pad_id=pad_id_of(self.tokenizer))
        self.layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "cp": cfg.parallel.cp,
                       "world_size": self.world_size}
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

    # ------------------------------------------------------------------ state
    @property
    def optimizer_step(self) -> int:
        return self.rollout_step * self.updates_per_rollout

    def save(self) -> Path:
        from real_megatron.megatron.optimizer import optimizer_state

        state = {"model": [c.state_dict() for c in self.chunks], "optimizer": optimizer_state(self.optimizer)}
        meta = {"layout": self.layout, "rollout_step": self.rollout_step, "optimizer_step": self.optimizer_step,
                "skipped_steps": self.skipped_steps, "config": config_to_dict(self.cfg),
                "sampler": self.sampler.state_dict() if self.sampler is not None else None}
        meta = broadcast_object(meta)  # rank 0 owns the sampler
        path = self.ckpt.save(self.rollout_step, state, meta)
        if self.rank == 0:
            log.info("checkpoint saved: %s", path)
        return path

    def restore(self) -> bool:
        from real_megatron.megatron.optimizer import load_optimizer_state

        latest = self.ckpt.latest()
        if latest is None:
            return False
        meta, state = self.ckpt.load(latest, expect_layout=self.layout)
        for chunk, sd in zip(self.chunks, state["model"]):
            chunk.load_state_dict(sd)
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.rollout_step = int(meta["rollout_step"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        if self.sampler is not None and meta.get("sampler") is not None:
            self.sampler.load_state_dict(meta["sampler"])
        if self.rank == 0:
            log.info("resumed from %s (rollout step %d)", latest, self.rollout_step)
        return True

    # ------------------------------------------------------------------ set-up on rank 0
    def _setup_rank0(self, sampler_batch: int | None = None):
        from real_megatron.data import PromptSampler
        from real_megatron.metrics import MetricsLogger
        from real_megatron.rewards import RewardPool

        cfg = self.cfg
        self.train_records, skipped = load_prompt_files(cfg.data.train_files, tokenizer=self.tokenizer,
                                                        max_prompt_length=cfg.data.max_prompt_length,
                                                        on_bad_row=cfg.data.on_bad_row)
        self.eval_records = []
        if cfg.data.eval_files:
            self.eval_records, eval_skipped = load_prompt_files(cfg.data.eval_files, tokenizer=self.tokenizer,
                                                                max_prompt_length=cfg.data.max_prompt_length,
                                                                on_bad_row=cfg.data.on_bad_row)
            skipped = {k: skipped.get(k, 0) + eval_skipped.get(k, 0) for k in {*skipped, *eval_skipped}}
            if cfg.eval.max_prompts:
                self.eval_records = self.eval_records[:cfg.eval.max_prompts]
        self.data_skipped = skipped
        if skipped:
            log.warning("data: skipped rows %s (data.on_bad_row=skip)", skipped)
        if len(self.train_records) < cfg.train.rollout_batch_prompts:
            raise ConfigError(f"train.rollout_batch_prompts={cfg.train.rollout_batch_prompts} exceeds the "
                              f"{len(self.train_records)} training prompts")
        from real_megatron.data import encode_prompt

        self.train_ids = [encode_prompt(self.tokenizer, r.messages) for r in self.train_records]
        self.eval_ids = [encode_prompt(self.tokenizer, r.messages) for r in self.eval_records]
        self.sampler = PromptSampler(self.train_records, sampler_batch or cfg.train.rollout_batch_prompts, seed=cfg.seed)
        self.engine = make_engine(cfg, cfg.model.hf_dir, self.tokenizer)
        if self._colocated:  # what is released during training and resumed after the sync
            self._memory_tags = self.engine.memory_tags()
        self.reward_pool = RewardPool(num_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s,
                                      answer_after_think=cfg.data.answer_after_think)

    def export_hf(self, out_dir: Path) -> Path | None:
        """Write the current weights as a HF directory in ``model.dtype``, atomically (every rank
        calls; rank 0 writes and gets the path).

        From the Megatron model itself, not the rollout engine: an SGLang engine's weights live in
        another process. Config, generation config and chat template come from ``model.hf_dir``,
        the tokenizer files from the run's tokenizer.
        """
        from real_megatron.convert import save_hf_from_model

        return save_hf_from_model(self.chunks, out_dir, side_files_from=self.cfg.model.hf_dir, hf_config=self.hf,
                                  tokenizer=self.tokenizer, dtype=DTYPES[self.cfg.model.dtype])

    # ------------------------------------------------------------------ evaluation (rank 0)
    def evaluate(self) -> dict:
        from real_megatron.evaluate import evaluate_prompts
        from real_megatron.rollout import SamplingParams

        e = self.cfg.eval
        sampling = SamplingParams(temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                                  seed=self.cfg.seed * 7919 + 104729)  # the same samples' seeds at every eval
        result = evaluate_prompts(self.engine, self.reward_pool, self.tokenizer, self.eval_records, self.eval_ids,
                                  samples=e.samples, sampling=sampling)
        return {"eval/pass@1": result["pass@1"], f"eval/pass@{e.samples}": result[f"pass@{e.samples}"],
                "eval/response_length_mean": result["response_length_mean"]}

    # ------------------------------------------------------------------ one rollout step
    def _rollout(self) -> dict:
        """Rank 0: sample, score; returns the payload every rank receives."""
        from real_megatron.rollout import SamplingParams
        from real_megatron.rollouts import collect_rollouts

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

    def step(self) -> None:
        from real_megatron.megatron.batch import Sample
        from real_megatron.rollouts import split_mini_batches

        cfg = self.cfg
        payload = None
        if self.rank == 0:
            try:
                payload = self._rollout()
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
        records, rollout_metrics = payload["records"], payload["metrics"]
        if not records:
            raise RolloutFailed("the rollout engine returned no non-empty response in a whole batch")

        t0 = time.perf_counter()
        samples = [Sample(r.prompt_ids, r.response_ids, r.reward, r.group_id) for r in records]
        logps, entropies = self.policy.compute_logprobs(samples)
        for s, lp in zip(samples, logps):
            s.old_logp = lp
        tokens = sum(len(e) for e in entropies)
        rollout_metrics["train/entropy"] = float(sum(e.double().sum() for e in entropies) / max(tokens, 1))
        engine_lp = [r.engine_logprobs for r in records]
        if all(lp is not None for lp in engine_lp):
            diff = torch.cat([torch.tensor(e, dtype=torch.float64) - lp.double() for e, lp in zip(engine_lp, logps)])
            rollout_metrics["rollout/logprob_abs_diff_mean"] = float(diff.abs().mean())
        rollout_metrics["time/logprob_s"] = time.perf_counter() - t0

        index_of = {id(r): i for i, r in enumerate(records)}
        mini_batches = split_mini_batches(records, cfg.train.mini_batch_prompts)
        rows = []
        for j, mb in enumerate(mini_batches):
            t0 = time.perf_counter()
            result = self.policy.train_step([samples[index_of[id(r)]] for r in mb])
            self.skipped_steps += int(result.get("skipped", 0.0) > 0)
            row = {k: v for k, v in rollout_metrics.items() if not k.startswith("time/")}
            row.update({
                "rollout_step": self.rollout_step + 1,
                "train/loss": result["loss"],
                "train/grad_norm": result["grad_norm"],
                "train/skipped_steps": float(self.skipped_steps),
                "hook/exact_mode": result["hook/exact_mode"],
                **{k: v for k, v in result.items() if k.startswith("loss/")},
                "time/update_s": time.perf_counter() - t0,
                "time/sync_s": 0.0,
            })
            for key in ("time/rollout_s", "time/reward_s", "time/logprob_s"):
                row[key] = rollout_metrics.get(key, 0.0) if j == 0 else 0.0
            rows.append(row)

        t0 = time.perf_counter()
        if self.rank == 0 and self._colocated:
            self.engine.resume_memory(["weights"])  # weights first, then KV cache / CUDA graphs (SGLang's order)
        sync_weights(self.chunks, self.hf, self.engine, self.rank, self.cfg.rollout.weight_bucket_mb << 20)
        if self.rank == 0 and self._colocated:
            self.engine.resume_memory([t for t in self._memory_tags if t != "weights"])
        rows[-1]["time/sync_s"] = time.perf_counter() - t0
        self.rollout_step += 1
        if self.rank == 0 and self.eval_records and cfg.train.eval_every and \
                (self.rollout_step % cfg.train.eval_every == 0 or self.rollout_step == cfg.train.steps):
            t0 = time.perf_counter()
            rows[-1].update(self.evaluate())
            rows[-1]["time/eval_s"] = time.perf_counter() - t0
        if self.rank == 0:
            skips = {f"data/skipped_{k}": float(v) for k, v in self.data_skipped.items()}
            first = self.optimizer_step - len(rows) + 1
            for i, row in enumerate(rows):
                self.logger.log(first + i, {**row, **skips})

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame):
        self._stop_signal = signum
        log.warning("signal %d: finishing the current rollout step, then saving and exiting", signum)

    def run(self) -> int:
        from real_megatron.metrics import MetricsLogger

        cfg = self.cfg
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._setup_rank0()
        resumed = self.restore() if self.resuming else False
        if not resumed and self.rank == 0:
            log.info("initial weights from %s", self.initial_weights)
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
            self.logger = MetricsLogger(self.run_dir, total_steps=cfg.train.steps * self.updates_per_rollout,
                                        start_step=self.optimizer_step, wandb_mode=cfg.logging.wandb_mode,
                                        wandb_project=cfg.logging.wandb_project, config=config_to_dict(cfg),
                                        progress_bar=cfg.logging.progress_bar)
        sync_weights(self.chunks, self.hf, self.engine, self.rank, self.cfg.rollout.weight_bucket_mb << 20)
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


def _parse(argv, prog: str, description: str):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config file (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.name=grpo parallel.tp=2")
    return parser.parse_args(argv)


def setup_logging():
    rank, _ = world()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("megatron", "httpx", "urllib3", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_job(argv, prog: str, description: str, job) -> int:
    """The shared command-line wrapper of ``train`` and ``sft``: parse, run ``job(cfg)``, map failures
    to exit codes (2: a config that cannot work, 1: a failed rollout), always tear down the process group."""
    args = _parse(argv, prog, description)
    setup_logging()
    try:
        return job(load_config(args.config, args.overrides))
    except ConfigError as err:
        print(f"config error: {err}", flush=True)
        return 2
    except RolloutFailed as err:
        print(f"error: {err}", flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> int:
    return run_job(argv, "real-megatron train", "RL training with REAL (or a baseline loss) on Megatron-Core",
                   lambda cfg: Trainer(cfg).run())
