"""A throw-away Slurm cluster for the tests: Debian's Slurm 22.05 as two nodes on one host.

The ``slurm_cluster`` fixture (session-scoped) starts, from one temporary directory and with free
ports chosen at run time: a private ``munged``, MariaDB with its own datadir, ``slurmdbd`` (so
that ``sacct`` works: NeMo-Run waits for jobs through it), ``slurmctld`` and two ``slurmd``
(nodeA, nodeB: Debian builds Slurm with MULTIPLE_SLURMD, so both run on this host, each with its
own port and spool directory). Every daemon runs in the foreground under ``subprocess.Popen``;
teardown cancels the jobs still queued, stops the daemons and kills any process left holding this
cluster's ``SLURM_CONF`` in its environment, so nothing outlives the session.

Client commands need ``SLURM_CONF`` in their environment: use ``cluster.env`` (or
``cluster.run(...)``). Facts this is built on: ../shared/SLURM_ON_CPU.md.

Packages: slurmctld slurmd slurm-client munge slurmdbd mariadb-server (``tools/install_slurm.sh``,
which ``make test`` runs). Without them, or when not root, the tests that use the fixture skip with
a reason naming what is missing; under ``CI=true`` they fail instead.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

# binary -> Debian package
REQUIRED = {"munged": "munge", "mariadbd": "mariadb-server", "mariadb-install-db": "mariadb-server",
            "mariadb": "mariadb-client", "slurmdbd": "slurmdbd", "slurmctld": "slurmctld", "slurmd": "slurmd",
            "sbatch": "slurm-client", "sacct": "slurm-client", "scontrol": "slurm-client"}
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
NODES = ("nodeA", "nodeB")
DB_PASSWORD = "slurm-test"  # a private MariaDB bound to 127.0.0.1 for the session's lifetime
# cancelled jobs get SIGTERM, then SIGKILL this many seconds later: long enough for the tiny
# recipe to finish its rollout step and save (the trainer's SIGTERM contract)
KILL_WAIT_S = 60


class ClusterError(RuntimeError):
    """A daemon did not come up; the message carries the tail of its log."""


def missing_pieces() -> list[str]:
    """What keeps the cluster from starting here: absent binaries (with their package), not root."""
    missing = []
    absent = sorted({pkg for binary, pkg in REQUIRED.items() if shutil.which(binary, path=SEARCH_PATH) is None})
    if absent:
        missing.append("packages " + " ".join(absent) + " (as root: tools/install_slurm.sh, or make test)")
    if os.geteuid() != 0:
        missing.append("root (slurmd runs jobs and munged/MariaDB run with root-owned files)")
    return missing


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now, below the kernel's ephemeral range.

    Why not port 0: the kernel hands out ephemeral ports to every port-0 bind and outgoing connection
    on the host (other tests' torchrun --standalone among them), so a port picked that way and used
    seconds later by a rendezvous was seen taken by someone else; ports below the range are only
    ever used by name.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", rng.randrange(max(1024, low - 12000), low)))
            except OSError:
                s.close()
                continue
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"({path} not written)"


class SlurmCluster:
    """Daemons, config and client environment of one cluster under ``root`` (a fresh directory)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if len(str(self.root / "munge.socket")) > 100:  # sun_path holds 108 bytes
            raise ClusterError(f"{self.root} is too long for a Unix socket path")
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge.socket"
        self.db_socket = self.root / "mariadb.socket"
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        (self.ctld_port, self.dbd_port, self.db_port, *self.node_ports) = free_ports(3 + len(NODES))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SEARCH_PATH}

    # ------------------------------------------------------------------ set-up
    def start(self) -> SlurmCluster:
        t0 = time.monotonic()
        try:
            self._start_munge()
            self._start_mariadb()
            self._write_configs()
            self._daemon("slurmdbd", ["slurmdbd", "-D"], self.root / "log" / "slurmdbd.log")
            self._wait(lambda: self._port_open(self.dbd_port), "slurmdbd", self.root / "log" / "slurmdbd.log")
            self._daemon("slurmctld", ["slurmctld", "-D", "-i"], self.root / "log" / "slurmctld.log")
            self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld",
                       self.root / "log" / "slurmctld.log")
            for node in NODES:
                self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-N", node], self.root / "log" / f"slurmd-{node}.log")
            self._wait(self._nodes_idle, "slurmd", self.root / "log" / "slurmd-nodeB.log")
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _daemon(self, name: str, argv: list[str], log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log.with_suffix(".stdout"), "wb")
        proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.root, start_new_session=True)
        out.close()
        self.procs.append((name, proc, log))

    def _wait(self, ready, name: str, log: Path, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pname, proc, plog in self.procs:
                if proc.poll() is not None:
                    raise ClusterError(f"{pname} exited with {proc.returncode} while starting; {plog} ends:\n"
                                       f"{_tail(plog)}{_tail(plog.with_suffix('.stdout'), 1500)}")
            if ready():
                return
            time.sleep(0.1)
        raise ClusterError(f"{name} not ready after {timeout:.0f} s; {log} ends:\n{_tail(log)}")

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=True))
        return all(states.get(node) == "idle" for node in NODES)

    def _start_munge(self):
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        log = self.root / "log" / "munged.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # --force: pytest's temporary directories are 0700, which munged otherwise refuses for its socket
        self._daemon("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                                f"--pid-file={self.root / 'munged.pid'}", f"--log-file={log}",
                                f"--seed-file={self.root / 'munged.seed'}"], log)
        self._wait(self.munge_socket.exists, "munged", log)

    def _start_mariadb(self):
        datadir = self.root / "mariadb"
        log = self.root / "log" / "mariadb.log"
        init = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                               "--auth-root-authentication-method=socket", "--skip-test-db"],
                              env=self.env, capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed:\n{init.stdout[-2000:]}{init.stderr[-2000:]}")
        # small and non-durable: a throw-away accounting database
        self._daemon("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={datadir}", f"--socket={self.db_socket}",
                                  f"--port={self.db_port}", "--bind-address=127.0.0.1", "--user=root",
                                  f"--pid-file={self.root / 'mariadb.pid'}", f"--log-error={log}", "--skip-log-bin",
                                  "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=0"], log)
        self._wait(self.db_socket.exists, "mariadbd", log)
        sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        done = subprocess.run(["mariadb", "--no-defaults", f"--socket={self.db_socket}", "-u", "root", "-e", sql],
                              env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise ClusterError(f"creating the slurm database user failed: {done.stderr}")

    def _write_configs(self):
        for sub in ("etc", "state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        cpus = os.cpu_count() or 1
        memory_mb = min(4000, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2)
        r = self.root
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} "
                          f"RealMemory={memory_mb} State=UNKNOWN" for n, p in zip(NODES, self.node_ports, strict=True))
        self.conf.write_text(f"""\
ClusterName=rmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.dbd_port}
AccountingStoragePass={self.munge_socket}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait={KILL_WAIT_S}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        dbd = self.root / "etc" / "slurmdbd.conf"  # slurmdbd reads it beside $SLURM_CONF
        dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser=slurm
StoragePass={DB_PASSWORD}
StorageLoc=slurm_acct_db
PidFile={r}/slurmdbd.pid
LogFile={r}/log/slurmdbd.log
""")
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it holds the password)

    # ------------------------------------------------------------------ clients
    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sacct_state(self, job_id: str) -> str | None:
        """The batch job's accounting state (COMPLETED, CANCELLED, FAILED, RUNNING, ...), None until it appears."""
        out = self.run("sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "State", check=False).stdout.split()
        return out[0].split()[0] if out else None

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.sacct_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s (wanted {sorted(states)})")

    def wait_gone(self, job_id: str, timeout: float):
        """Until the job has left the queue: every process of it has ended (a cancelled job is CANCELLED
        in sacct at once, while its processes still have KillWait seconds to finish)."""
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-j", str(job_id), check=False).stdout.strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still in squeue after {timeout:.0f} s")
            time.sleep(0.5)

    # ------------------------------------------------------------------ teardown
    def stop(self):
        if any(name == "slurmctld" and proc.poll() is None for name, proc, _ in self.procs):
            self.run("scancel", "--full", "--partition", "debug", check=False)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.2)
        for _name, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.leftover_pids():
            if time.monotonic() > deadline:
                raise ClusterError(f"processes {self.leftover_pids()} of the test cluster survived SIGKILL")
            time.sleep(0.1)

    def leftover_pids(self) -> list[int]:
        """Processes still carrying this cluster's SLURM_CONF (job steps, slurmstepd): ours to end."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found


def skip_or_fail_if_missing(missing: list[str]):
    """Skip naming what is missing; under CI=true (where `make test` installs the packages) fail instead."""
    if not missing:
        return
    reason = "real-Slurm tests need " + "; ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI=true: these tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node cluster with accounting; skips (fails under CI=true) when it cannot start here."""
    skip_or_fail_if_missing(missing_pieces())
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
