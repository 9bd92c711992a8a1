"""Preemption: a signal asks a run to stop, the loop checkpoints at the next step boundary, requeues the Slurm job
and exits (as Lightning's and litgpt's Slurm support do).

Slurm sends ``SIGUSR1`` ``<seconds>`` before a job's time limit with ``#SBATCH --signal=USR1@<seconds>`` (the
script `domainlm launch slurm` writes); the torchrun agent passes it on to its ranks (`launch/torchrun.py`). The
handler only sets a flag. Ranks may see the signal at different steps (a rank past the boundary when it arrives
sees it a step later), so at each boundary the ranks sum their flags: all stop after the same step, or none does
— one all-reduce of one number per step, next to the step's own loss all-reduce. Then the loop writes a
checkpoint (`train/driver.py`), rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` when under Slurm, and every rank
raises `Preempted`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from domainlm.train.parallel import Dist, barrier

SIGNAL = signal.SIGUSR1


class Preemption:
    """``with Preemption(world) as p:`` — SIGUSR1 sets a flag; ``p.requested()`` at a step boundary says whether
    any rank has seen it (a collective: every rank calls it at every boundary)."""

    def __init__(self, world: Dist):
        self.world, self.seen, self._old = world, False, None

    def _on_signal(self, signum, frame) -> None:
        self.seen = True

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # Python's rule for signal handlers
            self._old = signal.signal(SIGNAL, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(SIGNAL, self._old)

    def requested(self) -> bool:
        if not dist.is_initialized():
            return self.seen
        flag = torch.tensor([float(self.seen)], device=self.world.device)
        dist.all_reduce(flag)  # SUM: gloo has no MAX for every dtype
        return flag.item() > 0


def requeue(world: Dist, announce: Callable[[], None]) -> str:
    """Under Slurm, rank 0 asks Slurm to requeue this job (it then runs again under the same id and resumes) while
    the other ranks wait for it — a rank that exited first would have torchrun stop rank 0 before it asked. Slurm
    then ends this run's processes, so rank 0 calls ``announce`` (the line saying so) first. Returns what was done,
    for the message."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "rerun the same command to resume"
    if world.is_main:
        announce()
        done = _scontrol_requeue(job)
    barrier()
    return done if world.is_main else f"rank 0 requeued Slurm job {job}"


def _scontrol_requeue(job: str) -> str:
    exe = shutil.which("scontrol")
    if exe is None:
        return f"scontrol not found: requeue Slurm job {job} (`scontrol requeue {job}`) or resubmit to resume"
    r = subprocess.run([exe, "requeue", job], capture_output=True, text=True)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        return f"`scontrol requeue {job}` failed ({why}): resubmit the job to resume"
    return f"requeued Slurm job {job}: it resumes from this checkpoint"
