"""The command-line wrapper of the config-driven jobs (``train``, ``sft``): arguments, logging, exit codes,
and process-group teardown. ``cli.py`` dispatches a sub-command to its module; this runs the job."""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch.distributed as dist

from real_megatron.arguments import ArgumentParser
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
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config file (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.name=grpo parallel.tp=2")
    return parser.parse_args(argv)


def _tell_torchrun(message: str) -> None:
    """Under torchrun, record ``message`` in the worker's error file, so that torchrun's failure summary names it
    as the root cause instead of pointing at a traceback (torchrun prints that summary whatever the child does)."""
    import json
    import os

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as fh:
                json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                        "timestamp": str(int(time.time()))}}}, fh)
        except OSError:  # the summary then lacks the message; the message itself was printed
            pass


def run_job(argv, prog: str, description: str, job) -> int:
    """Parse, run ``job(cfg)`` and return its exit code; the process group is always torn down.

    A config that cannot work exits 2, a ``JobFailed`` 1, each with its one-line message on stderr, said once
    (by rank 0: under torchrun every rank meets the same check and exits with the same code); a run already
    done (``NothingToDo``) says so and exits 0; Ctrl-C before training begins exits 130 without a traceback
    (the trainer itself finishes a rollout step and saves on SIGINT once it runs)."""
    from real_megatron.run_dir import NothingToDo, release_unused

    args = parse_job_args(argv, prog, description)
    setup_logging()
    rank, _ = world()

    def say(message: str) -> None:
        _tell_torchrun(message)
        if rank == 0:
            print(message, file=sys.stderr, flush=True)
        else:  # torchrun stops every worker once one exits: let rank 0, which says it, exit first
            time.sleep(2.0)

    try:
        return job(load_config(args.config, args.overrides))
    except ConfigError as err:
        say(f"config error: {err}")
        return 2
    except JobFailed as err:
        say(f"error: {err}")
        return 1
    except NothingToDo as done:
        say(str(done))
        return 0
    except KeyboardInterrupt:
        release_unused()
        say(f"{prog}: interrupted before training began; nothing was saved. Rerun the same command to start")
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
