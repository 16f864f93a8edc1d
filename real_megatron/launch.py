"""``real-megatron launch``: start a training run with NeMo-Run, locally under torchrun or on Slurm.

    # one node, 8 GPUs, torchrun; print what would run
    real-megatron launch --recipe real_1p5b --executor local --gpus 8 --dryrun
    # GRPO baseline on DeepScaleR, with an extra override
    real-megatron launch --recipe real_1p5b --loss grpo --data deepscaler --gpus 8 train.eval_every=100
    # 7B on 4 Slurm nodes x 8 GPUs, pyxis container, submitted through an SSH tunnel
    real-megatron launch --recipe real_7b --executor slurm --nodes 4 --gpus-per-node 8 \\
        --account ACC --partition batch --time 24:00:00 --container-image nvcr.io/me/real-megatron:gpu \\
        --tunnel ssh --ssh-host login.cluster --ssh-user me --job-dir /lustre/me/nemo-run
    # from a login node, no container (the nodes share this checkout and its .venv), CPU nodes, wait
    real-megatron launch --recipe tiny_cpu --executor slurm --nodes 2 --gpus-per-node 0 \\
        --account ACC --partition debug --wait
    # two nodes without Slurm: run this on each node with its own --node-rank
    real-megatron launch --recipe tiny_cpu --gpus 1 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500

``python examples/launch.py ...`` is the same command from a checkout (it calls ``main`` here).

Every job runs the one train entry point, ``python -m real_megatron train --config FILE key=value ...``,
under torchrun (one process per GPU). The config and the overrides are loaded and validated here,
before anything is submitted, with the same ``load_config`` / ``validate_config`` the job uses, so
a typo in an override fails in a second instead of after the queue wait. Layouts are checked
against the model's real shapes when ``model.hf_dir`` exists on this machine.

Recipes (``--recipe NAME``) are the YAML files in the checkout's ``examples/configs/``; ``--config FILE``
takes any other. Multi-node jobs (Slurm ``--nodes N``, local ``--nnodes N``) run one torchrun agent per
node that meet in a c10d rendezvous (Slurm: on the first node of the allocation, port ``--rdzv-port``).

A submitted Slurm job is reported with its job id, its log file and the ``sacct`` command for its
state; ``--wait`` waits for it and exits 0 only when it COMPLETED. ``scancel JOBID`` sends SIGTERM:
the run finishes its rollout step, saves and exits (within the cluster's KillWait grace period), and
the same launch command resumes it.

Slurm jobs get the code as a tarball of ``real_megatron/``, ``examples/`` and ``setup.py``
(``--packager pattern``, the default: works in any checkout, git or not), or ``git archive``
of HEAD (``--packager git``: exactly the committed code; fails outside a git repo). A pyxis
container (``--container-image``) must already hold the dependencies (``pip install -e .[gpu]``);
the container is optional: without one, the job runs in the nodes' own environment with this
Python's bin directory first on PATH (a shared file system with the same .venv on every node).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

# the checkout this package lives in (pip install -e .): recipes and the code a Slurm job gets come from it
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"
PROG = "real-megatron launch"
RECIPES = {p.stem: p for p in sorted(CONFIGS.glob("*.yaml"))}
# --data shortcuts: the training-set file a recipe's data.train_files points at (tools/prepare_data.py
# writes them in this schema from the copies a user has)
TRAIN_SETS = {"dapo17k": "data/dapo-math-17k.parquet", "deepscaler": "data/deepscaler.parquet"}


class LaunchError(ValueError):
    """A launch that cannot work; the message names the flag and the fix."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("overrides", nargs="*", help="dotted config overrides passed to the job, e.g. optim.lr=1e-6")
    what = p.add_argument_group("what to run")
    what.add_argument("--recipe", choices=sorted(RECIPES), help="a config in examples/configs/")
    what.add_argument("--config", help="any other YAML config file (instead of --recipe)")
    # the loss name is checked with the rest of the config (real_megatron.losses.LOSSES), not re-listed here
    what.add_argument("--loss", help="policy loss: real (default) or a baseline such as grpo; sets loss.name")
    what.add_argument("--data", choices=sorted(TRAIN_SETS), help="training set shortcut; sets data.train_files")
    what.add_argument("--name", help="experiment/job name (default: recipe[-loss])")
    what.add_argument("--dryrun", action="store_true", help="print the torchrun command / sbatch script; submit nothing")
    ex = p.add_argument_group("executor")
    ex.add_argument("--executor", choices=("local", "slurm"), default="local")
    ex.add_argument("--gpus", type=int, default=None, help="local: processes (GPUs) on this machine")
    ex.add_argument("--nnodes", type=int, default=1, help="local: machines in the job (run the launch on each)")
    ex.add_argument("--node-rank", type=int, default=0, help="local, --nnodes > 1: this machine's rank, 0..nnodes-1")
    ex.add_argument("--rdzv-endpoint", help="local, --nnodes > 1: HOST:PORT of the c10d rendezvous (on node 0)")
    ex.add_argument("--nodes", type=int, default=1, help="slurm: number of nodes")
    ex.add_argument("--gpus-per-node", type=int, default=8,
                    help="slurm: GPUs (= torchrun processes) per node; 0: CPU nodes, one gloo process each, no GPU request")
    ex.add_argument("--rdzv-port", type=int, default=29500, help="slurm: c10d rendezvous port on the first node")
    ex.add_argument("--account", help="slurm: account")
    ex.add_argument("--partition", help="slurm: partition")
    ex.add_argument("--time", default="04:00:00", help="slurm: wall-clock limit")
    ex.add_argument("--container-image", help="slurm, optional: pyxis/enroot image with the [gpu] extra installed; "
                    "without it the job runs in the nodes' own environment (this Python's bin first on PATH)")
    ex.add_argument("--container-mounts", action="append", default=[], help="slurm with a container: SRC:DST (repeatable)")
    ex.add_argument("--tunnel", choices=("local", "ssh"), default="local",
                    help="slurm: submit from this machine (local: a login node) or through SSH")
    ex.add_argument("--ssh-host", help="slurm --tunnel ssh: login host")
    ex.add_argument("--ssh-user", default=os.environ.get("USER", ""), help="slurm --tunnel ssh: user")
    ex.add_argument("--ssh-identity", help="slurm --tunnel ssh: private key file")
    ex.add_argument("--job-dir", help="slurm --tunnel ssh: directory (on the cluster) for code tarballs and logs; "
                    "--tunnel local uses NeMo-Run's own $NEMORUN_HOME/experiments")
    ex.add_argument("--wait", action="store_true", help="slurm: wait for the job, report its sacct state, exit 0 "
                    "only when it COMPLETED (default: submit, print the job id and log path, return)")
    ex.add_argument("--packager", choices=("pattern", "git"), default="pattern", help="slurm: how code travels")
    ex.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job's environment (repeatable)")
    return p


