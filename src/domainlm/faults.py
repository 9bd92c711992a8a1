"""Named crash sites, for tests that kill a command at an exact point of its work.

Set ``DOMAINLM_FAULT=<site>:<n>`` (several: comma-separated) in the environment of a command: the n-th time
any process of its process group reaches ``hit("<site>")``, that process SIGKILLs the whole group — the same
thing ``kill -9 -PGID`` does to a run and its worker processes. Hits are counted across the process group
(datatrove's forked workers) in a small counter file keyed by the group id, so "the 3rd completed datatrove
task" means the same thing whichever worker completes it. (torchrun starts each rank in a session of its own:
there each rank counts its own hits, the fault kills that rank, and its agent then stops the job.) A crash test
therefore picks its kill point by *what has been done*, never by how long it has run: it passes at any machine speed.

Start the command in a new session (``subprocess.Popen(..., start_new_session=True)``) so the group it kills is
its own. In production the variable is unset: ``hit`` is one dict lookup.

``<site>:<n>:<SIGNAL>`` (e.g. ``train.step:3:USR1``) sends that signal to this process alone instead — what Slurm
does ahead of a time limit or a preemption (``#SBATCH --signal``) — and returns once Python has run its handler,
so the process sees it at a known point. ``DOMAINLM_FAULT_RANK=<r>`` arms only the process whose ``RANK`` is r
(one rank of a torchrun job).

The sites (grep ``faults.hit`` for where each one is):

=====================================  =====================================================================
prepare.task_done                      a datatrove task has written its completion marker
prepare.write.mid_document             half of a document is written to a train/val split file
tokenize.part_done                     a tokenized part and its count file are on disk
tokenize.before_counts                 every ``<split>.bin`` is written, ``counts.json`` is not
tokenize.after_counts                  ``counts.json`` is written, the stage is not yet marked done
tokenizer.before_save                  the tokenizer is trained, nothing of it is written
train.step                             a training step is done and logged (each rank counts)
train.before_export                    training is done and checkpointed, the HF export is not written
checkpoint.mid_write                   a checkpoint's weights are in its temp folder, the rest is not
finetune.step                          a fine-tuning step is done and logged
scaling.point_done                     one point of a scaling sweep is trained and evaluated
ablate.variant_done                    one variant of an ablation is trained and evaluated
decide.arm_done                        one arm of `domainlm decide` is trained and evaluated
eval.source_done                       bits per byte of one source are computed
report.mid_write                       the report's figures are written, its page is not
=====================================  =====================================================================
"""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile
from pathlib import Path

ENV = "DOMAINLM_FAULT"


def _parse(spec: str) -> dict[str, tuple[int, signal.Signals]]:
    armed = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        site, _, n = item.rpartition(":")
        sig = signal.SIGKILL
        if not n.isdigit() and ":" in site:  # <site>:<n>:<SIGNAL>
            name = n.upper().removeprefix("SIG")
            site, _, n = site.rpartition(":")
            if not hasattr(signal, "SIG" + name):
                raise ValueError(f"{ENV}: {item!r}: no signal SIG{name}")
            sig = getattr(signal, "SIG" + name)
        if not site or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{ENV}: expected <site>:<n>[:<SIGNAL>] with n ≥ 1, got {item!r}")
        armed[site] = (int(n), sig)
    return armed


_ARMED: dict[str, tuple[int, signal.Signals]] = _parse(os.environ.get(ENV, "")) if os.environ.get(
    f"{ENV}_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0") else {}


def _counter(site: str) -> Path:
    folder = Path(os.environ.get(f"{ENV}_DIR") or tempfile.gettempdir())
    return folder / f"domainlm-fault-{os.getpgid(0)}-{site}"


def armed(site: str) -> bool:
    """Whether ``site`` is armed in this process (to prepare a torn write just before ``hit``)."""
    return site in _ARMED


def hit(site: str) -> None:
    """Count one pass through ``site``; on the armed n-th pass, SIGKILL this process group (or send the armed
    signal to this process)."""
    if site not in _ARMED:
        return
    n, sig = _ARMED[site]
    path = _counter(site)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        count = len(f.read()) + 1  # one byte per hit: no parsing, no torn numbers
        f.write(".")
        f.flush()
    if count == n:
        path.unlink(missing_ok=True)
        if sig != signal.SIGKILL:
            signal.raise_signal(sig)  # Python runs the handler before the next bytecode: before `hit` returns
            return
        os.killpg(os.getpgid(0), signal.SIGKILL)
