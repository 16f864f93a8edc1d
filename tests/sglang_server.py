"""Start and stop REAL SGLang 0.5.23 servers on the CPU for the tests (not product code).

The server runs from the pinned test environment ``.venv-sglang/`` (built by
``tests/sglang_env/build.sh``, which ``make test`` runs), with the two CPU workarounds of
``tests/sglang_env/stubs/`` on its ``PYTHONPATH`` and the CPU flags measured in
../shared/ENGINES_ON_CPU.md. When the environment is missing or incomplete the caller FAILS with
what is missing and the command that builds it: never a skip.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV_DIR = ROOT / "tests" / "sglang_env"
VENV = Path(os.environ.get("SGLANG_VENV", ROOT / ".venv-sglang"))
PYTHON = VENV / "bin" / "python"
START_TIMEOUT_S = float(os.environ.get("SGLANG_START_TIMEOUT_S", "400"))


def env_problem() -> str | None:
    """Why the SGLang environment cannot be used, or None when its build is complete and current."""
    digest = hashlib.sha256((ENV_DIR / "requirements.lock").read_bytes() + (ENV_DIR / "build.sh").read_bytes())
    stamp = VENV / f".built-{digest.hexdigest()[:16]}"
    if not PYTHON.exists():
        return f"no SGLang test environment at {VENV}"
    if not stamp.exists():
        return (f"the SGLang test environment at {VENV} is incomplete or built from another lock file "
                f"(no {stamp.name})")
    return None


def require_env() -> None:
    problem = env_problem()
    if problem:
        pytest.fail(f"{problem}. Build it with `tests/sglang_env/build.sh` (about 10 minutes; `make test` runs it "
                    "first). The real-SGLang tests cannot run without it.", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health_generate", timeout=30) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Server:
    """One ``python -m sglang.launch_server`` process on 127.0.0.1 (its own process group)."""

    def __init__(self, model_dir, log_path, *, cpus: str = "0-1", max_running_requests: int = 4, wait: bool = True,
                 taskset: str | None = None, max_total_tokens: int = 2048):
        """``cpus``: the cores its OpenMP threads bind to; ``taskset``: pin the whole server (every process) to
        these cores too (a benchmark's placement)."""
        require_env()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "SGLANG_CPU_OMP_THREADS_BIND": cpus,
               "PYTHONPATH": str(ENV_DIR / "stubs"), "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
        args = [str(PYTHON), "-m", "sglang.launch_server", "--model-path", str(model_dir), "--device", "cpu",
                "--attention-backend", "torch_native", "--dtype", "float32",
                "--disable-cuda-graph", "--max-total-tokens", str(max_total_tokens),
                "--max-running-requests", str(max_running_requests), "--host", "127.0.0.1", "--port", str(self.port),
                "--skip-server-warmup", "--log-level", "warning",
                # An idle CPU scheduler otherwise busy-polls a whole core for as long as the
                # session-scoped server lives, halving the speed of every later test on 2 cores.
                "--sleep-on-idle"]
        if taskset:
            args = ["taskset", "-c", taskset, *args]
        self._log = open(self.log_path, "w")
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until ``/health_generate`` answers 200 (``start_s``: seconds from launch); fail with the log tail."""
        t0 = self._t0
        try:
            while not _ready(self.url):
                if self.proc.poll() is not None or time.monotonic() - t0 > START_TIMEOUT_S:
                    pytest.fail(f"the SGLang server did not become ready (exit code {self.proc.returncode}, "
                                f"{time.monotonic() - t0:.0f}s); its log ({self.log_path}) ends with:\n"
                                f"{self.log_tail()}", pytrace=False)
                time.sleep(1.0)
        except BaseException:  # also Ctrl-C while waiting: never leave a server behind
            self.stop()
            raise
        self.start_s = time.monotonic() - t0

    @classmethod
    def several(cls, model_dir, log_dir, count: int, **kw) -> list[Server]:
        """``count`` servers launched at once (one core each: ``cpus`` 0, 1, ...), then waited for."""
        servers = [cls(model_dir, Path(log_dir) / f"server{k}.log", cpus=str(k % 2), wait=False, **kw)
                   for k in range(count)]
        try:
            for server in servers:
                server.wait_ready()
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return servers

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def post(self, path: str, payload: dict | None = None, timeout: float = 300):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body.decode()

    def kill(self) -> None:
        """SIGKILL the whole server (launcher, scheduler, detokenizer): an engine dying mid-run."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):  # SGLang's children share the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
