"""Several REAL SGLang servers behind one rollout engine (rollout.sglang_urls), on the CPU.

Two real SGLang 0.5.23 servers (one core each, --max-running-requests 2) on the tiny Qwen2:
rollouts come from both and in prompt order; one weight sync (one gloo group spanning the trainer
and both servers, each bucket broadcast once) reaches both; the trainer end to end with both; one
server killed mid-run is a clear error naming it, after a checkpoint the run resumes from.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sglang_server  # noqa: E402
from test_sglang_real import GREEDY, PROMPTS, Reference, buckets_of, perturbed  # noqa: E402
from test_trainer import overrides, rows_of, run_train, train_cmd  # noqa: E402

from real_megatron.rollout.sglang_engine import SGLangEngine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def assets(warm_assets):
    """Training runs start from the warmed-up model (mixed rewards, nonzero gradients), as in test_trainer."""
    return warm_assets


@pytest.fixture(scope="module")
def two_servers(random_assets, tmp_path_factory):
    servers = sglang_server.Server.several(random_assets["base"], tmp_path_factory.mktemp("pool"), 2,
                                           max_running_requests=2)
    print(f"\ntwo SGLang servers ready in {max(s.start_s for s in servers):.0f}s", flush=True)
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def serves(url, eos, reference, state):
    got = SGLangEngine(url, eos_token_id=eos).generate(PROMPTS, 1, GREEDY)
    want = reference.greedy(state, PROMPTS, GREEDY.max_new_tokens)
    return all(c.token_ids == ids for c, (ids, _) in zip(got, want, strict=True))


def test_rollouts_from_both_and_every_sync_reaches_both(two_servers, random_assets, monkeypatch):
    base = Path(random_assets["base"])
    eos = json.loads((base / "config.json").read_text())["eos_token_id"]
    reference = Reference(base, eos)
    from safetensors.torch import load_file

    new = perturbed(load_file(base / "model.safetensors"), seed=11)
    eng = SGLangEngine([s.url for s in two_servers], eos_token_id=eos, weight_sync="distributed")
    eng.init_weights_update_group("127.0.0.1", sglang_server.free_port(), backend="gloo", timeout_s=120)
    try:
        eng.update_weights(buckets_of(new))
        for s in two_servers:
            assert serves(s.url, eos, reference, new), s.url
        asked = {}
        for server in eng.servers:  # spy on which prompts each real server is asked for
            real = server.generate
            monkeypatch.setattr(server, "generate", lambda p, n, sp, first_prompt=0, _real=real, _s=server:
                                asked.setdefault(_s.name, list(range(first_prompt, first_prompt + len(p)))) and
                                _real(p, n, sp, first_prompt=first_prompt))
        out = eng.generate(PROMPTS, 3, GREEDY)
        assert asked == {two_servers[0].url: [0, 1], two_servers[1].url: [2, 3]}
        assert [c.prompt_index for c in out] == [i for i in range(len(PROMPTS)) for _ in range(3)]
        want = reference.greedy(new, PROMPTS, GREEDY.max_new_tokens)
        assert [c.token_ids for c in out] == [ids for ids, _ in want for _ in range(3)]
    finally:
        eng.close()
    # colocated: the same shared-memory tensors to both servers (each gets payloads of its own)
    newer = perturbed(new, seed=12)
    SGLangEngine([s.url for s in two_servers], eos_token_id=eos, weight_sync="tensor").update_weights(buckets_of(newer))
    for s in two_servers:
        assert serves(s.url, eos, reference, newer), s.url


def test_trainer_with_two_servers_then_one_killed_mid_run(two_servers, assets, tmp_path):
    """Both servers end with hf_final; then a run whose second server is SIGKILLed after the first
    step fails naming it, with a checkpoint, and the same run resumes on the surviving server."""
    import subprocess

    from safetensors.torch import load_file

    urls = "[" + ",".join(s.url for s in two_servers) + "]"
    common = {"train.eval_every": 0, "rollout.engine": "sglang", "rollout.sglang_weight_sync": "distributed",
              "rollout.weight_bucket_mb": 1, "train.save_every": 1}
    run_dir = tmp_path / "both"
    proc = run_train(overrides(assets, run_dir, **{**common, "train.steps": 1, "rollout.sglang_urls": urls,
                                                   "rollout.sglang_master_port": sglang_server.free_port()}),
                     timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = load_file(run_dir / "hf_final" / "model.safetensors")
    eos = json.loads((Path(assets["base"]) / "config.json").read_text())["eos_token_id"]
    reference = Reference(run_dir / "hf_final", eos)
    for s in two_servers:
        assert serves(s.url, eos, reference, final), f"{s.url} does not hold the trained weights"

    run_dir = tmp_path / "killed"
    args = overrides(assets, run_dir, **{**common, "train.steps": 3, "rollout.sglang_urls": urls,
                                         "rollout.sglang_master_port": sglang_server.free_port()})
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.Popen(train_cmd(args, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    victim = two_servers[1]
    deadline = time.monotonic() + 900
    while not (run_dir / "metrics.jsonl").exists() or not rows_of(run_dir):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
        time.sleep(1)
    victim.kill()  # mid-run: after the first step's rows, before the run ends
    out, err = run.communicate(timeout=900)
    assert run.returncode != 0
    assert victim.url in err + out, err[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step_")
    survivor = [a for a in args if not a.startswith(("rollout.sglang_urls=", "rollout.sglang_master_port="))] + [
        f"rollout.sglang_urls=[{two_servers[0].url}]", f"rollout.sglang_master_port={sglang_server.free_port()}"]
    resumed = run_train(survivor, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert [r["rollout_step"] for r in rows_of(run_dir)][-1] == 3
    final = load_file(run_dir / "hf_final" / "model.safetensors")
    assert serves(two_servers[0].url, eos, Reference(run_dir / "hf_final", eos), final)
    assert torch.isfinite(torch.cat([t.flatten().float() for t in final.values()])).all()
