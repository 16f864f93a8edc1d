"""SGLang rollout engine: the :class:`RolloutEngine` interface over an SGLang server or ``sglang.Engine``.

Two ways to reach SGLang (pick with the constructor):

* **HTTP** (``SGLangEngine(url="http://host:30000", ...)``): a server started separately, e.g.
  ``python -m sglang.launch_server --model-path DIR --tp 2 --port 30000``. Used for disaggregated
  rollouts (separate GPUs) and for colocated servers alike.
* **in-process** (``SGLangEngine(engine_kwargs={"model_path": DIR, "tp_size": 1, ...})``):
  ``sglang.Engine`` in this process (lazy import; a clear error when SGLang is not installed).

Endpoints used. Request schemas checked (2026-11) against SGLang's own source:
``python/sglang/srt/managers/io_struct.py`` (``GenerateReqInput``, ``UpdateWeightsFromTensorReqInput``,
``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``,
``Release/ResumeMemoryOccupationReqInput``), ``python/sglang/srt/sampling/sampling_params.py``
(``SamplingParams``, incl. ``sampling_seed``) and ``python/sglang/srt/entrypoints/http_server.py``
(routes, status codes: weight endpoints answer ``{"success", "message"}`` with 200 or 400, the
memory endpoints answer ``null``, ``/health`` 200 or 503). The weight-update session routes
(``/begin_weight_update``, ``/end_weight_update``; ``BeginWeightUpdateReqInput`` /
``EndWeightUpdateReqInput``, both usable with an empty body) came with upstream PRs #28710/#28001
(June 2026) and are absent from the 0.5.3-era snapshot we could read in full; the release that
first enforces them is taken from docs/environment.md §4 (0.5.21) and can be overridden with
``weight_update_session=True/False``.

=================================  =========================================================
``GET  /health``                   liveness (200; 503 while starting or unhealthy)
``GET  /get_server_info``          ``version`` (decides whether the weight-update session is used)
``POST /generate``                 ``input_ids`` (batch), ``sampling_params`` (list, one per
                                   completion, with ``sampling_seed``), ``return_logprob``
``POST /flush_cache``              drop the prefix cache (after new weights)
``POST /begin_weight_update``      SGLang >= 0.5.21: open a weight-update session (body ``{}``)
``POST /end_weight_update``        ... and close it; updates outside a session are refused
``POST /update_weights_from_tensor``        colocated: ``serialized_named_tensors`` (one
                                   serialized bucket per TP rank; CUDA IPC handles), ``flush_cache``
``POST /init_weights_update_group``         separate engines: join an NCCL group with the trainer
                                   (``master_address``, ``master_port``, ``rank_offset``,
                                   ``world_size``, ``group_name``, ``backend``)
``POST /update_weights_from_distributed``   ``names``, ``dtypes``, ``shapes`` of one bucket; the
                                   trainer broadcasts the tensors from rank 0 of that group
``POST /release_memory_occupation`` / ``/resume_memory_occupation``  ``tags`` (``weights``,
                                   ``kv_cache``, ``cuda_graph``), around training when colocated
=================================  =========================================================

Weight sync is bucketed: tensors arrive in HF names and full (unsharded) shape, are grouped into
buckets of at most ``bucket_bytes`` and sent one request per bucket, then the prefix cache is
flushed once. With SGLang >= 0.5.21 all buckets go inside one ``begin``/``end`` session.

What is tested where (say it plainly): every HTTP request this module makes is checked against
SGLang 0.5.x's request schemas by ``tests/sglang_standin.py`` (unknown / missing / mistyped
fields rejected, the session enforced when emulating >= 0.5.21, the NCCL path emulated with a
gloo group and real broadcasts), in ``tests/test_sglang_engine.py`` on the CPU. Real SGLang
(GPU, CUDA IPC serialisation, NCCL) is NOT exercised by the test-suite; the in-process mode's
argument mapping is tested with a fake ``sglang`` module only.

The rollout engine's log-probs are not used by the loss (the trainer recomputes old log-probs
at the sampling temperature, as the paper's authors do). :func:`logprob_mismatch` turns both
into metrics so that a drift between the engine and the trainer is visible in ``metrics.jsonl``.
"""
from __future__ import annotations

