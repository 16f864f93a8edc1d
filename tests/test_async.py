"""Generation overlapped with training (``train.max_staleness``), end to end with the real train command: the
synchronous loop untouched at S = 0, the staleness bound, kill -9 and resume at S = 1 and 2, a DP = 2 run, the
behaviour correction on the loop's own rollouts, and an engine that dies while the trainer works."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from test_trainer import (
    assert_learning_signal,
    assert_same_rows,
    close,
    kill_9_after_checkpoint,
    overrides,
    rows_of,
    run_train,
    train_cmd,
)

pytestmark = pytest.mark.slow  # real train commands

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ASYNC_KEYS = {"rollout/staleness_mean", "rollout/staleness_max", "time/wait_rollout_s", "time/engine_idle_s",
              "rollout/behaviour_kl", "rollout/behaviour_weight_mean", "rollout/behaviour_weight_max",
              "rollout/behaviour_corrected_fraction"}


@pytest.fixture(scope="module")
def assets(warm_assets):
    return warm_assets


def settings(**extra):
    # lr 1e-4 keeps the tiny policy learning (not collapsing) over the steps compared
    return {"train.steps": 4, "train.eval_every": 0, "optim.lr": 1e-4, **extra}


def test_s0_is_the_synchronous_loop(assets, tmp_path):
    """S = 0 runs no producer (a producer that cannot even be built does not matter) and logs no new key."""
    run_dir = tmp_path / "s0"
    code = ("import sys, real_megatron.rollout.producer as p\n"
            "class Refused:\n"
            "    def __init__(self, *a, **k): raise AssertionError('S=0 built a producer')\n"
            "p.AheadProducer = Refused\n"
            "from real_megatron.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([train_cmd([])[0], "-c", code, "train", *overrides(assets, run_dir, **settings(
        **{"train.steps": 2}))], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(run_dir)
    assert rows and not any(ASYNC_KEYS & row.keys() for row in rows)


@pytest.mark.parametrize("staleness", [1, 2])
def test_staleness_is_bounded_and_the_run_learns(assets, tmp_path, staleness):
    run_dir = tmp_path / f"s{staleness}"
    proc = run_train(overrides(assets, run_dir, **settings(**{"train.max_staleness": staleness})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(run_dir)
    assert_learning_signal(rows)
    for row in rows:  # batch k is sampled by version max(k - S, 0): k-1 of the rollout step counts from 1
        assert row["rollout/staleness_max"] == min(row["rollout_step"] - 1, staleness), row
        assert ASYNC_KEYS <= row.keys()
    # the trained policy moved between sampling and training: the engine's log-probs differ from π_old's
    assert max(r["rollout/behaviour_kl"] for r in rows if r["rollout/staleness_max"] > 0) > 0


@pytest.mark.parametrize("staleness", [1, 2])
def test_kill_9_then_resume_matches_an_uninterrupted_run(assets, tmp_path, staleness):
    """The batches generated ahead are part of the state: a run killed right after a checkpoint (its producer
    already generating the next batches) resumes to exactly the rows of an uninterrupted run."""
    s = settings(**{"train.max_staleness": staleness})
    reference = tmp_path / "reference"
    proc = run_train(overrides(assets, reference, **s))
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    args = overrides(assets, killed, **s)
    kill_9_after_checkpoint(args, killed, ENV)
    assert (killed / "checkpoints" / "step_000002" / "pending_rollouts.pt").exists()
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_rows, res_rows = rows_of(reference), rows_of(killed)
    assert_learning_signal([r for r in ref_rows if r["rollout_step"] > 2])
    assert_same_rows(ref_rows, res_rows)


def test_dp2_at_s1_matches_one_process(assets, tmp_path):
    common = settings(**{"train.max_staleness": 1, "train.steps": 2})
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_train(overrides(assets, one, **common)).returncode == 0
    proc = run_train(overrides(assets, two, **common), nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a_rows, b_rows = rows_of(one), rows_of(two)
    assert len(a_rows) == len(b_rows) == 4
    assert_learning_signal(a_rows)
    for a, b in zip(a_rows, b_rows, strict=True):
        for key in ("train/loss", "train/reward_mean", "train/entropy", "train/grad_norm", "rollout/staleness_max",
                    "rollout/behaviour_kl"):
            assert close(a[key], b[key], rel=1e-4), f"{key}: {a[key]} (1 process) vs {b[key]} (DP=2)"


@pytest.mark.parametrize("loss", ["real", "grpo"])
def test_behaviour_correction_runs_on_the_loops_own_rollouts(assets, tmp_path, loss):
    run_dir = tmp_path / loss
    proc = run_train(overrides(assets, run_dir, **settings(**{
        "train.max_staleness": 1, "loss.name": loss, "train.steps": 3,
        "loss.hparams": "{behaviour_correction: truncate, behaviour_cap: 1.01}"})))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(run_dir)
    assert_learning_signal(rows)
    stale = [r for r in rows if r["rollout/staleness_max"] > 0]
    assert max(r["rollout/behaviour_weight_max"] for r in stale) > 1.01  # weights beyond the cap existed ...
    assert max(r["rollout/behaviour_corrected_fraction"] for r in stale) > 0  # ... and were truncated


def test_an_engine_that_dies_while_the_trainer_works_is_a_clear_error_after_a_save(assets, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(assets, run_dir, **settings(**{"train.max_staleness": 1, "train.steps": 6,
                                                     "train.save_every": 1}))
    log = tmp_path / "stderr.log"
    with open(log, "w") as fh:
        p = subprocess.Popen(train_cmd(args), stdout=subprocess.DEVNULL, stderr=fh, text=True, env=ENV)
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "step_000001" / "meta.json").exists():
            assert p.poll() is None and time.time() < deadline, "the run ended before the engine could be killed"
            time.sleep(0.05)
        match = re.search(r"embedded rollout engine: process (\d+)", log.read_text())
        assert match, log.read_text()[-2000:]
        os.kill(int(match.group(1)), signal.SIGKILL)
        p.wait(timeout=300)
    err = log.read_text()
    assert p.returncode == 1, err[-3000:]
    assert "embedded rollout engine process died" in err and "was saved to" in err, err[-3000:]
    assert "rerun the same command to resume" in err


@pytest.mark.parametrize("partial", [False, True], ids=["one-step-off", "partial"])
def test_a_real_sglang_server_generates_ahead(assets, sglang_server, tmp_path, partial):
    """S = 1 against a REAL SGLang 0.5.23 server: requests run while the trainer trains; with rollout.partial the
    weights reach the server during generation and each token's version comes back. The bound holds either way."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        group_port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    args = overrides(assets, run_dir, **settings(**{
        "train.steps": 3, "train.max_staleness": 1, "rollout.engine": "sglang",
        "rollout.sglang_urls": sglang_server.url, "rollout.sglang_weight_sync": "distributed",
        "rollout.sglang_master_port": group_port, "rollout.partial": str(partial).lower()}))
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        code = subprocess.run(train_cmd(args), stdout=out, stderr=subprocess.STDOUT, timeout=900, env=ENV).returncode
    assert code == 0, log.read_text()[-3000:] + "\nserver log:\n" + sglang_server.log_tail()
    rows = rows_of(run_dir)
    assert [r["rollout_step"] for r in rows] == [1, 1, 2, 2, 3, 3]
    assert all(0 <= r["rollout/staleness_mean"] <= r["rollout/staleness_max"] <= 1 for r in rows), rows
    assert rows[-1]["rollout/staleness_max"] == 1  # the last batch was sampled one version back (at least partly)


