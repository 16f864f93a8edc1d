"""SGLangEngine against the schema-checking stand-in server (tests/sglang_standin.py), on the CPU.

What these tests establish: every request the adapter sends is one SGLang 0.5.x accepts (field
names, JSON types, one sampling-params dict per batch item, one serialized payload per TP rank,
the weight-update session when the server version needs it), the replies are turned into
prompt-major Completions with EOS kept, and weights really arrive (tensor path as serialized
bytes, distributed path as real broadcasts in a gloo group). What they cannot establish: real
SGLang sampling, CUDA IPC handles, NCCL, memory-saver behaviour: those need a GPU machine.
"""
from __future__ import annotations

import json
import socket
import sys
import types
import urllib.request
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sglang_standin  # noqa: E402
from real_megatron.rollout.base import RolloutEngineError, SamplingParams  # noqa: E402
from real_megatron.rollout.sglang_engine import (  # noqa: E402
    SGLangEngine,
    SGLangError,
    bucket_named_tensors,
    logprob_mismatch,
    parse_version,
    serialize_named_tensors_torch,
)

EOS = 2


@pytest.fixture
def start_standin():
    """Start stand-in servers (``start_standin(version=..., params=...) -> (state, url)``); all stop at teardown."""
    servers = []

    def start(**kwargs):
        kwargs.setdefault("eos", EOS)
        server, state, url = sglang_standin.start_in_thread(**kwargs)
        servers.append(server)
        return state, url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def standin(start_standin):
    return start_standin()


def make_engine(url, **kw):
    kw.setdefault("eos_token_id", EOS)
    kw.setdefault("serializer", serialize_named_tensors_torch)
    kw.setdefault("health_timeout_s", 5)
    return SGLangEngine(url, **kw)


def paths(state, prefix="/"):
    return [r["path"] for r in state.requests if r["path"].startswith(prefix)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


# ----------------------------------------------------------------------------- generation


def test_generate_is_prompt_major_and_batched(standin):
    state, url = standin
    eng = make_engine(url, max_prompts_per_request=2)
    out = eng.generate(PROMPTS, n=4, sampling=SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=6, seed=3))
    assert len(out) == 12
    assert [c.prompt_index for c in out] == [0] * 4 + [1] * 4 + [2] * 4
    # 3 prompts at most 2 per request -> two /generate calls, each with exactly the fields SGLang knows
    gens = [r for r in state.requests if r["path"] == "/generate"]
    assert len(gens) == 2
    assert all(r["fields"] == ["input_ids", "return_logprob", "sampling_params"] for r in gens)
    # n completions of one prompt must differ (one sampling_seed per completion, not n copies)
    assert len({tuple(c.token_ids) for c in out[:4]}) == 4
    for c in out:
        assert c.finish_reason in ("stop", "length")
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        assert 1 <= len(c.token_ids) <= 6


def test_eos_is_kept_and_length_finishes_at_max_new_tokens(standin):
    state, url = standin
    eng = make_engine(url)
    out = eng.generate([[i, i + 1] for i in range(3, 23)], n=2, sampling=SamplingParams(max_new_tokens=5, seed=0))
    stops = [c for c in out if c.finish_reason == "stop"]
    lengths = [c for c in out if c.finish_reason == "length"]
    assert stops and lengths, "the stand-in should produce both finish reasons over 40 completions"
    assert all(c.token_ids[-1] == EOS for c in stops)  # the loss trains on EOS
    assert all(EOS not in c.token_ids[:-1] for c in stops)
    assert all(len(c.token_ids) == 5 and c.token_ids[-1] != EOS for c in lengths)


def test_seed_reproducibility(standin):
    _, url = standin
    eng = make_engine(url)
    a = eng.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=11))
    b = eng.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=11))
    c = eng.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=12))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_seeds_stay_unique_across_request_chunks(standin):
    state, url = standin
    eng = make_engine(url, max_prompts_per_request=1)
    chunked = eng.generate([[5, 6], [5, 6]], 2, SamplingParams(max_new_tokens=8, seed=1))
    whole = make_engine(url).generate([[5, 6], [5, 6]], 2, SamplingParams(max_new_tokens=8, seed=1))
    # the same prompt twice must not repeat its samples because it landed in another request
    assert len({tuple(c.token_ids) for c in chunked}) == 4
    assert [c.token_ids for c in chunked] == [c.token_ids for c in whole]


