"""Slurm: the training job of `domainlm launch slurm`, and the job queries `prepare.executor: slurm` waits on.

`domainlm launch slurm CONFIG --nodes N --gpus-per-node G` writes ``<run>/launch/train.sbatch`` and submits it.
The job runs one torchrun agent per node under ``srun``; the agents meet at a c10d rendezvous on the first node
of ``$SLURM_JOB_NODELIST`` (torchrun then assigns the ranks), the node count comes from
``$SLURM_JOB_NUM_NODES``. The script is requeue-safe: ``--requeue`` lets Slurm (preemption, a failed node) or
``scontrol requeue`` run it again under the same job id, and ``domainlm train`` resumes from the last
checkpoint by default, so a requeued job continues the loss curve instead of restarting it. On a CPU-only
cluster (``--gpus-per-node 0``) the processes use gloo, as `domainlm train` does on CPU.

Preemption: ``#SBATCH --signal=USR1@<seconds>`` makes Slurm send SIGUSR1 that long before the time limit; the
torchrun agent (`launch/torchrun.py`, which survives it) passes it to the ranks, which checkpoint at the next step
boundary, ``scontrol requeue`` the job and exit (`train/preempt.py`): a TIMEOUT loses no steps.
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

from domainlm.config import config_path, demo_recipe_path, load_config
from domainlm.errors import UserError
from domainlm.rundir import RunDir, atomic_write

# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (sbatch(1)), or UNLIMITED
TIME_RE = re.compile(r"^(\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2}|unlimited|infinite)$", re.IGNORECASE)
PARTITION_RE = re.compile(r"^[A-Za-z0-9_.,-]+$")
# an #SBATCH value that needs no quotes: sbatch's parser treats only space, quotes, backslash and # specially
SBATCH_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./&|()\[\]*-]+$")
# + job id mod 10000: two jobs sharing a head node get different ports, all of them below Linux's ephemeral range
# (net.ipv4.ip_local_port_range starts at 32768), where an outgoing connection (NCCL's, gloo's) could hold one
RDZV_PORT_BASE, RDZV_PORTS = 20000, 10000
SIGNAL_S = 300  # default --signal-seconds: time to finish a step and write a checkpoint before the time limit
GRES_RE = re.compile(r"^[A-Za-z0-9_]+(:[A-Za-z0-9_.-]+)*(,[A-Za-z0-9_]+(:[A-Za-z0-9_.-]+)*)*$")  # gpu:h100:8
MEM_RE = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)  # sbatch --mem: 0 (all of the node's), 512G, 500000M
NAME_RE = re.compile(r"^[A-Za-z0-9_.,-]+$")  # an account, a QOS
CONSTRAINT_RE = re.compile(r"^[A-Za-z0-9_.,&|()\[\]*:-]+$")  # node features: a100&ib, [rack1|rack2]
POLL_S = 2.0  # between two queue queries while waiting on jobs
DONE_POLL_S = 0.25  # between two looks at a stage's completion markers
ENDED = {"COMPLETING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}  # squeue's %T names of job states after which the job's tasks do not run


def script_path(run_dir: Path) -> Path:
    return RunDir(run_dir) / RunDir.SBATCH


def job_log(run_dir: Path, job_id: str) -> Path:
    """The log of a Slurm job of this run (``%j``: sbatch puts the job id in)."""
    return RunDir(run_dir) / RunDir.LAUNCH_DIR / f"slurm-{job_id}.out"


def no_control(value: str, what: str) -> str:
    """``value`` unchanged, or a one-line UserError when it holds a control character: a newline in a path or
    name would end the line of the script it is written into and start a command of its own."""
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise UserError(f"{what} {value!r}: contains the control character {bad!r}, which a Slurm script cannot "
                        "hold safely; rename it")
    return value


def sbatch_quote(value: str) -> str:
    """``value`` as one argument of an ``#SBATCH`` line. sbatch splits these lines itself, not bash: it groups
    characters between quotes and takes the character after a backslash literally (``_get_argument`` in Slurm's
    src/sbatch/opt.c), so a double-quoted value with ``\\`` and ``"`` escaped reads back unchanged."""
    if SBATCH_SAFE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def train_script(*, config: Path, workdir: Path, run_dir: Path, job_name: str, nodes: int, gpus_per_node: int,
                 procs_per_node: int, cpus_per_task: int, partition: str | None, time_limit: str | None,
                 python: str, account: str | None = None, qos: str | None = None, mem: str | None = None,
                 exclusive: bool = False, constraint: str | None = None, gres: str | None = None,
                 signal_s: int | None = SIGNAL_S) -> str:
    """The sbatch script: ``srun`` starts one torchrun agent per node, which starts ``procs_per_node`` ranks.
    ``gres`` (``gpu:8``, ``gpu:h100:8``) requests the GPUs as generic resources instead of ``--gpus-per-node``,
    which needs Slurm's cons_tres plugin. Every path and name in it is free of control characters
    (`no_control`) and quoted: for bash with shlex.quote, on ``#SBATCH`` lines for sbatch's own parser
    (`sbatch_quote`)."""
    q, sq = shlex.quote, sbatch_quote
    for value, what in ((str(config), "the config path"), (str(workdir), "the working directory"),
                        (str(run_dir), "run_dir"), (job_name, "the job name"), (python, "the Python executable"),
                        (partition or "", "--partition"), (time_limit or "", "--time"), (account or "", "--account"),
                        (qos or "", "--qos"), (mem or "", "--mem"), (constraint or "", "--constraint"),
                        (gres or "", "--gres")):
        no_control(value, what)
    # --output is a filename pattern: %j is the job id, %% a literal % (sbatch(1), "filename pattern")
    log = str(RunDir(run_dir) / RunDir.LAUNCH_DIR).replace("%", "%%") + "/slurm-%j.out"
    gpus = [f"--gres={sq(gres)}"] if gres else [f"--gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    directives = [
        f"--job-name={sq(job_name)}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",  # one torchrun agent per node; it forks the ranks
        f"--cpus-per-task={cpus_per_task}",
        *gpus,
        *([f"--mem={sq(mem)}"] if mem else []),
        *(["--exclusive"] if exclusive else []),
        *([f"--constraint={sq(constraint)}"] if constraint else []),
        *([f"--partition={sq(partition)}"] if partition else []),
        *([f"--account={sq(account)}"] if account else []),
        *([f"--qos={sq(qos)}"] if qos else []),
        *([f"--time={sq(time_limit)}"] if time_limit else []),
        f"--chdir={sq(str(workdir))}",  # the config's relative run_dir resolves as it did at submission
        f"--output={sq(log)}",
        "--open-mode=append",  # a requeued run appends to the same log
        "--requeue",
        # SIGUSR1 ahead of the time limit: checkpoint at the next step, requeue, exit (train/preempt.py)
        *([f"--signal=USR1@{signal_s}"] if signal_s else []),
    ]
    train = f"{q(python)} -m domainlm.launch.torchrun"  # torchrun that passes SIGUSR1 on to its ranks
    nccl = [
        "# a failed or hung collective aborts the rank (instead of hanging until the time limit), so the job fails",
        "# and can be requeued",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
    ] if gpus_per_node or gres else []
    return "\n".join([
        "#!/bin/bash",
        f"# written by `domainlm launch slurm`: `domainlm train {q(str(config))}` on {nodes} node(s) x "
        f"{procs_per_node} process(es) ({'nccl' if gpus_per_node or gres else 'gloo'})",
        *(f"#SBATCH {d}" for d in directives),
        "set -euo pipefail",
        *nccl,
        "# rendezvous: torchrun's c10d store on the first node of the allocation, by address (the name may resolve",
        "# differently, or to another interface, on the other nodes)",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'head_addr=$(getent ahostsv4 "$head_node" | awk \'NR == 1 { print $1 }\' || true)',
        'head_addr=${head_addr:-$head_node}',
        f"port=$(({RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORTS}))",
        'echo "domainlm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s) '
        '$SLURM_JOB_NODELIST, rendezvous $head_node ($head_addr):$port"',
        "# srun does not pass --cpus-per-task on to the step by itself (Slurm >= 22.05)",
        'srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \\',
        f'    {train} --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={procs_per_node} \\',
        '    --rdzv-backend=c10d --rdzv-endpoint="$head_addr:$port" --rdzv-id="$SLURM_JOB_ID" \\',
        f"    -m domainlm train {q(str(config))}",
        "",
    ])


