"""The fused output layer (``megatron/fused_output.py``) equals Megatron's output layer + ``logprobs.py``.

Reference everywhere: the logits materialised (``h·Wᵀ``, or GPTModel's own output layer) and
``vocab_parallel_logprobs``. Errors are relative to the reference tensor. float64: every tensor's
largest entry error ≤ 1e-12 of its largest entry — the two paths compute the same function, what is
left is rounding. float32, the issue's bar of 1e-6: log-probs, entropy and the loss by their largest
entry; gradients by norm (‖Δ‖/‖ref‖ ≤ 1e-6) and by largest entry ≤ 2e-6 — after four layers of
backpropagation in float32, *the unfused path itself* is up to ~8e-7 of a gradient's largest entry
away from its float64 result (the worker measures it: ``floor/…``), so two float32 runs that sum in
different orders legitimately differ by up to about twice that. bfloat16: no worse than the
unfused path, both against a float64 truth.

Single process here (the op, and a tiny GPTModel in-process); the layouts that need several ranks
(TP=2 ± sequence parallelism, PP=2 with tied embeddings, DP=2, CP=2) run
``megatron_workers/fused_output.py`` under torchrun and are marked slow. Each mutation (a wrong chunk
boundary, a missing TP reduction, a dropped tied-weight gradient) is shown to fail the same checks.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "megatron_workers"))
import fused_output as worker  # noqa: E402  (tests/megatron_workers/fused_output.py)
from common import TINY_QWEN2  # noqa: E402

from real_megatron.megatron import fused_output as fo  # noqa: E402
from real_megatron.megatron.fused_output import fused_logprobs  # noqa: E402
from real_megatron.megatron.logprobs import vocab_parallel_logprobs  # noqa: E402

WORKER = Path(__file__).parent / "megatron_workers" / "fused_output.py"
TOL = {"float64": 1e-12, "float32": 1e-6}
FP32_GRAD_MAX = 2e-6  # a float32 gradient's largest-entry error (its norm-wise error stays under TOL["float32"])
MUTATED = 1e-3  # a mutation's error must exceed this (they land at 0.1 … inf)


def _op_case(dtype, *, seq=13, batch=2, hidden=16, padded=64, vocab=50, temperature=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(seq, batch, hidden, generator=g, dtype=torch.float64)
    w = 0.7 * torch.randn(padded, hidden, generator=g, dtype=torch.float64)
    target = torch.randint(0, vocab, (batch, seq), generator=g)
    coef = torch.randn(batch, seq, generator=g, dtype=torch.float64)
    return h.to(dtype), w.to(dtype), target, coef.to(dtype)


def _run(fused: bool, h, w, target, coef, *, temperature, vocab, with_entropy=True, **tile):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    if fused:
        logp, ent = fused_logprobs(h, w, target, temperature=temperature, vocab_size=vocab,
                                   with_entropy=with_entropy, **tile)
    else:  # GPTModel's logits are [B, S, V]: the [S, B, H] hidden states times Wᵀ, batch first
        logp, ent = vocab_parallel_logprobs((h @ w.t()).transpose(0, 1), target, temperature=temperature,
                                            vocab_size=vocab, with_entropy=with_entropy)
    dh, dw = torch.autograd.grad((logp * coef).sum(), (h, w))
    return {"logp": logp.detach(), "entropy": ent, "grad/hidden": dh, "grad/weight": dw}


def _errors(got: dict, ref: dict) -> dict:
    return {k: worker.rel_err(got[k], ref[k])[0] for k in ref if ref[k].numel()}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("tile", [{}, {"chunk_tokens": 5, "vocab_block": 7}, {"chunk_tokens": 1, "vocab_block": 1000},
                                  {"chunk_tokens": 26, "vocab_block": 3}])
@pytest.mark.parametrize("temperature, with_entropy", [(0.7, True), (1.0, False)])
def test_op_equals_logits_then_logprobs(dtype, tile, temperature, with_entropy):
    # 64 entries of which 50 are real (padding), [S, B, H] with B = 2 (the batch-first transpose),
    # tiles: one, ragged in both directions, one token at a time, a vocabulary block of 3
    h, w, target, coef = _op_case(getattr(torch, dtype), temperature=temperature)
    ref = _run(False, h, w, target, coef, temperature=temperature, vocab=50, with_entropy=with_entropy)
    got = _run(True, h, w, target, coef, temperature=temperature, vocab=50, with_entropy=with_entropy, **tile)
    assert got["logp"].shape == (2, 13) and got["logp"].dtype == getattr(torch, dtype)
    assert (got["grad/weight"][50:] == 0).all()  # padding rows: never multiplied, zero gradient
    errors = _errors(got, ref)
    assert set(errors) == ({"logp", "entropy", "grad/hidden", "grad/weight"} if with_entropy
                           else {"logp", "grad/hidden", "grad/weight"})
    assert max(errors.values()) <= TOL[dtype], errors


def test_op_bfloat16_is_as_accurate_as_the_unfused_path():
    # both paths against a float64 truth computed from the same bf16-rounded inputs; the fused one
    # rounds its logits like Megatron's bf16 layer, then works in fp32 and accumulates ∂W in fp32
    h, w, target, coef = _op_case(torch.float64, seq=40, hidden=32, padded=256, vocab=250, seed=3)
    h, w, coef = h.bfloat16(), w.bfloat16(), coef.float()
    truth = _run(False, h.double(), w.double(), target, coef.double(), temperature=0.7, vocab=250)
    unfused = _run(False, h, w, target, coef, temperature=0.7, vocab=250)
    for tile in ({}, {"chunk_tokens": 9, "vocab_block": 40}):
        fused = _run(True, h, w, target, coef, temperature=0.7, vocab=250, **tile)
        assert fused["grad/hidden"].dtype == fused["grad/weight"].dtype == torch.bfloat16
        assert fused["logp"].dtype == torch.float32
        err_fused, err_unfused = _errors(fused, truth), _errors(unfused, truth)
        for key in err_fused:
            assert err_fused[key] <= 1.5 * err_unfused[key] + 1e-3, (key, err_fused, err_unfused)
        assert max(err_fused.values()) < 0.02


def test_token_mask_skips_positions_and_changes_nothing_else():
    h, w, target, coef = _op_case(torch.float64)
    mask = torch.rand(target.shape, generator=torch.Generator().manual_seed(4)) < 0.6
    ref = _run(False, h, w, target, coef * mask, temperature=0.7, vocab=50)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logp, ent = fused_logprobs(hh, ww, target, temperature=0.7, vocab_size=50, token_mask=mask, chunk_tokens=4,
                               vocab_block=9)
    dh, dw = torch.autograd.grad((logp * coef).sum(), (hh, ww))
    assert (logp[~mask] == 0).all() and (ent[~mask] == 0).all() and (dh.transpose(0, 1)[~mask] == 0).all()
    assert torch.allclose(logp[mask], ref["logp"][mask], rtol=0, atol=1e-12)
    assert torch.allclose(ent[mask], ref["entropy"][mask], rtol=0, atol=1e-12)
    assert worker.rel_err(dh, ref["grad/hidden"])[0] <= 1e-12 and worker.rel_err(dw, ref["grad/weight"])[0] <= 1e-12


def test_backward_recomputes_only_tokens_with_gradient(monkeypatch):
    # the loss reads some positions only (g = 0 elsewhere, as for prompts): backward skips those rows
    # and the gradients are unchanged; the rows the tiles saw, forward vs backward, show the skip
    h, w, target, coef = _op_case(torch.float64)
    coef = coef * (torch.rand(coef.shape, generator=torch.Generator().manual_seed(8)) < 0.4)
    live = int((coef != 0).sum())
    assert 0 < live < coef.numel()
    seen = []
    real_logits = fo._Tiles.logits
    monkeypatch.setattr(fo._Tiles, "logits",
                        lambda self, h, *a, **k: seen.append(h.shape[0]) or real_logits(self, h, *a, **k))
    ref = _run(False, h, w, target, coef, temperature=0.7, vocab=50)
    got = _run(True, h, w, target, coef, temperature=0.7, vocab=50, chunk_tokens=4, vocab_block=1000)
    assert sum(seen) == coef.numel() + live  # forward: every token; backward: only the live ones
    assert max(_errors(got, ref).values()) <= TOL["float64"]


def test_no_logits_sized_tensor_is_ever_created():
    # every tensor any aten op produces during forward + backward, by size: none may approach the
    # [tokens, V] logits; the largest temporaries are tiles (chunk_tokens × vocab_block)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.sizes.append((t.numel(), str(func)))
            return out

    tokens, vocab, hidden = 512, 4096, 4
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, 1, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    target = torch.randint(0, vocab, (1, tokens), generator=g)
    with Largest() as spy:
        logp, ent = fused_logprobs(h, w, target, chunk_tokens=64, vocab_block=256)
        logp.sum().backward()
    tile = 64 * 256
    biggest = max(spy.sizes)
    # the gradient of W (vocab × hidden = 16,384) is an output; nothing else is larger than a tile
    assert biggest[0] <= max(tile, vocab * hidden), biggest
    assert biggest[0] * 64 <= tokens * vocab  # ≤ 1/64 of the logits
    assert any(n == tile for n, _ in spy.sizes)  # the tiles were really that size (not vacuous)


def test_wrong_chunk_boundary_fails_the_comparison():
    h, w, target, coef = _op_case(torch.float64)
    ref = _run(False, h, w, target, coef, temperature=0.7, vocab=50)
    with worker.mutations(["chunk"]):
        got = _run(True, h, w, target, coef, temperature=0.7, vocab=50, chunk_tokens=5, vocab_block=7)
    assert max(_errors(got, ref).values()) > MUTATED


def test_bad_input_is_refused():
    h, w, target, _ = _op_case(torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs(h, w, target, temperature=0.0)
    with pytest.raises(ValueError, match="S, B, H"):
        fused_logprobs(h[:, 0], w, target)
    with pytest.raises(ValueError, match="target shape"):
        fused_logprobs(h, w, target.t())
    with pytest.raises(ValueError, match="vocab_size"):
        fused_logprobs(h, w, target, vocab_size=65)
    with pytest.raises(ValueError, match=r"\[V/tp, H\]"):
        fused_logprobs(h, w[:, :3], target)


def test_forward_only_keeps_no_graph():
    h, w, target, _ = _op_case(torch.float32)
    with torch.no_grad():
        logp, ent = fused_logprobs(h.requires_grad_(True), w.requires_grad_(True), target, vocab_size=50)
    assert logp.grad_fn is None and not logp.requires_grad and ent.shape == logp.shape


# ------------------------------------------------------------------- a real GPTModel, one process

def _assert_within(section: str, errors: dict) -> None:
    """The tolerances of the module docstring, for one section ``"<dtype>/…"`` of a worker's result."""
    dtype = section.split("/")[0]
    for key, (largest, norm) in errors.items():
        if dtype == "float64" or not key.startswith("grad/"):
            assert largest <= TOL[dtype], (section, key, largest)
        else:
            assert norm <= TOL[dtype] and largest <= FP32_GRAD_MAX, (section, key, largest, norm)