def test_weights_pushed_during_generation_stamp_the_tokens_after_them(sglang_server):
    """The adapter's partial mode on its own: a push in the middle of a long generation pauses the server, the
    requests continue on the new weights, and each completion's tokens carry both versions in order."""
    import threading

    from safetensors.torch import load_file

    from real_megatron.rollout import SamplingParams
    from real_megatron.rollout.sglang_engine import SGLangEngine

    engine = SGLangEngine(sglang_server.url, eos_token_id=sglang_server.eos + 10_000, partial=True)  # never sampled
    weights = load_file(sglang_server.model_dir / "model.safetensors")
    try:
        engine.update_weights([list(weights.items())], version=5)
        spanned = False
        for attempt in range(4):  # the push must land while the requests run: pushed sooner each attempt
            got = {}
            thread = threading.Thread(target=lambda seed=attempt, got=got: got.update(out=engine.generate(
                [[1, 2, 3], [4, 5]], 2, SamplingParams(temperature=1.0, max_new_tokens=120, seed=seed))))
            thread.start()
            time.sleep(0.8 / (attempt + 1))
            engine.update_weights([[(k, v * 1.01) for k, v in weights.items()]], version=6 + 2 * attempt)
            thread.join(timeout=600)
            old, new = 5 + 2 * attempt, 6 + 2 * attempt
            for c in got["out"]:
                assert c.token_versions is not None and len(c.token_versions) == len(c.token_ids)
                assert c.token_versions == sorted(c.token_versions) and set(c.token_versions) <= {old, new}
            spanned = any(old in c.token_versions and new in c.token_versions for c in got["out"])
            if spanned:  # interrupted, then continued on the new weights
                break
            engine.update_weights([list(weights.items())], version=7 + 2 * attempt)
        assert spanned, "no push landed while requests ran"
    finally:
        engine.update_weights([list(weights.items())], version=99)  # the session's server serves its weights again
        engine.close()