import base64
import datetime
import io
import json
import logging
import math
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from real_megatron.rollout.base import Completion, RolloutEngine, RolloutEngineError, SamplingParams

log = logging.getLogger(__name__)

__all__ = [
    "SGLangEngine",
    "SGLangError",
    "WeightBucket",
    "bucket_named_tensors",
    "logprob_mismatch",
    "init_custom_process_group",
    "serialize_named_tensors_torch",
    "deserialize_named_tensors_torch",
    "parse_version",
    "WEIGHT_SESSION_MIN_VERSION",
]

#: first SGLang release whose weight updates must sit inside /begin_weight_update ... /end_weight_update
WEIGHT_SESSION_MIN_VERSION = (0, 5, 21)
# SGLang can release CUDA-graph memory (tag "cuda_graph") since its PR #7873 (autumn 2025); the
# exact release is not pinned down here, so the tag is used from a version safely after it. An older
# server would refuse the unknown tag; a newer one below this line just keeps its graphs resident.
CUDA_GRAPH_TAG_MIN_VERSION = (0, 5, 5)

_DTYPE_NAMES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64",
    torch.int64: "int64", torch.int32: "int32", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
}


class SGLangError(RolloutEngineError):
    """SGLang refused or failed a request, or is unreachable; the message names the endpoint, SGLang's
    answer and, where there is one, the fix. A :class:`RolloutEngineError`, so the trainer handles it
    like any other engine failure."""


def _import_sglang():
    try:
        import sglang  # noqa: F401
    except ImportError as err:  # the GPU extra is not installed (never on the CPU machines)
        raise ImportError(
            "rollout.engine=sglang without rollout.sglang_url needs the `sglang` package in this process "
            "(pip install -e .[gpu] on a GPU machine; SGLang pins its own torch version). Either install it, "
            "point rollout.sglang_url at a running server (python -m sglang.launch_server ...), or use "
            "rollout.engine=embedded.") from err
    return sglang


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.5.21rc1"`` -> ``(0, 5, 21)``; unparsable parts stop the tuple."""
    parts = []
    for piece in str(text).strip().lstrip("v").split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    return tuple(parts)


# ----------------------------------------------------------------------------- buckets