def _print_errors(result: dict) -> None:
    """One line per section (run pytest with -s to see them; docs/fused_output.md quotes them): the largest
    log-prob/entropy/loss error, and the gradients' largest-entry and norm-wise errors (worst tensor)."""
    for section, errors in result.items():
        if section == "layout":
            continue
        grads = [e for k, e in errors.items() if k.startswith("grad/")]
        values = [errors[k][0] for k in ("logp", "entropy", "loss") if k in errors]
        print(f"{section}: logp/entropy/loss {max(values):.1e}" + (
            f", gradients {max(e[0] for e in grads):.1e} (norm {max(e[1] for e in grads):.1e})" if grads else ""))


def _check(result: dict, *, mutations: tuple[str, ...] = (), tied: bool = False, grads: bool = True) -> None:
    """Clean sections within tolerance, with every parameter compared; each mutation far off."""
    from real_megatron.megatron.sharding import full_parameter_shapes

    _print_errors(result)
    clean = [s for s in result if s != "layout" and not s.startswith(("mutated/", "floor/"))]
    assert {s.split("/")[0] for s in clean} == {"float32", "float64"}, clean
    for section in clean:
        errors = result[section]
        assert {"logp", "entropy", "loss"} <= set(errors), (section, errors)
        if grads and section.endswith("/train"):  # every parameter of the model, by its full name
            names = set(full_parameter_shapes(dict(TINY_QWEN2, tie_word_embeddings=tied)))
            assert {k[len("grad/"):] for k in errors if k.startswith("grad/")} == names
        _assert_within(section, errors)
    for name in mutations:
        sections = [s for s in result if s.startswith(f"mutated/{name}")]
        assert sections, name
        for section in sections:
            assert max(e[0] for e in result[section].values()) > MUTATED, (section, result[section])