def job_overrides(args) -> list[str]:
    """The overrides the job gets: shortcuts first, then the user's (which win on conflict)."""
    out = []
    if args.loss:
        out.append(f"loss.name={args.loss}")
    if args.data:
        # no brackets: a one-file list needs none (a str becomes [str]) and brackets need shell quoting
        out.append(f"data.train_files={TRAIN_SETS[args.data]}")
    return out + list(args.overrides)


def config_path(args) -> Path:
    if bool(args.recipe) == bool(args.config):
        # recipes come from the checkout; a non-editable install has none beside the package
        known = ", ".join(sorted(RECIPES)) or f"none ({CONFIGS} is missing: install from a checkout, pip install -e .)"
        raise LaunchError(f"give exactly one of --recipe NAME or --config FILE; recipes: {known}")
    path = RECIPES[args.recipe] if args.recipe else Path(args.config).resolve()
    if not path.exists():
        raise LaunchError(f"--config {path} does not exist")
    return path


def world_size(args) -> int:
    if args.executor == "local":
        return (args.gpus or 1) * args.nnodes
    return args.nodes * procs_per_node(args)


def procs_per_node(args) -> int:
    """Slurm: torchrun processes per node: one per GPU, or one gloo process on a CPU node (--gpus-per-node 0)."""
    return args.gpus_per_node or 1


def put_this_python_first_on_path():
    """nemo-run runs the bare name "torchrun" (locally, or in a Slurm job that inherits this environment):
    put this interpreter's bin directory first on PATH, so a launch from an unactivated venv
    (.venv/bin/real-megatron launch, .venv/bin/python examples/launch.py) gets the venv's torchrun and packages."""
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def set_local_rendezvous(args):
    """Local multi-node: nemo-run's torchrun component reads the rendezvous from MASTER_ADDR/MASTER_PORT and
    the rank from NODE_RANK (its LocalExecutor builds the command from the environment)."""
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise LaunchError(f"--nnodes {args.nnodes} / --node-rank {args.node_rank}: need nnodes >= 1 and "
                          "0 <= node-rank < nnodes")
    if args.nnodes == 1:
        return
    host, sep, port = (args.rdzv_endpoint or "").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LaunchError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address and a free "
                          f"port), got {args.rdzv_endpoint!r}")
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=port, NODE_RANK=str(args.node_rank))


