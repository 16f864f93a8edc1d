"""Where weights go to SGLang: the three ways new weights reach one or more SGLang servers.

The trainer hands over the buckets ``real_megatron.convert.iter_hf_tensors`` yields (lists of
``(hf_name, full tensor)``, at most ``rollout.weight_bucket_mb`` each); every bucket is sent as one
request per server, all inside one ``/begin_weight_update`` ... ``/end_weight_update`` session per
server (SGLang >= 0.5.21 refuses updates outside one), then each server's prefix cache is flushed.

* :class:`TensorSender` (``weight_sync=tensor``, colocated): ``/update_weights_from_tensor`` with
  the bucket serialised in SGLang's ``MultiprocessingSerializer`` format (:func:`serialize_named_tensors`):
  CUDA tensors travel as CUDA IPC handles, CPU tensors as shared-memory files. The bucket is
  serialised once per receiving process (each server's TP ranks); no tensor data is copied.
* :class:`DistributedSender` (``weight_sync=distributed``, separate engines): one process group
  spanning the trainer's rank 0 (rank 0) and every server's TP workers (ranks 1..W, server k at
  offset ``1 + sum of the TP sizes before it``), made by :meth:`DistributedSender.init_group`
  (NCCL on GPUs, gloo on the CPU); per bucket every server is told the names/dtypes/shapes and rank 0
  broadcasts each tensor ONCE, whatever the number of servers.
* :func:`update_weights_from_disk`: a server reloads a HF checkpoint directory (``/update_weights_from_disk``).

The trainer's process does not import ``sglang`` (it is not installed there on the CPU machines and
pins its own torch); what must match SGLang byte for byte (the serialiser, the process-group
rendezvous) is written here from SGLang 0.5.23's source and tested against a real server.
"""
from __future__ import annotations

import base64
import datetime
import io
import itertools
import logging
import os
import threading
from collections.abc import Iterable, Sequence

import torch

from real_megatron.dtypes import dtype_name
from real_megatron.rollout.sglang_client import WEIGHT_SESSION_MIN_VERSION, SGLangError, SGLangServer, on_each

log = logging.getLogger(__name__)

Bucket = Sequence[tuple[str, torch.Tensor]]


def bucket_nbytes(bucket: Bucket) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


# ----------------------------------------------------------------------------- tensor (colocated)


