"""The producer of rollouts ahead of training (rollout/producer.py), driven as the trainer drives it, with a fake
engine: which weight version samples each batch, the staleness bound, failures, and resuming from pending batches."""
from __future__ import annotations

import threading
import time

import pytest

from real_megatron.rollout.producer import AheadProducer, ProducerFailed


class FakeEngine:
    """Holds a weight version; ``collect(j)`` records which version sampled batch j (and sleeps a little, so the
    trainer and the producer really interleave)."""

    def __init__(self, version=0, fail_at=None, delay=0.002):
        self.version = version
        self.sampled = {}
        self.fail_at = fail_at
        self.delay = delay
        self.busy = threading.Event()

    def collect(self, j):
        self.busy.set()
        try:
            time.sleep(self.delay)
            if j == self.fail_at:
                raise RuntimeError("engine crashed")
            self.sampled[j] = self.version
            return {"records": [f"batch {j}"], "metrics": {}}
        finally:
            self.busy.clear()


def train(producer, engine, start, end, train_s=0.001):
    """The trainer's loop: take batch k, train (version k+1), push version k+1 when allowed; the versions trained."""
    versions = {}
    for k in range(start, end):
        payload, _ = producer.take(k)
        versions[k] = payload["version"]
        time.sleep(train_s)
        producer.before_push(k + 1)
        assert not engine.busy.is_set(), "a weight push overlapped generation"
        engine.version = k + 1
        producer.pushed(k + 1)
    return versions


@pytest.mark.parametrize("staleness", [1, 2, 3])
def test_each_batch_is_sampled_by_exactly_the_version_s_steps_back(staleness):
    for delays in ((0.002, 0.0), (0.0, 0.004)):  # a slow engine, then a slow trainer: same versions either way
        engine = FakeEngine(delay=delays[0])
        producer = AheadProducer(engine.collect, staleness=staleness, start=0, end=12, engine_version=0)
        producer.start()
        versions = train(producer, engine, 0, 12, train_s=delays[1])
        producer.stop()
        assert versions == {j: max(j - staleness, 0) for j in range(12)}
        assert versions == engine.sampled
        assert max(k - v for k, v in versions.items()) == staleness


def test_the_bound_check_fails_a_producer_that_runs_too_far_ahead(monkeypatch):
    """The mutation the trainer's bound check exists for: a producer that never waits for newer weights."""
    engine = FakeEngine(delay=0.0)
    producer = AheadProducer(engine.collect, staleness=1, start=0, end=6, engine_version=0)
    monkeypatch.setattr(producer, "required_version", lambda j: producer._version)
    producer.start()
    deadline = time.monotonic() + 30
    while len(producer.pending()) < 6 and time.monotonic() < deadline:  # it runs to the end on version 0
        time.sleep(0.01)
    versions = {}
    for k in range(6):
        payload, _ = producer.take(k)
        versions[k] = payload["version"]
        engine.version = k + 1
        producer.pushed(k + 1)
    producer.stop()
    assert max(k - v for k, v in versions.items()) > 1  # the trainer's check (trainer._take_rollouts) would refuse


def test_a_failure_reaches_the_trainer_at_the_batch_it_breaks():
    engine = FakeEngine(fail_at=3)
    producer = AheadProducer(engine.collect, staleness=2, start=0, end=8, engine_version=0)
    producer.start()
    with pytest.raises(ProducerFailed, match="RuntimeError: engine crashed"):
        train(producer, engine, 0, 8)
    assert sorted(engine.sampled) == [0, 1, 2]
    producer.stop()


def test_resuming_with_the_pending_batches_continues_the_same_versions():
    """A checkpoint after step k holds batches k … k+S−1; the resumed producer regenerates the one in flight from
    the checkpoint's weights (version k), and every later batch gets the version it had uninterrupted."""
    staleness, k = 2, 5
    engine = FakeEngine()
    producer = AheadProducer(engine.collect, staleness=staleness, start=0, end=10, engine_version=0)
    producer.start()
    before = train(producer, engine, 0, k)
    pending = producer.pending()
    producer.stop()
    assert sorted(pending) == [5, 6]  # generated ahead, not trained
    resumed_engine = FakeEngine(version=k)
    resumed = AheadProducer(resumed_engine.collect, staleness=staleness, start=k, end=10, engine_version=k,
                            pending=pending)
    resumed.start()
    after = train(resumed, resumed_engine, k, 10)
    resumed.stop()
    assert {**before, **after} == {j: max(j - staleness, 0) for j in range(10)}
    with pytest.raises(ValueError, match="are not the next ones"):
        AheadProducer(engine.collect, staleness=2, start=4, end=10, engine_version=4, pending=pending)


def test_partial_mode_starts_on_any_version_new_enough_and_never_waits_to_push():
    """rollout.partial: pushes do not wait for batch boundaries; a batch starts once the engine's version is within
    S of it, so its oldest tokens are at most S versions old when trained."""
    engine = FakeEngine(delay=0.003)
    producer = AheadProducer(engine.collect, staleness=1, start=0, end=8, engine_version=0, partial=True)
    producer.start()
    versions = {}
    for k in range(8):
        payload, _ = producer.take(k)
        versions[k] = payload["version"]
        producer.before_push(k + 1)  # returns at once
        engine.version = k + 1
        producer.pushed(k + 1)
    producer.stop()
    assert all(k - 1 <= v <= k for k, v in versions.items() if k >= 1)  # started on version k-1 or newer


def test_token_versions_come_from_sglangs_spans():
    from real_megatron.rollout.sglang_client import SGLangServer

    server = SGLangServer.__new__(SGLangServer)  # the parsing needs no connection
    server.weight_version_prefix = "step-"
    spans = {"weight_versions": [{"version": "step-3", "start": 0, "end": 2}, {"version": "step-4", "start": 2,
                                                                               "end": 5}]}
    assert server.token_versions(spans, 5) == [3, 3, 4, 4, 4]
    assert server.token_versions({"weight_version": "step-7"}, 3) == [7, 7, 7]
    assert server.token_versions(spans, 6) == [3, 3, 4, 4, 4, 4]  # the appended stop token: the last version
    assert server.token_versions({"weight_version": "default"}, 2) is None  # the server's own start-up weights
