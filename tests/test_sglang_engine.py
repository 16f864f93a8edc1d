"""SGLangEngine against the stand-in server (tests/sglang_standin.py), for what a REAL server cannot
be made to do on demand: answer 503 / hang / send malformed or aborted outputs, emulate another
SGLang version (no weight-update session before 0.5.21, no cuda_graph tag before 0.5.5), refuse a
process group, or run with TP > 1 on the CPU; plus the in-process mode with a fake ``sglang``.
Everything a real server can do is tested against one in tests/test_sglang_real.py.
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
from real_megatron.rollout.sglang_client import SGLangServer, parse_version  # noqa: E402
from real_megatron.rollout.sglang_engine import SGLangEngine, SGLangError, split_prompts  # noqa: E402

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


def test_bad_prompts_are_rejected_before_any_request(standin):
    state, url = standin
    eng = make_engine(url)
    with pytest.raises(ValueError, match="prompt 1"):
        eng.generate([[1, 2], []], 2, SamplingParams())
    with pytest.raises(ValueError, match="n must be"):
        eng.generate([[1, 2]], 0, SamplingParams())
    assert paths(state, "/generate") == []


def test_malformed_and_aborted_outputs_are_errors():
    srv = SGLangServer("http://127.0.0.1:9", health_timeout_s=0)  # never contacted
    with pytest.raises(SGLangError, match=r"127\.0\.0\.1:9 /generate output 3 is malformed"):
        srv._to_completion({"output_ids": [1]}, 0, 3)
    with pytest.raises(SGLangError, match="aborted output 0"):
        srv._to_completion({"output_ids": [1], "meta_info": {"finish_reason": {"type": "abort",
                                                                                      "message": "oom"}}}, 0, 0)
    # a stop whose matched EOS is not in output_ids gets it appended (no log-prob for it)
    c = srv._to_completion({"output_ids": [4, 5], "meta_info": {
        "finish_reason": {"type": "stop", "matched": EOS},
        "output_token_logprobs": [[-0.1, 4, None], [-0.2, 5, None]]}}, 1, 0)
    assert c.token_ids == [4, 5, EOS] and c.finish_reason == "stop" and c.logprobs is None


# ----------------------------------------------------------------------------- weight sync


PARAMS = {"model.embed_tokens.weight": [16, 4], "model.norm.weight": [4], "lm_head.weight": [16, 4]}


def buckets(scale=1.0):
    """Two buckets, as convert.iter_hf_tensors would yield them: [embed, norm], [lm_head]."""
    g = torch.Generator().manual_seed(0)
    pairs = [(n, torch.randn(*s, generator=g) * scale) for n, s in PARAMS.items()]
    return [pairs[:2], pairs[2:]]


def test_tensor_update_sends_one_payload_per_tp_rank(start_standin):
    state, url = start_standin(version="0.5.21", params=PARAMS, tp_size=2)
    make_engine(url, tp_size=2).update_weights(buckets())
    assert "model.norm.weight" in state.weights
    # and a tp_size mismatch is refused by the server with a message naming the TP size
    with pytest.raises(SGLangError, match="one per TP rank"):
        make_engine(url, tp_size=1).update_weights(buckets())
    assert not state.session_open  # the failed update still closed its session


def test_old_server_gets_no_session(start_standin):
    state, url = start_standin(version="0.5.20")
    eng = make_engine(url)
    assert not eng.servers[0].uses_weight_update_session()
    eng.update_weights(buckets())
    assert "/begin_weight_update" not in paths(state) and "/end_weight_update" not in paths(state)
    # forcing a session on a server without the routes is an error that says how to fix it
    with pytest.raises(SGLangError, match="weight_update_session=False"):
        make_engine(url, weight_update_session=True).update_weights(buckets())


def test_version_parsing():
    assert parse_version("0.5.21") == (0, 5, 21)
    assert parse_version("v0.5.21rc1") == (0, 5, 21)
    assert parse_version("0.5.3.post1") == (0, 5, 3)
    assert parse_version("") == ()


def test_distributed_group_refusal_is_reported_without_hanging(start_standin):
    state, url = start_standin(version="0.5.21")
    eng = make_engine(url, weight_sync="distributed", tp_size=2)  # stand-in emulates one worker
    with pytest.raises(SGLangError, match="world_size=2 expected"):
        eng.init_weights_update_group("127.0.0.1", free_port(), backend="gloo", timeout_s=5)


def test_distributed_push_checks_liveness_without_health_and_reports_refusals_at_once(start_standin):
    """Before a broadcast every server's scheduler is asked once (``/server_info``: SGLang answers
    ``/health`` only after generating a token and sleeping a second, which cost every push a second);
    a server that refuses the update is reported while the trainer's broadcast is still blocked,
    not after the group's timeout."""
    import time

    def standin_state(url):
        with urllib.request.urlopen(url + "/standin/state") as resp:
            return json.loads(resp.read())

    params = [f"--param={name}:{'x'.join(map(str, shape))}" for name, shape in PARAMS.items()]
    # its own process: a group joins two processes
    with sglang_standin.running_process("--version=0.5.21", f"--eos={EOS}", *params) as url:
        eng = make_engine(url, weight_sync="distributed")
        eng.init_weights_update_group("127.0.0.1", free_port(), backend="gloo", timeout_s=20)
        eng.update_weights(buckets(1.0))  # the first push also reads the server's version, once
        gets_before = len(standin_state(url)["gets"])
        sent = buckets(2.0)
        eng.update_weights(sent)
        state = standin_state(url)
        assert torch.allclose(torch.tensor(state["weights"]["model.norm.weight"]), sent[0][1][1])  # it arrived
        assert state["gets"][gets_before:] == ["/server_info"]  # the liveness check, and no /health
        # a dtype the stand-in refuses before receiving, while the trainer's broadcast waits for it
        bad = [[("model.norm.weight", torch.ones(4, dtype=torch.int16))]]
        t0 = time.monotonic()
        with pytest.raises(SGLangError, match="update_weights_from_distributed"):
            eng.update_weights(bad)
        assert time.monotonic() - t0 < 10  # the group's timeout is 20 s
        # a second engine in this process forms a group of its own while the first still holds one
        # (a fixed group name made torch refuse it, and the servers then hung waiting for the group)
        second = make_engine(url, weight_sync="distributed")
        try:
            second.init_weights_update_group("127.0.0.1", free_port(), backend="gloo", timeout_s=20)
            assert second.sender.group_name != eng.sender.group_name
            with pytest.raises(SGLangError, match="already formed"):
                second.init_weights_update_group("127.0.0.1", free_port(), backend="gloo", timeout_s=20)
            sent = buckets(3.0)
            second.update_weights(sent)
            assert torch.allclose(torch.tensor(standin_state(url)["weights"]["model.norm.weight"]), sent[0][1][1])
        finally:
            second.close()
            eng.close()
        assert second.sender.group is None and eng.sender.group is None


