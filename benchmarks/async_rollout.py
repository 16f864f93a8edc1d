"""Rollout steps per hour with generation overlapped with training (train.max_staleness), on a real SGLang server.

    python benchmarks/async_rollout.py [--work runs/bench_async] [--steps 10] [--settings s0,s1,...]

The demo's chain-task RL (``real_megatron/repro/recipe.py``: 16 prompts x 8 rollouts of up to 96 tokens,
four updates per rollout batch) from the demo's warm-up (built under ``--work`` unless ``--warmup DIR``
names an existing one), run for ``--steps`` rollout steps in each setting, one fresh run directory each:

* ``pinned``: the SGLang server on core 0 (``taskset``, one OpenMP thread), the trainer on core 1 (one
  thread) — generation and training on separate resources, as peers deploy them (rollout GPUs beside
  training GPUs); S = 0 (the synchronous loop) vs S = 1 (one-step-off) vs S = 2, and S = 1 with partial rollouts
  (``rollout.partial``: weights pushed during generation, the requests in flight paused and continued);
* ``shared``: server and trainer on both cores (each two threads), S = 0 vs S = 1;
* ``embedded``: the embedded transformers engine (in the trainer at S = 0, in its own process at S = 1),
  both cores shared.

Throughput is steady-state: the benchmark timestamps each rollout step's last metrics row as it appears and
counts steps per hour between the first and the last step (start-up and the first step excluded). Idle
fractions over the same window: the trainer's (its wait for rollouts: the generate + reward time at S = 0,
``time/wait_rollout_s`` at S >= 1) and the engine's (1 - generation time / wall at S = 0,
``time/engine_idle_s`` at S >= 1). Weights reach the server by a gloo broadcast (``sglang_weight_sync=
distributed``), as for a server on other machines.

The last line printed is one JSON object: ``steps_per_hour`` (by setting), ``speedup_s1`` (S = 1 / S = 0,
pinned), ``speedup_s2``, ``speedup_s1_partial``, ``speedup_s1_shared``, ``speedup_s1_embedded``,
``trainer_idle`` and ``engine_idle`` (by setting).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the real-SGLang server launcher the tests use (tests/sglang_server.py)

SETTINGS = {  # name -> (placement, engine, staleness, partial)
    "pinned_s0": ("pinned", "sglang", 0, False), "pinned_s1": ("pinned", "sglang", 1, False),
    "pinned_s2": ("pinned", "sglang", 2, False), "pinned_s1_partial": ("pinned", "sglang", 1, True),
    "shared_s0": ("shared", "sglang", 0, False), "shared_s1": ("shared", "sglang", 1, False),
    "embedded_s0": ("shared", "embedded", 0, False), "embedded_s1": ("shared", "embedded", 1, False),
}


def warmup_model(work: Path, warmup: str | None) -> tuple[object, Path]:
    """The chain task's assets and the demo's warmed-up model (built once under ``work``)."""
    from real_megatron.repro import recipe

    assets = recipe.build_chain_assets(work / "task")
    if warmup:
        return assets, Path(warmup)
    print("building the demo's warm-up (once) ...", flush=True)
    return assets, recipe.run_warmup(work / "warmup", assets)


class RowClock:
    """Timestamps each new rollout step's rows of ``metrics.jsonl`` as they appear (polled every 20 ms)."""

    def __init__(self, path: Path):
        self.path, self.seen, self.stamps = path, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            if self.path.exists():
                lines = self.path.read_text().splitlines()
                for line in lines[self.seen:]:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    self.seen += 1
                    step = row.get("rollout_step")
                    if step:
                        self.stamps[step] = time.monotonic()  # the step's last row arrives last
            time.sleep(0.02)

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_setting(name: str, args, assets, init_dir: Path, server_url: str | None, port: int) -> dict:
    from real_megatron.repro import recipe

    placement, engine, staleness, partial = SETTINGS[name]
    run_dir = args.work / "runs" / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    overrides = recipe.rl_overrides(assets, init_dir=init_dir, run_dir=run_dir, loss="real", seed=1, steps=args.steps)
    overrides += [f"train.max_staleness={staleness}", "train.eval_every=0", f"train.save_every={args.steps}",
                  "logging.wandb_mode=disabled", "logging.progress_bar=false"]
    if engine == "sglang":
        overrides += ["rollout.engine=sglang", f"rollout.sglang_urls=[{server_url}]",
                      "rollout.sglang_weight_sync=distributed", f"rollout.sglang_master_port={port}",
                      f"rollout.partial={str(partial).lower()}"]
    threads = "1" if placement == "pinned" else "2"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "real_megatron", "train", *overrides]
    if placement == "pinned":
        cmd = ["taskset", "-c", "1", *cmd]
    clock = RowClock(run_dir / "metrics.jsonl")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    total = time.monotonic() - t0
    clock.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = 1, args.steps
    window = clock.stamps[last] - clock.stamps[first]
    steady = [r for r in rows if first < r["rollout_step"] <= last]
    if staleness:
        trainer_wait = sum(r.get("time/wait_rollout_s", 0.0) for r in steady)
        engine_idle = sum(r.get("time/engine_idle_s", 0.0) for r in steady)
    else:
        busy = sum(r.get("time/rollout_s", 0.0) + r.get("time/reward_s", 0.0) for r in steady)
        trainer_wait, engine_idle = busy, window - sum(r.get("time/rollout_s", 0.0) for r in steady)
    result = {"steps_per_hour": 3600 * (last - first) / window, "trainer_idle": trainer_wait / window,
              "engine_idle": max(engine_idle, 0.0) / window, "wall_s": total,
              "staleness_max": max(r.get("rollout/staleness_max", 0.0) for r in rows)}
    print(f"{name:12s} {result['steps_per_hour']:7.0f} rollout steps/h  trainer idle {result['trainer_idle']:.2f}  "
          f"engine idle {result['engine_idle']:.2f}  (run {total:.0f} s, staleness max "
          f"{result['staleness_max']:g})", flush=True)
    return result