def _check(flag: str, value: str | None, pattern: re.Pattern, what: str) -> None:
    if value is not None and not pattern.match(value):
        raise UserError(f"{flag}: expected {what}, got {value!r}")


def launch_train(config: Path | None, *, nodes: int, gpus_per_node: int, procs_per_node: int | None = None,
                 cpus_per_task: int | None = None, partition: str | None = None, time_limit: str | None = None,
                 account: str | None = None, qos: str | None = None, mem: str | None = None, exclusive: bool = False,
                 constraint: str | None = None, gres: str | None = None, signal_s: int | None = SIGNAL_S,
                 dry_run: bool = False) -> dict:
    """Write ``<run>/launch/train.sbatch`` (atomically) and, unless ``dry_run``, submit it with sbatch. A dry run
    only writes the script, so it works before the data is prepared (a user reads the script first)."""

    _check("--time", time_limit, TIME_RE, "a Slurm time limit (MINUTES, H:M:S or D-H:M:S)")
    _check("--partition", partition, PARTITION_RE, "a partition name")
    _check("--account", account, NAME_RE, "an account name")
    _check("--qos", qos, NAME_RE, "a QOS name")
    _check("--mem", mem, MEM_RE, "memory per node, e.g. 512G (0: all of it)")
    _check("--constraint", constraint, CONSTRAINT_RE, "node features, e.g. a100&ib")
    _check("--gres", gres, GRES_RE, "generic resources, e.g. gpu:8 or gpu:h100:8")
    if signal_s is not None and not 0 <= signal_s <= 65535:  # sbatch(1): sig_time up to 65535
        raise UserError(f"--signal-seconds: expected 0–65535 seconds (0: no signal), got {signal_s}")
    if gres and not gpus_per_node:
        raise UserError(f"--gres {gres}: also give --gpus-per-node (the processes per node, one per GPU)")
    path = config_path(config).resolve() if config is not None else demo_recipe_path()
    cfg = load_config(path)
    procs = procs_per_node or gpus_per_node or 1  # CPU-only: one process per node unless told
    if gpus_per_node and procs > gpus_per_node:
        raise UserError(f"--procs-per-node: {procs} processes on {gpus_per_node} GPUs per node; at most one per GPU")
    workdir = Path.cwd()
    run_dir = cfg.directory(workdir).resolve()
    text = train_script(config=path, workdir=workdir, run_dir=run_dir, job_name=f"domainlm-train-{cfg.name}",
                        nodes=nodes, gpus_per_node=gpus_per_node, procs_per_node=procs,
                        cpus_per_task=cpus_per_task or procs, partition=partition, time_limit=time_limit,
                        python=sys.executable, account=account, qos=qos, mem=mem, exclusive=exclusive,
                        constraint=constraint, gres=gres, signal_s=signal_s or None)  # refuses control characters
    counts = RunDir(run_dir).counts
    if not dry_run and not counts.exists():  # else the job would fail on the cluster, after waiting in the queue
        raise UserError(f"{counts}: no token files to train on; run `domainlm prepare`, `domainlm tokenizer` and "
                        "`domainlm tokenize` before `domainlm launch slurm` (`--dry-run` writes the script without "
                        "them)")
    script = script_path(run_dir)
    atomic_write(script, text)
    out = {"script": str(script), "nodes": nodes, "gpus_per_node": gpus_per_node, "procs_per_node": procs,
           "job_id": None, "log": None, "data_ready": counts.exists()}
    if not dry_run:
        out["job_id"] = sbatch(script)
        out["log"] = str(job_log(run_dir, out["job_id"]))
    return out


