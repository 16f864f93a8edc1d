"""HF -> Megatron -> HF at DeepSeek-R1-Distill-Qwen-1.5B's shapes, against a plain safetensors load + save.

    python benchmarks/convert_1p5b.py [--workdir /tmp] [--keep]

Writes a random bf16 checkpoint with the real model's shapes (hidden 1536, 28 layers, 12 heads,
2 KV heads, FFN 8960, vocab 151,936, untied lm_head: ~3.55 GB in one model.safetensors, as
published) straight to a safetensors file, tensor by tensor (no transformers model of that size is
built). Each phase runs in its own subprocess, so its peak RSS (VmHWM, which includes the Python +
torch interpreter) is its own; every phase imports the same modules before its clock starts:

* baseline: ``safetensors.torch.load_file`` + ``save_file`` of the same bytes;
* hf->megatron: ``real_megatron.convert.hf_to_megatron`` at TP=1 PP=1;
* megatron->hf: ``real_megatron.convert.megatron_to_hf`` (default 5GB shards);
* verify (not timed against anything): every output tensor equals the input bit for bit.

Prints seconds (fastest of --repeats interleaved runs) and peak RSS (largest) per phase and the
ratios to the targets: round-trip time <= 2x the baseline, each conversion's peak RSS <= 2x the
checkpoint size. Because a shared or virtual machine's disk and memory speed drift from minute to
minute, it also prints each repeat's own ratio (its round trip over the baseline run just before
it) and their median. Needs ~11 GB free disk in --workdir (input, Megatron, output; the baseline's
copy is deleted right away) and RAM for ~3 checkpoints of page cache; run it on an idle machine
(other processes' I/O and page cache distort every number). ``--cold`` (root) drops the page cache
before every timed phase, so each phase reads its input from the disk.
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
    elif name == "hf_to_megatron":
        hf_to_megatron(work / "hf", work / "meg", tp=1, pp=1)
    elif name == "megatron_to_hf":
        megatron_to_hf(work / "meg", work / "hf2")
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


def run_phase(name: str, work: Path, cold: bool = False) -> dict:
    os.sync()  # no phase pays for flushing the previous phase's dirty pages
    if cold:  # every input is read from the disk, as after a download or on another node
        DROP_CACHES.write_text("3\n")
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
    if args.cold and not os.access(DROP_CACHES, os.W_OK):
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
        res: dict[str, dict] = {}
        seconds: dict[str, list[float]] = {}  # every repeat's time per phase, in order
        for r in range(args.repeats):
            if r:
                shutil.rmtree(work / "meg")
                shutil.rmtree(work / "hf2")
            for name in ("baseline", "hf_to_megatron", "megatron_to_hf"):
                got = run_phase(name, work, cold=args.cold)
                print(f"  run {r + 1} {name}: {got['seconds']:.1f} s, peak RSS {got['peak_rss'] / 1e9:.2f} GB")
                if name == "baseline":
                    shutil.rmtree(work / "copy")
                best = res.setdefault(name, got)
                for key in ("seconds", "seconds_no_fsync", "import_seconds"):
                    if key in got:
                        best[key] = min(best[key], got[key])
                best["peak_rss"] = max(best["peak_rss"], got["peak_rss"])
                seconds.setdefault(name, []).append(got["seconds"])
        run_phase("verify", work)
        gb = 1e9
        print(f"\n{'phase':<16}{'seconds':>9}{'peak RSS GB':>13}{'RSS / ckpt':>12}")
        for name, r in res.items():
            print(f"{name:<16}{r['seconds']:>9.1f}{r['peak_rss'] / gb:>13.2f}{r['peak_rss'] / size:>12.2f}")
        base = res["baseline"]["seconds"]
        plain = res["baseline"]["seconds_no_fsync"]
        h2m, m2h = res["hf_to_megatron"]["seconds"], res["megatron_to_hf"]["seconds"]
        total = h2m + m2h
        peak = max(res["hf_to_megatron"]["peak_rss"], res["megatron_to_hf"]["peak_rss"])
        print(f"\npage cache: {'dropped before every phase (--cold)' if args.cold else 'warm (inputs cached)'}")
        print(f"baseline load+save: {plain:.1f} s without fsync, {base:.1f} s with fsync (the converters fsync)")
        print(f"round trip HF->Megatron->HF: {total:.1f} s = {total / base:.2f}x the baseline with fsync, "
              f"{total / plain:.2f}x without [target <= 2x]")
        paired = [(h + m) / b for b, h, m in zip(seconds["baseline"], seconds["hf_to_megatron"],
                                                  seconds["megatron_to_hf"])]
        print(f"each repeat's round trip / its own baseline: {', '.join(f'{x:.2f}' for x in paired)}; "
              f"median {statistics.median(paired):.2f}x")
        print(f"per direction (one load+save each): hf->megatron {h2m / base:.2f}x / {h2m / plain:.2f}x, "
              f"megatron->hf {m2h / base:.2f}x / {m2h / plain:.2f}x (with / without fsync in the baseline)")
        print(f"peak RSS of a conversion: {peak / gb:.2f} GB = {peak / size:.2f}x the checkpoint ({size / gb:.2f} GB) "
              f"[target <= 2x]; baseline {res['baseline']['peak_rss'] / size:.2f}x")
        print(f"not timed: starting Python and importing torch + the package, "
              f"{res['hf_to_megatron']['import_seconds']:.1f} s per process")
        print("output verified bit-identical to the input")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
