"""A rollout engine in a process of its own: the embedded engine when it generates beside training.

With ``train.max_staleness`` ≥ 1 the embedded (transformers) engine samples while the trainer trains. In the
trainer's process that would share its random-number state (transformers samples from torch's global
generator) and its interpreter lock; in a child process it has its own, and its HF copy of the weights is
what it samples with. ``EngineProcess`` is the trainer's proxy: the same interface (``rollout/base.py``),
each call sent over a pipe and answered in order (a lock keeps calls from two threads — the producer's
generation, the trainer's evaluation — from interleaving). Weight buckets are copied into the child
(``update_weights``); nothing is shared with the training parameters.

The child exits when its pipe closes (the trainer ended, or was killed).
"""
from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence

import torch

from real_megatron.rollout.base import Completion, RolloutEngine, RolloutEngineError, SamplingParams

log = logging.getLogger("real_megatron")


def _serve(conn, factory: Callable[[], RolloutEngine]) -> None:
    """The child: build the engine, then answer ``(method, args)`` messages until the pipe closes."""
    try:
        engine = factory()
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    buckets: list = []
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):  # the trainer is gone
            return
        try:
            if method == "generate":
                result = engine.generate(*args)
            elif method == "bucket":  # weights arrive bucket by bucket, applied together on "commit"
                buckets.append(args)
                continue
            elif method == "commit":
                engine.update_weights(iter(buckets))
                buckets, result = [], None
            elif method == "close":
                engine.close()
                conn.send(("ok", None))
                return
            else:
                raise RolloutEngineError(f"unknown engine call {method!r}")
            conn.send(("ok", result))
        except BaseException as err:  # noqa: BLE001
            buckets = []
            conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"))


class EngineProcess(RolloutEngine):
    """Runs ``factory()`` (a picklable callable returning a ``RolloutEngine``) in a spawned child process."""

    def __init__(self, factory: Callable[[], RolloutEngine], *, name: str = "rollout engine"):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, factory), name=name, daemon=True)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self._closed = False
        status, detail = self._receive()
        if status != "ready":
            self.close()
            raise RolloutEngineError(f"the {name} process could not start: {detail}")
        log.info("%s: process %d (generates beside training)", name, self._proc.pid)

    def _receive(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError) as err:
            raise RolloutEngineError(f"the {self.name} process died (exit code {self._proc.exitcode}); "
                                     "its log is above") from err

    def _call(self, method: str, args):
        with self._lock:
            if self._closed:
                raise RolloutEngineError(f"the {self.name} process is closed")
            self._conn.send((method, args))
            status, result = self._receive()
        if status != "ok":
            raise RolloutEngineError(f"{self.name}: {result}")
        return result

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        return self._call("generate", ([list(p) for p in prompt_token_ids], n, sampling))

    def update_weights(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], version: int | None = None) -> None:
        with self._lock:  # the whole update is one call: no generation sees half of it
            for bucket in buckets:
                # copies: the trainer's tensors (often views of Megatron's buffers) never move to shared memory
                self._conn.send(("bucket", [(name, tensor.detach().clone()) for name, tensor in bucket]))
            self._conn.send(("commit", None))
            status, result = self._receive()
        if status != "ok":
            raise RolloutEngineError(f"{self.name}: {result}")

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._proc.is_alive():
                with self._lock:
                    self._conn.send(("close", None))
                    self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            pass
        finally:
            self._closed = True
            self._conn.close()
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