def test_liveness_check_falls_back_to_the_old_info_path_once(start_standin):
    state, url = start_standin(version="0.5.21", legacy_info_path=True)
    server = SGLangServer(url, health_timeout_s=0)
    server.check_alive()
    server.check_alive()
    assert server.server_version() == (0, 5, 21)
    assert state.gets == ["/server_info", "/get_server_info", "/get_server_info", "/get_server_info"]
    with pytest.raises(SGLangError, match=r"127\.0\.0\.1:9 is not answering.*rollout\.sglang_urls"):
        SGLangServer("http://127.0.0.1:9", health_timeout_s=0).check_alive(1.0)


# ----------------------------------------------------------------------------- memory, health


@pytest.mark.parametrize("version,tags", [("0.5.21", ["weights", "kv_cache", "cuda_graph"]),
                                          ("0.5.2", ["weights", "kv_cache"])])
def test_colocated_cycle_releases_what_it_resumes(start_standin, version, tags):
    state, url = start_standin(version=version)
    eng = make_engine(url)
    assert eng.memory_tags() == tags
    eng.release_memory(tags)
    eng.resume_memory(["weights"])
    eng.update_weights(buckets())
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
    make_engine(url)


def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SGLangError, match=f"{url}.*no usable answer"):
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
        for ids, sp in zip(input_ids, sampling_params, strict=True):
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
    eng = SGLangEngine(engine_kwargs={"model_path": "/m", "tp_size": 1})
    assert eng.servers[0]._engine.kwargs == {"model_path": "/m", "tp_size": 1}
    out = eng.generate([[3], [4]], 2, SamplingParams(max_new_tokens=3, seed=0))
    assert [c.token_ids for c in out] == [[4, EOS], [7, 7, 7], [5, EOS], [7, 7, 7]]
    assert [c.finish_reason for c in out] == ["stop", "length", "stop", "length"]
    eng.update_weights(buckets())
    calls = eng.servers[0]._engine.calls
    assert calls[1:] == [("begin_weight_update",),
                         ("update_weights_from_tensor", ["model.embed_tokens.weight", "model.norm.weight"], False),
                         ("update_weights_from_tensor", ["lm_head.weight"], False),
                         ("end_weight_update",), ("flush_cache",)]
    eng.release_memory(["kv_cache"])
    eng.resume_memory(None)
    assert calls[-2:] == [("release_memory_occupation", ["kv_cache"]), ("resume_memory_occupation", None)]
    engine = eng.servers[0]._engine
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
        eng.update_weights(buckets())
    assert ("begin_weight_update",) not in eng.servers[0]._engine.calls  # 0.5.3: no session