def check_config(path: Path, overrides: list[str], world: int):
    """Load + validate exactly what the job will (model shapes when hf_dir is on this machine)."""
    from real_megatron.config import load_config, validate_config
    from real_megatron.hf_model import read_hf_config

    cfg = load_config(path, overrides)
    hf_config = None
    cfg_json = Path(cfg.model.hf_dir) / "config.json"
    if cfg.model.hf_dir and cfg_json.exists():
        hf_config = read_hf_config(cfg_json)  # the reader the trainer uses (checks the architecture too)
    validate_config(cfg, world_size=world, hf_config=hf_config)
    return cfg


def make_executor(args):
    import nemo_run as run

    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--env {item!r} is not KEY=VALUE")
        env[key] = value
    if args.executor == "local":
        if args.gpus is not None and args.gpus < 1:
            raise LaunchError(f"--gpus {args.gpus}: need at least 1 process")
        # torchrun on this machine, one process per GPU (gloo on the CPU for the tiny recipe)
        set_local_rendezvous(args)
        put_this_python_first_on_path()
        return run.LocalExecutor(ntasks_per_node=args.gpus or 1, nodes=args.nnodes, launcher="torchrun", env_vars=env)

    missing = [flag for flag, value in (("--account", args.account), ("--partition", args.partition),
                                        ("--job-dir", args.job_dir or args.tunnel == "local")) if not value]
    if missing:
        raise LaunchError(f"--executor slurm needs {', '.join(missing)}")
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise LaunchError(f"--nodes {args.nodes} must be >= 1 and --gpus-per-node {args.gpus_per_node} >= 0")
    if args.tunnel == "ssh":
        if not args.ssh_host or not args.ssh_user:
            raise LaunchError("--tunnel ssh needs --ssh-host and --ssh-user")
        tunnel = run.SSHTunnel(host=args.ssh_host, user=args.ssh_user, job_dir=args.job_dir,
                               identity=args.ssh_identity)
    else:
        # a LocalTunnel copies nothing: sbatch reads the script from NeMo-Run's own experiment directory
        from nemo_run.config import get_nemorun_home

        job_dir = os.path.join(get_nemorun_home(), "experiments")
        if args.job_dir and Path(args.job_dir).resolve() != Path(job_dir).resolve():
            raise LaunchError(f"--job-dir {args.job_dir} with --tunnel local: the job directory is NeMo-Run's "
                              f"{job_dir}; set NEMORUN_HOME to move it, or drop --job-dir")
        tunnel = run.LocalTunnel(job_dir=job_dir)
    if not args.container_image:
        put_this_python_first_on_path()  # the job inherits this environment (sbatch --export=ALL)
    if args.packager == "git":
        packager = run.GitArchivePackager()
    else:
        # paths are absolute and tarred relative to the repo, so the job sees real_megatron/ and
        # examples/configs/ in its working directory (/nemo_run/code), git checkout or not
        parts = [str(REPO / "real_megatron"), str(REPO / "examples"), str(REPO / "setup.py")]
        packager = run.PatternPackager(include_pattern=parts, relative_path=[str(REPO)] * len(parts))
    return run.SlurmExecutor(
        account=args.account, partition=args.partition, time=args.time, nodes=args.nodes,
        ntasks_per_node=procs_per_node(args), gpus_per_node=args.gpus_per_node or None,
        container_image=args.container_image, container_mounts=list(args.container_mounts),
        tunnel=tunnel, packager=packager, launcher=run.Torchrun(rdzv_port=args.rdzv_port), env_vars=env)


def resolved_config_path(cfg) -> Path:
    """Where a local launch writes its fully resolved config: beside the run directory."""
    run_dir = Path(cfg.run_dir).absolute()
    return run_dir.with_name(run_dir.name + ".launch.yaml")


