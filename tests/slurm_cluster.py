"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd started as root from a temp folder.

Everything the daemons write (state, spool, pid files, logs, the munge key and socket) lives under ``root``;
the ports are free ones picked at start, so the cluster does not touch a system Slurm or another test run.
Clients (``sbatch``, ``squeue``, ``scontrol``, and ``srun`` inside a job) find it through ``SLURM_CONF``, which
``env`` holds and jobs inherit (``sbatch --export=ALL``, Slurm's default). Needs the Debian packages
``slurm-wlm`` and ``munge`` (scripts/system-packages.sh) and root.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "srun")
READY_S = 90  # bound on the wait for the node to come up idle (it takes a few seconds)
# job states after which a job does not run again by itself (Slurm's JOB_STATE_BASE names)
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")


def missing() -> str | None:
    """Why this machine cannot start the cluster, or None."""
    absent = [c for c in DAEMONS if shutil.which(c) is None]
    if absent:
        return f"{', '.join(absent)} not installed (Debian: slurm-wlm munge; scripts/system-packages.sh)"
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_resources() -> tuple[int, int]:
    """(CPUs, RealMemory MB) as slurmd itself sees this host."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    cpus = int(re.search(r"CPUs=(\d+)", out).group(1))
    mem = int(re.search(r"RealMemory=(\d+)", out).group(1))
    return cpus, mem


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]  # what `hostname -s` prints; slurmd looks itself up by it
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.partition = "debug"

    # ------------------------------------------------------------------------------------------- start, stop

    def start(self) -> SlurmCluster:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)  # munged refuses a socket folder others can write to
        key = r / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        sock = r / "munge" / "munge.socket"
        cpus, mem = _node_resources()
        self.cpus = cpus
        self.conf.write_text(f"""\
ClusterName=domainlm-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it starts again (slurmd refuses the old job's
# credential until it expires; default 120 s)
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
# no cgroups in a container: processes tracked by parent pid, no task binding, no accounting daemon
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
# a full scheduling pass every 2 s (default 60 s): a requeued job whose begin time has passed starts promptly
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# finished jobs stay visible to `scontrol show job` for 10 minutes
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        try:
            m = r / "munge"
            self._daemon("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                                    f"--pid-file={m / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                                    f"--seed-file={m / 'munged.seed'}"])
            self._wait(lambda: sock.exists(), "munged's socket")
            self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._daemon("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self._wait(self._node_idle, f"node {self.host} idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        log.close()

    def _node_idle(self) -> bool:
        r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return r.returncode == 0 and r.stdout.strip() == "idle"

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + READY_S
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}"
                                 for f in sorted((self.root / "log").glob("*")))
                why = f"{', '.join(dead)} exited" if dead else f"not ready after {READY_S} s"
                raise RuntimeError(f"test Slurm cluster: waiting for {what}: {why}\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel what is still queued, then stop exactly the daemons this object started (newest first)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition", self.partition, check=False)
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    # ------------------------------------------------------------------------------------------- clients

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` as one dict per job (per task of an array): JobState, ExitCode, Restarts..."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        return self.jobs(job_id)[0]

    def wait_job(self, job_id: str, timeout_s: float = 600) -> list[dict[str, str]]:
        """Poll until the job (every task of an array) has reached a final state and released its node (no
        longer COMPLETING, so it can be requeued at once); a bound, not a kill point. Returns the records."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = self.jobs(job_id)
            completing = self.run("squeue", "-h", "-j", str(job_id), "-t", "CG", check=False).stdout.strip()
            if all(r.get("JobState") in FINAL for r in records) and not completing:
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout_s} s: {records}")
            time.sleep(0.5)

    def log(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                         for f in sorted((self.root / "log").glob("*.log")))
