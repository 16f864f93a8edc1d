"""The `real-megatron` command.

Each sub-command lives in its own module and exposes `main(argv: list[str]) -> int`;
modules are imported only when their sub-command runs, so `real-megatron --help`
stays fast and a missing optional dependency only affects the command that needs it.
"""
from __future__ import annotations

import importlib
import sys

# sub-command -> (module, one-line help)
COMMANDS = {
    "demo": ("real_megatron.repro.demo", "run the CPU demo end to end (the README's first command)"),
    "train": ("real_megatron.trainer", "REAL / GRPO / DAPO / GSPO training: --config FILE [key=value ...]"),
    "sft": ("real_megatron.sft", "supervised warm-up on the same Megatron stack"),
    "compare": ("real_megatron.repro.compare", "REAL vs its baselines on the chain task: tables and figures over seeds"),
    "evaluate": ("real_megatron.evaluate", "pass@k evaluation on benchmark parquet files"),
    "convert": ("real_megatron.convert.cli", "HF <-> Megatron checkpoint conversion"),
    "launch": ("real_megatron.launch", "start training with NeMo-Run: local torchrun or Slurm (--dryrun prints it)"),
    "make-task": ("real_megatron.repro.make_task", "write a synthetic task's parquet files: chains --out DIR"),
    "plot": ("real_megatron.plots", "PNG curves from a run directory's metrics.jsonl"),
    "plot-weights": ("real_megatron.repro.figures", "Figure 1 of the paper: gradient weight |W| vs s"),
}

# functions to call inside a module that serves several sub-commands
ENTRY = {"plot": "main_plot_run", "plot-weights": "main_plot_weights"}


def usage() -> str:
    lines = ["usage: real-megatron <command> [args ...]", "", "commands:"]
    lines += [f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"real-megatron: unknown command {command!r}; commands: {', '.join(COMMANDS)} (see real-megatron --help)",
              file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
        result = getattr(module, ENTRY.get(command, "main"))(rest)
    except KeyboardInterrupt:  # Ctrl-C before a command installs its own handling (e.g. while importing torch)
        from real_megatron.run_dir import release_unused

        release_unused()
        print(f"real-megatron {command}: interrupted; nothing was saved", file=sys.stderr, flush=True)
        return 130
    return int(result or 0)
