"""Operating like a cluster, for real: examples/launch.py submitting to a real Slurm, and multi-node torchrun.

Every run here is the launcher's own command line (``python examples/launch.py ...`` as a user types
it), never a copy of the torchrun command it builds:

* the reference: one machine, DP = 2 (``--gpus 2``: one torchrun, two gloo processes);
* rendezvous: two torchrun "nodes" on this host (``--gpus 1 --nnodes 2 --node-rank 0|1
  --rdzv-endpoint``: two agents, one process each, meeting in a c10d rendezvous);
* Slurm: ``--executor slurm --nodes 2 --gpus-per-node 0`` through NeMo-Run's SlurmExecutor and a
  LocalTunnel into the throw-away cluster of tests/slurm_cluster.py (nodeA + nodeB), no container;
  and a job cancelled with ``scancel`` mid-run, then resubmitted.

Each multi-node run must reproduce the reference's metrics (losses, rewards, entropies, gradient
norms) row by row: the same DP = 2 training, whoever started it. The runs are tiny (3 rollout steps of
4 prompts x 4 rollouts, from the warmed-up model, so losses and gradients are nonzero).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster as cluster_module
from slurm_cluster import KILL_WAIT_S, free_ports, slurm_cluster  # noqa: F401  (slurm_cluster is a fixture)
from test_trainer import assert_learning_signal, close, deterministic, overrides, rows_of

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(REPO / "examples" / "launch.py"), "--recipe", "tiny_cpu"]
STEPS = 5  # rollout steps; 2 optimizer steps each (enough that a scancel on a loaded machine lands mid-run)


@pytest.fixture(scope="module")
def assets(warm_assets):
    return warm_assets


def run_overrides(assets, run_dir: Path) -> list[str]:
    return overrides(assets, run_dir, **{"train.steps": STEPS, "train.eval_every": 0, "train.save_every": 1})


def launcher_env(tmp_path: Path, **extra) -> dict:
    # OMP_NUM_THREADS=1: torchrun sets it only when it starts several processes per node; the same
    # thread count everywhere keeps the float reductions (and so the samples) identical across runs
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "NEMORUN_HOME": str(tmp_path / "nemorun"),
            **extra}


def launch(args, env, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([*LAUNCH, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return proc


def assert_same_training(reference: Path, other: Path, what: str):
    ref_rows, rows = rows_of(reference), rows_of(other)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows], f"{what}: steps differ"
    for a, b in zip(ref_rows, rows, strict=True):
        a, b = deterministic(a), deterministic(b)
        assert a.keys() == b.keys(), f"{what}: step {a['step']} keys differ"
        for key in a:
            assert close(a[key], b[key]), f"{what}, step {a['step']} {key}: {a[key]} (reference) vs {b[key]}"


@pytest.fixture(scope="module")
def single_node_dp2(assets, tmp_path_factory):
    """The reference: `launch.py --gpus 2` on one machine (one torchrun agent, DP = 2)."""
    tmp = tmp_path_factory.mktemp("dp2")
    t0 = time.monotonic()
    proc = launch(["--gpus", "2", *run_overrides(assets, tmp / "run")], launcher_env(tmp))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = rows_of(tmp / "run")
    assert [r["step"] for r in rows] == list(range(1, 2 * STEPS + 1))
    assert_learning_signal(rows)
    print(f"single-node DP=2 reference: {time.monotonic() - t0:.1f} s")
    return tmp / "run"


# ----------------------------------------------------------------------------- the fixture's own rules


def test_slurm_missing_pieces_skip_with_a_reason_or_fail_under_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(cluster_module, "SEARCH_PATH", str(tmp_path))  # no binary anywhere
    missing = cluster_module.missing_pieces()
    assert "slurmctld" in missing[0] and "mariadb-server" in missing[0] and "munge" in missing[0]
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="real-Slurm tests need packages"):
        cluster_module.skip_or_fail_if_missing(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        cluster_module.skip_or_fail_if_missing(missing)
    cluster_module.skip_or_fail_if_missing([])  # nothing missing: the tests run


# ----------------------------------------------------------------------------- rendezvous (no Slurm)


@pytest.mark.slow
def test_rendezvous_two_torchrun_nodes_equal_single_node_dp2(assets, tmp_path, single_node_dp2):
    port = free_ports(1)[0]
    run_dir = tmp_path / "run"
    common = ["--gpus", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", *run_overrides(assets, run_dir)]
    # what each node would run, from the launcher itself: torchrun with a 2-node c10d rendezvous
    dry = launch(["--node-rank", "1", *common, "--dryrun"], launcher_env(tmp_path))
    assert dry.returncode == 0, dry.stderr[-3000:]
    torchrun = dry.stdout.strip().splitlines()[-1].split()
    for flag, value in (("--nnodes", "2"), ("--nproc-per-node", "1"), ("--node-rank", "1"),
                        ("--rdzv-backend", "c10d"), ("--rdzv-endpoint", f"127.0.0.1:{port}")):
        assert torchrun[torchrun.index(flag) + 1] == value, (flag, torchrun)

    t0 = time.monotonic()
    nodes = [subprocess.Popen([*LAUNCH, "--node-rank", str(rank), *common], env=launcher_env(tmp_path / f"n{rank}"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
             for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=600)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    codes = [node.returncode for node in nodes]
    assert codes == [0, 0], "\n".join(f"node {rank} exited {code}:\n{out[-3000:]}"
                                      for rank, (code, out) in enumerate(zip(codes, outputs, strict=True)))
    print(f"two-node rendezvous run: {time.monotonic() - t0:.1f} s")
    assert_same_training(single_node_dp2, run_dir, "2 torchrun nodes x 1 process")


# ----------------------------------------------------------------------------- real Slurm


def slurm_args(rdzv_port: int) -> list[str]:
    return ["--executor", "slurm", "--nodes", "2", "--gpus-per-node", "0", "--account", "test", "--partition", "debug",
            "--time", "00:20:00", "--rdzv-port", str(rdzv_port)]


def reported(out: str) -> tuple[str, Path]:
    """The job id and log file the launcher told the user."""
    job = re.search(r"Slurm job (\d+)\n  log: (\S+)", out)
    assert job, out[-3000:]
    return job.group(1), Path(job.group(2))


@pytest.mark.slow
def test_slurm_two_node_job_equals_torchrun(assets, tmp_path, slurm_cluster, single_node_dp2):  # noqa: F811
    run_dir = tmp_path / "run"
    env = launcher_env(tmp_path, **slurm_cluster.env)
    t0 = time.monotonic()
    proc = launch([*slurm_args(free_ports(1)[0]), "--wait", *run_overrides(assets, run_dir)], env)
    job_id, log = reported(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log.read_text()[-4000:]
    print(f"Slurm 2-node job: {time.monotonic() - t0:.1f} s")
    assert f"Slurm job {job_id} ended COMPLETED" in proc.stdout
    assert slurm_cluster.sacct_state(job_id) == "COMPLETED"
    # it really ran on both nodes, one torchrun agent each
    nodes = slurm_cluster.run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "NodeList").stdout.strip()
    assert nodes in ("nodeA,nodeB", "node[A-B]"), nodes
    text = log.read_text()
    assert "run directory:" in text  # the trainer's last words, from rank 0
    assert_same_training(single_node_dp2, run_dir, "Slurm 2 nodes")


@pytest.mark.slow
def test_slurm_scancel_saves_then_resubmission_resumes(assets, tmp_path, slurm_cluster, single_node_dp2):  # noqa: F811
    run_dir = tmp_path / "run"
    env = launcher_env(tmp_path, **slurm_cluster.env)
    argv = [*slurm_args(free_ports(1)[0]), *run_overrides(assets, run_dir)]
    t0 = time.monotonic()
    proc = launch(argv, env)  # no --wait: submit, report, return
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id, log = reported(proc.stdout)
    assert f"sacct -j {job_id}" in proc.stdout and f"scancel {job_id}" in proc.stdout

    first = run_dir / "checkpoints" / "step_000001"
    deadline = time.monotonic() + 300
    while not (first / "meta.json").exists():
        state = slurm_cluster.sacct_state(job_id)
        assert state in (None, "PENDING", "RUNNING"), f"job {job_id} {state} before its first checkpoint:\n" + (
            log.read_text()[-4000:] if log.exists() else "(no log)")
        assert time.monotonic() < deadline, "no first checkpoint after 300 s"
        time.sleep(0.05)
    slurm_cluster.run("scancel", job_id)  # SIGTERM now, SIGKILL after KillWait
    assert slurm_cluster.wait_state(job_id, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120) == "CANCELLED"
    slurm_cluster.wait_gone(job_id, timeout=KILL_WAIT_S + 60)  # the grace period: save, then exit
    text = log.read_text()
    assert "stopped by signal 15" in text, text[-4000:]
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    # the trainer finishes the step it is in when SIGTERM arrives: any step before the last leaves one to resume
    assert saved in {f"step_{k:06d}" for k in range(1, STEPS)}, f"cancelled too late to test a resume: latest={saved}"

    proc = launch([*argv, "--wait"], env)
    job2, log2 = reported(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log2.read_text()[-4000:]
    print(f"Slurm scancel + resubmission: {time.monotonic() - t0:.1f} s")
    assert job2 != job_id and "resumed from" in log2.read_text()
    assert_same_training(single_node_dp2, run_dir, f"Slurm, cancelled after {saved} and resubmitted")
