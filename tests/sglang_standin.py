"""A local stand-in for an SGLang 0.5.x HTTP server, for testing ``SGLangEngine`` on the CPU.

What it is: a stdlib ``http.server`` on 127.0.0.1 that implements the endpoints
``real_megatron.rollout.sglang_engine`` uses, checks every request body against SGLang 0.5.x's
request schemas (``GenerateReqInput``, ``SamplingParams``, ``UpdateWeightsFromTensorReqInput``,
``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``,
``Release/ResumeMemoryOccupationReqInput``, ``Begin/EndWeightUpdateReqInput``, as read from
SGLang's ``io_struct.py`` / ``http_server.py``) and answers with deterministic fake tokens.

Checked here, each violation answered with HTTP 400 and a message naming the field:
  * unknown fields, missing required fields, wrong JSON types, out-of-range sampling values;
  * ``/generate``: exactly one of ``text`` / ``input_ids``; ``sampling_params`` list length equal
    to the batch; no generation while memory is released;
  * weight updates: outside a ``/begin_weight_update`` ... ``/end_weight_update`` session when
    emulating SGLang >= 0.5.21 (and re-entry / end-without-begin); while weights are released;
    ``serialized_named_tensors`` carrying one payload per TP rank; tensor names, dtypes and shapes
    against the fake model's parameters (``--param NAME:SHAPE``, none declared: anything goes);
  * the NCCL path: ``init_weights_update_group`` really joins a (gloo) process group with the
    trainer, and ``update_weights_from_distributed`` really receives the broadcast tensors.

Outputs are a pure function of (input ids, ``sampling_seed``, position, a checksum of the current
weights), so tests can see that a weight update took effect. EOS (``--eos``) ends some outputs
(``finish_reason {"type": "stop", "matched": eos}``, EOS included in ``output_ids``), the others
run to ``max_new_tokens`` (``{"type": "length"}``).

NOT covered (needs a GPU and real SGLang): real sampling, CUDA IPC serialisation
(``MultiprocessingSerializer``; here tensors travel as base64 ``torch.save`` bytes), NCCL,
memory-saver behaviour, performance.

Run: ``python tests/sglang_standin.py --version 0.5.21 [--tp-size 1] [--eos 2]``; it prints
``PORT <n>`` once listening. ``GET /standin/state`` returns what it has received (for tests).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# -------------------------------------------------------------------- schemas (SGLang 0.5.x)

_ANY = object()
OPT_STR, OPT_INT, OPT_BOOL, OPT_LIST = ("str", None), ("int", None), ("bool", None), ("list", None)

# GenerateReqInput: accepted fields (all optional; exactly one prompt field is required below)
GENERATE_FIELDS = {
    "text", "input_ids", "input_embeds", "image_data", "video_data", "audio_data", "sampling_params", "rid",
    "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob", "return_text_in_logprobs",
    "stream", "log_metrics", "return_hidden_states", "modalities", "session_params", "lora_path", "lora_id",
    "custom_logit_processor", "bootstrap_host", "bootstrap_port", "bootstrap_room", "data_parallel_rank",
    "priority", "extra_key", "no_logs", "custom_labels", "return_bytes", "return_entropy",
}
# SamplingParams.__init__ keyword arguments
SAMPLING_FIELDS = {
    "max_new_tokens": "int", "stop": _ANY, "stop_token_ids": "list", "stop_regex": _ANY, "temperature": "number",
    "top_p": "number", "top_k": "int", "min_p": "number", "frequency_penalty": "number",
    "presence_penalty": "number", "repetition_penalty": "number", "min_new_tokens": "int", "n": "int",
    "json_schema": "str", "regex": "str", "ebnf": "str", "structural_tag": "str", "ignore_eos": "bool",
    "skip_special_tokens": "bool", "spaces_between_special_tokens": "bool", "no_stop_trim": "bool",
    "custom_params": "dict", "stream_interval": "int", "logit_bias": "dict", "sampling_seed": "int",
}
# name -> (required fields {field: type}, optional fields {field: type})
SCHEMAS = {
    "update_weights_from_tensor": (
        {"serialized_named_tensors": "list"},
        {"load_format": "str?", "flush_cache": "bool", "abort_all_requests": "bool", "weight_version": "str?",
         "disable_draft_model": "bool?"}),
    "init_weights_update_group": (
        {"master_address": "str", "master_port": "int", "rank_offset": "int", "world_size": "int"},
        {"group_name": "str", "backend": "str"}),
    "update_weights_from_distributed": (
        {"names": "list", "dtypes": "list", "shapes": "list"},
        {"group_name": "str", "flush_cache": "bool", "abort_all_requests": "bool", "weight_version": "str?",
         "load_format": "str?", "torch_empty_cache": "bool"}),
    "release_memory_occupation": ({}, {"tags": "list?"}),
    "resume_memory_occupation": ({}, {"tags": "list?"}),
    # BeginWeightUpdateReqInput has an optional runner selector in upstream tests; End takes no field
    "begin_weight_update": ({}, {"selector": "str"}),
    "end_weight_update": ({}, {}),
}
MEMORY_TAGS = {"weights", "kv_cache", "cuda_graph"}
DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"}


class BadRequest(Exception):
    pass


def _type_ok(value, kind: str) -> bool:
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "bool": bool, "list": list, "dict": dict}[kind])


def check_fields(endpoint: str, body) -> dict:
    """Required/optional fields and JSON types of one weight/memory endpoint's body."""
    if not isinstance(body, dict):
        raise BadRequest(f"{endpoint}: body must be a JSON object")
    required, optional = SCHEMAS[endpoint]
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise BadRequest(f"{endpoint}: unknown field(s) {unknown}")
    for name in required:
        if name not in body:
            raise BadRequest(f"{endpoint}: missing required field {name!r}")
    for name, value in body.items():
        kind = required.get(name) or optional[name]
        if not _type_ok(value, kind):
            raise BadRequest(f"{endpoint}: field {name!r} must be {kind}, got {type(value).__name__}")
    return body


