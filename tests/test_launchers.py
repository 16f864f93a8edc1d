"""NeMo-Run launchers (``real-megatron launch``, real_megatron/launch.py): each recipe x executor dry-runs to
the expected torchrun command / sbatch script.

No GPU and no Slurm here: nemo-run's dry run builds the real torchx request (the local Popen
argument list, the sbatch script text) without executing it; these tests read those.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from real_megatron import launch
from real_megatron.config import ConfigError, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]

# Public model shapes (config.json of the two checkpoints): layouts are validated against them
QWEN_1P5B = {"num_attention_heads": 12, "num_key_value_heads": 2, "num_hidden_layers": 28, "intermediate_size": 8960,
             "max_position_embeddings": 131072}
QWEN_7B = {"num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28, "intermediate_size": 18944,
           "max_position_embeddings": 131072}
# tiny_cpu runs the demo's chain model (repro/recipe.py)
TINY = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "intermediate_size": 384,
        "max_position_embeddings": 256}
RECIPES = {"tiny_cpu": (TINY, 1), "real_1p5b": (QWEN_1P5B, 8), "real_7b": (QWEN_7B, 16)}


@pytest.fixture(autouse=True)
def nemorun_home(tmp_path, monkeypatch):
    import nemo_run.config

    # experiments are written (then removed) under NEMORUN_HOME; keep them out of ~/.nemo_run
    monkeypatch.setattr(nemo_run.config, "_NEMORUN_HOME", str(tmp_path / "nemorun"))
    # the packager shells out through invoke, which reads stdin; pytest's captured stdin refuses reads
    devnull = open(os.devnull)
    monkeypatch.setattr(sys, "stdin", devnull)
    yield
    devnull.close()


def dry(argv):
    code, text = launch.launch(argv + ["--dryrun"])
    assert code == 0
    return text


def slurm_flags(tmp_path, nodes=2, gpn=8, extra=()):
    return ["--executor", "slurm", "--nodes", str(nodes), "--gpus-per-node", str(gpn), "--account", "acct",
            "--partition", "batch", "--container-image", "nvcr.io/me/real-megatron:gpu", "--time", "12:00:00", *extra]


def ssh_flags(tmp_path):
    return ["--tunnel", "ssh", "--ssh-host", "login.example", "--ssh-user", "me", "--job-dir", str(tmp_path / "jobs")]


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_load_and_validate_against_model_shapes(recipe):
    hf, world = RECIPES[recipe]
    cfg = load_config(REPO / "examples" / "configs" / f"{recipe}.yaml")
    dp = validate_config(cfg, world_size=world, hf_config=hf)
    assert dp >= 1
    assert cfg.loss.name == "real"
    if recipe != "tiny_cpu":  # the paper's recipe (docs/method.md §4)
        assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.max_new_tokens) == (8, 0.6, 8192)
        assert (cfg.train.rollout_batch_prompts, cfg.train.mini_batch_prompts) == (128, 32)
        assert cfg.data.max_prompt_length == 1024
        assert (cfg.optim.weight_decay, cfg.optim.clip_grad) == (0.01, 1.0)
        assert (cfg.eval.samples, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.max_new_tokens) == (16, 0.6, 0.95, 8192)
        assert len(cfg.data.eval_files) == 6 and cfg.data.answer_after_think
        assert cfg.model.dtype == "bfloat16"
    expected = {"real_1p5b": (2e-6, 1400), "real_7b": (1e-6, 1000)}.get(recipe)
    if expected:
        assert (cfg.optim.lr, cfg.train.steps) == expected


def test_tiny_cpu_recipe_is_the_demos_rl_stage():
    """examples/configs/tiny_cpu.yaml reads what `make demo` writes and repeats its RL stage: every setting
    equals the demo's own (repro/recipe.py), apart from the run directory."""
    from real_megatron.config import config_to_dict
    from real_megatron.repro import recipe

    demo = Path("runs/demo")
    assets = recipe.ChainAssets(rl_train=demo / "task/data/train.parquet", warmup_train=demo / "task/data/warmup.parquet",
                                eval_files=tuple(demo / f"task/data/level{k}.parquet" for k in range(1, 6)),
                                base_model=demo / "task/base_model")
    want = load_config(None, recipe.rl_overrides(assets, init_dir=demo / "warmup/hf", run_dir=Path("runs/tiny_cpu"),
                                                 loss="real", seed=1))
    got = load_config(REPO / "examples" / "configs" / "tiny_cpu.yaml")
    assert config_to_dict(got) == config_to_dict(want)


