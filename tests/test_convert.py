"""HF <-> Megatron converters: bit-exact round trips at every layout, resharding, logits against
transformers (in process at TP=1, under torchrun at TP=2 / PP=2), live export, bad input, atomicity.

The HF models are tiny random Qwen2 (qkv bias, GQA, tied and untied, fp32 and bf16) and Llama
(GQA, no bias) made here with ``transformers`` and saved with ``save_pretrained``. Every weight,
biases and norms included, is randomised, so a swapped q/k/v, gate/up or a wrong bias order changes
the numbers.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from real_megatron.convert import (
    ConversionError,
    MegatronCheckpoint,
    hf_to_megatron,
    iter_hf_tensors,
    load_hf_into,
    load_megatron_checkpoint_into,
    load_megatron_shards,
    megatron_to_hf,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "megatron_workers" / "convert_layouts.py"
LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2)]
DIMS = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-6)
INPUT_IDS = torch.tensor([[3, 17, 250, 42, 9, 101, 77, 5, 299, 1, 64, 128]])  # same ids as the torchrun worker
RTOL = 1e-5


def _make_model(kind: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if kind.startswith("llama"):
        model = LlamaForCausalLM(LlamaConfig(**DIMS, tie_word_embeddings=False, attention_bias=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**DIMS, tie_word_embeddings=kind.endswith("tied")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> HF directory. qwen2 is saved in several shard files, with tokenizer side files."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for i, (name, kind, dtype, shard) in enumerate([
            ("qwen2", "qwen2", torch.float32, "40KB"), ("qwen2_tied", "qwen2_tied", torch.float32, None),
            ("llama", "llama", torch.float32, None), ("qwen2_bf16", "qwen2", torch.bfloat16, "40KB")]):
        model = _make_model(kind, seed=i).to(dtype)
        d = root / name
        model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        if name == "qwen2":
            (d / "tokenizer_config.json").write_text('{"model_max_length": 128, "eos_token": "<e>"}\n')
            (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
        dirs[name] = d
    assert len(list(dirs["qwen2"].glob("*.safetensors"))) > 1  # the sharded-input path is exercised
    return dirs


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    """(name, tp, pp) -> Megatron dir, converted once and cached for the module."""
    root = tmp_path_factory.mktemp("meg")
    cache = {}

    def get(name: str, tp: int, pp: int) -> Path:
        if (name, tp, pp) not in cache:
            cache[(name, tp, pp)] = hf_to_megatron(hf_models[name], root / f"{name}-tp{tp}pp{pp}", tp=tp, pp=pp)
        return cache[(name, tp, pp)]

    return get


def _hf_state(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), f"{name} differs"


def _no_leftovers(out: Path) -> None:
    assert not out.exists(), f"{out} exists after a failed conversion"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("tp, pp", LAYOUTS)
@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "llama", "qwen2_bf16"])
def test_round_trip_is_bit_identical(hf_models, converted, tmp_path, name, tp, pp):
    meg = converted(name, tp, pp)
    out = megatron_to_hf(meg, tmp_path / "hf2", max_shard_size="60KB")
    _assert_bit_identical(_hf_state(hf_models[name]), _hf_state(out))
    src_cfg = json.loads((hf_models[name] / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == src_cfg  # dtype preserved: config unchanged
    for side in ("generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        if (hf_models[name] / side).exists():
            assert (out / side).read_bytes() == (hf_models[name] / side).read_bytes(), side
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _hf_state(out).values())


def test_output_loads_in_transformers(hf_models, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    for name in ("qwen2_tied", "qwen2_bf16"):
        out = megatron_to_hf(converted(name, 2, 2), tmp_path / name)
        ref = AutoModelForCausalLM.from_pretrained(hf_models[name], dtype="auto").eval()
        got = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
        assert got.dtype == ref.dtype == (torch.bfloat16 if name.endswith("bf16") else torch.float32)
        assert got.config.tie_word_embeddings == ref.config.tie_word_embeddings
        ref_sd, got_sd = ref.state_dict(), got.state_dict()
        assert ref_sd.keys() == got_sd.keys()
        for k in ref_sd:
            assert torch.equal(ref_sd[k], got_sd[k]), k
        with torch.no_grad():
            assert torch.equal(got(INPUT_IDS).logits, ref(INPUT_IDS).logits)


def test_dtype_cast_on_conversion(hf_models, tmp_path):
    meg = hf_to_megatron(hf_models["qwen2"], tmp_path / "meg", tp=2, pp=1, dtype="bf16")
    assert json.loads((meg / "meta.json").read_text())["dtype"] == "bfloat16"
    out = megatron_to_hf(meg, tmp_path / "hf2")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    src, got = _hf_state(hf_models["qwen2"]), _hf_state(out)
    assert src.keys() == got.keys()
    for k in src:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], src[k].to(torch.bfloat16)), k
    # dtype names come from real_megatron/dtypes.py: long names cast too; an unknown one lists the choices
    meg32 = hf_to_megatron(hf_models["qwen2"], tmp_path / "meg32", dtype="float32")
    assert json.loads((meg32 / "meta.json").read_text())["dtype"] == "float32"
    _expect_error(lambda: hf_to_megatron(hf_models["qwen2"], tmp_path / "bad", dtype="int8"), tmp_path / "bad",
                  "--dtype 'int8'", "auto, fp32, bf16, fp16")


# ----------------------------------------------------------------------------- the Megatron format


def test_megatron_format_files(hf_models, converted):
    from safetensors import safe_open

    meg = converted("qwen2_tied", 2, 2)
    meta = json.loads((meg / "meta.json").read_text())
    assert (meta["format"], meta["tp"], meta["pp"], meta["dtype"]) == ("real-megatron/v1", 2, 2, "float32")
    assert (meta["vocab_size"], meta["padded_vocab_size"]) == (300, 512)  # multiple of 128 * tp
    assert meta["hf_config"]["tie_word_embeddings"] is True
    assert (meg / "hf" / "config.json").is_file()
    names = {}
    for t in range(2):
        for p in range(2):
            with safe_open(meg / f"model_tp{t}_pp{p}.safetensors", "pt") as fh:  # plain safetensors files
                names[(t, p)] = set(fh.keys())
                if p == 0:
                    assert tuple(fh.get_tensor("embedding.word_embeddings.weight").shape) == (256, 64)
                    qkv = fh.get_tensor("decoder.layers.1.self_attention.linear_qkv.weight")
                    assert tuple(qkv.shape) == ((4 + 2 * 2) * 16 // 2, 64)
    assert names[(0, 0)] == names[(1, 0)] and names[(0, 1)] == names[(1, 1)]
    assert "embedding.word_embeddings.weight" in names[(0, 0)]
    assert not any(n.startswith("output_layer") for s in names.values() for n in s)  # tied: stored once
    assert {n.split(".")[2] for n in names[(0, 1)] if n.startswith("decoder.layers.")} == {"2", "3"}  # global numbers
    assert "decoder.final_layernorm.weight" in names[(0, 1)]


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied"])
def test_resharding_equals_direct_conversion(hf_models, converted, name):
    saved = converted(name, 2, 2)
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        direct = MegatronCheckpoint(converted(name, tp, pp))
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                got = load_megatron_shards(saved, tp_rank, tp, pp_rank, pp)
                want = load_megatron_shards(direct.dir, tp_rank, tp, pp_rank, pp)
                assert got.keys() == want.keys()
                assert got, "no tensors for a stage"
                for k in want:
                    assert torch.equal(got[k], want[k]), (tp, pp, tp_rank, pp_rank, k)
                # and `want` really is the stored shard of the direct conversion (no resharding there)
                for k in want:
                    if k in direct.location:
                        assert torch.equal(want[k], direct.location[k][tp_rank].get(k)), k
        if name == "qwen2_tied" and pp == 2:  # the last stage gets the tied embedding for its output layer
            assert "embedding.word_embeddings.weight" in load_megatron_shards(saved, 0, tp, 1, pp)
        direct.close()


# ----------------------------------------------------------------------------- Megatron models


@pytest.fixture(scope="module")
def megatron_tp1():
    from real_megatron.megatron.model import initialize_parallel

    initialize_parallel(tp=1, pp=1, cp=1, seed=7)
    yield


def _megatron_logits(chunks) -> torch.Tensor:
    with torch.no_grad():
        chunks[0].eval()
        pos = torch.arange(INPUT_IDS.shape[1]).unsqueeze(0)
        return chunks[0](INPUT_IDS, pos, None)


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "llama"])
def test_megatron_logits_match_transformers_tp1(hf_models, converted, megatron_tp1, name):
    from transformers import AutoModelForCausalLM

    from real_megatron.hf_model import read_hf_config
    from real_megatron.megatron.model import build_model

    hf = read_hf_config(hf_models[name])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf_models[name]).eval()(INPUT_IDS).logits
    chunks = build_model(hf, dtype=torch.float32, transformer_impl="local")
    load_megatron_checkpoint_into(chunks, converted(name, 2, 2))  # saved at TP2 PP2, loaded at TP1 PP1
    logits = _megatron_logits(chunks)
    assert logits.shape[-1] == 384  # padded vocabulary (multiple of 128)
    err = _rel_err(logits[..., :300], ref)
    assert err <= RTOL, f"logits differ from transformers: {err:.2e}"

    other = build_model(hf, dtype=torch.float32, transformer_impl="local")  # fresh random init
    assert not torch.equal(_megatron_logits(other), logits)
    load_hf_into(other, hf_models[name])
    assert torch.equal(_megatron_logits(other), logits)


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "llama"])
def test_iter_hf_tensors_tp1(hf_models, megatron_tp1, name):
    from real_megatron.hf_model import read_hf_config
    from real_megatron.megatron.model import build_model

    hf = read_hf_config(hf_models[name])
    chunks = build_model(hf, dtype=torch.float32, transformer_impl="local")
    load_hf_into(chunks, hf_models[name])
    ref = _hf_state(hf_models[name])
    biggest = max(t.numel() * t.element_size() for t in ref.values())
    for bucket_bytes in (biggest // 3, 4 * biggest):  # smaller than the embedding: it must come alone
        got, sizes = {}, []
        for bucket in iter_hf_tensors(chunks, hf, bucket_bytes=bucket_bytes):
            sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
            assert len(bucket) == 1 or sizes[-1] <= bucket_bytes, (len(bucket), sizes[-1], bucket_bytes)
            got.update(bucket)
        _assert_bit_identical(ref, got)
        assert len(sizes) > 1 and max(sizes) <= max(bucket_bytes, biggest)
    # cloned: changing the model afterwards does not change what was yielded
    kept = dict(pair for bucket in iter_hf_tensors(chunks, hf) for pair in bucket)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(1.0)
    _assert_bit_identical(ref, kept)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # torchrun process groups
def test_tp2_logits_and_pp2_export_under_torchrun(hf_models, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    models = [["qwen2", str(hf_models["qwen2"]), str(converted("qwen2", 1, 1))],          # TP1 -> TP2 / PP2
              ["qwen2_tied", str(hf_models["qwen2_tied"]), str(converted("qwen2_tied", 2, 2))]]
    bucket_bytes = 40_000
    out = tmp_path / "result.pt"
    # the in-process TP=1 tests set RANK/WORLD_SIZE/MASTER_* in os.environ: torchrun must not inherit them
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(WORKER), "--models", json.dumps(models),
           "--bucket-bytes", str(bucket_bytes), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = torch.load(out, weights_only=False)
    for name, hf_dir, _ in models:
        with torch.no_grad():
            ref_logits = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(INPUT_IDS).logits
        ref = _hf_state(Path(hf_dir))
        for layout in ("tp2pp1", "tp1pp2"):
            entry = results[f"{name}/{layout}"]
            _assert_bit_identical(ref, entry["tensors"])
            assert len(entry["buckets"]) > 1
            assert all(b <= bucket_bytes for b in entry["buckets"] if b < 300 * 64 * 4)
        err = _rel_err(results[f"{name}/tp2pp1"]["logits"], ref_logits)
        assert err <= RTOL, f"{name}: TP=2 logits differ from transformers by {err:.2e}"


# ----------------------------------------------------------------------------- bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _expect_error(fn, out: Path, *needles: str) -> str:
    with pytest.raises(ConversionError) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    _no_leftovers(out)
    return msg


def test_unknown_architecture(hf_models, tmp_path):
    src = _copy(hf_models["qwen2_tied"], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (src / "config.json").write_text(json.dumps(cfg))
    _expect_error(lambda: hf_to_megatron(src, tmp_path / "out"), tmp_path / "out", "GPT2LMHeadModel", "config.json")


def test_missing_and_truncated_shard(hf_models, tmp_path):
    src = _copy(hf_models["qwen2"], tmp_path / "src")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    _expect_error(lambda: hf_to_megatron(src, tmp_path / "out"), tmp_path / "out", victim.name, "truncated")
    victim.write_bytes(data[:5])
    _expect_error(lambda: hf_to_megatron(src, tmp_path / "out"), tmp_path / "out", victim.name)
    victim.unlink()
    _expect_error(lambda: hf_to_megatron(src, tmp_path / "out"), tmp_path / "out", victim.name, "missing")


def test_config_weights_mismatch(hf_models, tmp_path):
    src = _copy(hf_models["qwen2_tied"], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=128)))
    _expect_error(lambda: hf_to_megatron(src, tmp_path / "out"), tmp_path / "out", "mlp.gate_proj.weight",
                  "(96, 64)", "(128, 64)", "intermediate_size")
    (src / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=False)))  # lm_head expected
    _expect_error(lambda: hf_to_megatron(src, tmp_path / "out"), tmp_path / "out", "lm_head.weight", "missing")


def test_missing_tensor(hf_models, tmp_path):
    from safetensors.torch import save_file

    src = _copy(hf_models["llama"], tmp_path / "src")
    state = _hf_state(src)
    del state["model.layers.2.self_attn.k_proj.weight"]
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    _expect_error(lambda: hf_to_megatron(src, tmp_path / "out"), tmp_path / "out",
                  "model.layers.2.self_attn.k_proj.weight", "missing")


def test_layout_errors(hf_models, tmp_path):
    from real_megatron.convert.mapping import check_conversion_layout

    src, out = hf_models["qwen2_tied"], tmp_path / "out"
    _expect_error(lambda: hf_to_megatron(src, out, tp=3), out, "--tp 3", "num_attention_heads=4", "[1, 2]")
    _expect_error(lambda: hf_to_megatron(src, out, tp=4), out, "--tp 4", "num_key_value_heads=2")
    _expect_error(lambda: hf_to_megatron(src, out, pp=3), out, "--pp 3", "num_hidden_layers=4", "[1, 2, 4]")
    _expect_error(lambda: hf_to_megatron(src, out, tp=0), out, "--tp")
    with pytest.raises(ConversionError, match="intermediate_size=90"):
        check_conversion_layout(dict(DIMS, num_attention_heads=8, num_key_value_heads=4, intermediate_size=90), 4, 1)
    meg = hf_to_megatron(src, tmp_path / "meg")
    with pytest.raises(ConversionError, match="num_key_value_heads"):
        load_megatron_shards(meg, 0, 4, 0, 1)


def test_output_exists_and_overwrite(hf_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ConversionError, match="already exists.*--overwrite"):
        hf_to_megatron(hf_models["qwen2_tied"], out)
    assert (out / "keep.txt").read_text() == "user data"
    # a failing conversion with --overwrite leaves the old directory as it was
    with pytest.raises(ConversionError):
        hf_to_megatron(hf_models["qwen2_tied"], out, tp=3, overwrite=True)
    assert (out / "keep.txt").read_text() == "user data"
    hf_to_megatron(hf_models["qwen2_tied"], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "meta.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ConversionError, match="overlaps the input"):
        hf_to_megatron(hf_models["qwen2_tied"], hf_models["qwen2_tied"] / "meg")


def test_failure_while_writing_leaves_nothing(hf_models, converted, tmp_path, monkeypatch):
    import real_megatron.convert.offline as conv

    calls = {"n": 0}
    real = conv.hf_to_megatron_blocks

    def flaky(name, src, hf):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return real(name, src, hf)

    monkeypatch.setattr(conv, "hf_to_megatron_blocks", flaky)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        hf_to_megatron(hf_models["qwen2"], out, tp=2, pp=2)
    assert calls["n"] == 5
    _no_leftovers(out)

    calls["n"] = 0
    real_split = conv.megatron_to_hf_blocks

    def flaky_split(name, tensor, hf):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk full (simulated)")
        return real_split(name, tensor, hf)

    monkeypatch.setattr(conv, "megatron_to_hf_blocks", flaky_split)
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OSError, match="simulated"):
        megatron_to_hf(converted("qwen2", 2, 2), out, overwrite=True, max_shard_size="40KB")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_bad_megatron_checkpoints(hf_models, converted, tmp_path):
    good = converted("qwen2", 2, 2)
    out = tmp_path / "hf2"
    meg = _copy(good, tmp_path / "meg")
    (meg / "model_tp1_pp1.safetensors").unlink()
    _expect_error(lambda: megatron_to_hf(meg, out), out, "model_tp1_pp1.safetensors", "missing")
    data = (good / "model_tp1_pp1.safetensors").read_bytes()
    (meg / "model_tp1_pp1.safetensors").write_bytes(data[:-64])
    _expect_error(lambda: megatron_to_hf(meg, out), out, "model_tp1_pp1.safetensors", "truncated")
    shutil.copyfile(good / "model_tp1_pp1.safetensors", meg / "model_tp1_pp1.safetensors")
    _expect_error(lambda: megatron_to_hf(meg, out, hf_config_from=hf_models["qwen2_tied"]), out,
                  "tie_word_embeddings=True", "config.json")
    _expect_error(lambda: megatron_to_hf(meg, out, hf_config_from=hf_models["llama"]), out, "shapes differ")
    (meg / "meta.json").unlink()
    _expect_error(lambda: megatron_to_hf(meg, out), out, "meta.json", "hf-to-megatron")
    with pytest.raises(ConversionError, match="meta.json"):
        load_megatron_shards(meg, 0, 1, 0, 1)


def test_model_mismatch_on_load(hf_models, converted, megatron_tp1):
    from real_megatron.hf_model import read_hf_config
    from real_megatron.megatron.model import build_model

    chunks = build_model(read_hf_config(hf_models["qwen2"]), dtype=torch.float32, transformer_impl="local")
    with pytest.raises(ConversionError, match="tie_word_embeddings"):
        load_megatron_checkpoint_into(chunks, converted("qwen2_tied", 1, 1))
    with pytest.raises(ConversionError, match="tie_word_embeddings"):
        load_hf_into(chunks, hf_models["qwen2_tied"])


# ----------------------------------------------------------------------------- CLIs


@pytest.mark.slow  # four CLI subprocesses
def test_cli_scripts_round_trip(hf_models, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    meg, out = tmp_path / "meg", tmp_path / "hf2"
    run = lambda *a: subprocess.run([sys.executable, *map(str, a)], capture_output=True, text=True, env=env,  # noqa: E731
                                    timeout=300)
    proc = run(REPO / "checkpoints_convert" / "hf_to_megatron.py", "--hf-dir", hf_models["llama"], "--out", meg,
               "--tp", 2, "--pp", 2)
    assert proc.returncode == 0, proc.stderr
    proc = run(REPO / "checkpoints_convert" / "megatron_to_hf.py", "--megatron-dir", meg, "--out", out,
               "--hf-config-from", hf_models["llama"], "--max-shard-size", "50KB")
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.safetensors"))) > 1
    _assert_bit_identical(_hf_state(hf_models["llama"]), _hf_state(out))
    proc = run(REPO / "checkpoints_convert" / "hf_to_megatron.py", "--hf-dir", hf_models["llama"], "--out", meg)
    assert proc.returncode == 2 and "already exists" in proc.stderr


def test_real_megatron_convert_command(hf_models, tmp_path, capsys):
    from real_megatron.cli import main

    meg = tmp_path / "meg"
    assert main(["convert", "hf-to-megatron", "--hf-dir", str(hf_models["qwen2_tied"]), "--out", str(meg),
                 "--tp", "2"]) == 0
    assert main(["convert", "megatron-to-hf", "--megatron-dir", str(meg), "--out", str(tmp_path / "hf2")]) == 0
    _assert_bit_identical(_hf_state(hf_models["qwen2_tied"]), _hf_state(tmp_path / "hf2"))
    assert main(["convert", "hf-to-megatron", "--hf-dir", str(hf_models["qwen2_tied"]), "--out",
                 str(tmp_path / "x"), "--tp", "3"]) == 2
    assert "num_attention_heads=4" in capsys.readouterr().err
    _no_leftovers(tmp_path / "x")


def test_prefetch_order_errors_and_early_stop():
    import threading

    from real_megatron.convert.st_io import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad tensor 2")

    got = []
    with pytest.raises(ValueError, match="bad tensor 2"):
        for x in prefetch(failing()):
            got.append(x)
    assert got == [1]

    # the producer runs at most `depth` items ahead, and stops (and is closed) when the consumer stops
    produced, closed = [], threading.Event()

    def counting():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    stream = prefetch(counting(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert closed.is_set() and len(produced) <= 4
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]


def test_writer_failure_stops_the_reader_and_leaves_nothing(hf_models, tmp_path, monkeypatch):
    import threading

    from real_megatron.convert import st_io

    real_write, calls = st_io.SafetensorsWriter.write, {"n": 0}

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("no space left on device (simulated)")
        real_write(self, name, tensor)

    monkeypatch.setattr(st_io.SafetensorsWriter, "write", failing_write)
    out = tmp_path / "meg"
    with pytest.raises(OSError, match="simulated"):
        hf_to_megatron(hf_models["qwen2"], out)
    _no_leftovers(out)
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]


def test_single_file_output_is_named_like_transformers(hf_models, converted, tmp_path):
    out = megatron_to_hf(converted("qwen2", 1, 1), tmp_path / "hf2")  # default 5GB shards: one file
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    _assert_bit_identical(_hf_state(hf_models["qwen2"]), _hf_state(out))


def test_fsync_by_default_and_no_fsync_skips_it(hf_models, tmp_path, monkeypatch):
    """Default: every output file and directory is fsynced before the rename. ``--no-fsync``: no
    fsync at all, the same bytes, and a failure still leaves nothing at --out."""
    from real_megatron.cli import main

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    src = hf_models["qwen2"]
    for fsync_flag in ([], ["--no-fsync"]):
        meg, out = tmp_path / f"meg{len(fsync_flag)}", tmp_path / f"hf{len(fsync_flag)}"
        synced.clear()
        assert main(["convert", "hf-to-megatron", "--hf-dir", str(src), "--out", str(meg), "--tp", "2",
                     *fsync_flag]) == 0
        assert main(["convert", "megatron-to-hf", "--megatron-dir", str(meg), "--out", str(out),
                     "--max-shard-size", "60KB", *fsync_flag]) == 0
        _assert_bit_identical(_hf_state(src), _hf_state(out))
        if fsync_flag:
            assert synced == []
        else:  # the temp dirs' files were fsynced; after the rename they carry the final names
            written = {f.name for d in (meg, out) for f in d.rglob("*") if f.is_file()}
            assert written and written <= {Path(p).name for p in synced}
            assert len(list(out.glob("*.safetensors"))) > 1

    import real_megatron.convert.st_io as st_io

    real_write = st_io.SafetensorsWriter.write

    def failing_write(self, name, tensor):
        if name.endswith("layers.1.mlp.linear_fc2.weight"):
            raise OSError("no space left on device (simulated)")
        real_write(self, name, tensor)

    monkeypatch.setattr(st_io.SafetensorsWriter, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        hf_to_megatron(src, tmp_path / "failed", fsync=False)
    _no_leftovers(tmp_path / "failed")


# ----------------------------------------------------------------------------- streaming file I/O


def _odd_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file whose tensors start at offsets that are not multiples of their element
    size or of a page (a 3-byte bool tensor first), with an empty tensor and a scalar."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    tensors = {"a_flags": torch.tensor([True, False, True]), "b_big": torch.randn(3000, 7, generator=g),
               "c_empty": torch.zeros(0, 5), "d_scalar": torch.tensor(2.5, dtype=torch.float64),
               "e_half": torch.randn(33, 3, generator=g).to(torch.bfloat16)}
    save_file(tensors, path)
    return tensors


def test_views_equal_copies_and_never_write_the_file(tmp_path):
    from real_megatron.convert.st_io import SafetensorsReader

    path = tmp_path / "odd.safetensors"
    want = _odd_file(path)
    before = path.read_bytes()
    with SafetensorsReader(path) as reader:
        for name, tensor in want.items():
            view, copy = reader.view(name), reader.get(name)
            assert view.dtype == tensor.dtype and view.shape == tensor.shape, name
            assert torch.equal(view, tensor) and torch.equal(copy, tensor), name
        view = reader.view("b_big")
        view.fill_(0.0)  # a private map: the file and later reads keep the original bytes
        assert torch.equal(reader.view("b_big"), want["b_big"])
    assert path.read_bytes() == before


def test_view_falls_back_to_a_copy_without_memory_maps(tmp_path, monkeypatch):
    from real_megatron.convert import st_io

    path = tmp_path / "odd.safetensors"
    want = _odd_file(path)

    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device (simulated file system without mmap)")

    monkeypatch.setattr(st_io.mmap, "mmap", no_mmap)
    copies, real_get = [], st_io.SafetensorsReader.get

    def counting_get(self, name):
        copies.append(name)
        return real_get(self, name)

    monkeypatch.setattr(st_io.SafetensorsReader, "get", counting_get)
    with st_io.SafetensorsReader(path) as reader:
        assert torch.equal(reader.view("b_big"), want["b_big"])
    assert copies == ["b_big"]


def test_writer_takes_row_blocks_and_checks_them(tmp_path):
    from safetensors import safe_open

    from real_megatron.convert.st_io import SafetensorsWriter

    full = torch.randn(10, 4)
    path = tmp_path / "blocks.safetensors"
    writer = SafetensorsWriter(path, [("w", torch.float32, (10, 4)), ("b", torch.float32, (6,))])
    writer.write("w", [full[:3], full[3:4], full[4:]])  # written one after another, never concatenated
    bias = torch.randn(6)
    with pytest.raises(RuntimeError, match=r"blocks.safetensors: got 'b' torch.float32 \(5,\), planned 'b'"):
        writer.write("b", [bias[:2], bias[2:5]])  # one row short
    with pytest.raises(RuntimeError, match="row blocks"):
        writer.write("b", [bias[:2], bias[2:].double()])  # blocks of different dtypes do not concatenate
    writer.write("b", [bias[:2], bias[2:]])
    writer.close()
    with safe_open(path, "pt") as fh:
        assert torch.equal(fh.get_tensor("w"), full) and torch.equal(fh.get_tensor("b"), bias)


def _record_sendfile(monkeypatch) -> list[int]:
    """Byte counts of every ``os.sendfile`` (file-to-file copy) into a .safetensors file from here on
    (``shutil`` copies the side files, config and tokenizer, with it too)."""
    sent: list[int] = []
    real_sendfile = os.sendfile

    def recording_sendfile(out_fd, in_fd, offset, count):
        n = real_sendfile(out_fd, in_fd, offset, count)
        if os.readlink(f"/proc/self/fd/{out_fd}").endswith(".safetensors"):
            sent.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", recording_sendfile)
    return sent


def _fds_open_on(path) -> int:
    """How many of this process's descriptors are open on ``path``. Counting only the file's own
    descriptors keeps the check about the maps: the process-wide count moves with whatever earlier
    tests left to the garbage collector (CI saw it drop by 3 in the middle of this test)."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                count += 1
        except OSError:  # closed between the listing and the read
            pass
    return count