def test_bad_prompts_are_rejected_before_any_request(standin):
    state, url = standin
    eng = make_engine(url)
    with pytest.raises(ValueError, match="prompt 1"):
        eng.generate([[1, 2], []], 2, SamplingParams())
    with pytest.raises(ValueError, match="n must be"):
        eng.generate([[1, 2]], 0, SamplingParams())
    assert paths(state, "/generate") == []


# ----------------------------------------------------------------------------- schema violations


def test_unknown_sampling_field_surfaces_as_clear_error(standin, monkeypatch):
    _, url = standin
    eng = make_engine(url)
    real = SGLangEngine._sampling_dicts

    def typo(self, sampling, count):
        return [dict(d, tempreature=0.5) for d in real(self, sampling, count)]

    monkeypatch.setattr(SGLangEngine, "_sampling_dicts", typo)
    with pytest.raises(SGLangError, match=r"/generate -> HTTP 400.*tempreature"):
        eng.generate(PROMPTS, 2, SamplingParams())


def test_mistyped_and_missing_weight_fields_are_refused(standin):
    _, url = standin
    eng = make_engine(url)
    with pytest.raises(SGLangError, match="master_port"):
        eng._http.post("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": "29500",
                                                      "rank_offset": 1, "world_size": 2})
    with pytest.raises(SGLangError, match="missing required field 'shapes'"):
        eng._http.post("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"]})


def test_malformed_and_aborted_outputs_are_errors():
    with pytest.raises(SGLangError, match="output 3 is malformed"):
        SGLangEngine._to_completion({"output_ids": [1]}, 0, 3)
    with pytest.raises(SGLangError, match="aborted output 0"):
        SGLangEngine._to_completion({"output_ids": [1], "meta_info": {"finish_reason": {"type": "abort",
                                                                                      "message": "oom"}}}, 0, 0)
    # a stop whose matched EOS is not in output_ids gets it appended (no log-prob for it)
    c = SGLangEngine._to_completion({"output_ids": [4, 5], "meta_info": {
        "finish_reason": {"type": "stop", "matched": EOS},
        "output_token_logprobs": [[-0.1, 4, None], [-0.2, 5, None]]}}, 1, 0)
    assert c.token_ids == [4, 5, EOS] and c.finish_reason == "stop" and c.logprobs is None


# ----------------------------------------------------------------------------- weight sync


PARAMS = {"model.embed_tokens.weight": [16, 4], "model.norm.weight": [4], "lm_head.weight": [16, 4]}


def named(scale=1.0):
    g = torch.Generator().manual_seed(0)
    return [(n, torch.randn(*s, generator=g) * scale) for n, s in PARAMS.items()]


def test_tensor_update_in_session_bucketed(start_standin):
    state, url = start_standin(version="0.5.21", params=PARAMS)
    eng = make_engine(url, bucket_bytes=300)  # 256 B + 16 B + 256 B -> buckets [embed, norm] [lm_head]
    before = eng.generate(PROMPTS, 1, SamplingParams(max_new_tokens=8, seed=0))
    weights = named()
    eng.update_weights(weights)
    seq = [p for p in paths(state) if p != "/generate"]
    assert seq == ["/begin_weight_update", "/update_weights_from_tensor", "/update_weights_from_tensor",
                   "/end_weight_update", "/flush_cache"]
    assert not state.session_open and state.weight_version == "step-1"
    for name, tensor in weights:
        assert state.weight_shapes[name] == list(tensor.shape)
        assert torch.allclose(torch.tensor(state.weights[name]), tensor.flatten())
    assert eng.stats["weight_buckets"] == 2 and eng.stats["weight_updates"] == 1
    after = eng.generate(PROMPTS, 1, SamplingParams(max_new_tokens=8, seed=0))
    assert [c.token_ids for c in before] != [c.token_ids for c in after]  # the new weights took effect