@pytest.mark.parametrize("loss", ["grpo", "dapo", "gspo", "real_bce"])
def test_baselines_validate_by_loss_name(loss):
    cfg = load_config(REPO / "examples" / "configs" / "real_1p5b.yaml", [f"loss.name={loss}"])
    validate_config(cfg, world_size=8, hf_config=QWEN_1P5B)  # no REAL-only hparams left in the recipe


# ----------------------------------------------------------------------------- local executor


@pytest.mark.parametrize("recipe,gpus", [("tiny_cpu", 1), ("real_1p5b", 8), ("real_7b", 4)])
def test_local_dryrun_is_one_torchrun_command(recipe, gpus):
    text = dry(["--recipe", recipe, "--executor", "local", "--gpus", str(gpus), "--loss", "gspo",
                "train.eval_every=7"])
    argv = shlex.split(text)
    assert argv[0] == "torchrun"
    assert argv[argv.index("--nproc-per-node") + 1] == str(gpus)
    assert argv[argv.index("--nnodes") + 1] == "1"
    tail = argv[argv.index("-m"):]
    assert tail == ["-m", "real_megatron", "train", "--config", str(REPO / "examples" / "configs" / f"{recipe}.yaml"),
                    "loss.name=gspo", "train.eval_every=7"]


def test_data_shortcut_and_user_override_order():
    text = dry(["--recipe", "real_1p5b", "--gpus", "8", "--data", "deepscaler", "--loss", "dapo", "loss.name=grpo"])
    args = shlex.split(text)
    # the user's own override comes last, so it wins over the --loss shortcut
    assert args.index("loss.name=grpo") > args.index("loss.name=dapo")
    assert "data.train_files=data/deepscaler.parquet" in args
    cfg = load_config(REPO / "examples/configs/real_1p5b.yaml", args[args.index("--config") + 2:])
    assert cfg.data.train_files == ["data/deepscaler.parquet"] and cfg.loss.name == "grpo"


def test_local_list_overrides_travel_in_a_resolved_config(tmp_path):
    # torchrun is started without a shell, so [a,b] cannot go on its command line: the launcher
    # writes the config with the overrides applied and passes only --config
    overrides = ["data.train_files=[a.parquet,b.parquet]", f"run_dir={tmp_path}/run", "optim.lr=2e-6"]
    text = dry(["--recipe", "real_1p5b", "--gpus", "8", "--loss", "grpo", *overrides])
    argv = shlex.split(text)
    resolved = tmp_path / "run.launch.yaml"
    assert argv[argv.index("-m"):] == ["-m", "real_megatron", "train", "--config", str(resolved)]
    want = load_config(REPO / "examples/configs/real_1p5b.yaml", ["loss.name=grpo", *overrides])
    assert load_config(resolved) == want
    assert want.data.train_files == ["a.parquet", "b.parquet"] and want.loss.name == "grpo"


def tiny_run_args(assets, run_dir, train_files):
    # the one-step arithmetic assets: a 128-position model, so shorter prompts and responses than the recipe's
    return ["--recipe", "tiny_cpu", "--gpus", "2", f"model.hf_dir={assets['base']}", f"data.train_files={train_files}",
            f"data.eval_files=[{assets['test']}]", f"run_dir={run_dir}", "train.steps=1", "train.eval_every=0",
            "logging.progress_bar=false", "train.rollout_batch_prompts=4", "train.mini_batch_prompts=4", "rollout.n=4",
            "data.max_prompt_length=64", "rollout.max_new_tokens=24", "eval.max_new_tokens=24"]


@pytest.mark.slow  # a real torchrun launch of a training step
def test_local_launch_runs_torchrun_for_real(assets, tmp_path, monkeypatch, capsys):
    """Not a dry run: nemo-run starts torchrun with 2 gloo processes, which train one step; a list
    override reaches the job through the resolved config; a failing job makes the launcher exit 1."""
    import json

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # an unactivated venv: torchrun is found beside python
    run_dir = tmp_path / "run"
    train = assets["train"]
    assert launch.main(tiny_run_args(assets, run_dir, f"[{train},{train}]")) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["loss/num_rollouts"] == 16
    assert load_config(run_dir / "config.yaml").data.train_files == [str(train), str(train)]

    capsys.readouterr()
    assert launch.main(tiny_run_args(assets, tmp_path / "bad", f"[{tmp_path}/missing.parquet]")) == 1
    assert "the job ended FAILED" in capsys.readouterr().err


def test_slurm_keeps_list_overrides_shell_quoted(tmp_path):
    text = dry(["--recipe", "real_1p5b", *slurm_flags(tmp_path), "data.train_files=[a.parquet,b.parquet]"])
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert shlex.split(srun.replace("$", "DOLLAR"))[-1] == "data.train_files=[a.parquet,b.parquet]"