# ------------------------------------------------------------------------------------------- the queue


def require(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise UserError(f"{name}: command not found; run this on a Slurm login node (or `--dry-run` to only "
                        f"write the script)")
    return exe


def sbatch(script: Path, *args: str) -> str:
    """Submit ``script``; returns the job id."""
    r = subprocess.run([require("sbatch"), "--parsable", *args, str(script)], capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        raise UserError(f"sbatch {script}: {msg}")
    return r.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"


def active(job_id: str | int) -> bool:
    """Whether a job (any task of an array) may still run: pending, running, suspended, requeued... A task
    that is COMPLETING has ended; Slurm is only releasing its node (squeue still lists it for a moment)."""
    r = subprocess.run([require("squeue"), "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    if r.returncode != 0:
        if "Invalid job id" in r.stderr:  # purged from the controller: long finished
            return False
        raise UserError(f"squeue -j {job_id}: {(r.stderr.strip().splitlines() or ['failed'])[-1]}")
    return any(state not in ENDED for state in r.stdout.split())


def wait(job_id: str | int, done=None) -> None:
    """Block until the job has left the queue (finished, failed or cancelled), or until ``done()`` says its
    work is complete (its last tasks may still be exiting). ``done`` (files on disk) is checked every
    ``DONE_POLL_S``, the queue (a request to slurmctld) every ``POLL_S``."""
    for i in itertools.count():
        if done is not None and done():
            return
        if i % round(POLL_S / DONE_POLL_S) == 0 and not active(job_id):
            return
        time.sleep(DONE_POLL_S)
