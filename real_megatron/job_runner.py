"""The command-line wrapper of the config-driven jobs (``train``, ``sft``): arguments, logging, exit codes,
and process-group teardown. ``cli.py`` dispatches a sub-command to its module; this runs the job."""
from __future__ import annotations

import argparse
import logging

import torch.distributed as dist

from real_megatron.config import ConfigError, load_config
from real_megatron.distributed import world


class JobFailed(RuntimeError):
    """A job stopped on a failure it has reported and cleaned up after (exit code 1); e.g. ``RolloutFailed``."""


def setup_logging() -> None:
    """INFO on rank 0, warnings only on the other ranks, each line tagged with its rank; chatty libraries quieted."""
    rank, _ = world()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("megatron", "httpx", "urllib3", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_job_args(argv, prog: str, description: str) -> argparse.Namespace:
    """``--config FILE`` and dotted overrides (``loss.name=grpo parallel.tp=2``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config file (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.name=grpo parallel.tp=2")
    return parser.parse_args(argv)


def run_job(argv, prog: str, description: str, job) -> int:
    """Parse, run ``job(cfg)`` and return its exit code; a config that cannot work exits 2, a ``JobFailed``
    exits 1 (each with its message); the process group is always torn down."""
    args = parse_job_args(argv, prog, description)
    setup_logging()
    try:
        return job(load_config(args.config, args.overrides))
    except ConfigError as err:
        print(f"config error: {err}", flush=True)
        return 2
    except JobFailed as err:
        print(f"error: {err}", flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
