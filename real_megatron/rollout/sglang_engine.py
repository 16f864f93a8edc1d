"""SGLang as the trainer's rollout engine: one or several SGLang servers behind :class:`RolloutEngine`.

Where things are:

* ``sglang_client.py``: talking to ONE server (HTTP or in-process ``sglang.Engine``): generation,
  health, version gates, memory release/resume, cache flush;
* ``sglang_weights.py``: where weights go to SGLang (tensor / distributed / disk, the session);
* here: the pool. ``rollout.sglang_urls: [url, ...]`` (one URL is a pool of one):

  - **rollouts**: a batch's prompts are split into contiguous, near-equal runs, one per server, and
    all ``n`` completions of a prompt come from the same server (its prefix cache holds the prompt
    once); the servers work at the same time and the completions come back in prompt order, with
    seeds that depend on the prompt's index in the batch, not on the split;
  - **weights**: every sync reaches every server, bucket by bucket, as ``sglang_weights.py`` says
    (the distributed path streams each bucket once from the trainer's rank 0, to all servers);
  - **failures**: a server that refuses, dies or does not answer within ``request_timeout_s`` is an
    :class:`SGLangError` naming its URL; the trainer then saves what it safely can and stops.

What runs where: see README "Rollout engines". On the CPU the tests drive real SGLang 0.5.23 servers
(tests/sglang_server.py); CUDA IPC, NCCL and the memory saver need GPUs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise

from real_megatron.rollout.base import Completion, RolloutEngine, SamplingParams
from real_megatron.rollout.sglang_client import SGLangError, SGLangServer, on_each
from real_megatron.rollout.sglang_weights import Bucket, DistributedSender, TensorSender, push_weights
from real_megatron.rollout.sglang_weights import update_weights_from_disk as _update_from_disk

__all__ = ["SGLangEngine", "SGLangError", "split_prompts"]


def split_prompts(num_prompts: int, num_servers: int) -> list[range]:
    """Contiguous prompt ranges, one per server, sizes differing by at most one (some empty when
    there are fewer prompts than servers)."""
    bounds = [k * num_prompts // num_servers for k in range(num_servers + 1)]
    return [range(a, b) for a, b in pairwise(bounds)]


class SGLangEngine(RolloutEngine):
    """Rollouts from a pool of SGLang servers, and weight sync into all of them.

    Args:
        urls: one base URL or a list of them (HTTP servers); or
        engine_kwargs: keyword arguments of an in-process ``sglang.Engine`` (a pool of one).
        eos_token_id: sent as ``stop_token_ids``; the EOS is kept in the response (the loss needs it).
        weight_sync: ``"tensor"`` (colocated: ``update_weights_from_tensor``) or ``"distributed"``
            (separate engines: broadcasts after :meth:`init_weights_update_group`).
        tp_size: each server's tensor-parallel size.
        weight_update_session: True / False, or None to decide from each server's version.
        serializer: replaces :func:`~real_megatron.rollout.sglang_weights.serialize_named_tensors`
            (tensor sync over HTTP); for tests of the request format only.
        max_prompts_per_request, request_timeout_s, health_timeout_s: per server, see ``SGLangServer``.
        partial: weights pushed during generation (``rollout.partial``): every server pauses (its running
            requests retracted), takes them and continues; each token's version comes back in its
            completion (``Completion.token_versions``).
    """

    def __init__(self, urls: str | Sequence[str] | None = None, *, engine_kwargs: dict | None = None,
                 eos_token_id=None, weight_sync: str = "tensor", tp_size: int = 1,
                 weight_update_session: bool | None = None, serializer: Callable | None = None,
                 max_prompts_per_request: int = 0, request_timeout_s: float = 3600.0,
                 weight_version_prefix: str = "step-", health_timeout_s: float = 60.0, partial: bool = False):
        if isinstance(urls, str):
            urls = [urls]
        if (not urls) == (engine_kwargs is None):
            raise ValueError("SGLangEngine needs exactly one of urls= (HTTP servers) or engine_kwargs= (in-process)")
        if urls and len(set(urls)) != len(urls):
            raise ValueError(f"rollout.sglang_urls lists a server twice: {list(urls)}")
        if weight_sync not in ("tensor", "distributed"):
            raise ValueError(f"weight_sync={weight_sync!r}; choose 'tensor' (colocated) or 'distributed' (NCCL)")
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        common = {"eos_token_id": eos_token_id, "weight_update_session": weight_update_session,
                  "max_prompts_per_request": max_prompts_per_request, "request_timeout_s": request_timeout_s}
        if urls:
            self.servers = [SGLangServer(u, health_timeout_s=0, **common) for u in urls]
            if health_timeout_s > 0:
                on_each(self.servers, lambda s: s.wait_healthy(health_timeout_s))
        else:
            self.servers = [SGLangServer(engine_kwargs=engine_kwargs, **common)]
        self.weight_sync = weight_sync
        tp_sizes = [int(tp_size)] * len(self.servers)
        if weight_sync == "tensor":
            self.sender = TensorSender(self.servers, tp_sizes, serializer)
        else:
            self.sender = DistributedSender(self.servers, tp_sizes)
        self._weight_version = 0
        self._weight_version_prefix = weight_version_prefix
        for server in self.servers:
            server.weight_version_prefix = weight_version_prefix
        self.partial = partial
        self.stats = {"weight_updates": 0, "weight_buckets": 0, "weight_bytes": 0}
        self._closed = False

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        """``n`` completions per prompt, prompt-major (``len == len(prompts) * n``), with log-probs."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        for i, ids in enumerate(prompt_token_ids):
            if not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise ValueError(f"prompt {i}: token ids must be a non-empty list of non-negative ints")
        if self._closed:
            raise SGLangError("SGLangEngine is closed; cannot generate")
        ranges = {id(s): r for s, r in zip(self.servers, split_prompts(len(prompt_token_ids), len(self.servers)),
                                           strict=True)}
        servers = [s for s in self.servers if len(ranges[id(s)])]
        results = on_each(servers, lambda s: s.generate(
            [prompt_token_ids[i] for i in ranges[id(s)]], n, sampling, first_prompt=ranges[id(s)].start))
        return [c for part in results for c in part]

    # ------------------------------------------------------------------ weights

    def init_weights_update_group(self, master_address: str, master_port: int, *,
                                  group_name: str | None = None, backend: str = "nccl",
                                  timeout_s: float = 300.0) -> None:
        """Separate engines: form the group {trainer rank 0} ∪ {every server's workers} (rank 0 only).
        ``group_name``: default a name unique to this group (see ``sglang_weights.fresh_group_name``)."""
        if self.weight_sync != "distributed":
            raise SGLangError("init_weights_update_group is for weight_sync='distributed'")
        self.sender.init_group(master_address, master_port, group_name=group_name, backend=backend,
                               timeout_s=timeout_s)

    def _next_version(self) -> str:
        self._weight_version += 1
        return f"{self._weight_version_prefix}{self._weight_version}"

    def update_weights(self, buckets: Iterable[Bucket], version: int | None = None) -> None:
        """Push new weights into every server: ``buckets`` as ``convert.iter_hf_tensors`` yields them
        (lists of ``(hf_name, full tensor)``), one request per bucket and server, then flush caches.
        ``version``: the weights' version (the servers stamp the tokens they sample with it); default: the next
        number. With ``partial``, generation in flight pauses for the push and continues on the new weights."""
        if self._closed:
            raise SGLangError("SGLangEngine is closed; cannot update weights")
        if self.sender.kind == "distributed":
            # every server must be alive before the first broadcast: a server dying mid-collective leaves the
            # others blocked inside it until the group's timeout, so fail here, naming it, while none is in one
            on_each(self.servers, lambda s: s.check_alive(5.0))
        if version is not None:
            self._weight_version = version
            label = f"{self._weight_version_prefix}{version}"
        else:
            label = self._next_version()
        if self.partial:  # requests in flight go back to the queue; the servers resume them on the new weights
            on_each(self.servers, lambda s: s.pause_generation("retract"))
        sent = push_weights(self.servers, buckets, self.sender, label)
        if self.partial:  # only after a complete push: a failed one leaves them paused, the trainer stops
            on_each(self.servers, lambda s: s.continue_generation())
        self.stats["weight_buckets"] += sent["buckets"]
        self.stats["weight_bytes"] += sent["bytes"]
        self.stats["weight_updates"] += 1

    def update_weights_from_disk(self, model_path) -> None:
        """Every server reloads its weights from a HF checkpoint directory it can read."""
        _update_from_disk(self.servers, str(model_path), self._next_version())
        self.stats["weight_updates"] += 1

    # ------------------------------------------------------------------ memory and cache

    def memory_tags(self) -> list[str]:
        """The memory tags every server can release (see ``SGLangServer.memory_tags``)."""
        per_server = [s.memory_tags() for s in self.servers]
        return [t for t in per_server[0] if all(t in tags for tags in per_server[1:])]

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        on_each(self.servers, lambda s: s.release_memory(tags))

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        on_each(self.servers, lambda s: s.resume_memory(tags))

    def flush_cache(self) -> None:
        on_each(self.servers, lambda s: s.flush_cache())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.sender.close()
        for server in self.servers:
            server.close()
