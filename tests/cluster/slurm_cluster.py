"""A real single-host SLURM cluster for tests: munged, slurmctld and slurmd started from
a private directory (own munge socket, ports, state and logs), torn down afterwards.

Not a conftest.py on purpose: a second ``conftest`` module would shadow tests/conftest.py
for every ``from conftest import ...`` in the suite.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")

# Short scheduler intervals so a requeued job restarts in seconds, not minutes: a requeued
# job waits cred_expire + 1 s, then the main scheduler (every sched_interval) starts it.
# slurmctld refuses cred_expire under 5 ("AuthInfo=cred_expire=4 invalid" in its log) and
# keeps its default of 120 s: each requeue then took two minutes.
SLURM_CONF = """\
ClusterName=genflowtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=15
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Default=YES Nodes=ALL MaxTime=INFINITE State=UP
"""


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


class SlurmUnavailable(Exception):
    """SLURM cannot run here (no packages and no way to install them)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge when missing (root + apt-get only)."""
    if all(shutil.which(name) for name in DAEMONS):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurmctld/munged missing and no root apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # a fresh machine may not have package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not all(shutil.which(name) for name in DAEMONS):
        raise SlurmUnavailable(f"apt-get install slurm-wlm munge failed: {proc.stderr[-500:]}")


@dataclass
class SlurmCluster:
    root: Path
    host: str
    env: dict[str, str]  # os.environ + SLURM_CONF: pass to every SLURM client / submit
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        info = self.job(job_id)
        while info["JobState"] not in states:
            if info["JobState"] in TERMINAL or time.time() > deadline:
                raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {info}")
            time.sleep(0.5)
            info = self.job(job_id)
        return info

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        # cancel what is left so no slurmstepd (and no rank) outlives the test session
        self.run("scancel", "--user", "root", check=False)
        deadline = time.time() + 20
        while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def start_slurm(timeout: float = 60) -> SlurmCluster:
    """munged + slurmctld + slurmd in the foreground (so their pids are ours), node idle."""
    ensure_installed()
    # munged insists that every directory above its socket be world-executable: not under
    # pytest's 0700 tmp root, hence a directory of our own in /tmp
    root = Path(tempfile.mkdtemp(prefix="genflow-slurm-"))
    root.chmod(0o755)
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(mode=0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=host,
            root=root,
            cpus=os.cpu_count() or 1,
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
        )
    )
    env = dict(os.environ, SLURM_CONF=str(conf))
    cluster = SlurmCluster(root=root, host=host, env=env)
    munge = root / "munge"
    daemons = [
        [
            "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={munge}/munge.socket",
            f"--pid-file={munge}/munged.pid",
            f"--seed-file={munge}/munged.seed",
            f"--log-file={root}/log/munged.log",
        ],
        ["slurmctld", "-D", "-i"],  # -i: ignore (absent) saved state
        ["slurmd", "-D", "-N", host],
    ]
    try:
        for cmd in daemons:
            log = open(root / "log" / f"{cmd[0]}.stdout", "w")
            cluster.procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
            if cmd[0] == "munged":
                _wait_until(lambda: (munge / "munge.socket").exists(), 10, "munged socket")
        _wait_until(
            lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
            timeout,
            "node idle in sinfo",
        )
    except BaseException as err:
        detail = cluster.logs()
        cluster.stop()
        raise RuntimeError(f"SLURM did not start: {err}\n{detail}") from err
    return cluster


def _wait_until(ready, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)