@pytest.fixture()
def one_process():
    from real_megatron.megatron.model import initialize_parallel

    initialize_parallel(tp=1, pp=1, cp=1, seed=7)
    torch.set_num_threads(1)
    yield


def test_gpt_model_one_process_packed_rows(one_process):
    # packed rows through run_packed, temperature 0.7, untied output layer, DDP-wrapped (main_grad)
    result = worker.model_mode(worker.parse(["--mutate", "chunk,tied"]))
    _check(result, mutations=("chunk", "tied"))


def test_gpt_model_one_process_unpacked_tied_temperature_1(one_process):
    # [2, S] rows (plain causal mask), tied embedding: the fused gradient lands on the embedding weight
    result = worker.model_mode(worker.parse(["--unpacked", "--tied", "--temperature", "1.0", "--mutate", "tied"]))
    assert result["layout"]["shapes"][0][0] == 2
    _check(result, mutations=("tied",), tied=True)


def test_output_hidden_states_restores_the_output_layer(one_process):
    from real_megatron.megatron.fused_output import output_hidden_states, output_weight
    from real_megatron.megatron.model import build_model

    model = build_model(TINY_QWEN2, transformer_impl="local", wrap_ddp=True)[0]
    ids = torch.randint(0, 300, (1, 10))
    pos = torch.arange(10)[None]
    with torch.no_grad(), output_hidden_states(model):
        hidden = model(ids, pos, None)
    assert hidden.shape == (10, 1, TINY_QWEN2["hidden_size"]) and hidden.is_contiguous()
    with torch.no_grad():
        logits = model(ids, pos, None)  # the output layer is back
        assert logits.shape == (1, 10, 384)
        assert torch.allclose(logits[0], hidden[:, 0] @ output_weight(model).t(), atol=1e-5)
    assert "forward" not in fo.unwrap(model).output_layer.__dict__