def test_tensor_update_sends_one_payload_per_tp_rank(start_standin):
    state, url = start_standin(version="0.5.21", params=PARAMS, tp_size=2)
    make_engine(url, tp_size=2).update_weights(named())
    assert "model.norm.weight" in state.weights
    # and a tp_size mismatch is refused by the server with a message naming the TP size
    with pytest.raises(SGLangError, match="one per TP rank"):
        make_engine(url, tp_size=1).update_weights(named())
    assert not state.session_open  # the failed update still closed its session


def test_wrong_shape_names_the_parameter_and_closes_the_session(start_standin):
    state, url = start_standin(version="0.5.21", params=PARAMS)
    bad = [("model.norm.weight", torch.zeros(5))]
    with pytest.raises(SGLangError, match=r"model\.norm\.weight has shape \[5\]"):
        make_engine(url).update_weights(bad)
    assert not state.session_open
    assert "/end_weight_update" in paths(state)


def test_old_server_gets_no_session(start_standin):
    state, url = start_standin(version="0.5.20")
    eng = make_engine(url)
    assert not eng.uses_weight_update_session()
    eng.update_weights(named())
    assert "/begin_weight_update" not in paths(state) and "/end_weight_update" not in paths(state)
    # forcing a session on a server without the routes is an error that says how to fix it
    with pytest.raises(SGLangError, match="weight_update_session=False"):
        make_engine(url, weight_update_session=True).update_weights(named())


def test_sessionless_update_on_new_server_is_refused_with_hint(start_standin):
    state, url = start_standin(version="0.5.21")
    with pytest.raises(SGLangError, match="weight_update_session=True"):
        make_engine(url, weight_update_session=False).update_weights(named())


def test_version_parsing():
    assert parse_version("0.5.21") == (0, 5, 21)
    assert parse_version("v0.5.21rc1") == (0, 5, 21)
    assert parse_version("0.5.3.post1") == (0, 5, 3)
    assert parse_version("") == ()


@pytest.fixture
def standin_process():
    """The stand-in in its own process: the NCCL path's group joins two processes, as in real use."""
    with sglang_standin.running_process("--version", "0.5.21", "--eos", str(EOS),
                                        *[f"--param={n}:{'x'.join(map(str, s))}" for n, s in PARAMS.items()]) as url:
        yield url


def remote_state(url):
    with urllib.request.urlopen(url + "/standin/state") as resp:
        return json.loads(resp.read())


def test_distributed_update_broadcasts_in_a_real_gloo_group(standin_process):
    url = standin_process
    eng = make_engine(url, weight_sync="distributed", bucket_bytes=300, health_timeout_s=30)
    with pytest.raises(SGLangError, match="init_weights_update_group"):
        eng.update_weights(named())  # no group yet
    eng.init_weights_update_group("127.0.0.1", free_port(), backend="gloo", timeout_s=30)
    weights = named(scale=3.0)
    weights[1] = ("model.norm.weight", weights[1][1].to(torch.bfloat16))  # dtype travels in the request
    eng.update_weights(weights)
    state = remote_state(url)
    assert state["group_backend"] == "gloo"
    dist_reqs = [r for r in state["requests"] if r["path"] == "/update_weights_from_distributed"]
    assert len(dist_reqs) == 2  # two buckets, each: names/dtypes/shapes then the broadcasts
    assert all("error" not in r for r in dist_reqs)
    for name, tensor in weights:
        assert torch.allclose(torch.tensor(state["weights"][name]), tensor.float().flatten())
    assert not state["session_open"] and state["weight_version"] == "step-2"
    eng.close()


def test_distributed_group_refusal_is_reported_without_hanging(start_standin):
    state, url = start_standin(version="0.5.21")
    eng = make_engine(url, weight_sync="distributed", tp_size=2)  # stand-in emulates one worker
    with pytest.raises(SGLangError, match="world_size=2 expected"):
        eng.init_weights_update_group("127.0.0.1", free_port(), backend="gloo", timeout_s=5)


