"""Talking to ONE SGLang server: requests, version gates, generation, memory, health.

Two ways to reach SGLang (pick with the constructor of :class:`SGLangServer`):

* **HTTP** (``SGLangServer(url="http://host:30000")``): a server started separately, e.g.
  ``python -m sglang.launch_server --model-path DIR --tp 2 --port 30000``.
* **in-process** (``SGLangServer(engine_kwargs={"model_path": DIR, "tp_size": 1, ...})``):
  ``sglang.Engine`` in this process (lazy import; a clear error when SGLang is not installed).

Endpoints (request schemas as in SGLang 0.5.23's ``srt/managers/io_struct.py`` and
``srt/entrypoints/http_server.py``; weight endpoints answer ``{"success", "message"}`` with 200 or
400, ``/health`` 200 or 503):

=================================  =========================================================
``GET  /health``                   liveness (200; 503 while starting or unhealthy)
``GET  /get_server_info``          ``version`` (decides whether the weight-update session is used)
``POST /generate``                 ``input_ids`` (batch), ``sampling_params`` (list, one per
                                   completion, with ``sampling_seed``), ``return_logprob``
``POST /flush_cache``              drop the prefix cache (after new weights)
``POST /release_memory_occupation`` / ``/resume_memory_occupation``  ``tags`` (``weights``,
                                   ``kv_cache``, ``cuda_graph``), around training when colocated
=================================  =========================================================

The weight endpoints (``/begin_weight_update``, ``/update_weights_from_*``, ...) are
``sglang_weights.py``'s; a pool of servers is ``sglang_engine.py``'s. Every error message starts
with the server's name (its URL), so with several engines the failing one is named.
"""
from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from real_megatron.rollout.base import Completion, RolloutEngineError, SamplingParams

log = logging.getLogger(__name__)

#: first SGLang release whose weight updates must sit inside /begin_weight_update ... /end_weight_update
WEIGHT_SESSION_MIN_VERSION = (0, 5, 21)
# SGLang can release CUDA-graph memory (tag "cuda_graph") since its PR #7873 (autumn 2025); the
# exact release is not pinned down here, so the tag is used from a version safely after it. An older
# server would refuse the unknown tag; a newer one below this line just keeps its graphs resident.
CUDA_GRAPH_TAG_MIN_VERSION = (0, 5, 5)


class SGLangError(RolloutEngineError):
    """SGLang refused or failed a request, or is unreachable; the message names the server, the
    endpoint, SGLang's answer and, where there is one, the fix. A :class:`RolloutEngineError`, so
    the trainer handles it like any other engine failure (safe save, then a clear exit)."""