def test_views_go_file_to_file_unless_written_to(tmp_path, monkeypatch):
    """Untouched views (and their row slices, at unaligned offsets) are copied by the kernel from the
    input file; a view written to in place, a cast and a fresh tensor are written from memory, so
    the output always holds the tensor's current bytes. The maps' descriptors are closed with them."""
    import gc

    from safetensors import safe_open

    from real_megatron.convert import st_io

    path = tmp_path / "odd.safetensors"
    want = _odd_file(path)
    sent = _record_sendfile(monkeypatch)
    out = tmp_path / "out.safetensors"
    with st_io.SafetensorsReader(path) as reader:
        big, half, flags = reader.view("b_big"), reader.view("e_half"), reader.view("a_flags")
        assert _fds_open_on(path) >= 1  # the count below can see the maps' descriptors
        touched = reader.view("b_big")
        touched[7:9] = -1.0  # in place: the private map now differs from the file
        assert st_io.file_region(touched) is None and st_io.file_region(touched[100:]) is None
        assert st_io.file_region(big[1:]) is not None and st_io.file_region(big.t()) is None  # not contiguous
        assert st_io.file_region(big.double()) is None and st_io.file_region(big.clone()) is None
        blocks = [big[:1001], big[1001:1002], big[1002:]]  # row slices of one view
        writer = st_io.SafetensorsWriter(out, [("big", big.dtype, tuple(big.shape)),
                                               ("half", half.dtype, tuple(half.shape)),
                                               ("flags", flags.dtype, tuple(flags.shape)),
                                               ("touched", touched.dtype, tuple(touched.shape)),
                                               ("cast", torch.float64, tuple(big.shape))])
        writer.write("big", blocks)
        writer.write("half", half)
        writer.write("flags", flags)
        assert sum(sent) == big.nbytes + half.nbytes + flags.nbytes  # all three file to file
        writer.write("touched", touched)
        writer.write("cast", big.double())
        writer.close()
        assert sum(sent) == big.nbytes + half.nbytes + flags.nbytes  # the last two from memory
        del big, half, flags, touched, blocks
        gc.collect()
        assert not st_io._MAPPED  # every map unregistered when freed
    assert _fds_open_on(path) == 0  # and its descriptors closed
    expected_touched = want["b_big"].clone()
    expected_touched[7:9] = -1.0
    with safe_open(out, "pt") as fh:
        assert torch.equal(fh.get_tensor("big"), want["b_big"]) and torch.equal(fh.get_tensor("half"), want["e_half"])
        assert torch.equal(fh.get_tensor("flags"), want["a_flags"])
        assert torch.equal(fh.get_tensor("touched"), expected_touched)
        assert torch.equal(fh.get_tensor("cast"), want["b_big"].double())


