"""Supervised warm-up on the same Megatron stack: token cross-entropy on reference solutions.

    real-megatron sft --config FILE [section.key=value ...]

Reads the same config as ``train``: ``model.hf_dir`` (start weights + tokenizer),
``data.train_files`` (each row's ``extra_info.solution`` is the target response),
``train.steps`` optimizer steps of ``train.mini_batch_prompts`` prompts, ``optim.*``, and
``data.eval_files`` for a pass@1 before and after (``eval.*`` sampling). The loss is the mean
cross-entropy over response tokens (EOS included), computed by the same loss hook as REAL
(``loss_name="sft"``), so the warm-up exercises the exact code path RL training uses.

Writes ``<run_dir>/metrics.jsonl`` and the trained model as a HF directory ``<run_dir>/hf``.
SFT runs are short: they do not checkpoint or resume (rerun to redo).
"""
from __future__ import annotations

import time

from real_megatron.config import ConfigError
from real_megatron.distributed import broadcast_object
from real_megatron.job_runner import run_job
from real_megatron.trainer import Trainer


def _solution(record) -> str:
    solution = (record.extra_info or {}).get("solution")
    if not isinstance(solution, str) or not solution.strip():
        raise ConfigError(f"{record.source_file} row {record.row}: extra_info.solution is missing or empty; SFT "
                          "needs a reference solution per training row")
    return solution


def run_sft(cfg) -> int:
    from real_megatron.losses import SFTLoss
    from real_megatron.megatron.batch import Sample

    t = Trainer(cfg, loss=SFTLoss())
    try:
        if t.rank == 0:
            t.run_dir.mkdir(parents=True, exist_ok=True)
            t.setup_rollout_side(sampler_batch=cfg.train.mini_batch_prompts)
            eos = t.tokenizer.eos_token_id
            targets = [t.tokenizer.encode(_solution(r), add_special_tokens=False) + [eos] for r in t.train_records]
            t.open_metrics(cfg.train.steps, fresh=True)  # SFT does not resume: the metrics file starts afresh
        if t.resuming:  # SFT keeps no checkpoints: a checkpoints/ folder here belongs to something else
            raise ConfigError(f"{t.run_dir}/checkpoints exists; give SFT a fresh run_dir")
        t.sync_weights()
        if t.rank == 0 and t.eval_records:
            t.logger.log(0, t.evaluate())
        for step in range(1, cfg.train.steps + 1):
            samples = None
            if t.rank == 0:
                batch = t.sampler.next_batch()
                samples = [Sample(t.train_ids[r.index], targets[r.index], 1.0, i) for i, r in enumerate(batch)]
            samples = broadcast_object(samples)
            t0 = time.perf_counter()
            result = t.policy.train_step(samples)
            row = {"train/loss": result["loss"], "train/grad_norm": result["grad_norm"],
                   "train/skipped": result["skipped"], "time/update_s": time.perf_counter() - t0}
            if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                row["time/sync_s"] = t.sync_weights()
                if t.rank == 0 and t.eval_records:
                    row.update(t.evaluate())
            if t.rank == 0:
                t.logger.log(step, row)
        out = t.export_hf(t.run_dir / "hf")
        if t.rank == 0:
            print(f"SFT model (HF): {out}\nmetrics: {t.run_dir / 'metrics.jsonl'}", flush=True)
        return 0
    finally:
        t.close()


def main(argv=None) -> int:
    return run_job(argv, "real-megatron sft", "supervised warm-up (cross-entropy on reference solutions)", run_sft)