def test_buckets_stream_in_order_and_reject_duplicates():
    t = [("a", torch.zeros(10)), ("b", torch.zeros(10)), ("c", torch.zeros(100)), ("d", torch.zeros(1))]
    buckets = list(bucket_named_tensors(iter(t), bucket_bytes=80))
    assert [b.names for b in buckets] == [["a", "b"], ["c"], ["d"]]  # 40+40, oversized alone, rest
    assert [b.nbytes for b in buckets] == [80, 400, 4]
    with pytest.raises(ValueError, match="'a' appears twice"):
        list(bucket_named_tensors([("a", torch.zeros(1)), ("a", torch.zeros(1))], 100))
    with pytest.raises(TypeError, match="pairs"):
        list(bucket_named_tensors([torch.zeros(1)], 100))


# ----------------------------------------------------------------------------- memory, health


def test_release_and_resume_memory(standin):
    state, url = standin
    eng = make_engine(url)
    eng.release_memory(["kv_cache", "weights"])
    assert state.released == {"kv_cache", "weights"}
    with pytest.raises(SGLangError, match="released"):
        eng.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4))
    with pytest.raises(SGLangError, match="resume_memory_occupation"):
        eng.update_weights(named())
    eng.resume_memory(["weights"])
    eng.update_weights(named())  # colocated order: weights back, sync, then the KV cache
    eng.resume_memory(["kv_cache"])
    assert state.released == set()
    assert len(eng.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4))) == 6
    with pytest.raises(SGLangError, match="unknown tag"):
        eng.release_memory(["kv"])


@pytest.mark.parametrize("version,tags", [("0.5.21", ["weights", "kv_cache", "cuda_graph"]),
                                          ("0.5.2", ["weights", "kv_cache"])])
def test_colocated_cycle_releases_what_it_resumes(start_standin, version, tags):
    state, url = start_standin(version=version)
    eng = make_engine(url)
    assert eng.memory_tags() == tags
    eng.release_memory(tags)
    eng.resume_memory(["weights"])
    eng.update_weights(named())
    eng.resume_memory([t for t in tags if t != "weights"])
    assert state.released == set()
    assert len(eng.generate(PROMPTS, 1, SamplingParams(max_new_tokens=2))) == 3
    # what the trainer did before: release everything, resume two tags; generation is refused
    eng.release_memory(None)
    eng.resume_memory(["weights"])
    eng.resume_memory(["kv_cache"])
    with pytest.raises(SGLangError, match="cuda_graph"):
        eng.generate(PROMPTS, 1, SamplingParams(max_new_tokens=2))