def input_problem(args, names: list[str]) -> str | None:
    """What is wrong with the arguments or the machine, in one line with the fix; None when all is well."""
    import shutil

    unknown = sorted(set(names) - set(SETTINGS))
    if unknown or not names:
        return f"--settings: unknown {unknown} (choose from {', '.join(SETTINGS)})"
    if args.steps < 3:
        return f"--steps {args.steps}: at least 3 (the first is not timed, and a rate needs two more)"
    if args.warmup and not (Path(args.warmup) / "config.json").is_file():
        return (f"--warmup {args.warmup}: not a HF model directory (no config.json); give a warm-up's hf/ "
                "directory, or leave --warmup out to build one")
    if any(SETTINGS[n][0] == "pinned" for n in names) and shutil.which("taskset") is None:
        return "the pinned settings need `taskset` (util-linux); install it or choose --settings shared_s0,..."
    if any(SETTINGS[n][1] == "sglang" for n in names):
        import sglang_server

        if (why := sglang_server.env_problem()) is not None:
            return f"{why}: build it with `make sglang-env`, or choose the embedded settings only"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_async",
                        help="the benchmark's scratch directory (its runs/<setting> are replaced on every run)")
    parser.add_argument("--warmup", default=None, help="an existing warmed-up HF directory (e.g. runs/demo/warmup/hf)")
    parser.add_argument("--steps", type=int, default=10, help="rollout steps per setting (the first is not timed)")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--dry-run", action="store_true", help="check the inputs and print the plan; run nothing")
    args = parser.parse_args(argv)
    names = [n for n in args.settings.split(",") if n]
    problem = input_problem(args, names)
    if problem:
        print(f"async_rollout.py: {problem}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"plan: {len(names)} settings x {args.steps} rollout steps ({', '.join(names)}); warm-up "
              f"{args.warmup or args.work / 'warmup (built first)'}; scratch {args.work}")
        return 0
    import sglang_server

    args.work.mkdir(parents=True, exist_ok=True)
    assets, init_dir = warmup_model(args.work, args.warmup)
    results, started = {}, time.monotonic()
    for placement, cpus, taskset in (("pinned", "0", "0"), ("shared", "0-1", None)):
        todo = [n for n in names if SETTINGS[n][0] == placement and SETTINGS[n][1] == "sglang"]
        if not todo:
            continue
        server = sglang_server.Server(init_dir, args.work / f"server_{placement}.log", cpus=cpus, taskset=taskset,
                                      max_running_requests=128, max_total_tokens=32768)
        print(f"SGLang server ({placement}: cores {cpus}) ready in {server.start_s:.0f} s", flush=True)
        try:
            for name in todo:
                results[name] = run_setting(name, args, assets, init_dir, server.url, sglang_server.free_port())
        finally:
            server.stop()
    for name in (n for n in names if SETTINGS[n][1] == "embedded"):
        results[name] = run_setting(name, args, assets, init_dir, None, 0)

    def ratio(a, b):
        return results[a]["steps_per_hour"] / results[b]["steps_per_hour"] if a in results and b in results else None

    summary = {"steps_per_hour": {k: round(v["steps_per_hour"], 1) for k, v in results.items()},
               "speedup_s1": ratio("pinned_s1", "pinned_s0"), "speedup_s2": ratio("pinned_s2", "pinned_s0"),
               "speedup_s1_partial": ratio("pinned_s1_partial", "pinned_s0"),
               "speedup_s1_shared": ratio("shared_s1", "shared_s0"),
               "speedup_s1_embedded": ratio("embedded_s1", "embedded_s0"),
               "trainer_idle": {k: round(v["trainer_idle"], 3) for k, v in results.items()},
               "engine_idle": {k: round(v["engine_idle"], 3) for k, v in results.items()},
               "steps": args.steps, "benchmark_s": round(time.monotonic() - started, 1)}
    print(f"S=1 / S=0, pinned (target >= 1.3): {summary['speedup_s1']:.2f}" if summary["speedup_s1"] else "")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