def test_file_to_file_copy_falls_back_to_writes(tmp_path, monkeypatch):
    """Where ``sendfile`` is refused (a file system without it), after some chunks or at once, the
    rest is written from memory and the file is the same."""
    from safetensors import safe_open

    from real_megatron.convert import st_io

    path = tmp_path / "odd.safetensors"
    want = _odd_file(path)
    monkeypatch.setattr(st_io, "_WRITE_CHUNK", 4096)  # b_big (84 KB) takes several chunks
    real_sendfile = os.sendfile
    for allowed in (0, 3):
        calls = {"n": 0}

        def refusing_sendfile(out_fd, in_fd, offset, count, calls=calls, allowed=allowed):
            calls["n"] += 1
            if calls["n"] > allowed:
                raise OSError(22, "Invalid argument (simulated file system without sendfile)")
            return real_sendfile(out_fd, in_fd, offset, count)

        monkeypatch.setattr(os, "sendfile", refusing_sendfile)
        out = tmp_path / f"out{allowed}.safetensors"
        with st_io.SafetensorsReader(path) as reader:
            writer = st_io.SafetensorsWriter(out, [("b_big", torch.float32, (3000, 7))])
            writer.write("b_big", reader.view("b_big"))
            writer.close()
        assert calls["n"] == allowed + 1
        with safe_open(out, "pt") as fh:
            assert torch.equal(fh.get_tensor("b_big"), want["b_big"])


