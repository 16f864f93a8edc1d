"""Verifiable rewards in killable worker processes with a hard per-answer deadline.

Why processes, and why killable: math-verify's own timeouts use SIGALRM, which only works on the
main thread and cannot interrupt a long C-level computation (sympy evaluating ``9^{9^{9^9}}`` runs
for seconds, a big-integer power can allocate gigabytes). A policy model will produce such answers
sooner or later, and one stuck verification must not stall or kill the trainer. So every answer is
verified in a worker process, and the only deadline that is trusted is the parent's clock: when an
answer has not come back ``timeout_s`` after it was handed over, the worker is SIGKILLed, the
answer scores 0.0 and a fresh worker takes its place.

Design
------
- Start method: ``forkserver`` where the platform has it (Linux, macOS), else ``spawn``. Never
  plain ``fork``: the trainer holds torch/OpenMP/NCCL threads (and runs under torchrun), and
  forking a multi-threaded process can deadlock the child. The fork server is a fresh,
  single-threaded interpreter that imports only ``real_megatron.rewards._preload`` (math-verify,
  warmed up with one verification); workers are forked from it, so a replacement is ready in
  milliseconds and pays no import cost. If a fork server was already running (started by someone
  else in this process) workers still work, they just import math-verify themselves.
- The answer is extracted in the parent (``extract_answer``: the last ``\\boxed{}``, optionally after
  ``</think>``). That scan is linear, capped at ``MAX_ANSWER_CHARS`` past the box and mostly C-level
  ``rfind``, so it costs microseconds even for a megabyte response; it means only a short answer is
  pickled to a worker (a pipe write that can never block on a stuck reader) and responses without a
  final answer never cost a round trip. Only math-verify (parse + verify), whose run time is
  unbounded, runs in the workers.
- One duplex pipe per worker and at most one answer in flight per worker, so a deadline is
  exactly the time one answer has spent in one worker. A worker announces itself ("ready") after
  its imports; the deadline only starts when the answer is sent to a ready worker, so a slow
  start on a loaded machine is never mistaken for a slow answer.
- The parent waits on all pipes and process sentinels at once
  (``multiprocessing.connection.wait``) with the nearest deadline as the timeout. Outcomes per
  answer: a result; an exception inside math-verify (scored 0.0, counted as ``errors``, worker
  kept); the process dying (0.0, ``crashes``, replaced); the deadline passing (SIGKILL, 0.0,
  ``timeouts``, replaced). Every replacement counts in ``restarts``.
- Inputs are screened in the parent before anything is pickled: ``None`` and non-text responses
  score 0.0 (``invalid``); bytes are decoded with replacement; lone surrogates are replaced (they
  cannot be encoded to UTF-8, so nothing downstream has to care); a ground truth of a bad type
  scores 0.0 (``invalid``). Only a ``str`` and a tuple of ``str`` cross the process boundary, so a
  hostile object cannot run code (``__str__``, ``__reduce__``) in the trainer or the worker.
- Workers cap their address space (``max_memory_mb``, Linux ``RLIMIT_AS``) so a memory bomb
  ends as a MemoryError (0.0, ``errors``) or a crash instead of an out-of-memory kill of the host,
  and they (and the fork server) ignore SIGINT and SIGTERM: Ctrl-C and ``scancel`` signal every
  process of the job, and the trainer's contract is to score and train its current rollout step,
  save and exit, which it could not do with its reward workers dead (found by the Slurm test).
- Workers are daemonic and exit on EOF of their pipe, so they never outlive the trainer; the pool
  closes (SIGKILL) at interpreter exit before multiprocessing's own clean-up, whose SIGTERM they ignore.

Fault injection: ``RewardPool(verify=...)`` replaces the function the workers run (default
``math_reward.verify_answer``). The tests pass one that crashes (``os._exit``, as a segfault in a C
extension would) or never returns on a marker answer; it must be picklable (a module-level function),
because workers are forked from the fork server and receive it by reference.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait

from real_megatron.rewards.math_reward import extract_answer

log = logging.getLogger(__name__)

_READY = "ready"
STAT_KEYS = ("timeouts", "crashes", "restarts", "errors", "invalid", "no_answer")


def _check_math_verify() -> None:
    """Fail loudly, once, if math-verify cannot verify a known-correct answer here.

    Without this, a broken install (e.g. an antlr4 runtime of the wrong version, which only shows
    at the first LaTeX parse) would make every worker score 0.0: a silent all-wrong run.
    """
    from real_megatron.rewards.math_reward import math_reward

    try:
        ok = math_reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    except Exception as err:  # noqa: BLE001 - any failure here is an environment problem
        raise RuntimeError(f"math-verify does not work in this environment ({type(err).__name__}: {err}); "
                           "reinstall the package's dependencies (pip install -e .)") from err
    if not ok:
        raise RuntimeError("math-verify rejects \\boxed{\\frac{1}{2}} against 0.5 in this environment; check the "
                           "math-verify / latex2sympy2_extended / antlr4 versions pinned in setup.py")


# --------------------------------------------------------------------------------------------- worker

def _worker_main(conn, verify, max_memory_mb: int | None) -> None:
    """Loop: receive (task_id, answer, ground_truths), reply (task_id, reward, ok). Exit on EOF/None."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if max_memory_mb:
        try:
            import resource

            limit = int(max_memory_mb) * 1024 * 1024
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            if soft == resource.RLIM_INFINITY or soft > limit:
                resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ImportError, ValueError, OSError):  # no RLIMIT_AS (macOS, Windows): the deadline still holds
            pass
    if verify is None:
        from real_megatron.rewards.math_reward import verify_answer as verify

    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone or closed the pool
        if msg is None:
            return
        task_id, answer, truths = msg
        try:
            reward, ok = float(verify(answer, list(truths))), True
        except SystemExit:
            raise
        except BaseException:  # noqa: B036 - math-verify's TimeoutException is a BaseException; RecursionError
            reward, ok = 0.0, False
        try:
            conn.send((task_id, reward, ok))
        except (EOFError, OSError):
            return


