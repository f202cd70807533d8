"""A private Slurm cluster for the `slurm` tests: munged, slurmctld and one or two slurmd, all under one
temp dir, on free loopback ports. Facts it relies on are in ../shared/NOTES-infra.md.

The session fixture `slurm_cluster` starts it once (installing Debian's packages when root and missing)
and always stops it: `scontrol shutdown` for the Slurm daemons, then munged by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol")
NODES = ("n1", "n2")
CPUS_PER_NODE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _path_with_sbin() -> str:
    """Debian installs the daemons in /usr/sbin, which a non-login PATH may lack."""
    return os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"


def _missing_daemons() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name, path=_path_with_sbin()) is None]


def ensure_slurm_installed() -> str | None:
    """None when Slurm and munge are usable (installing them with apt-get when missing; needs root), else
    the reason the slurm tests skip."""
    if not _missing_daemons():
        return None
    if shutil.which("apt-get") is None:
        return f"slurm tests need {', '.join(PACKAGES)} and there is no apt-get to install them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            return f"slurm tests skipped: `{' '.join(command)}` failed: {done.stderr.strip()[-300:]}"
    return None if not _missing_daemons() else f"slurm tests skipped: still missing {_missing_daemons()}"


@dataclass
class PrivateSlurm:
    """munged + slurmctld + one slurmd per node name, configured and logging under `root`."""

    root: Path
    nodes: tuple[str, ...] = NODES
    munged_pid: int | None = None
    started: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment of Slurm commands (and, through sbatch, of the jobs)."""
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=_path_with_sbin())

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._start_munged()
        self.conf.write_text(self._slurm_conf())
        self._run_daemon(["slurmctld", "-i"], "slurmctld")
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            self._run_daemon(["slurmd", "-N", node], f"slurmd-{node}")
        self._wait_nodes_idle(timeout_s=60)

    def _start_munged(self) -> None:
        key = self.root / "munge.key"
        subprocess.run(["mungekey", "-c", "-k", str(key)], env=self.env, check=True, capture_output=True)
        key.chmod(0o600)
        pid_file = self.root / "munged.pid"
        subprocess.run(
            [
                "munged",
                "--force",
                f"--socket={self.root / 'munge.sock'}",
                f"--key-file={key}",
                f"--pid-file={pid_file}",
                f"--log-file={self.root / 'munged.log'}",
                f"--seed-file={self.root / 'munged.seed'}",
            ],
            env=self.env,
            check=True,
            capture_output=True,
        )
        self.munged_pid = int(pid_file.read_text().strip())

    def _run_daemon(self, command: list[str], name: str) -> None:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed to start: {done.stderr.strip()}; log: {self.root / name}.log")
        self.started.append(name)

    def _slurm_conf(self) -> str:
        host, r = socket.gethostname().split(".")[0], self.root
        mem_mib = int(_mem_total_kib() / 1024 * 0.8)
        lines = [
            "ClusterName=pretraintest",
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={free_port()}",
            f"AuthInfo=socket={r / 'munge.sock'},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=500",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r / 'jobcomp.txt'}",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MailProg=/bin/true",
            "KillWait=5",
            "MinJobAge=300",
            "SchedulerParameters=sched_interval=2",
        ]
        lines += [
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={CPUS_PER_NODE} RealMemory={mem_mib} State=UNKNOWN"
            for node in self.nodes
        ]
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        (r / "state").mkdir(exist_ok=True)
        return "\n".join(lines) + "\n"

    def _wait_nodes_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.scontrol("show", "nodes", "-o").stdout
            if states.count("State=IDLE") == len(self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {timeout_s}s: {states}")

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        if self.started:
            self.scontrol("shutdown")
            self._wait_pid_files_gone(timeout_s=30)
        if self.munged_pid is not None:
            _terminate(self.munged_pid)
            self.munged_pid = None

    def _wait_pid_files_gone(self, timeout_s: float) -> None:
        """slurmctld and slurmd remove their pid files on exit; kill by pid whatever outlives the timeout."""
        pid_files = [self.root / "slurmctld.pid", *(self.root / f"slurmd-{n}.pid" for n in self.nodes)]
        deadline = time.monotonic() + timeout_s
        while any(p.exists() for p in pid_files) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid_file in pid_files:
            if pid_file.exists():
                _terminate(int(pid_file.read_text().strip()))


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _mem_total_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise RuntimeError("no MemTotal in /proc/meminfo")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> PrivateSlurm:
    """A private two-node Slurm cluster for the session; stopped (daemons and munged) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("slurm tests need root to run slurmctld, slurmd and munged (not root)")
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(reason)
    cluster = PrivateSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