def test_input_truncated_while_converting_is_an_error(tmp_path):
    from real_megatron.convert import st_io

    path = tmp_path / "odd.safetensors"
    _odd_file(path)
    with st_io.SafetensorsReader(path) as reader:
        view = reader.view("e_half")  # the last tensor
        os.truncate(path, path.stat().st_size - 10)  # e.g. another process rewriting the input
        writer = st_io.SafetensorsWriter(tmp_path / "out.safetensors", [("e_half", view.dtype, tuple(view.shape))])
        with pytest.raises(ConversionError, match=r"out.safetensors: the input file holding 'e_half' ended early"):
            writer.write("e_half", view)
        writer.abort()


@pytest.mark.parametrize("name", ["qwen2", "qwen2_bf16"])
def test_tp1_conversions_copy_every_tensor_file_to_file(hf_models, tmp_path, monkeypatch, name):
    """At TP=1 each HF tensor is a row block of a Megatron tensor and back, so both directions copy
    every byte inside the kernel (only the vocabulary padding is written from memory) and the round
    trip is still bit-identical."""
    from real_megatron.convert.megatron_format import padded_vocab

    src = hf_models[name]
    state = _hf_state(src)
    hf = json.loads((src / "config.json").read_text())
    assert padded_vocab(hf, 1) > hf["vocab_size"]  # the padding rows exist, and are not in the input
    total = sum(t.nbytes for t in state.values())
    sent = _record_sendfile(monkeypatch)
    meg = hf_to_megatron(src, tmp_path / "meg", fsync=False)
    assert sum(sent) == total
    sent.clear()
    out = megatron_to_hf(meg, tmp_path / "hf", fsync=False)
    assert sum(sent) == total
    _assert_bit_identical(state, _hf_state(out))