@dataclass
class WeightBucket:
    """Named full tensors sent in one weight-update request."""

    names: list
    tensors: list
    nbytes: int

    @property
    def dtypes(self) -> list[str]:
        return [_DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", "")) for t in self.tensors]

    @property
    def shapes(self) -> list[list[int]]:
        return [list(t.shape) for t in self.tensors]


def bucket_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[WeightBucket]:
    """Group ``(name, tensor)`` pairs in order into buckets of at most ``bucket_bytes``.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. Streaming: only one bucket is
    held at a time, so a trainer can gather its shards tensor by tensor.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    names, tensors, size = [], [], 0
    seen = set()
    for item in named_tensors:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"update_weights expects (name: str, tensor: Tensor) pairs, got {type(item).__name__}")
        name, tensor = item
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in one update")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if names and size + nbytes > bucket_bytes:
            yield WeightBucket(names, tensors, size)
            names, tensors, size = [], [], 0
        names.append(name)
        tensors.append(tensor)
        size += nbytes
    if names:
        yield WeightBucket(names, tensors, size)


# ----------------------------------------------------------------------------- serialisation


def serialize_named_tensors_torch(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """Portable serialiser (``torch.save`` + base64) used with the stand-in server and for CPU tensors.

    Real colocated SGLang expects ``MultiprocessingSerializer`` output (CUDA IPC handles, zero copy);
    that is the default serialiser whenever ``sglang`` imports.
    """
    buf = io.BytesIO()
    torch.save([(n, t.detach().cpu().contiguous()) for n, t in named_tensors], buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def deserialize_named_tensors_torch(text: str) -> list[tuple[str, torch.Tensor]]:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


def _sglang_serializer(named_tensors):
    from sglang.srt.utils import MultiprocessingSerializer  # GPU extra; imported only when used

    return MultiprocessingSerializer.serialize(list(named_tensors), output_str=True)


# ----------------------------------------------------------------------------- process group


def init_custom_process_group(*, backend: str, master_address: str, master_port: int, rank: int, world_size: int,
                              group_name: str, timeout_s: float = 300.0):
    """A process group of the trainer's rank 0 and the SGLang workers, outside the default group.

    Rendezvous over a TCP store at ``master_address:master_port`` (rank 0 hosts it), store prefix
    and group name as SGLang's own ``init_custom_process_group`` uses them, so that both sides
    agree on the keys. When ``sglang`` imports, its helper is used directly (same torch, same
    keys by construction); otherwise this mirror (used with the gloo stand-in in tests).
    """
    try:
        from sglang.srt.utils import init_custom_process_group as sgl_init  # type: ignore
    except ImportError:
        sgl_init = None
    if sgl_init is not None:
        return sgl_init(backend=backend, init_method=f"tcp://{master_address}:{master_port}",
                        world_size=world_size, rank=rank, group_name=group_name,
                        timeout=datetime.timedelta(seconds=timeout_s))
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0), timeout=timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


# ----------------------------------------------------------------------------- metrics


def logprob_mismatch(engine_logprobs: Sequence[Sequence[float] | None],
                     trainer_logprobs: Sequence[Sequence[float] | torch.Tensor],
                     prefix: str = "rollout/") -> dict[str, float]:
    """Rollout-engine vs trainer log-prob mismatch over response tokens (EOS included).

    ``engine_logprobs[k]``: the engine's per-token log-probs of response k (None when the engine
    returned none, such responses are skipped); ``trainer_logprobs[k]``: the trainer's log-probs of
    the same tokens (old policy, logits divided by the sampling temperature). Returns
    ``{prefix+"logprob_diff_mean": mean |Δ|, prefix+"logprob_diff_max": max |Δ|,
    prefix+"logprob_diff_signed_mean": mean (engine - trainer), prefix+"prob_diff_mean":
    mean |p_engine - p_trainer|, prefix+"logprob_mismatch_tokens": tokens compared}``;
    an empty dict when no response has engine log-probs. A length mismatch is an error naming k.
    """
    if len(engine_logprobs) != len(trainer_logprobs):
        raise ValueError(f"logprob_mismatch: {len(engine_logprobs)} engine responses vs {len(trainer_logprobs)} "
                         "trainer responses")
    diffs, pdiffs = [], []
    for k, (e, t) in enumerate(zip(engine_logprobs, trainer_logprobs)):
        if e is None:
            continue
        e_t = torch.as_tensor(list(e) if not isinstance(e, torch.Tensor) else e, dtype=torch.float64).reshape(-1)
        t_t = torch.as_tensor(t, dtype=torch.float64).detach().cpu().reshape(-1)
        if e_t.numel() != t_t.numel():
            raise ValueError(f"logprob_mismatch: response {k} has {e_t.numel()} engine log-probs but "
                             f"{t_t.numel()} trainer log-probs")
        ok = torch.isfinite(e_t) & torch.isfinite(t_t)
        diffs.append((e_t - t_t)[ok])
        pdiffs.append((e_t.exp() - t_t.exp())[ok])
    if not diffs:
        return {}
    d = torch.cat(diffs)
    p = torch.cat(pdiffs)
    if d.numel() == 0:
        return {f"{prefix}logprob_mismatch_tokens": 0.0}
    return {
        f"{prefix}logprob_diff_mean": float(d.abs().mean()),
        f"{prefix}logprob_diff_max": float(d.abs().max()),
        f"{prefix}logprob_diff_signed_mean": float(d.mean()),
        f"{prefix}prob_diff_mean": float(p.abs().mean()),
        f"{prefix}logprob_mismatch_tokens": float(d.numel()),
    }


# ----------------------------------------------------------------------------- backends


class _HTTPBackend:
    """JSON over HTTP with urllib (no extra dependency); errors name the endpoint and the reply."""

    def __init__(self, url: str, timeout_s: float):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"rollout.sglang_url={url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, payload: dict | None = None, *, timeout_s: float | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:2000]
            raise SGLangError(f"SGLang {method} {path} -> HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, OSError) as err:
            raise SGLangError(f"SGLang {method} {path}: cannot reach {self.url} ({err})") from err
        if not body:
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body.decode("utf-8", "replace")

    def post(self, path, payload=None, **kw):
        return self.request("POST", path, {} if payload is None else payload, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)


def _check_success(path: str, reply) -> None:
    """SGLang's weight endpoints answer ``{"success": bool, "message": str}`` (HTTP 200 or 400)."""
    if isinstance(reply, dict) and reply.get("success") is False:
        raise SGLangError(f"SGLang {path} failed: {reply.get('message', reply)}")