def serialize_named_tensors(named_tensors: Bucket) -> str:
    """The string SGLang's ``MultiprocessingSerializer.deserialize`` reads: base64 of a
    ``multiprocessing.reduction.ForkingPickler`` dump of the list of ``(name, tensor)`` pairs, with
    torch's tensor reductions (SGLang 0.5.23 ``srt/utils/common.py``; its ``SafeUnpickler`` admits
    exactly these rebuild functions). Tensors are not copied into the string: CUDA tensors become
    CUDA IPC handles, CPU tensors shared-memory files, so the caller must keep the tensors alive
    until the server has answered.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as torch_mp  # importing it registers torch's reductions with ForkingPickler

    # CPU tensors: torch's default strategy, file_descriptor, hands the server a file descriptor
    # through multiprocessing's resource sharer, which authenticates with THIS process's authkey;
    # the server has another one, the handshake fails ("AuthenticationError: digest sent was
    # rejected") and the SGLang server crashes. file_system names a shared-memory file the server
    # opens itself. The setting is process-wide; CUDA tensors (CUDA IPC) ignore it.
    if torch_mp.get_sharing_strategy() != "file_system":
        torch_mp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf).dump([(str(name), tensor.detach()) for name, tensor in named_tensors])
    return base64.b64encode(buf.getvalue()).decode("ascii")


class TensorSender:
    """Colocated servers (same node as the trainer's rank 0): ``/update_weights_from_tensor``.
    ``tp_sizes[k]``: server k's tensor-parallel size (one payload copy per TP rank)."""

    kind = "tensor"

    def __init__(self, servers: Sequence[SGLangServer], tp_sizes: Sequence[int], serializer=None):
        self.servers, self.tp_sizes = list(servers), [int(t) for t in tp_sizes]
        self.serializer = serializer or serialize_named_tensors

    def send(self, bucket: Bucket, version: str) -> None:
        if any(s._http is None for s in self.servers):  # in-process sglang.Engine: tensors go straight in
            on_each(self.servers, lambda s: s.call("update_weights_from_tensor", {
                "named_tensors": list(bucket), "load_format": None, "flush_cache": False}))
            return
        # one payload per receiving process (each server's TP rank): pickling a shared CPU tensor
        # takes one reference on its shared-memory file and each unpickling gives one back, so a
        # payload read twice frees the file under the second reader (measured: the second of two
        # servers crashed). Pickling copies no tensor data, only handles. `bucket` stays alive
        # until every server has answered.
        payloads = {id(s): [self.serializer(bucket) for _ in range(self.tp_sizes[k])]
                    for k, s in enumerate(self.servers)}
        on_each(self.servers, lambda s: s.call("update_weights_from_tensor", {
            "serialized_named_tensors": payloads[id(s)], "load_format": None,
            "flush_cache": False, "abort_all_requests": False, "weight_version": version}))

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- distributed (separate engines)


def init_custom_process_group(*, backend: str, master_address: str, master_port: int, rank: int, world_size: int,
                              group_name: str, timeout_s: float = 300.0):
    """A process group of the trainer's rank 0 and the SGLang workers, outside the default group.

    The same rendezvous as SGLang's ``srt.utils.init_custom_process_group`` (0.5.23): a TCP store
    at ``master_address:master_port`` hosted by rank 0, keys under the prefix ``group_name``, so
    both sides agree on the keys."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0), timeout=timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _concurrently(remote, local, poll_s: float = 0.02) -> None:
    """Run ``remote()`` (blocking HTTP calls that wait for the group) and ``local()`` (joining the
    group / broadcasting) side by side; raise the remote failure first.

    A refused request (bad field, wrong world size) answers at once while ``local`` would block in
    the collective until the group's timeout, so ``local`` runs in a thread of its own and this
    thread watches both: a remote error is raised as soon as it arrives, never after the timeout.
    (An earlier version waited a fixed 0.5 s for refusals before starting ``local``: a fifth of a
    second-long weight push on the demo's model, every step.)"""
    remote_errors: list[BaseException] = []
    local_errors: list[BaseException] = []

    def run(fn, errors):
        try:
            fn()
        except BaseException as err:  # re-raised below
            errors.append(err)

    remote_thread = threading.Thread(target=run, args=(remote, remote_errors), daemon=True)
    # daemon: after a refusal it may stay blocked in the collective until the group's timeout
    local_thread = threading.Thread(target=run, args=(local, local_errors), daemon=True)
    remote_thread.start()
    local_thread.start()
    while local_thread.is_alive():
        local_thread.join(poll_s)
        if remote_errors and local_thread.is_alive():
            raise remote_errors[0]
    if local_errors:
        # the servers' requests may wait for this group until the HTTP timeout (an hour by default):
        # give them a moment to report their own error, then raise this one rather than hang
        remote_thread.join(10.0)
        if remote_errors:
            raise remote_errors[0] from None
        raise local_errors[0]
    remote_thread.join()
    if remote_errors:
        raise remote_errors[0]


_groups_formed = itertools.count()


def fresh_group_name() -> str:
    """A weight-update group name no other group of this process (or of an earlier trainer on the
    same host, whose pid differs) has used."""
    return f"real_megatron_weights_{os.getpid()}_{next(_groups_formed)}"


class DistributedSender:
    """Separate engines: broadcasts in one group {trainer rank 0} ∪ {every server's TP workers}."""

    kind = "distributed"

    def __init__(self, servers: Sequence[SGLangServer], tp_sizes: Sequence[int]):
        self.servers, self.tp_sizes = list(servers), [int(t) for t in tp_sizes]
        self.group = None
        self.group_name = None

    def init_group(self, master_address: str, master_port: int, *, group_name: str | None = None,
                   backend: str = "nccl", timeout_s: float = 300.0) -> None:
        """Form the group (call on the trainer's rank 0 only). Each server's request blocks until its
        workers have joined, so the requests run in threads while this process joins as rank 0.

        ``group_name``: default :func:`fresh_group_name`. Both torch (in this process) and each
        server keep a group's name until it is destroyed, so a fixed name breaks the next group
        formed after one that was never closed: a second engine in this process, or a restarted
        trainer against servers that still hold the crashed one's group."""
        if self.group is not None:
            raise SGLangError(f"the weight-update group {self.group_name!r} is already formed; close() it first")
        group_name = group_name or fresh_group_name()
        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:k]) for k in range(len(self.servers))]

        def remote():
            on_each(self.servers, lambda s: s.call("init_weights_update_group", {
                "master_address": master_address, "master_port": int(master_port),
                "rank_offset": offsets[self.servers.index(s)],
                "world_size": world, "group_name": group_name, "backend": backend}))

        def local():
            self.group = init_custom_process_group(backend=backend, master_address=master_address,
                                                   master_port=master_port, rank=0, world_size=world,
                                                   group_name=group_name, timeout_s=timeout_s)

        self.group_name = group_name
        try:
            _concurrently(remote, local)
        except BaseException as err:
            self._leave_locally()  # if this side joined before a server refused
            if isinstance(err, SGLangError):
                raise SGLangError(f"init_weights_update_group failed: {err}") from err
            raise

    def send(self, bucket: Bucket, version: str) -> None:
        if self.group is None:
            raise SGLangError("weight_sync='distributed' needs init_weights_update_group(...) before update_weights")
        import torch.distributed as dist

        payload = {"names": [n for n, _ in bucket],
                   "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                   "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                   "flush_cache": False, "abort_all_requests": False, "weight_version": version}

        def local():
            for _, tensor in bucket:  # once, whatever the number of servers
                dist.broadcast(tensor.detach().contiguous(), src=0, group=self.group)

        try:
            _concurrently(lambda: on_each(self.servers, lambda s: s.call("update_weights_from_distributed", payload)),
                          local)
        except SGLangError as err:
            raise SGLangError(f"update_weights_from_distributed failed: {err}") from err

    def close(self) -> None:
        """Leave the group on both sides (best effort: a dead server must not stop the shutdown)."""
        if self.group is not None:
            for server in self.servers:
                try:
                    server.call("destroy_weights_update_group", {"group_name": self.group_name}, timeout_s=30)
                except SGLangError:
                    log.debug("destroy_weights_update_group on %s failed", server.name, exc_info=True)
            self._leave_locally()

    def _leave_locally(self) -> None:
        if self.group is not None:
            try:
                import torch.distributed as dist

                dist.destroy_process_group(self.group)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.debug("destroying the weight-update group failed", exc_info=True)
        self.group = self.group_name = None  # the name means something only while the group exists