def test_unhealthy_server_is_a_rollout_engine_error(standin):
    state, url = standin
    req = urllib.request.Request(url + "/standin/health", data=json.dumps({"ok": False}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
    with pytest.raises(RolloutEngineError, match=r"not healthy after 1s.*HTTP 503.*sglang.launch_server"):
        make_engine(url, health_timeout_s=1)
    state.healthy = True
    assert make_engine(url).health()


def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SGLangError, match=f"{url}.*cannot reach"):
        make_engine(url, health_timeout_s=0.5)
    with pytest.raises(ValueError, match="http://"):
        SGLangEngine("localhost:30000")
    with pytest.raises(ValueError, match="exactly one"):
        SGLangEngine()


# ----------------------------------------------------------------------------- in-process mode


class FakeEngine:
    """Records calls with the keyword names sglang.Engine uses; answers like SGLang's Engine."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False):
        self.calls.append(("generate", len(input_ids)))
        outs = []
        for ids, sp in zip(input_ids, sampling_params):
            toks = [ids[-1] + 1, EOS] if sp["sampling_seed"] % 2 == 0 else [7] * sp["max_new_tokens"]
            reason = {"type": "stop", "matched": EOS} if toks[-1] == EOS else {"type": "length",
                                                                              "length": len(toks)}
            outs.append({"text": "", "output_ids": toks, "meta_info": {
                "finish_reason": reason, "output_token_logprobs": [[-0.5, t, None] for t in toks]}})
        return outs

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update_weights_from_tensor", [n for n, _ in named_tensors], flush_cache))
        return True, "ok"

    def begin_weight_update(self):
        self.calls.append(("begin_weight_update",))
        return True, "ok"

    def end_weight_update(self):
        self.calls.append(("end_weight_update",))
        return True, "ok"

    def flush_cache(self):
        self.calls.append(("flush_cache",))

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release_memory_occupation", tags))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume_memory_occupation", tags))

    def shutdown(self):
        self.calls.append(("shutdown",))


def test_in_process_mode_with_fake_sglang(monkeypatch):
    fake = types.ModuleType("sglang")
    fake.__version__ = "0.5.21"
    fake.Engine = FakeEngine
    monkeypatch.setitem(sys.modules, "sglang", fake)
    eng = SGLangEngine(engine_kwargs={"model_path": "/m", "tp_size": 1}, bucket_bytes=300)
    assert eng.mode == "in_process" and eng._engine.kwargs == {"model_path": "/m", "tp_size": 1}
    out = eng.generate([[3], [4]], 2, SamplingParams(max_new_tokens=3, seed=0))
    assert [c.token_ids for c in out] == [[4, EOS], [7, 7, 7], [5, EOS], [7, 7, 7]]
    assert [c.finish_reason for c in out] == ["stop", "length", "stop", "length"]
    eng.update_weights(named())
    calls = eng._engine.calls
    assert calls[1:] == [("begin_weight_update",),
                         ("update_weights_from_tensor", ["model.embed_tokens.weight", "model.norm.weight"], False),
                         ("update_weights_from_tensor", ["lm_head.weight"], False),
                         ("end_weight_update",), ("flush_cache",)]
    eng.release_memory(["kv_cache"])
    eng.resume_memory(None)
    assert calls[-2:] == [("release_memory_occupation", ["kv_cache"]), ("resume_memory_occupation", None)]
    engine = eng._engine
    eng.close()
    assert engine.calls[-1] == ("shutdown",)
    with pytest.raises(SGLangError, match="closed"):
        eng.release_memory()


def test_in_process_failure_reply_is_an_error(monkeypatch):
    class Refusing(FakeEngine):
        def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
            return False, "shape mismatch for lm_head.weight"

    fake = types.ModuleType("sglang")
    fake.__version__ = "0.5.3"
    fake.Engine = Refusing
    monkeypatch.setitem(sys.modules, "sglang", fake)
    eng = SGLangEngine(engine_kwargs={"model_path": "/m"})
    with pytest.raises(SGLangError, match="lm_head.weight"):
        eng.update_weights(named())
    assert ("begin_weight_update",) not in eng._engine.calls  # 0.5.3: no session


def test_missing_sglang_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)  # import sglang -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\]"):
        SGLangEngine(engine_kwargs={"model_path": "/m"})


# ----------------------------------------------------------------------------- log-prob mismatch


def test_logprob_mismatch_metrics():
    engine = [[-1.0, -2.0], None, [-0.5]]
    trainer = [torch.tensor([-1.5, -2.0]), torch.tensor([-3.0]), [-0.25]]
    m = logprob_mismatch(engine, trainer)
    assert m["rollout/logprob_mismatch_tokens"] == 3
    assert m["rollout/logprob_diff_mean"] == pytest.approx((0.5 + 0 + 0.25) / 3)
    assert m["rollout/logprob_diff_max"] == pytest.approx(0.5)
    assert m["rollout/logprob_diff_signed_mean"] == pytest.approx((0.5 + 0 - 0.25) / 3)
    import math
    expected_p = (abs(math.exp(-1) - math.exp(-1.5)) + 0 + abs(math.exp(-0.5) - math.exp(-0.25))) / 3
    assert m["rollout/prob_diff_mean"] == pytest.approx(expected_p)
    assert logprob_mismatch([None], [[-1.0]]) == {}
    with pytest.raises(ValueError, match="response 0 has 2 engine log-probs but 1"):
        logprob_mismatch([[-1.0, -2.0]], [[-1.0]])
    with pytest.raises(ValueError, match="2 engine responses vs 1"):
        logprob_mismatch([None, None], [[-1.0]])