# ----------------------------------------------------------------------------- slurm executor


@pytest.mark.parametrize("recipe,nodes,gpn", [("tiny_cpu", 1, 1), ("real_1p5b", 1, 8), ("real_7b", 2, 8)])
def test_slurm_dryrun_sbatch_script(tmp_path, recipe, nodes, gpn):
    text = dry(["--recipe", recipe, *slurm_flags(tmp_path, nodes, gpn, ["--container-mounts", "/data:/data"]),
                "--loss", "grpo", "optim.lr=3e-6"])
    assert text.startswith("sbatch ")
    for line in (f"#SBATCH --nodes={nodes}", f"#SBATCH --gpus-per-node={gpn}", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --time=12:00:00"):
        assert line in text.splitlines(), line
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    argv = shlex.split(srun.replace("$", "DOLLAR"))
    assert argv[argv.index("--container-image") + 1] == "nvcr.io/me/real-megatron:gpu"
    assert "/data:/data" in argv[argv.index("--container-mounts") + 1]
    torchrun = argv[argv.index("torchrun"):]
    assert torchrun[torchrun.index("--nnodes") + 1] == str(nodes)
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == str(gpn)
    # the config travels with the packaged code, so it is named relative to the code directory
    assert torchrun[torchrun.index("-m"):] == ["-m", "real_megatron", "train", "--config",
                                               f"examples/configs/{recipe}.yaml", "loss.name=grpo", "optim.lr=3e-6"]


def test_slurm_pattern_packager_ships_code_and_configs(tmp_path):
    args = launch.build_parser().parse_args(["--recipe", "real_7b", *slurm_flags(tmp_path)])
    executor = launch.make_executor(args)
    tarball = executor.packager.package(REPO, str(tmp_path), "code")
    import tarfile

    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert "examples/configs/real_7b.yaml" in names and "real_megatron/config.py" in names
    assert "setup.py" in names


def test_slurm_ssh_tunnel_is_configured_from_flags(tmp_path):
    import nemo_run as run

    args = launch.build_parser().parse_args(["--recipe", "real_7b", *slurm_flags(tmp_path), *ssh_flags(tmp_path),
                                             "--packager", "git"])
    executor = launch.make_executor(args)
    assert isinstance(executor.tunnel, run.SSHTunnel)
    assert (executor.tunnel.host, executor.tunnel.user, executor.tunnel.job_dir) == ("login.example", "me",
                                                                                    str(tmp_path / "jobs"))
    assert isinstance(executor.packager, run.GitArchivePackager)
    # the dry run builds the script without connecting to the host
    text = dry(["--recipe", "real_7b", *slurm_flags(tmp_path), *ssh_flags(tmp_path)])
    assert "#SBATCH --nodes=2" in text


# ----------------------------------------------------------------------------- errors before submission


def test_bad_override_fails_before_submission(tmp_path, capsys):
    assert launch.main(["--recipe", "real_1p5b", "--gpus", "8", "--dryrun", "loss.nmae=grpo"]) == 2
    assert "loss.nmae" in capsys.readouterr().err
    # tp=5 cannot split 12 heads: caught here only with the model's shapes, so check via the validator
    with pytest.raises(ConfigError, match="parallel.tp=5"):
        validate_config(load_config(REPO / "examples/configs/real_1p5b.yaml", ["parallel.tp=5"]), world_size=10,
                        hf_config=QWEN_1P5B)
    assert launch.main(["--recipe", "real_7b", "--gpus", "8", "--dryrun", "train.mini_batch_prompts=33"]) == 2
    assert "mini_batch_prompts" in capsys.readouterr().err
    # a world size the layout cannot divide is caught without the model (tp*pp*cp must divide it)
    assert launch.main(["--recipe", "real_7b", "--gpus", "6", "--dryrun", "parallel.tp=4"]) == 2
    assert "world size 6 is not divisible by tp*pp*cp" in capsys.readouterr().err
    # the loss name is checked by the loss library's registry, with the valid names in the message
    assert launch.main(["--recipe", "real_7b", "--gpus", "8", "--dryrun", "--loss", "ppo"]) == 2
    err = capsys.readouterr().err
    assert "loss.name: unknown loss 'ppo'" in err and "'gspo'" in err


def test_layout_against_a_model_on_this_machine_fails_before_submission(tmp_path, capsys):
    """With model.hf_dir present, the launcher reads it with the trainer's reader and applies the one
    layout rule, FFN width included: tp=4 divides the heads (8) and KV heads (4) but not intermediate_size=90."""
    import json

    model = tmp_path / "model"
    model.mkdir()
    shapes = dict(TINY, architectures=["Qwen2ForCausalLM"], hidden_size=64, vocab_size=300,
                  num_attention_heads=8, num_key_value_heads=4, intermediate_size=90, max_position_embeddings=4096)
    (model / "config.json").write_text(json.dumps(shapes))
    argv = ["--recipe", "tiny_cpu", "--gpus", "4", "--dryrun", f"model.hf_dir={model}"]
    assert launch.main([*argv, "parallel.tp=4"]) == 2
    err = capsys.readouterr().err
    assert "parallel.tp=4 does not divide intermediate_size=90 (" in err and "valid choices: [1, 2]" in err
    assert launch.main([*argv, "parallel.tp=2"]) == 0


def test_slurm_flags_are_required(tmp_path, capsys):
    assert launch.main(["--recipe", "real_7b", "--executor", "slurm", "--dryrun"]) == 2
    err = capsys.readouterr().err
    assert "--account" in err and "--partition" in err
    assert "--container-image" not in err and "--job-dir" not in err  # optional: no container; NeMo-Run's own dir
    assert launch.main(["--recipe", "real_7b", *slurm_flags(tmp_path), "--tunnel", "ssh", "--dryrun"]) == 2
    assert "--job-dir" in capsys.readouterr().err  # where the cluster keeps code and logs
    assert launch.main(["--recipe", "real_7b", *slurm_flags(tmp_path), "--tunnel", "ssh", "--job-dir", "/j",
                        "--dryrun"]) == 2
    assert "--ssh-host" in capsys.readouterr().err
    # a LocalTunnel copies nothing: sbatch finds the script only in NeMo-Run's experiment directory
    assert launch.main(["--recipe", "real_7b", *slurm_flags(tmp_path), "--job-dir", str(tmp_path / "x"), "--dryrun"]) == 2
    assert "NEMORUN_HOME" in capsys.readouterr().err
    assert launch.main(["--dryrun"]) == 2
    assert "--recipe" in capsys.readouterr().err


def test_slurm_dryrun_cpu_nodes_without_container(tmp_path):
    """--gpus-per-node 0 and no --container-image: no GPU request, no pyxis flags, the job runs in the
    unpacked code directory, one torchrun agent per node meeting at the first node on --rdzv-port."""
    flags = ["--executor", "slurm", "--nodes", "2", "--gpus-per-node", "0", "--account", "acct", "--partition", "debug",
             "--rdzv-port", "31234"]
    text = dry(["--recipe", "tiny_cpu", *flags])
    lines = text.splitlines()
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert not any("gpus" in line or "gres" in line for line in lines if line.startswith("#SBATCH")), text
    srun = next(line for line in lines if line.startswith("srun ") and "torchrun" in line)
    argv = shlex.split(srun.replace("$", "DOLLAR"))
    assert "--container-image" not in argv and argv[argv.index("--chdir") + 1].endswith("/code")
    torchrun = argv[argv.index("torchrun"):]
    assert torchrun[torchrun.index("--rdzv-endpoint") + 1] == "DOLLARhead_node_ip:31234"
    assert (torchrun[torchrun.index("--nnodes") + 1], torchrun[torchrun.index("--nproc-per-node") + 1]) == ("2", "1")


def test_local_multi_node_needs_a_rendezvous_endpoint(capsys):
    assert launch.main(["--recipe", "tiny_cpu", "--gpus", "1", "--nnodes", "2", "--dryrun"]) == 2
    assert "--rdzv-endpoint HOST:PORT" in capsys.readouterr().err
    assert launch.main(["--recipe", "tiny_cpu", "--gpus", "1", "--nnodes", "2", "--node-rank", "2",
                        "--rdzv-endpoint", "h:1", "--dryrun"]) == 2
    assert "--node-rank 2" in capsys.readouterr().err


def test_entry_points_are_the_package_launcher(tmp_path):
    """`real-megatron launch` and `python examples/launch.py` (a checkout, run from elsewhere) are the same
    launcher: both dry-run to the same torchrun command."""
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "nemorun"), "PYTHONPATH": str(REPO)}
    argv = ["--recipe", "tiny_cpu", "--gpus", "1", "--dryrun"]
    outs = []
    for cmd in ([sys.executable, "-m", "real_megatron", "launch", *argv],
                [sys.executable, str(REPO / "examples" / "launch.py"), *argv]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        argv = shlex.split(done.stdout.strip().splitlines()[-1])
        argv[argv.index("--rdzv-id") + 1] = "ID"  # nemo-run draws a fresh rendezvous id per launch
        outs.append(argv)
    assert outs[0] == outs[1] and outs[0][0] == "torchrun"