# ----------------------------------------------------------------------------- the session around it


def push_weights(servers: Sequence[SGLangServer], buckets: Iterable[Bucket], sender, version: str) -> dict:
    """Send every bucket to every server inside one weight-update session per server, then flush
    their prefix caches. Returns ``{"buckets": count, "bytes": total}``.

    On a failure the open sessions are closed (best effort) and the first error is raised; the
    servers then hold a mix of old and new weights, which the trainer never samples from (it saves
    and stops)."""
    session = [s.uses_weight_update_session() for s in servers]
    opened: list[SGLangServer] = []
    stats = {"buckets": 0, "bytes": 0}
    ok = False
    try:
        for server, wanted in zip(servers, session, strict=True):
            if wanted:
                try:
                    server.call("begin_weight_update", {})
                except SGLangError as err:
                    raise SGLangError(
                        f"{err}. This server has no usable weight-update session; if it predates SGLang "
                        f"{'.'.join(map(str, WEIGHT_SESSION_MIN_VERSION))}, pass weight_update_session=False") from err
                opened.append(server)
        for bucket in buckets:
            bucket = list(bucket)
            names = [n for n, _ in bucket]
            if len(set(names)) != len(names):
                raise ValueError("a weight bucket names a tensor twice: "
                                 f"{sorted(n for n in names if names.count(n) > 1)}")
            sender.send(bucket, version)
            stats["buckets"] += 1
            stats["bytes"] += bucket_nbytes(bucket)
        ok = True
    except SGLangError as err:
        if not all(session) and "begin_weight_update" in str(err):
            raise SGLangError(f"{err}. The server wants a weight-update session (SGLang >= "
                              f"{'.'.join(map(str, WEIGHT_SESSION_MIN_VERSION))}): pass "
                              "weight_update_session=True or None (auto)") from err
        raise
    finally:
        for server in opened:
            try:
                server.call("end_weight_update", {})
            except SGLangError:
                if ok:
                    raise
                log.exception("end_weight_update on %s after a failed update also failed", server.name)
    on_each(servers, lambda s: s.flush_cache())
    return stats


def update_weights_from_disk(servers: Sequence[SGLangServer], model_path: str, version: str) -> None:
    """Every server reloads its weights from the HF checkpoint directory ``model_path`` (which
    each server must be able to read), then its prefix cache is flushed (SGLang does that itself)."""
    on_each(servers, lambda s: s.call("update_weights_from_disk", {
        "model_path": str(model_path), "weight_version": version}))