def _is_ids(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                      for t in x)


def check_sampling(d, where: str) -> None:
    if not isinstance(d, dict):
        raise BadRequest(f"{where}: sampling params must be an object")
    unknown = sorted(set(d) - set(SAMPLING_FIELDS))
    if unknown:
        raise BadRequest(f"{where}: unknown sampling param(s) {unknown}")
    for k, v in d.items():
        kind = SAMPLING_FIELDS[k]
        if kind is not _ANY and v is not None and not _type_ok(v, kind):
            raise BadRequest(f"{where}: sampling param {k!r} must be {kind}, got {type(v).__name__}")
    if d.get("temperature", 1.0) < 0:
        raise BadRequest(f"{where}: temperature must be >= 0")
    if not 0 < d.get("top_p", 1.0) <= 1:
        raise BadRequest(f"{where}: top_p must be in (0, 1]")
    if d.get("max_new_tokens", 128) is not None and d.get("max_new_tokens", 128) < 0:
        raise BadRequest(f"{where}: max_new_tokens must be >= 0")
    if d.get("n", 1) != 1:
        raise BadRequest(f"{where}: this stand-in (like SGLang's input_ids batches) wants n=1; repeat the prompt")
    if "stop_token_ids" in d and d["stop_token_ids"] is not None and not _is_ids(d["stop_token_ids"]):
        raise BadRequest(f"{where}: stop_token_ids must be a list of token ids")


# -------------------------------------------------------------------- server state


