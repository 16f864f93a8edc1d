"""A run's parts, built from its config by one function; the RL loop (``trainer.py``) and the SFT loop
(``sft.py``) only read them.

    parts = build_parts(cfg, build_loss(cfg.loss.name, cfg.loss.hparams))
    parts.policy.train_step(samples); parts.sync_weights(); parts.evaluate(); parts.close()

Built in this order, on every rank: the config checked against the model and the world (before any
process group), Megatron's process groups, the model chunks, the checkpoint manager, the initial weights
(before the optimizer: it copies them into its fp32 master parameters when built; a resumed run gets
those from its checkpoint instead), the optimizer, the tokenizer, the policy and — when the loss has a
KL to it — the frozen reference model. Then on rank 0 only: the run directory, the prompt files, the
prompt sampler, the rollout engine and the reward workers (the rollout side).

The pieces themselves (model directory, tokenizer, prompt files, the engine factory) are in
``components.py``; the parallel layout in ``megatron/model.py``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from real_megatron.components import (
    check_data_files,
    load_initial_weights,
    load_prompt_files,
    load_tokenizer,
    make_engine,
    pad_id_of,
    read_model_dir,
)
from real_megatron.config import ConfigError, RunConfig, config_to_dict, save_config, validate_config
from real_megatron.distributed import any_rank, barrier, broadcast_object, world
from real_megatron.dtypes import torch_dtype
from real_megatron.run_dir import check_run_dir, claim_run_dir

log = logging.getLogger("real_megatron")


class EngineSyncError(RuntimeError):
    """The rollout engine did not take the trainer's weights (raised on every rank)."""


