"""Every shell command in README.md and docs/*.md runs, so none can rot (docs/testing.md, "Documented commands").

A command is a line of a fenced code block tagged ``bash``, ``sh``, ``shell`` or ``console`` (in ``console``
blocks only the lines starting with ``$ ``), with ``\\`` continuations joined, comments dropped and spaces
collapsed. Each one has exactly one entry in ``RUNNERS`` saying how it runs: as written, or with the
documented flags appended that shrink it to one step or turn it into a dry run, in a sandbox checkout
that ``make demo`` (at its smallest size) fills first. A documented command without an entry fails
``test_every_documented_command_has_a_runner`` (fast), and an entry whose command left the docs fails it too;
``test_documented_command_runs`` (slow) runs each one.

    .venv/bin/python tests/test_docs_commands.py        # print the runner table docs/testing.md embeds
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
TABLE_BEGIN, TABLE_END = "<!-- runners: begin -->", "<!-- runners: end -->"
# the first word of an inline code span that shows a command (rather than naming a file or a flag)
COMMAND_WORD = re.compile(r"^(make|real-megatron|\.venv/bin/\S+|python3?|torchrun|pip|pytest|ruff|bash)(\s|$)")


# ----------------------------------------------------------------------------- reading the docs


def _strip_comment(line: str) -> str:
    """The line without a shell comment: `#` at the start or after a space, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _blocks(text: str):
    """(info string, first line number, lines) of every fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w-]*)", lines[i])
        if not fence:
            i += 1
            continue
        marker, info, start = fence.group(1), fence.group(2).lower(), i + 1
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(marker):
            body.append(lines[i])
            i += 1
        yield info, start, body
        i += 1


def commands_of(text: str) -> list[tuple[int, str]]:
    """(line number, command) for every command of a document's shell blocks."""
    found = []
    for info, start, body in _blocks(text):
        if info not in SHELL_FENCES:
            continue
        pending, first = "", None
        for n, raw in enumerate(body, start + 1):
            line = raw.strip()
            if info == "console":
                if not pending:
                    if not line.startswith("$ "):
                        continue  # output shown after a command
                    line = line[2:]
            if not pending and (not line or line.startswith("#")):
                continue
            first = first or n
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            command = " ".join(_strip_comment(pending + line).split())
            pending = ""
            if command:
                found.append((first, command))
            first = None
    return found


def documented_commands() -> dict[str, list[str]]:
    """Every documented command -> where it is shown (``README.md:12``), in document order."""
    out: dict[str, list[str]] = {}
    for doc in DOCS:
        for line, command in commands_of(doc.read_text()):
            out.setdefault(command, []).append(f"{doc.relative_to(REPO)}:{line}")
    return out


def inline_commands(text: str) -> list[str]:
    """Inline code spans in prose that show a command with arguments (more than a command's name)."""
    prose = []
    inside = None
    for line in text.splitlines():
        fence = re.match(r"^\s*(```+|~~~+)", line)
        if fence and inside is None:
            inside = fence.group(1)
        elif inside is not None and line.strip().startswith(inside):
            inside = None
        elif inside is None:
            prose.append(line)
    spans = re.findall(r"``(.+?)``|`([^`]+)`", "\n".join(prose))
    return [" ".join((a or b).split()) for a, b in spans
            if COMMAND_WORD.match((a or b).strip()) and len((a or b).split()) > 2]


def _plain(command: str) -> str:
    return command.removeprefix(".venv/bin/")


# ----------------------------------------------------------------------------- how each command runs


@dataclass(frozen=True)
class Runner:
    """How a documented command runs. ``how``:

    * ``run``: in the sandbox checkout (``where="sandbox"``) or the repository (``"repo"``), as written with
      ``extra`` appended (documented flags: a one-step override, ``--dryrun``, ``--collect-only``, ``make -n``);
    * ``ci``: ``make test`` — CI runs it (.ci/run); this test checks that .ci/run calls exactly it, not recurse;
    * ``gpu-only``: needs a GPU machine and its package index; this test checks what it names exists.
    """

    how: str = "run"
    extra: str = ""
    where: str = "sandbox"
    after: tuple[str, ...] = ()  # commands whose output this one reads (run first, once)
    expect: str = ""  # text the output must contain
    why: str = ""  # for the table: why this way

    def describe(self) -> str:
        if self.how == "ci":
            return "not run here: CI runs it (`.ci/run`); checked that `.ci/run` calls exactly this"
        if self.how == "gpu-only":
            return f"not run here: {self.why}"
        text = "as written" if not self.extra else f"with `{self.extra}`"
        where = " in the repository" if self.where == "repo" else ""
        return text + where + (f" ({self.why})" if self.why else "")


