"""HF -> Megatron -> HF at DeepSeek-R1-Distill-Qwen-1.5B's shapes, against a plain safetensors load + save.

    python benchmarks/convert_1p5b.py [--repeats N] [--cold] [--workdir /tmp] [--keep]

Writes a random bf16 checkpoint with the real model's shapes (hidden 1536, 28 layers, 12 heads,
2 KV heads, FFN 8960, vocab 151,936, untied lm_head: ~3.55 GB in one model.safetensors, as
published) straight to a safetensors file, tensor by tensor (no transformers model of that size is
built). Each phase runs in its own subprocess, so its peak RSS (VmHWM, which includes the Python +
torch interpreter) is its own; every phase imports the same modules before its clock starts:

* baseline: ``safetensors.torch.load_file`` + ``save_file`` of the same bytes;
* hf->megatron: ``real_megatron.convert.hf_to_megatron`` at TP=1 PP=1 (``_nofsync``: fsync=False);
* megatron->hf: ``real_megatron.convert.megatron_to_hf`` (default 5GB shards; ``_nofsync`` likewise);
* verify (not timed against anything): every output tensor equals the input bit for bit.

The converters run twice per repeat, once as users get them by default (every output file
fsynced before the rename, so the result survives a power loss) and once with ``--no-fsync``
(the output is handed to the page cache and written back by the kernel later). Each is compared
with the baseline of the same durability: ``--no-fsync`` with a plain ``load_file`` + ``save_file``
(which does not fsync), the default with the same followed by an fsync. Prints seconds (fastest
of --repeats interleaved runs) and peak RSS (largest) per phase and the ratios to the targets:
round-trip time <= 2x the baseline, each conversion's peak RSS <= 2x the checkpoint size.
Because a shared or virtual machine's disk and memory speed drift from minute to minute, it also
prints each repeat's own ratio (its round trip over the baseline run just before it) and their
median. Needs ~11 GB free disk in --workdir (input, Megatron, output; the baseline's copy is
deleted right away) and RAM for ~3 checkpoints of page cache; run it on an idle machine (other
processes' I/O and page cache distort every number). Every phase starts after an ``os.sync()``,
so none pays for writing back the previous phase's output. As root, the page cache is also
dropped before every phase and the phase's input read back in, so each phase starts from the same
memory state with its own input cached (measured: without that, the baseline of later repeats ran
with ~7 GB of earlier outputs cached and took up to 1.7x longer); ``--cold`` drops it and leaves
it empty, so each phase reads its input from the disk.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 151646, "eos_token_id": 151643, "hidden_act": "silu",
    "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 21, "attention_dropout": 0.0,
    "initializer_range": 0.02, "use_cache": True,
}


def make_checkpoint(d: Path) -> int:
    import torch

    from real_megatron.convert.mapping import hf_shapes
    from real_megatron.convert.st_io import SafetensorsWriter

    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 151646, "eos_token_id": 151643}))
    shapes = hf_shapes(CONFIG)
    entries = [(n, torch.bfloat16, s) for n, s in shapes.items()]
    writer = SafetensorsWriter(d / "model.safetensors", entries, {"format": "pt"})
    g = torch.Generator().manual_seed(0)
    for name, _, shape in entries:
        writer.write(name, (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16))
    writer.close()
    return (d / "model.safetensors").stat().st_size


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over from
    the parent through fork + exec, so every phase would report at least the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: an upper bound


def phase(name: str, work: Path) -> None:
    """Run in a child process: one phase, then print its seconds and peak RSS as JSON.

    The clock starts after the imports (torch alone takes ~2.5 s here), for the baseline too, so
    the ratios compare the work; the import time is printed beside them.
    """
    t_import = time.perf_counter()
    import torch
    from safetensors.torch import load_file, save_file

    from real_megatron.convert import hf_to_megatron, megatron_to_hf
    from real_megatron.convert.hf_io import HFCheckpoint

    t0 = time.perf_counter()
    if name == "baseline":
        state = load_file(work / "hf" / "model.safetensors")
        (work / "copy").mkdir()
        save_file(state, work / "copy" / "model.safetensors", metadata={"format": "pt"})
        seconds_no_fsync = time.perf_counter() - t0
        with open(work / "copy" / "model.safetensors", "rb") as fh:  # the converters fsync their output
            os.fsync(fh.fileno())
    elif name.startswith("hf_to_megatron"):
        hf_to_megatron(work / "hf", work / "meg", tp=1, pp=1, fsync=not name.endswith("_nofsync"))
    elif name.startswith("megatron_to_hf"):
        megatron_to_hf(work / "meg", work / "hf2", fsync=not name.endswith("_nofsync"))
    elif name == "verify":
        with HFCheckpoint(work / "hf") as a, HFCheckpoint(work / "hf2") as b:
            assert a.weight_map.keys() == b.weight_map.keys()
            for n in a.weight_map:
                x, y = a.get(n), b.get(n)
                assert x.dtype == y.dtype == torch.bfloat16 and torch.equal(x, y), n
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "peak_rss": peak_rss(), "import_seconds": t0 - t_import}
    if name == "baseline":
        out["seconds_no_fsync"] = seconds_no_fsync
    print(json.dumps(out))


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def read_through(d: Path) -> None:
    """Read every file under ``d`` once, so that it sits in the page cache."""
    buf = bytearray(64 << 20)
    for f in sorted(d.rglob("*")):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def run_phase(name: str, work: Path, cold: bool = False, reset: bool = False) -> dict:
    """Run one phase in a fresh process. ``reset``: drop the page cache first (every earlier
    phase's files leave it), then read this phase's input back in unless ``cold``; so every phase
    starts from the same memory state, with exactly its own input cached."""
    os.sync()  # no phase pays for flushing the previous phase's dirty pages
    if reset:
        DROP_CACHES.write_text("3\n")
        if not cold:  # the input: Megatron -> HF reads meg/, the other timed phases hf/
            read_through(work / ("meg" if name.startswith("megatron_to_hf") else "hf"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, __file__, "--phase", name, "--workdir", str(work)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--repeats", type=int, default=3, help="runs per phase; the fastest is reported (default 3)")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before every timed phase, so inputs come from the disk (Linux, root)")
    args = ap.parse_args()
    can_reset = os.access(DROP_CACHES, os.W_OK)
    if args.cold and not can_reset:
        raise SystemExit(f"--cold needs write access to {DROP_CACHES} (Linux, run as root); leave it out to "
                         f"measure with the input in the page cache")
    if args.phase:
        phase(args.phase, Path(args.workdir))
        return
    work = Path(tempfile.mkdtemp(prefix="convert_1p5b-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        size = make_checkpoint(work / "hf")
        print(f"random checkpoint: {size / 1e9:.2f} GB bf16 in {time.perf_counter() - t0:.1f} s ({work})")
        # an untimed read brings every input into the page cache, so no phase pays the cold read alone
        run_phase("baseline", work)
        shutil.rmtree(work / "copy")
        # the machine may be shared: phases are interleaved, repeated, and the fastest run of each kept
        modes = {"durable": ("hf_to_megatron", "megatron_to_hf"),
                 "plain": ("hf_to_megatron_nofsync", "megatron_to_hf_nofsync")}
        res: dict[str, dict] = {}
        seconds: dict[str, list[float]] = {}  # every repeat's time per phase, in order

        def record(run: int, name: str, got: dict) -> None:
            print(f"  run {run + 1} {name}: {got['seconds']:.1f} s, peak RSS {got['peak_rss'] / 1e9:.2f} GB")
            best = res.setdefault(name, dict(got))
            for key in ("seconds", "seconds_no_fsync", "import_seconds"):
                if key in got:
                    best[key] = min(best[key], got[key])
            best["peak_rss"] = max(best["peak_rss"], got["peak_rss"])
            seconds.setdefault(name, []).append(got["seconds"])
            if name == "baseline":
                seconds.setdefault("baseline_no_fsync", []).append(got["seconds_no_fsync"])

        for r in range(args.repeats):
            record(r, "baseline", run_phase("baseline", work, cold=args.cold, reset=can_reset))
            shutil.rmtree(work / "copy")
            for to_meg, to_hf in modes.values():
                for d in ("meg", "hf2"):
                    shutil.rmtree(work / d, ignore_errors=True)
                record(r, to_meg, run_phase(to_meg, work, cold=args.cold, reset=can_reset))
                record(r, to_hf, run_phase(to_hf, work, cold=args.cold, reset=can_reset))
                if r == args.repeats - 1:
                    run_phase("verify", work)  # both modes' outputs, once
        gb = 1e9
        print(f"\n{'phase':<24}{'seconds':>9}{'peak RSS GB':>13}{'RSS / ckpt':>12}")
        for name, got in res.items():
            print(f"{name:<24}{got['seconds']:>9.1f}{got['peak_rss'] / gb:>13.2f}{got['peak_rss'] / size:>12.2f}")
        baselines = {"plain": ("baseline_no_fsync", res["baseline"]["seconds_no_fsync"], "load_file + save_file"),
                     "durable": ("baseline", res["baseline"]["seconds"], "load_file + save_file + fsync")}
        cache = ("dropped before every phase (--cold): inputs read from the disk" if args.cold else
                 "dropped before every phase, then the phase's input read back in" if can_reset else
                 "NOT reset between phases (needs root): earlier phases' files stay cached and skew the numbers")
        print(f"\npage cache: {cache}")
        for mode in ("plain", "durable"):
            to_meg, to_hf = modes[mode]
            base_key, base, base_text = baselines[mode]
            h2m, m2h = res[to_meg]["seconds"], res[to_hf]["seconds"]
            paired = [(h + m) / b for b, h, m in zip(seconds[base_key], seconds[to_meg], seconds[to_hf], strict=True)]
            flag = "--no-fsync" if mode == "plain" else "default, fsynced"
            print(f"{mode} ({flag}): round trip {h2m:.1f} + {m2h:.1f} = {h2m + m2h:.1f} s vs {base_text} "
                  f"{base:.1f} s: {(h2m + m2h) / base:.2f}x [target <= 2x]; each repeat's own ratio "
                  f"{', '.join(f'{x:.2f}' for x in paired)}, median {statistics.median(paired):.2f}x")
        peak = max(got["peak_rss"] for name, got in res.items() if name != "baseline")
        print(f"peak RSS of a conversion: {peak / gb:.2f} GB = {peak / size:.2f}x the checkpoint ({size / gb:.2f} GB) "
              f"[target <= 2x]; baseline {res['baseline']['peak_rss'] / size:.2f}x")
        print(f"not timed: starting Python and importing torch + the package, "
              f"{res['hf_to_megatron']['import_seconds']:.1f} s per process")
        print("output verified bit-identical to the input (both modes)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