def make_script(args, path: Path, overrides: list[str], cfg):
    import nemo_run as run

    # Slurm jobs run in the unpacked code directory, so the config is named relative to the repo;
    # local jobs run in the caller's directory and get the absolute path
    if args.executor == "slurm":
        try:
            config_arg = str(path.relative_to(REPO))
        except ValueError:
            raise LaunchError(f"--config {path} is outside the repository and would not travel with the code; "
                              "put it under examples/configs/") from None
    else:
        config_arg = str(path)
        # nemo-run shell-quotes every argument (right for sbatch scripts), but the local executor
        # starts torchrun without a shell, so a quoted argument (a list such as data.train_files=[a,b])
        # would arrive with its quotes. Such a launch gets the config with the overrides already
        # applied, written to one file, and no overrides on the command line.
        if any(shlex.quote(item) != item for item in [config_arg, *overrides]):
            import yaml

            from real_megatron.checkpoint import atomic_write_text
            from real_megatron.config import config_to_dict

            resolved = resolved_config_path(cfg)
            if shlex.quote(str(resolved)) != str(resolved):
                raise LaunchError(f"run_dir {cfg.run_dir!r} has characters that need shell quoting; choose a "
                                  "plain path (letters, digits, - _ . /)")
            resolved.parent.mkdir(parents=True, exist_ok=True)
            header = f"# written by {PROG}: {path} with the overrides {overrides}\n"
            atomic_write_text(resolved, header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            print(f"{PROG}: overrides need shell quoting; the job reads the resolved config {resolved}",
                  file=sys.stderr)
            config_arg, overrides = str(resolved), []
    return run.Script(path="real_megatron", m=True, entrypoint="python",
                      args=["train", "--config", config_arg, *overrides])


def describe(job) -> str:
    """What a dry run would execute: the torchrun command line (local) or the sbatch script (slurm)."""
    info = job._dryrun_info
    request = info.request
    if hasattr(request, "role_params"):  # torchx local scheduler: one Popen per replica
        lines = []
        for params in request.role_params.values():
            for replica in params:
                lines.append(" ".join(replica.args))  # already shell-quoted by nemo-run
        return "\n".join(lines)
    return str(info)


def report_slurm_job(job, waited: bool) -> int:
    """Tell the user the job id, its log file and how to follow it; after --wait, its sacct state.

    Returns the exit code: 0 when submitted (no --wait) or when the job COMPLETED, else 1.
    """
    job_id = str(job.handle).rstrip("/").rsplit("/", 1)[-1]
    details = job.executor.job_details
    log = str(details.srun_stdout).replace("%j", job_id).replace("${SLURM_RESTART_COUNT:-0}", "0")
    print(f"{PROG}: Slurm job {job_id}\n  log: {log}\n  state: sacct -j {job_id}   cancel: scancel {job_id} "
          "(the run saves; the same launch command resumes it)", flush=True)
    if not waited:
        return 0
    found = job.executor.tunnel.run(f"sacct -X -n -P -j {job_id} -o State", warn=True)
    state = (found.stdout.split() or ["UNKNOWN"])[0]
    print(f"{PROG}: Slurm job {job_id} ended {state} (NeMo-Run: {job.state.name}); log: {log}", flush=True)
    return 0 if state == "COMPLETED" else 1


def launch(argv=None) -> tuple[int, str]:
    """Parse, validate, build and dry-run or submit; returns (exit code, dry-run description)."""
    args = build_parser().parse_args(argv)
    path = config_path(args)
    overrides = job_overrides(args)
    cfg = check_config(path, overrides, world_size(args))
    import nemo_run as run

    executor = make_executor(args)
    script = make_script(args, path, overrides, cfg)
    name = args.name or "-".join(filter(None, [args.recipe or path.stem, args.loss]))
    text = ""
    with run.Experiment(name, log_level="WARN") as exp:
        exp.add(script, executor=executor, name=name)
        if args.dryrun:
            exp.dryrun(log=False)
            text = describe(exp.jobs[0])
            print(text)
        else:
            exp.run(detach=args.executor == "slurm" and not args.wait, tail_logs=args.executor == "local")
    if args.executor == "slurm" and not args.dryrun:
        return report_slurm_job(exp.jobs[0], args.wait), text
    # a local experiment waits for its job when the `with` block exits: report the job's outcome
    if args.executor == "local" and not args.dryrun:
        from torchx.specs.api import AppState

        state = exp.jobs[0].state
        if state != AppState.SUCCEEDED:
            print(f"{PROG}: the job ended {state.name}; its log is above", file=sys.stderr)
            return 1, text
    return 0, text


def main(argv=None) -> int:
    from real_megatron.config import ConfigError

    try:
        return launch(argv)[0]
    except (LaunchError, ConfigError, ValueError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