# ------------------------------------------------------------------- several processes (torchrun)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(tmp_path: Path, nproc: int, *args: str) -> dict:
    out = tmp_path / f"fused-{nproc}-{'-'.join(a.strip('-') for a in args) or 'plain'}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), str(WORKER), *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_tensor_parallel_2(tmp_path):
    result = run_worker(tmp_path, 2, "--tp", "2", "--mutate", "tp_stats,tp_dgrad")
    assert result["layout"]["tp"] == 2
    _check(result, mutations=("tp_stats", "tp_dgrad"))


@pytest.mark.slow
def test_tensor_parallel_2_with_and_without_sequence_parallel_on_megatrons_output_layer(tmp_path):
    # the local layer spec refuses SP on the CPU (its norms), so SP runs on ColumnParallelLinear itself;
    # vocabulary 200 of 512 leaves rank 1's slice all padding
    result = run_worker(tmp_path, 2, "--layer", "--mutate", "tp_stats,tp_dgrad")
    _print_errors(result)
    clean = [s for s in result if s != "layout" and not s.startswith("mutated/")]
    assert len(clean) == 8  # 2 dtypes × SP on/off × 2 vocabularies
    for section in clean:
        assert set(result[section]) == {"logp", "entropy", "loss", "grad/hidden", "grad/weight"}
        _assert_within(section, result[section])
    for name in ("tp_stats", "tp_dgrad"):
        for sp in (False, True):
            section = result[f"mutated/{name}/sp={sp},vocab=300"]
            assert max(e[0] for e in section.values()) > MUTATED, (name, sp, section)


@pytest.mark.slow
def test_pipeline_parallel_2_tied_embeddings(tmp_path):
    # the last stage's copy of the embedding gets the fused gradient; finalize_model_grads adds it to
    # the first stage's embedding gradient (compared after that), and dropping it is caught
    result = run_worker(tmp_path, 2, "--pp", "2", "--tied", "--mutate", "tied")
    assert result["layout"]["pp"] == 2
    _check(result, mutations=("tied",), tied=True)
    assert result["mutated/tied"]["grad/embedding.word_embeddings.weight"][0] > MUTATED


@pytest.mark.slow
def test_data_parallel_2(tmp_path):
    result = run_worker(tmp_path, 2)
    assert result["layout"]["dp"] == 2
    _check(result)


@pytest.mark.slow
def test_context_parallel_2_rows(tmp_path):
    # the op is per token: a CP rank's rows are just fewer tokens; what CP adds is the loss's reduction
    result = run_worker(tmp_path, 2, "--cp")
    _print_errors(result)
    assert result["layout"]["cp"] == 2
    for dtype in ("float32", "float64"):
        errors = result[f"{dtype}/cp"]
        assert set(errors) == {"logp", "entropy", "loss", "grad/hidden", "grad/weight"}
        _assert_within(f"{dtype}/cp", errors)
