"""The chain task's recipe, shared by ``real-megatron demo`` and ``real-megatron compare``.

One place says what the CPU-scale experiment is: the task files (``repro/chains.py``), the model, the
supervised warm-up that leaves it partially competent, and the RL settings every loss is run with.

    assets = build_chain_assets(root, seed=0)            # task files, tokenizer, random base model
    sft_hf = run_warmup(root / "warmup", assets)         # supervised warm-up (skipped when done)
    cfg = load_config(None, rl_overrides(assets, init_dir=sft_hf, run_dir=..., loss="real", seed=1))

Scaled down from the paper's recipe (docs/method.md §4) for 2 CPU cores, and why:

- model: a 3-layer Qwen2 with a 128-wide residual stream (GQA 4/2, tied embeddings, 256 positions)
  instead of 1.5B parameters; a 4-layer 256-wide one took ~6 s per warm-up step under load;
- warm-up: 500 steps of cross-entropy on reference solutions of levels 1-3 only (``WARMUP_LEVELS``):
  held-out average ~0.43 (levels 1-3 ~0.5-0.75, levels 4-5 ~0.1-0.2: never seen chains that long);
  300 steps left 0.14, 600 steps 0.53;
- batch: 16 prompts × G = 8 rollouts per rollout batch, 4 mini-batches of 4 prompts — the paper's
  shape (128 prompts, mini-batches of 32, four updates) at 1/8 the size, so ratios leave 1 and the
  clipped baselines clip as they do in the paper;
- 50 rollout batches (200 optimizer steps) per run instead of 1,400 steps;
- learning rate: 1e-4 (AdamW, no decay), not 2e-6: a tiny model moves little at 2e-6 in tens of steps
  (3e-4 collapsed a weaker warm-up's REAL run within 20 rollout steps);
- temperature 1.0 for rollouts and evaluation (the paper: 0.6): the warmed-up model's entropy is
  already low (~0.07 nats per token); at 0.6 most groups would be uniform and give no signal;
- responses up to 96 tokens (the longest reference is 70), prompts up to 96 (the longest is 68);
- evaluation during training: 4 samples per problem on the first ``EVAL_PROMPTS_PER_LEVEL`` (30) problems
  of each level, every 10 rollout steps: one evaluation costs ~3 s, the average's standard error is up to
  0.02 (2 points; ``stats.eval_standard_error_bound``): the curves and the "best" column;
- the final evaluation of ``real-megatron compare`` (``final_eval.py``): all 100 problems of each level,
  ``FINAL_EVAL_SAMPLES`` (20) samples each, one sampling seed ``FINAL_EVAL_SEED`` for every model: standard
  error <= 0.5 points for any pass rates (q(1 - q) <= 1/4: sqrt(0.25 / (500 * 20)) = 0.005).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# a Qwen2 config.json minus vocabulary and special-token ids (those come from the task's tokenizer)
CHAIN_MODEL_CONFIG = {
    "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
}
TASK_SEED = 0  # the task files and the base model do not change with the RL seed
WARMUP_LEVELS = (1, 2, 3)
WARMUP_STEPS = 500
RL_STEPS = 50  # rollout batches per run
MAX_PROMPT_TOKENS = 96
MAX_NEW_TOKENS = 96
EVAL_PROMPTS_PER_LEVEL = 30
FINAL_EVAL_SAMPLES = 20  # 5 levels x 100 problems x 20: the average's standard error <= 0.5 points
FINAL_EVAL_SEED = 271828  # one sampling seed for every final evaluation (the warm-up's included)
# packed rows on CPU use an explicit block-diagonal mask, whose cost grows with the square of the row:
# short rows (a few rollouts each) are several times faster than one long row per mini-batch
MICRO_BATCH_TOKENS = 512


@dataclass(frozen=True)
class ChainAssets:
    """Where the task lives: the RL train file (all levels), the warm-up train file, the held-out
    files (one per level, in level order) and the random base model (with the task's tokenizer)."""

    rl_train: Path
    warmup_train: Path
    eval_files: tuple[Path, ...]
    base_model: Path


def build_chain_assets(root: Path, seed: int = TASK_SEED) -> ChainAssets:
    """Write the task files, train the tokenizer and save the random base model under ``root``; each
    piece is skipped when already there (every writer is atomic)."""
    from real_megatron.repro.assets import save_random_qwen2
    from real_megatron.repro.chains import chain_texts, write_chain_task
    from real_megatron.repro.tokenizer import train_task_tokenizer

    root = Path(root)
    data = root / "data"
    rl_train, warmup_train = data / "train.parquet", data / "warmup.parquet"
    levels = sorted(int(p.stem[len("level"):]) for p in data.glob("level*.parquet"))
    if not (rl_train.exists() and warmup_train.exists() and levels == [1, 2, 3, 4, 5]):
        write_chain_task(data, seed=seed)
        write_chain_task(data, seed=seed, train_levels=WARMUP_LEVELS, train_name="warmup.parquet")
    base = root / "base_model"
    if not (base / "config.json").exists():
        tokenizer = train_task_tokenizer(chain_texts(seed=seed), root / "tokenizer")
        save_random_qwen2(base, tokenizer, CHAIN_MODEL_CONFIG, seed)
    return ChainAssets(rl_train, warmup_train, tuple(data / f"level{k}.parquet" for k in range(1, 6)), base)


def _common(assets: ChainAssets, seed: int) -> list[str]:
    files = ",".join(str(f) for f in assets.eval_files)
    return [f"data.eval_files=[{files}]", f"data.max_prompt_length={MAX_PROMPT_TOKENS}", f"seed={seed}",
            "logging.wandb_mode=offline", f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
            "eval.samples=4", "eval.temperature=1.0", "eval.top_p=1.0", f"eval.max_new_tokens={MAX_NEW_TOKENS}",
            f"eval.max_prompts={EVAL_PROMPTS_PER_LEVEL}",
            "reward.num_workers=1", "reward.timeout_s=5.0", "optim.weight_decay=0.0",
            f"train.max_tokens_per_micro_batch={MICRO_BATCH_TOKENS}"]


def warmup_overrides(assets: ChainAssets, *, run_dir: Path, steps: int = WARMUP_STEPS,
                     seed: int = TASK_SEED) -> list[str]:
    """``real-megatron sft`` settings of the warm-up (cross-entropy on the easy levels' reference solutions)."""
    return _common(assets, seed) + [
        f"run_dir={run_dir}", f"model.hf_dir={assets.base_model}", f"data.train_files=[{assets.warmup_train}]",
        f"train.steps={steps}", "train.mini_batch_prompts=32", "train.rollout_batch_prompts=32",
        f"train.eval_every={steps}", "optim.lr=2e-3"]


def rl_overrides(assets: ChainAssets, *, init_dir: Path, run_dir: Path, loss: str, seed: int,
                 steps: int = RL_STEPS) -> list[str]:
    """``real-megatron train`` settings of one RL run; only ``loss`` and ``seed`` differ between the runs
    of a comparison (the seed fixes the prompt order and every sampling seed)."""
    return _common(assets, seed) + [
        f"run_dir={run_dir}", f"model.hf_dir={init_dir}", f"data.train_files=[{assets.rl_train}]",
        f"loss.name={loss}", f"train.steps={steps}", "train.rollout_batch_prompts=16", "train.mini_batch_prompts=4",
        f"train.eval_every={max(steps // 5, 1)}", f"train.save_every={max(steps // 5, 1)}", "rollout.n=8",
        "rollout.temperature=1.0", "optim.lr=1e-4"]


def run_warmup(run_dir: Path, assets: ChainAssets, *, steps: int = WARMUP_STEPS, extra: list[str] = ()) -> Path:
    """Run the supervised warm-up into ``run_dir`` unless ``run_dir/hf`` exists; returns that HF directory."""
    import torch.distributed as dist

    from real_megatron.config import load_config
    from real_megatron.sft import run_sft

    out = Path(run_dir) / "hf"
    if (out / "config.json").exists():
        return out
    cfg = load_config(None, warmup_overrides(assets, run_dir=Path(run_dir), steps=steps) + list(extra))
    code = run_sft(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    if code != 0:
        raise RuntimeError(f"the supervised warm-up in {run_dir} failed (exit {code}); see its log above")
    return out


def check_saved_config(run_dir: Path, cfg) -> None:
    """A run directory written with other settings (its ``config.yaml``) must not be resumed or counted as this
    run: ValueError listing the first differences (``logging.*`` aside). Nothing to check when the directory has
    no config yet. A setting the saved config predates counts as its default (the rule ``run_dir.with_defaults``
    states)."""
    import yaml

    from real_megatron.config import RunConfig, config_to_dict
    from real_megatron.run_dir import flat, with_defaults

    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.exists():
        return
    saved = flat(with_defaults(yaml.safe_load(saved_path.read_text()) or {}, config_to_dict(RunConfig())))
    now = flat(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False)))
    # logging.* (wandb, progress bar, which diagnostics are logged) changes no number a run produces
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and not k.startswith("logging."))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:5])
        raise ValueError(f"{run_dir} was run with other settings ({shown}{', ...' if len(diff) > 5 else ''}); "
                         "use a new output directory, or delete that one to rerun it")