ONE_STEP = "train.steps=1 train.eval_every=0"
DEMO = "make demo"
RUNNERS: dict[str, Runner] = {
    # --- README: the two commands, then what the demo leaves behind
    DEMO: Runner(extra='-o .venv/.installed DEMO_ARGS="--warmup-steps 2 --steps 1"', expect="[demo] plot:",
                 why="the set-up is what the suite's own `make test` did; the demo at its smallest size"),
    "make test": Runner(how="ci"),
    ".venv/bin/real-megatron train --config examples/configs/tiny_cpu.yaml loss.name=grpo run_dir=runs/grpo":
        Runner(extra=ONE_STEP, after=(DEMO,), expect="final model (HF): runs/grpo/hf_final"),
    ".venv/bin/real-megatron plot runs/grpo": Runner(after=(
        ".venv/bin/real-megatron train --config examples/configs/tiny_cpu.yaml loss.name=grpo run_dir=runs/grpo",)),
    ".venv/bin/real-megatron compare --losses real,grpo,dapo,gspo,real_bce,real_no_anchor --seeds 3 --out runs/compare":
        Runner(extra="--losses real,grpo --seeds 1 --steps 1 --warmup-steps 2 --set eval.max_prompts=2 "
                     "--warmup-set eval.max_prompts=2 --final-samples 2 --final-problems 3", expect="summary"),
    '.venv/bin/pip install -e ".[gpu]"': Runner(how="gpu-only", why="installs the GPU extra from a package index; "
                                                "checked that setup.py declares it (Transformer Engine, SGLang)"),
    ".venv/bin/python tools/prepare_data.py ../shared/data/dapo-math-17k.parquet data/dapo-math-17k.parquet "
    "--split train": Runner(expect="wrote 17398 rows"),
    ".venv/bin/real-megatron launch --recipe real_1p5b --gpus 8 --dryrun": Runner(expect="torchrun"),
    ".venv/bin/real-megatron launch --recipe real_1p5b --gpus 8": Runner(extra="--dryrun", why="8 GPUs"),
    ".venv/bin/real-megatron launch --recipe real_1p5b --gpus 8 --loss grpo optim.lr=1e-6":
        Runner(extra="--dryrun", expect="loss.name=grpo optim.lr=1e-6", why="8 GPUs"),
    ".venv/bin/real-megatron launch --recipe real_1p5b --executor slurm --nodes 2 --gpus-per-node 8 --account ACC "
    "--partition batch --container-image nvcr.io/me/real-megatron:gpu --wait":
        Runner(extra="--dryrun", expect="#SBATCH --nodes=2", why="no Slurm with GPUs and pyxis here"),
    # --- docs/training.md
    ".venv/bin/torchrun --nproc-per-node 2 -m real_megatron train --config examples/configs/tiny_cpu.yaml "
    "run_dir=runs/layout parallel.tp=2 train.steps=1": Runner(extra="train.eval_every=0", after=(DEMO,)),
    ".venv/bin/real-megatron train --config examples/configs/tiny_cpu.yaml run_dir=runs/layout train.steps=2":
        Runner(extra="train.eval_every=0", expect="resumed", after=(
            ".venv/bin/torchrun --nproc-per-node 2 -m real_megatron train --config examples/configs/tiny_cpu.yaml "
            "run_dir=runs/layout parallel.tp=2 train.steps=1",)),
    ".venv/bin/real-megatron sft --config examples/configs/tiny_cpu.yaml run_dir=runs/sft "
    "model.hf_dir=runs/demo/task/base_model data.train_files=runs/demo/task/data/warmup.parquet train.steps=500 "
    "train.mini_batch_prompts=32 train.rollout_batch_prompts=32 optim.lr=2e-3":
        Runner(extra="train.steps=2 eval.max_prompts=2", after=(DEMO,)),
    ".venv/bin/real-megatron evaluate --model runs/demo/warmup/hf --files runs/demo/task/data/level1.parquet "
    "runs/demo/task/data/level2.parquet --samples 4 --temperature 1.0 --top-p 1.0 --max-new-tokens 96 --out runs/eval":
        Runner(extra="--max-problems 2", after=(DEMO,), expect="level2"),
    ".venv/bin/python tools/prepare_data.py ../shared/data/aime24.parquet data/aime24.parquet --split test":
        Runner(expect="wrote 30 rows"),
    ".venv/bin/real-megatron make-task chains --out runs/chains --tokenizer": Runner(),
    ".venv/bin/real-megatron plot runs/demo/real": Runner(after=(DEMO,)),
    # --- docs/losses.md
    ".venv/bin/real-megatron plot-weights --out runs/figure1_gradient_weights.png": Runner(),
    # --- docs/checkpoints.md
    ".venv/bin/real-megatron convert hf-to-megatron --hf-dir runs/demo/warmup/hf --out runs/megatron_tp2 --tp 2":
        Runner(after=(DEMO,)),
    ".venv/bin/real-megatron convert megatron-to-hf --megatron-dir runs/megatron_tp2 --out runs/hf_again":
        Runner(after=(".venv/bin/real-megatron convert hf-to-megatron --hf-dir runs/demo/warmup/hf "
                      "--out runs/megatron_tp2 --tp 2",)),
    ".venv/bin/python checkpoints_convert/hf_to_megatron.py --hf-dir runs/demo/warmup/hf --out runs/megatron_bf16 "
    "--dtype bf16": Runner(after=(DEMO,)),
    # --- docs/scale-out.md
    ".venv/bin/python examples/launch.py --recipe tiny_cpu --gpus 2 --dryrun": Runner(expect="torchrun"),
    ".venv/bin/real-megatron launch --recipe tiny_cpu --gpus 2": Runner(extra=ONE_STEP, after=(DEMO,)),
    ".venv/bin/real-megatron launch --recipe real_1p5b --gpus 8 --dryrun "
    "'data.train_files=[data/dapo-math-17k.parquet,data/deepscaler.parquet]'": Runner(expect="real_1p5b.launch.yaml"),
    ".venv/bin/real-megatron launch --recipe tiny_cpu --executor slurm --nodes 2 --gpus-per-node 0 --account ACC "
    "--partition debug --wait": Runner(extra="--dryrun", expect="#SBATCH --nodes=2", why="no Slurm cluster here"),
    ".venv/bin/real-megatron launch --recipe real_7b --executor slurm --nodes 4 --gpus-per-node 8 --account ACC "
    "--partition batch --time 24:00:00 --container-image nvcr.io/me/real-megatron:gpu --tunnel ssh "
    "--ssh-host login.cluster --ssh-user me --job-dir /lustre/me/nemo-run":
        Runner(extra="--dryrun", expect="#SBATCH --nodes=4", why="no SSH host, Slurm or GPUs here"),
    ".venv/bin/real-megatron launch --recipe tiny_cpu --gpus 1 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500":
        Runner(extra="--dryrun", expect="--nnodes 2", why="node 1 would be another machine"),
    ".venv/bin/real-megatron launch --recipe real_1p5b --gpus 8 --dryrun "
    "'rollout.sglang_urls=[http://node1:30000,http://node2:30000]' rollout.sglang_weight_sync=distributed":
        Runner(expect="real_1p5b.launch.yaml"),
    "make sglang-env": Runner(extra="-n", expect="tests/sglang_env/build.sh",
                              why="make's dry run: the build takes ~10 min once, and `make test` runs it"),
    # --- docs/results.md: hours of CPU each; the plan is every run's config built and validated
    ".venv/bin/real-megatron compare --out runs/compare":
        Runner(extra="--dry-run", expect="[compare] dry run: 18 runs", why="hours of CPU: the plan, nothing written"),
    ".venv/bin/real-megatron compare --preset stress --out runs/compare":
        Runner(extra="--dry-run", expect="[compare] dry run: 84 runs", why="hours of CPU: the plan, nothing written"),
    ".venv/bin/real-megatron compare --preset stress --cells u4_lr3e-4_s1,u8_lr3e-4_s1 --out runs/compare":
        Runner(extra="--dry-run", expect="[compare] dry run: 42 runs", why="hours of CPU: the plan, nothing written"),
    ".venv/bin/real-megatron compare --losses real --out runs/compare --variant real_s1=real "
    "--set real_s1:train.max_staleness=1 --variant real_s1_trunc=real --set real_s1_trunc:train.max_staleness=1 "
    "--set real_s1_trunc:loss.hparams.behaviour_correction=truncate --variant real_s2=real "
    "--set real_s2:train.max_staleness=2":
        Runner(extra="--dry-run", expect="[compare] dry run: 12 runs", why="hours of CPU: the plan, nothing written"),
    ".venv/bin/python benchmarks/async_rollout.py":
        Runner(extra="--dry-run", where="repo", expect="plan: 8 settings",
               why="~12 min of both cores with a real SGLang server: the inputs checked, the plan printed"),
    # --- docs/testing.md
    ".venv/bin/ruff check .": Runner(where="repo"),
    '.venv/bin/python -m pytest -q -m "not slow"': Runner(extra="--collect-only", where="repo"),
    ".venv/bin/python -m pytest -q tests/test_losses.py": Runner(extra="--collect-only", where="repo"),
    '.venv/bin/python -m pytest -q tests -k "slurm or rendezvous"': Runner(extra="--collect-only", where="repo"),
    ".venv/bin/python -m pytest -q tests/test_docs_commands.py": Runner(extra="--collect-only", where="repo"),
    ".venv/bin/python tests/test_docs_commands.py": Runner(where="repo", expect=TABLE_BEGIN),
}


