"""Rollouts generated ahead of training, at most ``staleness`` weight versions old (``train.max_staleness`` ≥ 1).

Rank 0 runs a producer thread beside the training loop. Weight version v is the trainer's weights after v
rollout steps (version 0: the initial weights). Batch j is generated with exactly version ``max(j − S, v₀)``
(v₀: the version the engine held when the producer started), so it is trained on at most S versions after
the weights that sampled it, and a run is reproducible: which weights sample which batch never depends on
timing. The two sides meet at two points:

* ``take(k)`` (the trainer, at the start of rollout step k) waits for batch k;
* ``before_push(v)`` (the trainer, before sending version v to the engine) waits until every batch that needs
  the older weights — up to batch ``v + S − 1`` — has been generated; ``pushed(v)`` then lets the producer go on.

So generation never overlaps a weight push, the engine holds one version at a time, and while the trainer
trains batch k the producer generates batches up to k + S. At S = 1 this is one-step-off (verl, NeMo-RL): the
engine samples batch k+1 with the weights of step k−1 while step k trains.

With ``partial`` (SGLang, ``rollout.partial``) weights do not wait for a batch boundary: a push pauses the
requests in flight, which continue on the new weights, and each token records the version that sampled it.
Batch j then starts on any version ≥ j − S (its oldest tokens are at most S versions old when it is trained),
``before_push`` does not wait, and the versions in a batch depend on timing (such a run is not reproducible
token for token).

A checkpoint after step k holds the batches generated but not yet trained (``pending``: k … k+S−1, with their
versions and the prompt sampler's state after the last of them); a resumed run puts them back and regenerates
the batch that was in flight from the checkpoint's weights — which are exactly the weights it needs.
Nothing here imports Megatron.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable


class ProducerFailed(RuntimeError):
    """The producer thread failed (engine, reward workers); the trainer reports it as a failed rollout step."""


class AheadProducer:
    """``collect(j) -> payload`` (a dict, on the producer thread, for j in order) generates and scores batch j with
    the weights the engine holds. Batches ``start … end − 1``; ``pending``: batches already generated (a resume),
    each payload with its ``"version"``; ``engine_version``: the version the engine holds now."""

    def __init__(self, collect: Callable[[int], dict], *, staleness: int, start: int, end: int, engine_version: int,
                 pending: dict[int, dict] | None = None, partial: bool = False):
        if staleness < 1:
            raise ValueError(f"staleness must be >= 1 (0 is the synchronous loop), got {staleness}")
        self.collect = collect
        self.staleness = staleness
        self.partial = partial
        self.end = end
        self.first_version = engine_version
        self._cond = threading.Condition()
        self._ready: dict[int, dict] = dict(pending or {})
        expected = list(range(start, start + len(self._ready)))
        if sorted(self._ready) != expected:
            raise ValueError(f"pending batches {sorted(self._ready)} are not the next ones after step {start}")
        self._next = start + len(self._ready)
        self._version = engine_version
        self._error: BaseException | None = None
        self._stopped = False
        self.engine_idle_s = 0.0  # time the producer waited for newer weights (the engine had nothing to do)
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    def required_version(self, j: int) -> int:
        """The weight version batch j is generated with (its oldest tokens', with ``partial``)."""
        return max(j - self.staleness, self.first_version)

    def _may_start(self, j: int) -> bool:
        # partial: the engine takes newer weights during the batch, so it may start on any version new enough
        return self._version >= self.required_version(j) if self.partial else self._version == self.required_version(j)

    # ------------------------------------------------------------------ the producer thread
    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                t0 = time.perf_counter()
                while not self._stopped and self._next < self.end and not self._may_start(self._next):
                    self._cond.wait()
                self.engine_idle_s += time.perf_counter() - t0
                if self._stopped or self._next >= self.end:
                    return
                j, version = self._next, self._version
            try:
                payload = self.collect(j)
            except BaseException as err:  # noqa: BLE001 - every failure reaches the trainer, which reports it
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return
            with self._cond:
                self._ready[j] = {**payload, "version": version}
                self._next = j + 1
                self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise ProducerFailed(f"{type(self._error).__name__}: {self._error}") from self._error

    # ------------------------------------------------------------------ the trainer's side
    def take(self, k: int) -> tuple[dict, float]:
        """Batch k (its payload, with ``"version"``) and the seconds the trainer waited for it."""
        t0 = time.perf_counter()
        with self._cond:
            while k not in self._ready:
                self._raise_if_failed()
                if self._stopped or not self._thread.is_alive() and k >= self._next:
                    raise ProducerFailed(f"the producer stopped before batch {k}")
                self._cond.wait(timeout=1.0)
            return self._ready.pop(k), time.perf_counter() - t0

    def before_push(self, version: int) -> None:
        """Wait until every batch that needs weights older than ``version`` has been generated (or the producer
        has stopped: its failure is then reported by the ``take`` of the batch it could not make)."""
        if self.partial:  # the engine takes the weights in the middle of a batch: no batch boundary to wait for
            return
        last_old = version + self.staleness - 1  # the last batch generated with version − 1
        with self._cond:
            while self._next <= min(last_old, self.end - 1) and self._error is None and self._thread.is_alive():
                self._cond.wait(timeout=1.0)

    def pushed(self, version: int) -> None:
        """The engine now holds ``version``."""
        with self._cond:
            self._version = version
            self._cond.notify_all()

    def pending(self) -> dict[int, dict]:
        """The batches generated and not yet taken (a checkpoint saves them)."""
        with self._cond:
            return dict(self._ready)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the batch in flight (its result is dropped); idempotent. Waits up to ``timeout_s`` for it: a
        batch stuck on a dead engine is left to the daemon thread, which ends with the process."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