# ----------------------------------------------------------------------------- the engine


class SGLangEngine(RolloutEngine):
    """Rollouts from SGLang and weight sync into it.

    Args:
        url: base URL of a running SGLang server (HTTP mode). Exactly one of ``url`` /
            ``engine_kwargs`` is given.
        engine_kwargs: keyword arguments of ``sglang.Engine`` (in-process mode), e.g.
            ``{"model_path": dir, "tp_size": 1, "mem_fraction_static": 0.5, "enable_memory_saver": True}``.
        eos_token_id: int or list of ints sent as ``stop_token_ids`` (SGLang also stops at the
            model's own EOS). The EOS token is part of the returned response, as the loss needs.
        weight_sync: ``"tensor"`` (colocated: ``update_weights_from_tensor``) or ``"distributed"``
            (separate engines: NCCL broadcast after :meth:`init_weights_update_group`).
        bucket_bytes: largest weight bucket per request (default 512 MiB).
        weight_update_session: True / False, or None to decide from the server's version
            (>= 0.5.21 needs ``/begin_weight_update`` ... ``/end_weight_update``).
        tp_size: the server's tensor-parallel size (``update_weights_from_tensor`` carries one
            serialized payload per TP rank).
        serializer: turns a bucket's ``[(name, tensor)]`` into the string SGLang deserialises; by
            default SGLang's ``MultiprocessingSerializer`` (CUDA IPC), which needs ``sglang``
            importable in the trainer process (it is, when colocated). Tests pass
            :func:`serialize_named_tensors_torch`.
        max_prompts_per_request: split one ``generate`` call into several ``/generate`` requests
            of at most this many prompts (0: one request).
        request_timeout_s: HTTP timeout of generate / weight requests.
        health_timeout_s: HTTP mode: wait up to this long for ``/health`` to answer 200 before
            the constructor returns (a server still loading its model answers 503); an
            :class:`SGLangError` naming the URL when it never does. 0 skips the check.
    """

    def __init__(self, url: str | None = None, *, engine_kwargs: dict | None = None, eos_token_id=None,
                 weight_sync: str = "tensor", bucket_bytes: int = 512 << 20, weight_update_session: bool | None = None,
                 tp_size: int = 1, serializer: Callable | None = None, max_prompts_per_request: int = 0,
                 request_timeout_s: float = 3600.0, weight_version_prefix: str = "step-",
                 health_timeout_s: float = 60.0):
        if (url is None) == (engine_kwargs is None):
            raise ValueError("SGLangEngine needs exactly one of url= (HTTP server) or engine_kwargs= (in-process)")
        if weight_sync not in ("tensor", "distributed"):
            raise ValueError(f"weight_sync={weight_sync!r}; choose 'tensor' (colocated) or 'distributed' (NCCL)")
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        self.weight_sync = weight_sync
        self.bucket_bytes = int(bucket_bytes)
        self.tp_size = int(tp_size)
        self.max_prompts_per_request = int(max_prompts_per_request)
        if eos_token_id is None:
            self.stop_token_ids = None
        else:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            self.stop_token_ids = [int(i) for i in ids]
        self._serializer = serializer
        self._http = _HTTPBackend(url, request_timeout_s) if url is not None else None
        self._engine = None
        if engine_kwargs is not None:
            sglang = _import_sglang()
            self._engine = sglang.Engine(**engine_kwargs)
        self._session = weight_update_session
        self._version: tuple[int, ...] | None = None  # the server's, once known (asked for by several decisions)
        self._group = None  # trainer side of the NCCL weight-update group
        self._group_name = None
        self._weight_version = 0
        self._weight_version_prefix = weight_version_prefix
        self.stats = {"weight_updates": 0, "weight_buckets": 0, "weight_bytes": 0}
        self._closed = False
        if self._http is not None and health_timeout_s > 0:
            self.wait_healthy(health_timeout_s)

    # ------------------------------------------------------------------ plumbing

    @property
    def mode(self) -> str:
        return "http" if self._http is not None else "in_process"

    def _call(self, endpoint: str, payload: dict | None = None):
        """POST ``/endpoint`` (HTTP) or call ``engine.endpoint(**payload)`` (in-process)."""
        if self._closed:
            raise SGLangError(f"SGLangEngine is closed; cannot call {endpoint}")
        if self._http is not None:
            reply = self._http.post("/" + endpoint, payload)
        else:
            method = getattr(self._engine, endpoint, None)
            if method is None:
                raise SGLangError(f"this sglang.Engine has no {endpoint}(); upgrade SGLang or use HTTP mode")
            reply = method(**(payload or {}))
            if isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[0], bool):
                reply = {"success": reply[0], "message": reply[1]}
        _check_success("/" + endpoint, reply)
        return reply

    def health(self) -> bool:
        """True when the server answers ``/health`` (in-process: always True)."""
        if self._http is None:
            return True
        try:
            self._http.get("/health", timeout_s=10)
            return True
        except SGLangError:
            return False

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Block until ``/health`` answers 200; raise :class:`SGLangError` (URL, last answer, fix) otherwise."""
        import time

        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            try:
                self._http.get("/health", timeout_s=max(1.0, min(10.0, timeout_s)))
                return
            except SGLangError as err:
                last = err
            if time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
        raise SGLangError(
            f"SGLang server at {self._http.url} is not healthy after {timeout_s:g}s ({last}). Start it with "
            "`python -m sglang.launch_server --model-path DIR --port PORT` and check rollout.sglang_url, or use "
            "rollout.engine=embedded.")

    def server_version(self) -> tuple[int, ...] | None:
        if self._version is None:
            self._version = self._query_version()
        return self._version

    def _query_version(self) -> tuple[int, ...] | None:
        if self._http is not None:
            try:
                info = self._http.get("/get_server_info", timeout_s=30)
            except SGLangError:
                return None
            return parse_version(info.get("version", "")) if isinstance(info, dict) else None
        try:
            import sglang

            return parse_version(getattr(sglang, "__version__", ""))
        except ImportError:
            return None

    def uses_weight_update_session(self) -> bool:
        """Whether weight updates are wrapped in begin/end (decided once, from the version)."""
        if self._session is None:
            version = self.server_version()
            self._session = bool(version) and version >= WEIGHT_SESSION_MIN_VERSION
            log.info("SGLang version %s: weight-update session %s", version, "on" if self._session else "off")
        return self._session

    # ------------------------------------------------------------------ generation

    def _sampling_dicts(self, sampling: SamplingParams, count: int) -> list[dict]:
        base = {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
                "max_new_tokens": int(sampling.max_new_tokens), "skip_special_tokens": False, "no_stop_trim": True}
        if self.stop_token_ids:
            base["stop_token_ids"] = list(self.stop_token_ids)
        out = []
        for i in range(count):
            d = dict(base)
            if getattr(sampling, "seed", None) is not None:
                # one seed per completion: the same prompt repeated n times must not give n copies
                d["sampling_seed"] = int(sampling.seed) + i
            out.append(d)
        return out

    def generate(self, prompt_token_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        """``n`` completions per prompt, prompt-major (``len == len(prompts) * n``), with log-probs."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        for i, ids in enumerate(prompt_token_ids):
            if not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise ValueError(f"prompt {i}: token ids must be a non-empty list of non-negative ints")
        step = self.max_prompts_per_request or max(1, len(prompt_token_ids))
        completions: list[Completion] = []
        for start in range(0, len(prompt_token_ids), step):
            chunk = prompt_token_ids[start:start + step]
            input_ids = [list(ids) for ids in chunk for _ in range(n)]
            params = self._sampling_dicts(sampling, len(input_ids))
            if getattr(sampling, "seed", None) is not None:
                for j, d in enumerate(params):  # seeds unique across chunks
                    d["sampling_seed"] = int(sampling.seed) + start * n + j
            payload = {"input_ids": input_ids, "sampling_params": params, "return_logprob": True}
            if self._http is not None:
                reply = self._http.post("/generate", payload)
            else:
                reply = self._engine.generate(**payload)
            if isinstance(reply, dict):
                reply = [reply]
            if not isinstance(reply, list) or len(reply) != len(input_ids):
                got = len(reply) if isinstance(reply, list) else type(reply).__name__
                raise SGLangError(f"SGLang /generate returned {got} outputs for {len(input_ids)} inputs")
            for j, out in enumerate(reply):
                completions.append(self._to_completion(out, start + j // n, j))
        return completions

    @staticmethod
    def _to_completion(out: dict, prompt_index: int, j: int) -> Completion:
        try:
            meta = out["meta_info"]
            finish = meta.get("finish_reason") or {}
            ftype = finish.get("type") if isinstance(finish, dict) else str(finish)
            token_ids = out.get("output_ids")
            raw_lp = meta.get("output_token_logprobs")
        except (KeyError, AttributeError, TypeError) as err:
            raise SGLangError(f"SGLang /generate output {j} is malformed ({err!r}): {str(out)[:500]}") from err
        if ftype == "abort":
            raise SGLangError(f"SGLang aborted output {j}: {finish.get('message', finish)}")
        if token_ids is None:
            if not raw_lp:
                raise SGLangError(f"SGLang /generate output {j} has neither output_ids nor output_token_logprobs")
            token_ids = [int(entry[1]) for entry in raw_lp]
        token_ids = [int(t) for t in token_ids]
        logprobs = None
        if raw_lp is not None:
            logprobs = [float(entry[0]) if entry[0] is not None else math.nan for entry in raw_lp]
            if len(logprobs) != len(token_ids):
                logprobs = None
        if ftype == "stop" and isinstance(finish.get("matched"), int) and (not token_ids or token_ids[-1] != finish["matched"]):
            token_ids.append(int(finish["matched"]))  # keep the EOS the loss needs; no log-prob for it
            logprobs = None
        reason = {"stop": "stop", "length": "length"}.get(ftype, str(ftype))
        return Completion(prompt_index=prompt_index, token_ids=token_ids, logprobs=logprobs, finish_reason=reason)

    # ------------------------------------------------------------------ memory

    def memory_tags(self) -> list[str]:
        """The memory tags this server can release: ``weights``, ``kv_cache`` (+ ``cuda_graph`` on new versions).

        Colocated training releases exactly these and resumes exactly these (``weights`` first, then
        the rest): releasing with ``tags=None`` would also free tags the caller does not know to
        resume, and the next generation would be refused.
        """
        version = self.server_version()
        tags = ["weights", "kv_cache"]
        if version and version >= CUDA_GRAPH_TAG_MIN_VERSION:
            tags.append("cuda_graph")
        return tags

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free the engine's GPU memory before training (None: every tag the server has)."""
        self._call("release_memory_occupation", {"tags": list(tags) if tags is not None else None})

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Re-occupy GPU memory. Colocated order: ``["weights"]``, sync weights, then the other released tags."""
        self._call("resume_memory_occupation", {"tags": list(tags) if tags is not None else None})

    def flush_cache(self) -> None:
        if self._http is not None:
            self._http.post("/flush_cache", None)
        else:
            self._engine.flush_cache()

    # ------------------------------------------------------------------ weights

    def init_weights_update_group(self, master_address: str, master_port: int, *, engine_world_size: int | None = None,
                                  group_name: str = "weight_update_group", backend: str = "nccl",
                                  timeout_s: float = 300.0) -> None:
        """Separate engines: form a group {trainer rank 0 (rank 0), SGLang ranks 1..W} for broadcasts.

        Call on the trainer's rank 0 only. The HTTP request blocks until the server's workers have
        joined, so it runs in a thread while this process joins the group as rank 0.
        """
        if self.weight_sync != "distributed":
            raise SGLangError("init_weights_update_group is for weight_sync='distributed'")
        world = 1 + int(engine_world_size or self.tp_size)
        payload = {"master_address": master_address, "master_port": int(master_port), "rank_offset": 1,
                   "world_size": world, "group_name": group_name, "backend": backend}
        errors: list[BaseException] = []

        def remote():
            try:
                self._call("init_weights_update_group", payload)
            except BaseException as err:  # re-raised below
                errors.append(err)

        thread = threading.Thread(target=remote, daemon=True)
        thread.start()
        # a refused request (bad field, wrong world size) answers at once; joining the group first
        # would then hang until the rendezvous timeout instead of showing SGLang's message
        thread.join(0.5)
        if errors:
            raise SGLangError(f"init_weights_update_group failed: {errors[0]}") from errors[0]
        try:
            self._group = init_custom_process_group(backend=backend, master_address=master_address,
                                                    master_port=master_port, rank=0, world_size=world,
                                                    group_name=group_name, timeout_s=timeout_s)
        finally:
            thread.join(timeout_s)
        if errors:
            raise SGLangError(f"init_weights_update_group failed: {errors[0]}") from errors[0]
        self._group_name = group_name

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push new weights (HF names, full tensors) into SGLang, bucket by bucket, then flush the cache."""
        session = self.uses_weight_update_session()
        self._weight_version += 1
        version = f"{self._weight_version_prefix}{self._weight_version}"
        if session:
            try:
                self._call("begin_weight_update", {})
            except SGLangError as err:
                raise SGLangError(
                    f"{err}. This server has no usable weight-update session; if it predates SGLang "
                    f"{'.'.join(map(str, WEIGHT_SESSION_MIN_VERSION))}, pass weight_update_session=False") from err
        ok = False
        try:
            for bucket in bucket_named_tensors(named_tensors, self.bucket_bytes):
                if self.weight_sync == "tensor":
                    self._send_tensor_bucket(bucket, version)
                else:
                    self._send_distributed_bucket(bucket, version)
                self.stats["weight_buckets"] += 1
                self.stats["weight_bytes"] += bucket.nbytes
            ok = True
        except SGLangError as err:
            if not session and "begin_weight_update" in str(err):
                raise SGLangError(f"{err}. The server wants a weight-update session (SGLang >= "
                                  f"{'.'.join(map(str, WEIGHT_SESSION_MIN_VERSION))}): pass "
                                  "weight_update_session=True or None (auto)") from err
            raise
        finally:
            if session:
                try:
                    self._call("end_weight_update", {})
                except SGLangError:
                    if ok:
                        raise
                    log.exception("end_weight_update after a failed update also failed")
        self.flush_cache()
        self.stats["weight_updates"] += 1

    def _send_tensor_bucket(self, bucket: WeightBucket, version: str) -> None:
        pairs = list(zip(bucket.names, bucket.tensors))
        if self._http is None:  # in-process: tensors go straight in
            self._call("update_weights_from_tensor", {"named_tensors": pairs, "load_format": None,
                                                      "flush_cache": False})
            return
        serializer = self._serializer or _sglang_serializer
        try:
            payload_one = serializer(pairs)
        except ImportError as err:
            raise ImportError("weight_sync='tensor' over HTTP serialises CUDA tensors with SGLang's "
                              "MultiprocessingSerializer: install sglang in the trainer environment (colocated "
                              "engines share the node) or use weight_sync='distributed'") from err
        self._call("update_weights_from_tensor", {
            "serialized_named_tensors": [payload_one] * self.tp_size, "load_format": None,
            "flush_cache": False, "abort_all_requests": False, "weight_version": version})

    def _send_distributed_bucket(self, bucket: WeightBucket, version: str) -> None:
        if self._group is None:
            raise SGLangError("weight_sync='distributed' needs init_weights_update_group(...) before update_weights")
        import torch.distributed as dist

        payload = {"names": bucket.names, "dtypes": bucket.dtypes, "shapes": bucket.shapes,
                   "group_name": self._group_name, "flush_cache": False, "abort_all_requests": False,
                   "weight_version": version}
        errors: list[BaseException] = []

        def remote():
            try:
                self._call("update_weights_from_distributed", payload)
            except BaseException as err:
                errors.append(err)

        thread = threading.Thread(target=remote, daemon=True)
        thread.start()
        try:
            for tensor in bucket.tensors:
                dist.broadcast(tensor.detach().contiguous(), src=0, group=self._group)
        finally:
            thread.join()
        if errors:
            raise SGLangError(f"update_weights_from_distributed failed: {errors[0]}") from errors[0]

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._group is not None:
            try:
                import torch.distributed as dist

                dist.destroy_process_group(self._group)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.debug("destroying the weight-update group failed", exc_info=True)
            self._group = None
        if self._engine is not None:
            try:
                self._engine.shutdown()
            finally:
                self._engine = None