def _context():
    methods = mp.get_all_start_methods()
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        # Replaces the default preload ['__main__']: re-importing the trainer's main module in the fork
        # server would be slow and, for scripts without a __main__ guard, would run the trainer again.
        ctx.set_forkserver_preload(["real_megatron.rewards._preload"])
        return ctx
    return mp.get_context("spawn")


class _Worker:
    __slots__ = ("process", "conn", "ready", "task", "deadline", "started")

    def __init__(self, ctx, args):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, *args), daemon=True,
                                   name="real-megatron-reward")
        self.process.start()
        child_conn.close()  # the parent keeps only its end, so the worker's death reads as EOF
        self.conn = parent_conn
        self.ready = False
        self.task: int | None = None  # index of the answer in flight
        self.deadline = 0.0
        self.started = time.monotonic()

    def kill(self) -> None:
        try:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(timeout=2.0)
        except (OSError, ValueError, AssertionError):
            pass
        try:
            self.conn.close()
        except OSError:
            pass


def _close_if_alive(pool_ref) -> None:
    pool = pool_ref()
    if pool is not None:
        pool.close()


# ----------------------------------------------------------------------------------------------- pool

class RewardPool:
    """Math rewards (1.0 / 0.0) for batches of responses, in worker processes with a hard deadline.

    ``score(responses, ground_truths) -> (rewards, stats)``: ``ground_truths[i]`` is one answer or a
    list of accepted answers (str/int/float, normalised as the data loader does). ``stats`` counts,
    for that call: ``timeouts``, ``crashes``, ``restarts``, ``errors`` (math-verify raised),
    ``invalid`` (non-text response or bad ground truth), ``no_answer`` (no final boxed answer, scored
    0.0 without a worker), plus ``num`` and ``time_s``. Use as a context
    manager or call ``close()``. One ``score`` call at a time (the trainer's rank 0 drives rewards);
    ``totals`` accumulates the counts over the pool's life.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, answer_after_think: bool = False, *,
                 max_memory_mb: int | None = 4096, start_timeout_s: float = 120.0,
                 verify: Callable[[str, list[str]], float] | None = None):
        if int(num_workers) < 1:
            raise ValueError(f"RewardPool: num_workers={num_workers} must be >= 1 (reward.num_workers)")
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"RewardPool: timeout_s={timeout_s} must be > 0 (reward.timeout_s)")
        _check_math_verify()
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self.answer_after_think = bool(answer_after_think)
        self.start_timeout_s = float(start_timeout_s)
        self._args = (verify, max_memory_mb)  # verify=None: math_reward.verify_answer, imported in the worker
        self._ctx = _context()
        self.totals = dict.fromkeys(STAT_KEYS, 0)
        self._closed = False
        self._start_failures = 0  # consecutive workers that died before saying ready
        # started now, ready in the background: construction does not wait for imports
        self._workers = [_Worker(self._ctx, self._args) for _ in range(self.num_workers)]
        # runs before multiprocessing's exit hook (registered earlier), which would SIGTERM and join them
        atexit.register(_close_if_alive, weakref.ref(self))

    # -------------------------------------------------------------------------- public
    def score(self, responses: Sequence, ground_truths: Sequence) -> tuple[list[float], dict]:
        if self._closed:
            raise RuntimeError("RewardPool.score called after close()")
        if len(responses) != len(ground_truths):
            raise ValueError(f"RewardPool.score: {len(responses)} responses but {len(ground_truths)} ground truths")
        started = time.monotonic()
        stats = dict.fromkeys(STAT_KEYS, 0)
        rewards = [0.0] * len(responses)
        queue: deque = deque()
        for i, (response, truth) in enumerate(zip(responses, ground_truths, strict=True)):
            text, truths = _screen_response(response), _screen_truths(truth)
            if text is None or truths is None:
                stats["invalid"] += 1
                continue
            # Extraction is bounded, linear and pure Python (see extract_answer), so it runs here; only
            # the short boxed answer (<= MAX_ANSWER_CHARS) crosses to a worker, and a send never blocks.
            answer = extract_answer(text, answer_after_think=self.answer_after_think)
            if answer is None:
                stats["no_answer"] += 1  # scored 0.0 without a worker: nothing to verify
            else:
                queue.append((i, answer, truths))
        try:
            self._run(queue, rewards, stats)
        except BaseException:
            # Interrupted (Ctrl-C, a signal handler raising, a start-up failure): answers still in flight
            # belong to this aborted call, so their workers are replaced; the pool stays usable.
            for k, w in enumerate(self._workers):
                if w.task is not None:
                    self._replace(k, stats)
            raise
        for key in STAT_KEYS:
            self.totals[key] += stats[key]
        stats["num"] = len(responses)
        stats["time_s"] = time.monotonic() - started
        if stats["timeouts"] or stats["crashes"]:
            log.warning("rewards: %d timeouts, %d crashes in %d answers (scored 0.0, workers replaced)",
                        stats["timeouts"], stats["crashes"], len(responses))
        return rewards, stats

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                if w.task is None:
                    w.conn.send(None)  # polite exit for idle workers
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 1.0
        for w in self._workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            w.kill()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -------------------------------------------------------------------------- internals
    def _replace(self, k: int, stats: dict) -> None:
        self._workers[k].kill()
        self._workers[k] = _Worker(self._ctx, self._args)
        stats["restarts"] += 1

    def _run(self, queue: deque, rewards: list, stats: dict) -> None:
        workers = self._workers
        send_failures = 0
        # a worker started (e.g. as a replacement) long before this call has had no chance to report
        # ready yet: the start-up deadline counts from the later of its start and this call
        call_start = time.monotonic()
        while queue or any(w.task is not None for w in workers):
            # hand answers to ready, idle workers; the deadline starts now
            for k, w in enumerate(workers):
                if not queue:
                    break
                if w.ready and w.task is None:
                    i = queue[0][0]
                    try:
                        w.conn.send(queue[0])
                    except (OSError, ValueError):
                        # died while idle: the answer never ran, so it is re-queued, not scored
                        send_failures += 1
                        if send_failures > 3 * self.num_workers + 3:
                            raise RuntimeError("reward workers keep dying before taking work; see their stderr "
                                               "(is math-verify installed in this environment?)") from None
                        self._replace(k, stats)
                        continue
                    queue.popleft()
                    w.task, w.deadline = i, time.monotonic() + self.timeout_s
            now = time.monotonic()
            busy = [w for w in workers if w.task is not None]
            starting = [w for w in workers if not w.ready]
            if busy:
                timeout = max(0.0, min(w.deadline for w in busy) - now)
            elif starting:
                oldest = max(min(w.started for w in starting), call_start)
                if now - oldest > self.start_timeout_s:
                    raise RuntimeError(f"no reward worker became ready within {self.start_timeout_s:.0f} s; the "
                                       "machine is overloaded or the workers fail on import (see stderr)")
                timeout = self.start_timeout_s - (now - oldest)
            else:
                break
            handles = []
            for w in busy + starting:
                handles += [w.conn, w.process.sentinel]
            ready = set(wait(handles, timeout=timeout))
            for k, w in enumerate(workers):
                if w.conn in ready or w.process.sentinel in ready:
                    self._collect(k, w, rewards, stats)
            now = time.monotonic()
            for k, w in enumerate(workers):
                if w.task is not None and now >= w.deadline and self._workers[k] is w:
                    rewards[w.task] = 0.0
                    stats["timeouts"] += 1
                    log.debug("reward: answer %d timed out after %.1f s; worker killed", w.task, self.timeout_s)
                    self._replace(k, stats)
            workers = self._workers

    def _collect(self, k: int, w: _Worker, rewards: list, stats: dict) -> None:
        """Read what a worker has to say; a worker that died is replaced (its answer, if any, is a crash)."""
        try:
            msg = w.conn.recv() if w.conn.poll() else None
            dead = msg is None and not w.process.is_alive()
        except (EOFError, OSError):
            msg, dead = None, True
        if msg == _READY:
            w.ready = True
            self._start_failures = 0
        elif isinstance(msg, tuple) and len(msg) == 3 and w.task is not None and msg[0] == w.task:
            rewards[w.task] = 1.0 if msg[1] == 1.0 else 0.0
            stats["errors"] += 0 if msg[2] else 1
            w.task = None
        elif dead or msg is not None:  # gone, or talking nonsense: either way it cannot be trusted
            if w.task is not None:
                rewards[w.task] = 0.0
                stats["crashes"] += 1
                log.debug("reward: worker died on answer %d (exit code %s); replaced", w.task, w.process.exitcode)
            elif not w.ready:
                stats["crashes"] += 1  # died during start-up
                self._start_failures += 1
                if self._start_failures > 2 * self.num_workers + 2:
                    raise RuntimeError(
                        f"reward workers die during start-up (exit code {w.process.exitcode}; see stderr). If you "
                        "create a RewardPool in a script, put the code under `if __name__ == \"__main__\":` - "
                        "multiprocessing re-imports the main script in every worker - and check that math-verify "
                        "imports in this environment")
            self._replace(k, stats)
        # else: woken with nothing to read and the process alive (sentinel race); wait again


# ------------------------------------------------------------------------------------------ screening

def _screen_response(response) -> str | None:
    """A clean ``str`` for the worker, or None for anything that is not text."""
    if isinstance(response, (bytes, bytearray)):
        return bytes(response).decode("utf-8", errors="replace")
    if type(response) is not str:  # subclasses could carry hostile __reduce__/__str__; None is invalid
        if isinstance(response, str):
            response = str.__str__(response)
        else:
            return None
    try:
        response.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a broken detokenizer or os.fsdecode
        response = response.encode("utf-8", errors="replace").decode("utf-8")
    return response


def _screen_truths(truth) -> tuple | None:
    """Normalised accepted answers as a tuple of str, or None when the ground truth is unusable."""
    from real_megatron.data.prompts import ground_truth_candidates

    try:
        candidates = ground_truth_candidates(truth)
    except (TypeError, ValueError, OverflowError, RecursionError):
        return None
    clean = []
    for c in candidates:
        c = _screen_response(c)
        if c:
            clean.append(c)
    return tuple(clean) or None