def runner_table() -> str:
    """The Markdown table docs/testing.md embeds between its runner markers."""
    docs = documented_commands()
    rows = ["| command | shown in | how the test runs it |", "|---|---|---|"]
    for command, runner in RUNNERS.items():
        where = ", ".join(sorted({w.split(":")[0] for w in docs.get(command, ["(not documented)"])}))
        rows.append(f"| `{command}` | {where} | {runner.describe()} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- fast checks


def test_every_documented_command_has_a_runner():
    docs = documented_commands()
    missing = [f"{command}   ({', '.join(where)})" for command, where in docs.items() if command not in RUNNERS]
    stale = [command for command in RUNNERS if command not in docs]
    assert not missing, ("documented commands without a runner; add each to RUNNERS in tests/test_docs_commands.py "
                         "(how it runs: as written, or with a documented one-step / dry-run flag):\n  "
                         + "\n  ".join(missing))
    assert not stale, "RUNNERS entries no document shows any more (remove them):\n  " + "\n  ".join(stale)


def test_prose_shows_commands_only_from_shell_blocks():
    """An inline code span with a whole command line must be one of the commands the blocks show (and so run);
    naming a command (`real-megatron demo`, `make test`) is fine."""
    fenced = {_plain(c) for c in documented_commands()}
    bad = [f"{doc.relative_to(REPO)}: `{span}`" for doc in DOCS for span in inline_commands(doc.read_text())
           if _plain(span) not in fenced]
    assert not bad, ("inline commands that no test runs; put them in a ```bash block (with a runner) or name only "
                     "the command:\n  " + "\n  ".join(bad))


def test_testing_md_embeds_the_current_runner_table():
    text = (REPO / "docs" / "testing.md").read_text()
    assert TABLE_BEGIN in text and TABLE_END in text, f"docs/testing.md lacks the markers {TABLE_BEGIN} {TABLE_END}"
    embedded = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
    assert embedded == runner_table(), ("docs/testing.md's runner table is out of date: paste the output of "
                                        "`.venv/bin/python tests/test_docs_commands.py` between its markers")


def test_the_command_reader():
    text = "\n".join([
        "```bash", "make demo    # set-up", "# a comment line", "", ".venv/bin/x a \\", "    --b 'c # d'  # end",
        "```", "```console", "$ make test", "output line", "```", "```python", "make this not a command", "```",
        "Prose `real-megatron demo` and `real-megatron train --config x.yaml` and `run_dir=x`.",
    ])
    assert commands_of(text) == [(2, "make demo"), (5, ".venv/bin/x a --b 'c # d'"), (9, "make test")]
    assert inline_commands(text) == ["real-megatron train --config x.yaml"]


# ----------------------------------------------------------------------------- running them


def _venv_root() -> Path:
    """The virtual environment running this test (the checkout's .venv under `make test`)."""
    return Path(sys.executable).parent.parent


def _env(sandbox: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    # the checkout under test comes first, also for a shared venv whose editable install points elsewhere
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", NEMORUN_HOME=str(sandbox / ".nemorun"))
    return env


class Sandbox:
    """A checkout to run documented commands in: the repository's files linked in (not runs/), `.venv` the test's
    own environment, and `../shared/data` the shared benchmark files (tests/shared_data.py). Commands share what
    earlier ones built; each runs at most once."""

    def __init__(self, root: Path):
        from shared_data import SHARED_DATA

        self.dir = root / "checkout"
        self.dir.mkdir(parents=True)
        for entry in REPO.iterdir():
            if entry.name not in ("runs", ".venv", ".git", ".venv-sglang", "data"):
                (self.dir / entry.name).symlink_to(entry)
        (self.dir / ".venv").symlink_to(_venv_root())
        (root / "shared").mkdir()
        (root / "shared" / "data").symlink_to(SHARED_DATA)
        self.done: dict[str, subprocess.CompletedProcess] = {}
        self.seconds: dict[str, float] = {}

    def run(self, command: str) -> subprocess.CompletedProcess:
        if command in self.done:
            return self.done[command]
        runner = RUNNERS[command]
        for before in runner.after:
            proc = self.run(before)
            assert proc.returncode == 0, f"{before!r}, needed first, failed (rc {proc.returncode})"
        line = f"{command} {runner.extra}".strip()
        cwd = self.dir
        if runner.where == "repo":
            cwd = REPO
            if not (REPO / ".venv").exists():  # a worktree using another checkout's venv: the same interpreter
                line = re.sub(r"^\.venv/bin/", f"{_venv_root()}/bin/", line)
        started = time.perf_counter()
        proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=_env(self.dir), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=1200)
        self.seconds[command] = time.perf_counter() - started
        self.done[command] = proc
        return proc


def _check_ci():
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    calls = [ln for ln in lines if ln and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
    assert calls == ["make test"], f".ci/run should call exactly `make test`, the README's test command: {calls}"


def _check_gpu_extra():
    tree = ast.parse((REPO / "setup.py").read_text())
    extras = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "EXTRAS" for t in node.targets))
    assert {"gpu"} <= set(extras) and any("transformer-engine" in r for r in extras["gpu"]) and \
        any(r.startswith("sglang") for r in extras["gpu"]), extras