class StandIn:
    def __init__(self, *, version: str, tp_size: int, vocab_size: int, eos: int, params: dict | None,
                 legacy_info_path: bool = False):
        self.version = version
        self.tp_size = tp_size
        self.vocab_size = vocab_size
        self.eos = eos
        self.params = params or {}  # name -> shape (declared model parameters; empty: accept any)
        v = tuple(int(p) for p in version.split(".")[:3])
        self.session_required = v >= (0, 5, 21)
        self.lock = threading.Lock()
        self.session_open = False
        self.released: set[str] = set()
        self.weights: dict[str, list] = {}  # name -> flattened values (floats)
        self.weight_shapes: dict[str, list] = {}
        self.weight_version = "initial"
        self.requests: list[dict] = []  # {"path", "fields"[, "body" of /generate]} in arrival order
        self.group = None
        self.group_backend = None
        self.flushes = 0
        self.healthy = True  # tests flip it through POST /standin/health to emulate a 503
        self.legacy_info_path = legacy_info_path  # only the deprecated /get_server_info, as older servers
        self.gets: list[str] = []  # the paths of GET requests, in arrival order

    # deterministic fake generation
    def _checksum(self) -> int:
        h = hashlib.sha256()
        for name in sorted(self.weights):
            h.update(name.encode())
            h.update(json.dumps(self.weights[name][:64]).encode())
        return int.from_bytes(h.digest()[:4], "little") if self.weights else 0

    def fake_output(self, ids: list[int], sp: dict, index: int) -> dict:
        seed = sp.get("sampling_seed", index)
        max_new = sp.get("max_new_tokens", 128)
        stops = set(sp.get("stop_token_ids") or []) | {self.eos}
        base = hashlib.sha256(json.dumps([ids, seed, self._checksum()]).encode()).digest()
        out, lps, reason = [], [], {"type": "length", "length": max_new}
        for pos in range(max_new):
            d = hashlib.sha256(base + pos.to_bytes(4, "little")).digest()
            tok = d[0] * 256 + d[1]
            tok = self.eos if (d[2] % 5 == 0 and pos > 0) else tok % self.vocab_size
            out.append(tok)
            lps.append([-(0.05 + d[3] / 128.0), tok, None])
            if tok in stops and not sp.get("ignore_eos", False):
                reason = {"type": "stop", "matched": tok}
                break
        return {"text": " ".join(f"t{t}" for t in out), "output_ids": out,
                "meta_info": {"id": f"req-{index}", "finish_reason": reason, "prompt_tokens": len(ids),
                              "completion_tokens": len(out), "cached_tokens": 0, "output_token_logprobs": lps,
                              "weight_version": self.weight_version}}

    # endpoints
    def generate(self, body):
        if not isinstance(body, dict):
            raise BadRequest("generate: body must be a JSON object")
        unknown = sorted(set(body) - GENERATE_FIELDS)
        if unknown:
            raise BadRequest(f"generate: unknown field(s) {unknown}")
        if (body.get("text") is None) == (body.get("input_ids") is None):
            raise BadRequest("generate: give exactly one of 'text' or 'input_ids'")
        if body.get("text") is not None:
            raise BadRequest("generate: this stand-in only serves token ids (input_ids)")
        if self.released:
            raise BadRequest(f"generate while memory is released ({sorted(self.released)}); resume first")
        ids = body["input_ids"]
        batch = isinstance(ids, list) and len(ids) > 0 and isinstance(ids[0], list)
        prompts = ids if batch else [ids]
        for i, p in enumerate(prompts):
            if not _is_ids(p):
                raise BadRequest(f"generate: input_ids[{i}] must be a non-empty list of token ids")
        sps = body.get("sampling_params") or {}
        if isinstance(sps, list):
            if not batch or len(sps) != len(prompts):
                raise BadRequest(f"generate: sampling_params is a list of {len(sps)} for {len(prompts)} inputs")
        else:
            sps = [sps] * len(prompts)
        for i, sp in enumerate(sps):
            check_sampling(sp, f"generate: sampling_params[{i}]")
        rl = body.get("return_logprob")
        if rl is not None and not isinstance(rl, (bool, list)):
            raise BadRequest("generate: return_logprob must be a bool or a list of bools")
        if body.get("stream"):
            raise BadRequest("generate: this stand-in does not stream")
        outs = [self.fake_output(p, sp, i) for i, (p, sp) in enumerate(zip(prompts, sps, strict=True))]
        if not rl:
            for o in outs:
                o["meta_info"].pop("output_token_logprobs")
        return outs if batch else outs[0]

    def _weights_writable(self, endpoint):
        if self.session_required and not self.session_open:
            raise BadRequest(f"{endpoint}: SGLang >= 0.5.21 refuses weight updates outside "
                             "/begin_weight_update ... /end_weight_update")
        if "weights" in self.released:
            raise BadRequest(f"{endpoint}: weights are released; resume_memory_occupation(['weights']) first")

    def _store(self, endpoint, name, shape, dtype, values):
        if self.params:
            if name not in self.params:
                raise BadRequest(f"{endpoint}: unknown parameter {name!r}")
            if list(self.params[name]) != list(shape):
                raise BadRequest(f"{endpoint}: {name} has shape {list(shape)}, model expects {self.params[name]}")
        self.weights[name] = values
        self.weight_shapes[name] = list(shape)

    def update_weights_from_tensor(self, body):
        check_fields("update_weights_from_tensor", body)
        self._weights_writable("update_weights_from_tensor")
        payloads = body["serialized_named_tensors"]
        if len(payloads) != self.tp_size:
            raise BadRequest(f"update_weights_from_tensor: serialized_named_tensors has {len(payloads)} entries; "
                             f"one per TP rank expected ({self.tp_size})")
        if not all(isinstance(p, str) for p in payloads):
            raise BadRequest("update_weights_from_tensor: serialized_named_tensors entries must be strings")
        import base64
        import pickle

        import torch.multiprocessing  # noqa: F401 - torch's rebuild functions, as SGLang's unpickler uses them

        try:  # the MultiprocessingSerializer format: base64 of a pickle of [(name, tensor)]
            named = pickle.loads(base64.b64decode(payloads[0]))
        except Exception as err:  # noqa: BLE001
            raise BadRequest(f"update_weights_from_tensor: cannot deserialize payload ({err})") from err
        for name, tensor in named:
            self._store("update_weights_from_tensor", name, list(tensor.shape), str(tensor.dtype),
                        tensor.float().flatten().tolist())
        if body.get("weight_version"):
            self.weight_version = body["weight_version"]
        if body.get("flush_cache", True):
            self.flushes += 1
        return {"success": True, "message": f"updated {len(named)} tensors"}

    def init_weights_update_group(self, body):
        check_fields("init_weights_update_group", body)
        if self.tp_size != 1 or body["rank_offset"] != 1 or body["world_size"] != 2:
            raise BadRequest("init_weights_update_group: this stand-in emulates one worker: rank_offset=1, "
                             f"world_size=2 expected, got rank_offset={body['rank_offset']} "
                             f"world_size={body['world_size']}")
        backend = body.get("backend", "nccl")
        if backend not in ("nccl", "gloo"):
            raise BadRequest(f"init_weights_update_group: backend {backend!r} unknown")
        from real_megatron.rollout.sglang_weights import init_custom_process_group

        # nccl is emulated with gloo on the CPU (the trainer side in tests asks for gloo)
        self.group = init_custom_process_group(backend="gloo", master_address=body["master_address"],
                                               master_port=body["master_port"], rank=body["rank_offset"],
                                               world_size=body["world_size"],
                                               group_name=body.get("group_name", "weight_update_group"),
                                               timeout_s=60)
        self.group_backend = backend
        return {"success": True, "message": "joined"}

    def update_weights_from_distributed(self, body):
        check_fields("update_weights_from_distributed", body)
        self._weights_writable("update_weights_from_distributed")
        if self.group is None:
            raise BadRequest("update_weights_from_distributed: no weight-update group; call "
                             "init_weights_update_group first")
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not (len(names) == len(dtypes) == len(shapes)) or not names:
            raise BadRequest("update_weights_from_distributed: names, dtypes, shapes must be equally long, non-empty")
        for d in dtypes:
            if d not in DTYPES:
                raise BadRequest(f"update_weights_from_distributed: dtype {d!r} unknown")
        import torch
        import torch.distributed as dist

        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise BadRequest(f"update_weights_from_distributed: shape of {name!r} must be a list of ints")
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            dist.broadcast(t, src=0, group=self.group)
            self._store("update_weights_from_distributed", name, shape, dtype, t.float().flatten().tolist())
        if body.get("weight_version"):
            self.weight_version = body["weight_version"]
        return {"success": True, "message": f"updated {len(names)} tensors"}

    def begin_weight_update(self, body):
        check_fields("begin_weight_update", body)
        if body.get("selector", "all") not in ("all", "target", "draft"):
            raise BadRequest(f"begin_weight_update: selector {body['selector']!r} unknown")
        if self.session_open:
            raise BadRequest("begin_weight_update: a weight-update session is already open")
        self.session_open = True
        return {"success": True, "message": "session open"}

    def end_weight_update(self, body):
        check_fields("end_weight_update", body)
        if not self.session_open:
            raise BadRequest("end_weight_update: no weight-update session is open")
        self.session_open = False
        return {"success": True, "message": "session closed"}

    def _memory(self, endpoint, body, release: bool):
        check_fields(endpoint, body)
        tags = body.get("tags")
        tags = set(MEMORY_TAGS) if tags is None else set(tags)
        bad = sorted(tags - MEMORY_TAGS)
        if bad:
            raise BadRequest(f"{endpoint}: unknown tag(s) {bad}; valid: {sorted(MEMORY_TAGS)}")
        if release:
            self.released |= tags
        else:
            self.released -= tags
        return None  # SGLang's memory routes return nothing on success (JSON null)