def test_missing_sglang_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)  # import sglang -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\]"):
        SGLangEngine(engine_kwargs={"model_path": "/m"})


# ----------------------------------------------------------------------------- hangs, several servers


def test_a_hung_server_is_an_error_naming_it_after_the_timeout():
    """A server that accepts the connection and never answers (what a real one cannot do on demand)."""
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    accepted = []
    threading.Thread(target=lambda: accepted.extend(listener.accept() for _ in range(2)), daemon=True).start()
    try:
        eng = SGLangEngine(url, eos_token_id=EOS, health_timeout_s=0, request_timeout_s=1.5)
        t0 = time.monotonic()
        with pytest.raises(SGLangError, match=rf"{url} POST /generate: no usable answer.*timed out"):
            eng.generate(PROMPTS, 2, SamplingParams(max_new_tokens=2))
        assert time.monotonic() - t0 < 10
    finally:
        listener.close()


def test_split_prompts_is_contiguous_and_balanced():
    assert split_prompts(5, 2) == [range(0, 2), range(2, 5)]
    assert split_prompts(4, 2) == [range(0, 2), range(2, 4)]
    assert split_prompts(1, 3) == [range(0, 0), range(0, 0), range(0, 1)]
    for p in range(0, 9):
        for e in range(1, 4):
            parts = split_prompts(p, e)
            assert [i for r in parts for i in r] == list(range(p))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_pool_keeps_each_prompts_group_on_one_server_and_the_order(start_standin):
    (s1, u1), (s2, u2) = start_standin(), start_standin()
    eng = make_engine([u1, u2])
    out = eng.generate(PROMPTS, 3, SamplingParams(max_new_tokens=4, seed=5))
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # server 1 got prompt 0 (3 copies), server 2 prompts 1 and 2; seeds follow the global index
    got = {u: [r["body"] for r in s.requests if r["path"] == "/generate"] for u, s in ((u1, s1), (u2, s2))}
    assert [b["input_ids"] for b in got[u1]] == [[PROMPTS[0]] * 3]  # one request per server
    assert [b["input_ids"] for b in got[u2]] == [[PROMPTS[1]] * 3 + [PROMPTS[2]] * 3]
    assert [p["sampling_seed"] for p in got[u2][0]["sampling_params"]] == list(range(5 + 3, 5 + 9))
    single = make_engine(u1).generate(PROMPTS, 3, SamplingParams(max_new_tokens=4, seed=5))
    assert [c.token_ids for c in single] == [c.token_ids for c in out]  # the split changes nothing
    with pytest.raises(ValueError, match="twice"):
        make_engine([u1, u1])


def test_pool_failure_names_the_failing_server(start_standin):
    (_, u1), (s2, u2) = start_standin(), start_standin()
    eng = make_engine([u1, u2])
    req = urllib.request.Request(u2 + "/standin/health", data=json.dumps({"ok": False}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
    s2.released = {"weights"}  # the stand-in refuses generation while weights are released
    with pytest.raises(SGLangError, match=u2.replace(".", r"\.")):
        eng.generate(PROMPTS, 2, SamplingParams(max_new_tokens=2))