def _documented_in_order() -> list[str]:
    docs = documented_commands()
    return [c for c in RUNNERS if c in docs] + [c for c in docs if c not in RUNNERS]


def pytest_generate_tests(metafunc):
    if "documented" in metafunc.fixturenames:
        commands = _documented_in_order()
        metafunc.parametrize("documented", commands, ids=commands)  # the whole command: -k matches any word of it


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    box = Sandbox(tmp_path_factory.mktemp("docs"))
    yield box
    total = sum(box.seconds.values())
    print(f"\ndocumented commands: {len(box.seconds)} run, {total:.0f} s in all; slowest: "
          + ", ".join(f"{c[:50]} {s:.0f} s" for c, s in sorted(box.seconds.items(), key=lambda x: -x[1])[:5]))


@pytest.mark.slow  # it runs training (the demo at its smallest size, one-step runs, a real local launch)
def test_documented_command_runs(documented, sandbox):
    assert documented in RUNNERS, f"no runner for the documented command {documented!r} (see the fast test above)"
    runner = RUNNERS[documented]
    if runner.how == "ci":
        _check_ci()
        return
    if runner.how == "gpu-only":
        _check_gpu_extra()
        return
    proc = sandbox.run(documented)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (f"documented command failed (rc {proc.returncode}): {documented} {runner.extra}\n"
                                  f"{output[-4000:]}")
    assert runner.expect in output, f"{documented}: {runner.expect!r} not in its output:\n{output[-3000:]}"


if __name__ == "__main__":
    print(TABLE_BEGIN)
    print(runner_table())
    print(TABLE_END)
