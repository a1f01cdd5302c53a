"""A real one-node SLURM cluster on localhost, for the tests: munge, slurmctld and slurmd from
Debian's ``slurm-wlm`` and ``munge`` packages, with every file (config, key, state, logs,
sockets) under one folder, so it touches nothing of the machine's own SLURM, if any.

    python tests/slurm_cluster.py DIR    # start one in DIR and keep it up until Ctrl-C or SIGTERM

Clients find it through ``SLURM_CONF=DIR/slurm.conf`` (``LocalSlurm.env``). The node has 2 CPUs,
the machine's memory, and one partition, ``debug``, the default.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
PACKAGES = "slurm-wlm munge"
PARTITION = "debug"


def missing_programs() -> list[str]:
    """The SLURM and munge programs this machine lacks (the daemons live in sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=path) is None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


class LocalSlurm:
    """Start with ``start()``, stop with ``stop()`` (also a context manager)."""

    def __init__(self, root: str | os.PathLike, cpus: int = 2) -> None:
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._daemons: dict[str, subprocess.Popen] = {}
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        self._programs = {name: shutil.which(name, path=path) for name in DAEMONS}

    @property
    def env(self) -> dict:
        """The environment of a client of this cluster (and of the jobs it runs)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def log(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

    def _write_config(self) -> None:
        for folder in ("munge", "log", "state", "spool", "run"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root / folder, 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        user = getpass.getuser()
        # task/affinity pins each job to the CPUs it was given, as clusters do, so a job sees its
        # cpus-per-task as its cores; linuxproc tracks processes without cgroups (containers).
        # KillWait is how long a cancelled or requeued job has between SIGTERM and SIGKILL.
        self.conf.write_text(f"""\
ClusterName=captcha-lit-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=15
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}
SlurmctldPidFile={self.root / "run" / "slurmctld.pid"}
SlurmdPidFile={self.root / "run" / "slurmd.pid"}
SlurmctldLogFile={self.log("slurmctld")}
SlurmdLogFile={self.log("slurmd")}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, args: list[str]) -> None:
        # nice: the daemons and the jobs they start share the machine with everyone else's work.
        out = open(self.root / "log" / f"{name}.out", "w")
        self._daemons[name] = subprocess.Popen(["nice", "-n", "15", self._programs[name], *args], env=self.env,
                                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout: float = 60) -> None:
        missing = missing_programs()
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not installed: apt-get install {PACKAGES}")
        self._write_config()
        self._spawn("munged", ["--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={self.root / 'munge' / 'munge.key'}",
                               f"--pid-file={self.root / 'run' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                               f"--log-file={self.log('munged')}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged to open its socket")
        self._spawn("slurmctld", ["-D", "-c", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._idle, timeout, f"node {self.node} to be idle in sinfo")

    def _idle(self) -> bool:
        try:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True,
                                 timeout=10).stdout
        except subprocess.TimeoutExpired:
            return False
        return out.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name, proc in self._daemons.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").iterdir()))
                problem = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f} s"
                raise RuntimeError(f"waiting for {what}: {problem}\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then stop the daemons (newest first)."""
        if "slurmctld" in self._daemons and self._daemons["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", f"--user={getpass.getuser()}"], env=self.env, capture_output=True,
                           timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T"], env=self.env, capture_output=True,
                                       text=True, timeout=30).stdout.split()
                if not set(queue) & {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "SUSPENDED"}:
                    break
                time.sleep(0.5)
        for name in reversed(list(self._daemons)):
            proc = self._daemons.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/slurm_cluster.py DIR")
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: sys.exit(0))  # leave the with block, which stops the cluster
    with LocalSlurm(sys.argv[1]) as cluster:
        print(f"SLURM is up: export SLURM_CONF={cluster.conf}   (Ctrl-C stops it)", flush=True)
        while True:
            signal.pause()