@dataclass
class RunParts:
    """Everything a run holds. The rollout side (``train_records`` … ``reward_pool``) exists on rank 0 only."""

    cfg: RunConfig
    hf: dict  # the model's HF config (``hf_model.read_hf_config``)
    rank: int
    world_size: int
    run_dir: Path
    loss: object  # losses.PolicyLoss
    chunks: list
    optimizer: object
    policy: object  # megatron.policy.MegatronPolicy
    ref_policy: object | None  # the frozen reference model's forward-only policy, or None
    ref_model_mb: float
    tokenizer: object
    ckpt: object  # checkpoint.CheckpointManager
    layout: dict  # what a checkpoint records and a resume compares
    resuming: bool  # checkpoints/latest exists
    initial_weights: str | None  # where the initial weights came from (None: resuming)
    train_records: list = field(default_factory=list)
    eval_records: list = field(default_factory=list)
    train_ids: list = field(default_factory=list)
    eval_ids: list = field(default_factory=list)
    data_skipped: dict = field(default_factory=dict)
    sampler: object = None
    engine: object = None
    reward_pool: object = None
    logger: object = None  # metrics.MetricsLogger (rank 0, after open_metrics)
    memory_tags: list = field(default_factory=list)  # colocated SGLang: what is released during training

    @property
    def colocated(self) -> bool:
        """A colocated SGLang engine that releases its memory while the trainer trains."""
        return self.cfg.rollout.engine == "sglang" and self.cfg.rollout.sglang_release_memory

    # ------------------------------------------------------------------ weights out
    def sync_weights(self, version: int | None = None) -> float:
        """Push the current Megatron weights to the engine (on rank 0) in HF names, in the buckets
        ``iter_hf_tensors`` makes (the engine sends each as it comes, no re-bucketing); every rank takes
        part (TP shards are gathered, PP stages sent). ``version``: the weights' version (rollout steps trained),
        for an engine that stamps its tokens with it. Returns the seconds it took. An engine that fails to take
        them raises ``EngineSyncError`` on every rank, after the gathering collectives have all run."""
        from real_megatron.convert import iter_hf_tensors

        t0 = time.perf_counter()
        buckets = iter_hf_tensors(self.chunks, self.hf, bucket_bytes=self.cfg.rollout.weight_bucket_mb << 20)
        error = None
        if self.rank == 0:
            try:
                self.engine.update_weights(buckets, version=version)
            except Exception as err:  # the other ranks are in the gathering collectives: finish them first
                error = f"{type(err).__name__}: {err}"
                log.error("weight sync failed: %s", error)
        for _ in buckets:  # drive the collectives (on rank 0 only what a failed update left)
            pass
        if any_rank(error is not None):
            raise EngineSyncError(broadcast_object(error))
        return time.perf_counter() - t0

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

    # ------------------------------------------------------------------ evaluation and metrics (rank 0)
    def evaluate(self) -> dict:
        """Rank 0: the eval files' pass@k under ``eval.*`` (``evaluate.evaluate_benchmarks``) as a metrics row,
        with the same samples' seeds at every evaluation of the run."""
        from real_megatron.evaluate import evaluate_benchmarks, metrics_row
        from real_megatron.rollout import SamplingParams

        e = self.cfg.eval
        sampling = SamplingParams(temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                                  seed=self.cfg.seed * 7919 + 104729)
        results = evaluate_benchmarks(self.engine, self.reward_pool, self.tokenizer, self.eval_records, self.eval_ids,
                                      samples=e.samples, sampling=sampling)
        return metrics_row(results, e.samples)

    def open_metrics(self, total_steps: int, *, start_step: int = 0, fresh: bool = False) -> None:
        """Rank 0: write ``<run_dir>/config.yaml`` and open the metrics log (JSONL, wandb, progress bar).
        Rows after ``start_step`` are dropped (a resume logs them again); ``fresh`` drops every row."""
        from real_megatron.metrics import MetricsLogger

        cfg = self.cfg
        save_config(cfg, self.run_dir / "config.yaml")
        self.logger = MetricsLogger(self.run_dir, total_steps=total_steps, start_step=start_step, fresh=fresh,
                                    wandb_mode=cfg.logging.wandb_mode, wandb_project=cfg.logging.wandb_project,
                                    config=config_to_dict(cfg), progress_bar=cfg.logging.progress_bar)

    def close(self) -> None:
        """The metrics log, the reward workers and the engine (idempotent)."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if self.reward_pool is not None:
            self.reward_pool.close()
            self.reward_pool = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def build_parts(cfg: RunConfig, loss, *, job: str = "train", sampler_batch: int | None = None) -> RunParts:
    """Every part of a run (the module docstring gives the order); ``loss``: the run's loss object; ``job``:
    "train" or "sft", the run directory's owner (``run_dir.py``). ``sampler_batch``: prompts per sampler draw
    (default ``train.rollout_batch_prompts``)."""
    from real_megatron.checkpoint import CheckpointManager
    from real_megatron.megatron.cpu import enable_cpu_support
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.policy import MegatronPolicy

    hf = read_model_dir(cfg)
    check_data_files(cfg)
    validate_config(cfg, world_size=world()[1], hf_config=hf)
    start = check_run_dir(cfg, job)  # refuses before anything loads or is written
    enable_cpu_support()
    initialize_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.seed, hf)
    rank, world_size = world()
    run_dir = Path(cfg.run_dir)
    chunks = build_model(hf, dtype=torch_dtype(cfg.model.dtype), transformer_impl=cfg.model.transformer_impl,
                         wrap_ddp=True, sequence_parallel=cfg.model.sequence_parallel,
                         recompute_activations=cfg.model.recompute_activations,
                         use_distributed_optimizer=cfg.optim.use_distributed_optimizer)
    ckpt = CheckpointManager(run_dir, rank=rank, world_size=world_size, barrier=barrier, broadcast=broadcast_object)
    resuming = ckpt.latest() is not None
    initial_weights = None if resuming else load_initial_weights(cfg, chunks)
    o = cfg.optim
    optimizer = build_optimizer(chunks, lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
                                adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                                use_distributed_optimizer=o.use_distributed_optimizer)
    tokenizer = load_tokenizer(cfg.model.hf_dir)
    micro = {"max_tokens_per_micro_batch": cfg.train.max_tokens_per_micro_batch,
             "max_rollouts_per_micro_batch": cfg.train.micro_batch_rollouts or None, "pad_id": pad_id_of(tokenizer),
             "fused_output": cfg.model.fused_output}  # the reference model's forward too
    policy = MegatronPolicy(chunks, optimizer, loss=loss, temperature=cfg.rollout.temperature,
                            log_update_size=cfg.logging.update_size, **micro)
    ref_policy, ref_model_mb = _reference_policy(cfg, hf, loss, rank, micro)
    layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "cp": cfg.parallel.cp,
              "dp": world_size // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp), "world_size": world_size,
              "distributed_optimizer": cfg.optim.use_distributed_optimizer, "dtype": cfg.model.dtype}
    parts = RunParts(cfg=cfg, hf=hf, rank=rank, world_size=world_size, run_dir=run_dir, loss=loss, chunks=chunks,
                     optimizer=optimizer, policy=policy, ref_policy=ref_policy, ref_model_mb=ref_model_mb,
                     tokenizer=tokenizer, ckpt=ckpt, layout=layout, resuming=resuming, initial_weights=initial_weights)
    if rank == 0:
        try:
            claim_run_dir(run_dir, job)
            _set_up_rollout_side(parts, sampler_batch or cfg.train.rollout_batch_prompts)
        except BaseException:
            parts.close()
            raise
        for line in describe(parts, start):
            log.info("%s", line)
    return parts


def describe(parts: RunParts, start: str) -> list[str]:
    """A run's first log lines: what runs where (the trainer's layout and device, the loss, the rollout side)."""
    import megatron.core
    import torch

    from real_megatron.megatron.model import te_available, uses_transformer_engine

    cfg, lay = parts.cfg, parts.layout
    device = "cuda" if torch.cuda.is_available() else "cpu"
    te = uses_transformer_engine(cfg.model.transformer_impl)
    layers = ("Transformer Engine layers" if te else "Megatron's local (PyTorch) layers: Transformer Engine and Apex "
              "are not used" + (" (not installed: expected on a CPU; `pip install -e .[gpu]` on a GPU machine)"
                                if not te_available() else ""))
    rollout = (f"SGLang at {', '.join(cfg.rollout.sglang_urls)}" if cfg.rollout.sglang_urls else
               "SGLang in-process" if cfg.rollout.engine == "sglang" else "embedded transformers engine")
    start = {"new": "new", "restart": "starting afresh: no checkpoint to resume",
             "resume": f"resuming from {parts.ckpt.latest()}",
             "extend": f"extending to train.steps={cfg.train.steps} from {parts.ckpt.latest()}"}[start]
    return [
        f"run {parts.run_dir} ({start}); loss {parts.loss.name} {parts.loss.hp}",
        f"trainer: Megatron-Core {megatron.core.__version__} on {device} ({'nccl' if device == 'cuda' else 'gloo'}), "
        f"{lay['world_size']} process(es) = TP {lay['tp']} x PP {lay['pp']} x CP {lay['cp']} x DP {lay['dp']}, "
        f"{cfg.model.dtype}; {layers}",
        f"rollouts on rank 0: {rollout}, {cfg.rollout.n} per prompt at temperature {cfg.rollout.temperature}; "
        f"rewards: {cfg.reward.num_workers} math-verify worker process(es)",
    ]


def _reference_policy(cfg: RunConfig, hf: dict, loss, rank: int, micro: dict):
    """The frozen initial model for a KL to the reference (``megatron/reference.py``), or ``(None, 0.0)``
    when the loss needs none. Initial weights even on a resumed run (the checkpoint is the policy's)."""
    from real_megatron.megatron.reference import build_reference_policy, parameter_bytes

    if not loss.needs_reference:
        return None, 0.0
    ref = build_reference_policy(hf, load_weights=lambda chunks: load_initial_weights(cfg, chunks),
                                 dtype=torch_dtype(cfg.model.dtype), transformer_impl=cfg.model.transformer_impl,
                                 sequence_parallel=cfg.model.sequence_parallel, temperature=cfg.rollout.temperature,
                                 **micro)
    mb = parameter_bytes(ref.chunks) / 2**20
    log.info("reference model for the KL term (kl_target=ref): frozen initial weights, %.1f MB of parameters "
             "on rank %d, one extra forward pass per rollout step", mb, rank)
    return ref, mb


def _set_up_rollout_side(parts: RunParts, sampler_batch: int) -> None:
    """Rank 0: load and encode the train/eval prompts, build the prompt sampler (``sampler_batch`` prompts
    per draw), the rollout engine and the reward pool."""
    from real_megatron.data import PromptSampler, encode_prompt
    from real_megatron.evaluate import first_per_file
    from real_megatron.rewards import RewardPool

    cfg = parts.cfg
    read = {"tokenizer": parts.tokenizer, "max_prompt_length": cfg.data.max_prompt_length,
            "on_bad_row": cfg.data.on_bad_row}
    parts.train_records, skipped = load_prompt_files(cfg.data.train_files, **read)
    if cfg.data.eval_files:
        eval_records, eval_skipped = load_prompt_files(cfg.data.eval_files, **read)
        skipped = {k: skipped.get(k, 0) + eval_skipped.get(k, 0) for k in {*skipped, *eval_skipped}}
        parts.eval_records = first_per_file(eval_records, cfg.eval.max_prompts)
    parts.data_skipped = skipped
    if skipped:
        log.warning("data: skipped rows %s (data.on_bad_row=skip)", skipped)
    if len(parts.train_records) < cfg.train.rollout_batch_prompts:
        raise ConfigError(f"train.rollout_batch_prompts={cfg.train.rollout_batch_prompts} exceeds the "
                          f"{len(parts.train_records)} training prompts")
    parts.train_ids = [encode_prompt(parts.tokenizer, r.messages) for r in parts.train_records]
    parts.eval_ids = [encode_prompt(parts.tokenizer, r.messages) for r in parts.eval_records]
    parts.sampler = PromptSampler(parts.train_records, sampler_batch, seed=cfg.seed)
    parts.engine = make_engine(cfg.rollout, cfg.model.hf_dir, parts.tokenizer, dtype=cfg.model.dtype,
                               background=cfg.train.max_staleness >= 1)  # it generates beside training
    if parts.colocated:  # what is released during training and resumed after the sync
        parts.memory_tags = parts.engine.memory_tags()
    parts.reward_pool = RewardPool(num_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s,
                                   answer_after_think=cfg.data.answer_after_think)