def make_handler(state: StandIn):
    post_routes = {
        "/generate": state.generate,
        "/update_weights_from_tensor": state.update_weights_from_tensor,
        "/init_weights_update_group": state.init_weights_update_group,
        "/update_weights_from_distributed": state.update_weights_from_distributed,
        "/begin_weight_update": state.begin_weight_update,
        "/end_weight_update": state.end_weight_update,
        "/release_memory_occupation": lambda b: state._memory("release_memory_occupation", b, True),
        "/resume_memory_occupation": lambda b: state._memory("resume_memory_occupation", b, False),
    }
    session_routes = {"/begin_weight_update", "/end_weight_update"}
    unlocked = {"/init_weights_update_group", "/update_weights_from_distributed"}  # block on the group

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, code, obj=None, text=None):
            data = (json.dumps(obj) if text is None else text).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json" if text is None else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if not self.path.startswith("/standin/"):
                with state.lock:
                    state.gets.append(self.path)
            if self.path == "/health":
                return self._send(200 if state.healthy else 503, text="")
            if self.path == "/server_info" and not state.legacy_info_path:
                return self._send(200, {"version": state.version, "tp_size": state.tp_size})
            if self.path == "/get_server_info":
                return self._send(200, {"version": state.version, "tp_size": state.tp_size})
            if self.path == "/flush_cache":
                state.flushes += 1
                return self._send(200, text="Cache flushed.")
            if self.path == "/standin/state":
                with state.lock:
                    return self._send(200, {
                        "requests": state.requests, "weights": state.weights, "weight_shapes": state.weight_shapes,
                        "weight_version": state.weight_version, "session_open": state.session_open,
                        "released": sorted(state.released), "flushes": state.flushes,
                        "group_backend": state.group_backend, "gets": state.gets})
            self._send(404, {"detail": "Not Found"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.path == "/flush_cache":
                with state.lock:
                    state.flushes += 1
                    state.requests.append({"path": "/flush_cache", "fields": []})
                return self._send(200, text="Cache flushed.")
            if self.path == "/standin/health":
                state.healthy = bool(json.loads(raw or b"{}").get("ok", True))
                return self._send(200, {"healthy": state.healthy})
            route = post_routes.get(self.path)
            if route is None:
                return self._send(404, {"detail": "Not Found"})
            if not state.session_required and self.path in session_routes:
                return self._send(404, {"detail": "Not Found"})  # older servers lack these routes
            try:
                body = json.loads(raw) if raw else {}
            except json.JSONDecodeError as err:
                return self._send(400, {"success": False, "message": f"invalid JSON: {err}"})
            entry = {"path": self.path, "fields": sorted(body) if isinstance(body, dict) else None}
            if self.path == "/generate":  # what each server of a pool was asked for
                entry["body"] = body
            try:
                if self.path in unlocked:
                    with state.lock:
                        state.requests.append(entry)
                    result = route(body)
                else:
                    with state.lock:
                        state.requests.append(entry)
                        result = route(body)
            except BadRequest as err:
                entry["error"] = str(err)
                return self._send(400, {"success": False, "message": str(err)})
            self._send(200, result)

    return Handler


def start_in_thread(**kwargs):
    """Serve a StandIn on 127.0.0.1 (free port) from a daemon thread: ``(server, state, url)``.

    Tests use this instead of a subprocess (no second torch import on 2 shared cores); call
    ``server.shutdown(); server.server_close()`` when done.
    """
    defaults = dict(version="0.5.21", tp_size=1, vocab_size=1000, eos=2, params=None)
    defaults.update(kwargs)
    state = StandIn(**defaults)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}"


@contextlib.contextmanager
def running_process(*args: str):
    """Run the stand-in in its own process (``args``: its command-line flags); yields its URL.

    A separate process is what the NCCL path needs: its group joins two processes, as in real use.
    """
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"stand-in did not start: {line!r} "
                               f"{proc.stderr.read() if proc.poll() is not None else ''}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.kill()
        proc.wait(10)


def _parse_param(text: str):
    name, _, shape = text.partition(":")
    return name, [int(s) for s in shape.split("x")] if shape else []


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for real_megatron
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--version", default="0.5.21")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--eos", type=int, default=2)
    p.add_argument("--param", action="append", default=[], help="NAME:DxD declared model parameter")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--legacy-info-path", action="store_true",
                   help="answer only the deprecated /get_server_info (404 on /server_info), as older servers do")
    args = p.parse_args(argv)
    state = StandIn(version=args.version, tp_size=args.tp_size, vocab_size=args.vocab_size, eos=args.eos,
                    params=dict(_parse_param(s) for s in args.param), legacy_info_path=args.legacy_info_path)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(state))
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