def import_sglang():
    try:
        import sglang  # noqa: F401
    except ImportError as err:  # the GPU extra is not installed (never on the CPU machines)
        raise ImportError(
            "rollout.engine=sglang without rollout.sglang_urls needs the `sglang` package in this process "
            "(pip install -e .[gpu] on a GPU machine; SGLang pins its own torch version). Either install it, "
            "point rollout.sglang_urls at running servers (python -m sglang.launch_server ...), or use "
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


def on_each(servers: Sequence[SGLangServer], fn: Callable[[SGLangServer], object]) -> list:
    """``fn(server)`` for every server at once (one thread each); results in server order.

    Every call is waited for, then the first failure is raised (an :class:`SGLangError` already
    names its server; anything else is wrapped so that it does)."""
    if len(servers) == 1:
        return [fn(servers[0])]
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        futures = [pool.submit(fn, s) for s in servers]
        errors = [f.exception() for f in futures]
    for server, err in zip(servers, errors, strict=True):
        if isinstance(err, SGLangError):
            raise err
        if err is not None:
            raise SGLangError(f"SGLang {server.name}: {type(err).__name__}: {err}") from err
    return [f.result() for f in futures]


class _HTTP:
    """JSON over HTTP with urllib (no extra dependency); errors name the server and the endpoint."""

    def __init__(self, url: str, timeout_s: float):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"rollout.sglang_urls entry {url!r} must start with http:// or https://")
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
            raise SGLangError(f"SGLang {self.url} {method} {path} -> HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, OSError) as err:  # refused, reset, or no answer within the timeout
            raise SGLangError(f"SGLang {self.url} {method} {path}: no usable answer ({err}); is the server "
                              "alive? (a hung server shows up here after the request timeout)") from err
        if not body:
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body.decode("utf-8", "replace")


class SGLangServer:
    """One SGLang server (HTTP) or in-process ``sglang.Engine``.

    Args:
        url / engine_kwargs: exactly one (see the module docstring).
        eos_token_id: int or list of ints sent as ``stop_token_ids`` (SGLang also stops at the
            model's own EOS). The EOS token is part of the returned response, as the loss needs.
        weight_update_session: True / False, or None to decide from the server's version.
        max_prompts_per_request: split one ``generate`` into requests of at most this many prompts (0: one).
        request_timeout_s: HTTP timeout of every request; a server that hangs longer is an error naming it.
        health_timeout_s: HTTP: wait up to this long for ``/health`` 200 before the constructor
            returns (0 skips the check).
    """

    def __init__(self, url: str | None = None, *, engine_kwargs: dict | None = None, eos_token_id=None,
                 weight_update_session: bool | None = None, max_prompts_per_request: int = 0,
                 request_timeout_s: float = 3600.0, health_timeout_s: float = 60.0):
        if (url is None) == (engine_kwargs is None):
            raise ValueError("SGLangServer needs exactly one of url= (HTTP server) or engine_kwargs= (in-process)")
        self.max_prompts_per_request = int(max_prompts_per_request)
        if eos_token_id is None:
            self.stop_token_ids = None
        else:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            self.stop_token_ids = [int(i) for i in ids]
        self.weight_version_prefix = "step-"  # the engine's (SGLangEngine): versions it sets read back as numbers
        self._http = _HTTP(url, request_timeout_s) if url is not None else None
        self._engine = import_sglang().Engine(**engine_kwargs) if engine_kwargs is not None else None
        self.name = self._http.url if self._http is not None else "in-process sglang.Engine"
        self._session = weight_update_session
        self._version: tuple[int, ...] | None = None
        self._info_path = "/server_info"  # check_alive falls back to the older name once, on a 404
        self._closed = False
        if self._http is not None and health_timeout_s > 0:
            self.wait_healthy(health_timeout_s)

    # ------------------------------------------------------------------ requests

    def call(self, endpoint: str, payload: dict | None = None, *, timeout_s: float | None = None):
        """POST ``/endpoint`` (HTTP) or ``engine.endpoint(**payload)`` (in-process); a reply with
        ``"success": false`` is an :class:`SGLangError`."""
        if self._closed:
            raise SGLangError(f"SGLang {self.name}: closed; cannot call {endpoint}")
        if self._http is not None:
            reply = self._http.request("POST", "/" + endpoint, {} if payload is None else payload, timeout_s=timeout_s)
        else:
            method = getattr(self._engine, endpoint, None)
            if method is None:
                raise SGLangError(f"this sglang.Engine has no {endpoint}(); upgrade SGLang or use HTTP mode")
            reply = method(**(payload or {}))
            if isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[0], bool):
                reply = {"success": reply[0], "message": reply[1]}
        if isinstance(reply, dict) and reply.get("success") is False:
            raise SGLangError(f"SGLang {self.name} /{endpoint} failed: {reply.get('message', reply)}")
        return reply

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Block until ``/health`` answers 200; raise :class:`SGLangError` (URL, last answer, fix) otherwise."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            try:
                self._http.request("GET", "/health", timeout_s=max(1.0, min(10.0, timeout_s)))
                return
            except SGLangError as err:
                last = err
            if time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
        raise SGLangError(
            f"SGLang server at {self.name} is not healthy after {timeout_s:g}s ({last}). Start it with "
            "`python -m sglang.launch_server --model-path DIR --port PORT` and check rollout.sglang_urls, or use "
            "rollout.engine=embedded.")

    def _server_info(self, timeout_s: float):
        """GET the server's info (a round trip to its scheduler): ``/server_info``, or the deprecated
        ``/get_server_info`` on servers that predate it (tried once, on a 404, then remembered)."""
        try:
            return self._http.request("GET", self._info_path, timeout_s=timeout_s)
        except SGLangError as err:
            if self._info_path != "/server_info" or "HTTP 404" not in str(err):
                raise
            self._info_path = "/get_server_info"
            return self._http.request("GET", self._info_path, timeout_s=timeout_s)

    def check_alive(self, timeout_s: float = 5.0) -> None:
        """Raise :class:`SGLangError` naming the server unless its scheduler answers within ``timeout_s``.
        Cheap, unlike ``/health``, which SGLang answers after generating a token and sleeping a whole
        second: this check runs before every weight push."""
        if self._http is None:
            return
        try:
            self._server_info(timeout_s)
        except SGLangError as err:
            raise SGLangError(f"SGLang server at {self.name} is not answering ({err}); a weight push "
                              "needs every server alive. Check the server's log and rollout.sglang_urls.") from err

    def server_version(self) -> tuple[int, ...] | None:
        if self._version is None:
            if self._http is not None:
                try:
                    info = self._server_info(30)
                except SGLangError:
                    return None
                self._version = parse_version(info.get("version", "")) if isinstance(info, dict) else None
            else:
                self._version = parse_version(getattr(import_sglang(), "__version__", ""))
        return self._version

    def uses_weight_update_session(self) -> bool:
        """Whether weight updates are wrapped in begin/end (decided once, from the version)."""
        if self._session is None:
            version = self.server_version()
            self._session = bool(version) and version >= WEIGHT_SESSION_MIN_VERSION
            log.info("SGLang %s version %s: weight-update session %s", self.name, version,
                     "on" if self._session else "off")
        return self._session

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 first_prompt: int = 0) -> list[Completion]:
        """``n`` completions per prompt, prompt-major (``len == len(prompts) * n``), with log-probs.

        ``first_prompt``: the global index of ``prompt_token_ids[0]`` when a pool splits one batch
        over several servers; it offsets ``Completion.prompt_index`` and the per-completion seeds
        (``seed + global prompt index * n + j``), so results do not depend on the split.
        """
        step = self.max_prompts_per_request or max(1, len(prompt_token_ids))
        completions: list[Completion] = []
        for start in range(0, len(prompt_token_ids), step):
            chunk = prompt_token_ids[start:start + step]
            input_ids = [list(ids) for ids in chunk for _ in range(n)]
            params = self._sampling_dicts(sampling, len(input_ids), (first_prompt + start) * n)
            payload = {"input_ids": input_ids, "sampling_params": params, "return_logprob": True}
            if self._closed:
                raise SGLangError(f"SGLang {self.name}: closed; cannot generate")
            if self._http is not None:
                reply = self._http.request("POST", "/generate", payload)
            else:
                reply = self._engine.generate(**payload)
            if isinstance(reply, dict):
                reply = [reply]
            if not isinstance(reply, list) or len(reply) != len(input_ids):
                got = len(reply) if isinstance(reply, list) else type(reply).__name__
                raise SGLangError(f"SGLang {self.name} /generate returned {got} outputs for {len(input_ids)} inputs")
            for j, out in enumerate(reply):
                completions.append(self._to_completion(out, first_prompt + start + j // n, j))
        return completions

    def _sampling_dicts(self, sampling: SamplingParams, count: int, first_seed_offset: int) -> list[dict]:
        base = {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
                "max_new_tokens": int(sampling.max_new_tokens), "skip_special_tokens": False, "no_stop_trim": True}
        if self.stop_token_ids:
            base["stop_token_ids"] = list(self.stop_token_ids)
        out = []
        for i in range(count):
            d = dict(base)
            if sampling.seed is not None:
                # one seed per completion: the same prompt repeated n times must not give n copies
                d["sampling_seed"] = int(sampling.seed) + first_seed_offset + i
            out.append(d)
        return out

    def _to_completion(self, out: dict, prompt_index: int, j: int) -> Completion:
        try:
            meta = out["meta_info"]
            finish = meta.get("finish_reason") or {}
            ftype = finish.get("type") if isinstance(finish, dict) else str(finish)
            token_ids = out.get("output_ids")
            raw_lp = meta.get("output_token_logprobs")
        except (KeyError, AttributeError, TypeError) as err:
            raise SGLangError(f"SGLang {self.name} /generate output {j} is malformed ({err!r}): "
                              f"{str(out)[:500]}") from err
        if ftype == "abort":
            raise SGLangError(f"SGLang {self.name} aborted output {j}: {finish.get('message', finish)}")
        if token_ids is None:
            if not raw_lp:
                raise SGLangError(f"SGLang {self.name} /generate output {j} has neither output_ids nor "
                                  "output_token_logprobs")
            token_ids = [int(entry[1]) for entry in raw_lp]
        token_ids = [int(t) for t in token_ids]
        logprobs = None
        if raw_lp is not None:
            logprobs = [float(entry[0]) if entry[0] is not None else math.nan for entry in raw_lp]
            if len(logprobs) != len(token_ids):
                logprobs = None
        if (ftype == "stop" and isinstance(finish.get("matched"), int)
                and (not token_ids or token_ids[-1] != finish["matched"])):
            token_ids.append(int(finish["matched"]))  # keep the EOS the loss needs; no log-prob for it
            logprobs = None
        reason = {"stop": "stop", "length": "length"}.get(ftype, str(ftype))
        return Completion(prompt_index=prompt_index, token_ids=token_ids, logprobs=logprobs, finish_reason=reason,
                          token_versions=self.token_versions(meta, len(token_ids)))

    def token_versions(self, meta: dict, count: int) -> list[int] | None:
        """Each output token's weight version from SGLang's ``meta_info``: ``weight_versions`` spans
        (``{version, start, end}``, recorded when new weights arrive while the request runs) or the one
        ``weight_version``; versions this client set (``weight_version_prefix`` + a number) become the number.
        None when any version is not one of ours (e.g. the server's start-up weights)."""
        spans = meta.get("weight_versions") or [{"version": meta.get("weight_version"), "start": 0, "end": count}]
        out = [None] * count
        for span in spans:
            text = str(span.get("version"))
            if not text.startswith(self.weight_version_prefix) or not text[len(self.weight_version_prefix):].isdigit():
                return None
            version = int(text[len(self.weight_version_prefix):])
            for t in range(int(span.get("start", 0)), min(int(span.get("end", count)), count)):
                out[t] = version
        if any(v is None for v in out):  # a token no span covers (the appended stop token): the previous one's
            for t, v in enumerate(out):
                if v is None:
                    out[t] = out[t - 1] if t else next((x for x in out if x is not None), None)
        return out if all(v is not None for v in out) else None

    def pause_generation(self, mode: str = "retract") -> None:
        """Stop decoding until ``continue_generation``: ``retract`` puts running requests back in the queue
        (their KV cache may be flushed, so they resume on the new weights from the start of what they have);
        new requests wait. For weights pushed into requests in flight (``rollout.partial``)."""
        self.call("pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self.call("continue_generation", {})

    # ------------------------------------------------------------------ memory and cache

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
        """Free the engine's GPU memory before training (None: every tag the server has).

        SGLang 0.5.23 asserts that its scheduler is idle here, and the assertion kills the server;
        right after ``/generate`` has answered it can still be finishing the batch (measured on the
        CPU). So wait first until ``/flush_cache`` succeeds: it does exactly when the scheduler is idle."""
        if self._http is not None:
            deadline = time.monotonic() + 120
            while True:
                try:
                    self._http.request("POST", "/flush_cache", {})
                    break
                except SGLangError as err:
                    if "HTTP 400" not in str(err) or time.monotonic() > deadline:
                        raise
                time.sleep(0.2)
        self.call("release_memory_occupation", {"tags": list(tags) if tags is not None else None})

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Re-occupy GPU memory. Colocated order: ``["weights"]``, sync weights, then the other released tags."""
        self.call("resume_memory_occupation", {"tags": list(tags) if tags is not None else None})

    def flush_cache(self) -> None:
        if self._http is not None:
            self._http.request("POST", "/flush_cache", {})
        else:
            self._engine.flush_cache()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._engine is not None:
            try:
                self._engine.shutdown()
            finally:
                self._engine = None
