"""The training-loop driver: what pretraining (`train/loop.py`) and fine-tuning (`finetune/loop.py`) share.

The caller builds the model, the optimizer and its batches, and gives `Driver` the learning rate of a step,
one optimizer step, an eval and its own part of a checkpoint. The driver owns the rest, once: resume from the
newest checkpoint, the metrics log (``<out>/logs/metrics.jsonl``: one JSON row per step and per eval, and
TensorBoard if asked), eval and checkpoint cadence (both always at the last step), the NaN/inf-step guard, the
progress bar, the crash site ``<name>.step``, and preemption: on SIGUSR1 (`train/preempt.py`) a checkpoint at the
next step boundary, a Slurm requeue, and `Preempted`.

Resume is exact: weights, optimizer and RNG come from the checkpoint (`train/checkpoint.py`), the caller
restores its batch position from the state `resume` returns, and log rows after the checkpoint's step are
dropped (they are redone). Resumed at the last step (killed after the final checkpoint, before the export),
that step's loss, speed and eval are read back from the log, not redone.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter

from domainlm import faults
from domainlm.errors import Preempted, UserError
from domainlm.rundir import RunDir, atomic_write, open_append
from domainlm.train import checkpoint as ckpt
from domainlm.train.parallel import Dist, barrier
from domainlm.train.preempt import Preemption, requeue
from domainlm.train.step import StepResult

NOT_CURVES = ("kind", "step", "skipped", "tokens", "trained_tokens")  # row fields TensorBoard does not plot


@dataclass
class Eval:
    """One eval: the fields of its metrics row, a line for the console, its TensorBoard scalars."""

    fields: dict[str, float]
    text: str
    scalars: dict[str, float] = field(default_factory=dict)


@dataclass
class Driver:
    name: str  # "train" | "finetune": the progress bar's label and the crash site "<name>.step"
    out: Path  # checkpoints/ and logs/ go here
    world: Dist
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    total_steps: int
    lr: Callable[[int], float]  # step (0-based) → learning rate
    one_step: Callable[[float], tuple[StepResult, int, dict]]  # lr → (result, tokens processed, log fields)
    evaluate: Callable[[], Eval] | None  # None: no validation data
    state: Callable[[], dict]  # the caller's part of a checkpoint (its batch position, a fingerprint)
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    console: Console
    max_bad_steps: int | None = None  # stop after this many NaN/inf steps in a row
    tensorboard: bool = False
    mfu: Callable[[float], float | None] | None = None  # tokens/s → model FLOPs utilisation (logged when given)
    # what determines the weights (config keys, content hashes of the base, tokenizer and data, the seed):
    # recorded in every checkpoint; a resume from checkpoints with other inputs restarts from scratch instead
    inputs: dict | None = None
    # progress: restored by `resume`, advanced by `run`
    step: int = 0
    skipped: int = 0
    bad_in_row: int = 0
    last_loss: float = math.nan
    last_eval: dict | None = None  # the last eval row
    first_step: int = 0  # where this invocation started
    seconds: float = 0.0  # steps, evals and checkpoints of this invocation
    rates: deque = field(default_factory=lambda: deque(maxlen=20))  # tokens/s of the last 20 steps

    @property
    def tokens_per_s(self) -> float | None:
        return sum(self.rates) / len(self.rates) if self.rates else None

    def resume(self) -> tuple[Path, dict] | None:
        """Load the newest checkpoint into the model and optimizer; (its path, its state) for the caller to
        restore its own part, or None. Checkpoints made from other ``inputs`` are discarded first (one line says
        which keys changed): never resumed from."""
        unchecked = self._discard_stale() if self.inputs is not None else False
        found = ckpt.load_latest(self.out, self.model, self.optimizer, self.world)
        if found:
            state = found[1]
            self.step = state["step"]  # ≥ 1: no checkpoint at step 0
            self.skipped, self.bad_in_row = state.get("skipped_steps", 0), state.get("bad_in_row", 0)
            if unchecked and self.world.is_main:  # not silent: the inputs cannot be checked
                self.console.print(f"{self.name}: {found[0]} recorded no inputs (an earlier domainlm wrote it); "
                                   "resuming without checking them (--restart to train from scratch)",
                                   markup=False, highlight=False, soft_wrap=True)
        return found

    def checkpoint(self) -> None:
        state = {"step": self.step, "skipped_steps": self.skipped, "bad_in_row": self.bad_in_row,
                 "total_steps": self.total_steps, **self.state(),
                 **({ckpt.INPUTS: self.inputs} if self.inputs is not None else {})}
        ckpt.save_checkpoint(self.out, self.step, self.model, self.optimizer, state, self.world, self.keep_checkpoints)

    def _discard_stale(self) -> bool:
        """Discard checkpoints made from other inputs; True when the newest recorded none (cannot be checked).
        Every rank reads the same newest checkpoint and agrees; rank 0 discards, the others wait."""
        stale = ckpt.stale_checkpoint(self.out, self.inputs)
        barrier()  # every rank has read before rank 0 removes
        if stale is None:
            return False
        path, changed = stale
        if changed is None:
            return True
        if self.world.is_main:
            self.console.print(f"{self.name}: {path.parent} holds checkpoints of other inputs (changed: "
                               f"{ckpt.describe_changes(changed)}); discarding them and training from scratch",
                               markup=False, highlight=False, soft_wrap=True)
            ckpt.discard_checkpoints(self.out)
        barrier()
        return False

    def run(self) -> None:
        """Step from ``self.step`` to ``total_steps``; evaluate and checkpoint on cadence and at the end."""
        main = self.world.is_main
        path = RunDir(self.out).metrics
        if main:
            path.parent.mkdir(parents=True, exist_ok=True)
            truncate_metrics(path, self.step)
        resumed = self.step > 0
        last_ckpt, last_eval = (self.step if resumed else -1), -1
        for row in metric_rows(path, self.step) if resumed else []:  # every rank reads: all agree
            if row.get("step") == self.step and row.get("kind") == "eval":
                last_eval, self.last_eval = self.step, row
            elif row.get("step") == self.step and row.get("kind") == "train":
                self.last_loss = row["loss"]
                if row.get("tokens_per_s"):
                    self.rates.append(row["tokens_per_s"])
        tb = None
        if main and self.tensorboard:

            tb = SummaryWriter(str(RunDir(self.out) / RunDir.TENSORBOARD),
                               purge_step=self.step + 1 if self.step else None)
        metrics = open_append(path) if main else None

        def log(row: dict, scalars: dict) -> None:
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            for k, v in scalars.items() if tb is not None else ():
                if isinstance(v, int | float) and math.isfinite(v):
                    tb.add_scalar(k, v, self.step)

        def evaluate() -> None:
            e = self.evaluate()
            self.last_eval = {"kind": "eval", "step": self.step, **e.fields}
            log(self.last_eval, e.scalars)
            if main:
                progress.console.print(f"step {self.step}: {e.text}")


        progress = Progress(TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
                            disable=not main, transient=False)
        start, self.first_step = time.perf_counter(), self.step
        try:
            with progress, Preemption(self.world) as preemption:
                task = progress.add_task(self.name, total=self.total_steps, completed=self.step, info="")
                while self.step < self.total_steps:
                    info = self._step(log)
                    progress.update(task, completed=self.step, info=info)
                    faults.hit(f"{self.name}.step")
                    if not self.console.is_terminal and main and self.step % max(self.total_steps // 20, 1) == 0:
                        progress.console.print(f"step {self.step}/{self.total_steps}: {info}")  # 20 lines a run
                    self._check_bad_steps()
                    if self.evaluate is not None and self.step % self.eval_every == 0:
                        evaluate()
                        last_eval = self.step
                    if self.step % self.checkpoint_every == 0:
                        self.checkpoint()
                        last_ckpt = self.step
                    if self.step < self.total_steps and preemption.requested():
                        if last_ckpt != self.step:
                            self.checkpoint()
                        stopped = (f"{self.name}: stopped by a signal after step {self.step}/{self.total_steps}; "
                                   f"checkpoint {ckpt.list_checkpoints(self.out)[-1]} written")
                        how = requeue(self.world, functools.partial(progress.console.print, stopped, markup=False))
                        raise Preempted(f"{stopped}; {how}")
                if self.evaluate is not None and last_eval != self.step:
                    evaluate()
                if last_ckpt != self.step:
                    self.checkpoint()
        finally:
            if metrics is not None:
                metrics.close()
            if tb is not None:
                tb.close()
        self.seconds = time.perf_counter() - start

    def _step(self, log: Callable[[dict, dict], None]) -> str:
        """One optimizer step and its log row; returns the progress bar's text."""
        lr = self.lr(self.step)
        t0 = time.perf_counter()
        res, tokens, fields = self.one_step(lr)
        self.rates.append(tokens / (time.perf_counter() - t0))
        self.step += 1
        self.bad_in_row = self.bad_in_row + 1 if res.skipped else 0
        self.skipped += res.skipped
        self.last_loss = res.loss
        tokens_per_s = self.tokens_per_s
        row = {"kind": "train", "step": self.step, "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
               "skipped": res.skipped, **fields, "tokens_per_s": tokens_per_s}
        mfu = self.mfu(tokens_per_s) if self.mfu is not None else None
        if self.mfu is not None:
            row["mfu"] = mfu
        log(row, {f"train/{k}": v for k, v in row.items() if k not in NOT_CURVES and v is not None})
        return f"loss {res.loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s" + (f" mfu {mfu:.1%}" if mfu else "")

    def _check_bad_steps(self) -> None:
        if self.max_bad_steps is None or self.bad_in_row < self.max_bad_steps:
            return
        prev = ckpt.list_checkpoints(self.out)
        where = f"the last checkpoint {prev[-1].name} is intact" if prev else "no checkpoint was written"
        raise UserError(
            f"{self.name}: loss or gradient NaN/inf for {self.bad_in_row} steps in a row (steps "
            f"{self.step - self.bad_in_row + 1}–{self.step}, {self.skipped} skipped in all); stopping — lower "
            f"train.lr or check the token files; {where}"
        )


def metric_rows(path: Path, step: int) -> list[dict]:
    """The log rows of steps up to ``step``. A line that does not parse is dropped: a kill mid-write tears
    the last line, and its step is redone anyway."""
    if not path.exists():
        return []
    rows = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget log lines from steps after the checkpoint (they will be redone) and torn lines."""
    if path.exists():
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in metric_rows(path, step)))
