"""``python -m domainlm.launch.torchrun ARGS`` = ``torchrun ARGS``, except that SIGUSR1 is passed on to the ranks.

Slurm's ``--signal=USR1@<seconds>`` (the training script of `domainlm launch slurm`) signals the job step's
processes: the torchrun agent, and — depending on the cluster's process tracking (``ProctrackType``) — its ranks,
or not. torchrun does not handle SIGUSR1, so by default it would die of it and take the ranks down before they
could checkpoint. This agent catches it and sends it on to its worker processes (its children); a rank that
gets it twice (directly and from here) only sets its flag twice (`train/preempt.py`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from torch.distributed.run import main as torchrun

FORWARDED = (signal.SIGUSR1,)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: torchrun starts its ranks as its children)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after its last ")"
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def _forward(signum: int, frame) -> None:
    for child in children(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)


def main(argv: list[str] | None = None) -> None:
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    torchrun(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
