"""`domainlm run`'s downstream stage: the config's ``downstream`` section, run on the run's two models.

After the domain model and the general-only baseline (same shape and tokens, domain weight 0) are trained, both
are fine-tuned the same way on a LicenseDB task (the default split, license held out by license, written to
``<run>/tasks/licensedb/``) and compared by `finetune/compare.py` (paired bootstrap intervals), which writes
``eval/classify.json`` for the report. The stage is skipped when the models, the task data and the section are
unchanged; an interrupted stage resumes (each fine-tuning from its last checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from domainlm import stages
from domainlm.config import RunConfig
from domainlm.evaluate import tasks
from domainlm.finetune.compare import compare
from domainlm.finetune.loop import FinetuneArgs
from domainlm.outputs import ClassifyComparison
from domainlm.rundir import RunDir
from domainlm.train.variants import variant_config

STAGE = "downstream"


def run_downstream(cfg: RunConfig, run_dir: Path, console: Console) -> dict | None:
    """The comparison (as `compare.compare` returns it), or None when the config has no downstream task or
    the run has no general-only baseline."""

    d = cfg.downstream
    if d.task is None:
        console.print("downstream: no downstream.task in the config; skipped")
        return None
    rd = RunDir(run_dir)
    baseline = RunDir(variant_config(cfg, run_dir, 0.0).directory()).model
    if not (baseline / "config.json").is_file() or not (rd.model / "config.json").is_file():
        console.print("downstream: needs the trained model and the general-only baseline; skipped")
        return None
    task_dir = rd / RunDir.TASK_DATA
    if not (task_dir / RunDir.TASK_BALANCE).is_file():  # written last
        tasks.print_balance(tasks.write_task_data(task_dir), console)
    data, val, test = (task_dir / f"{s}.jsonl" for s in ("train", "val", "test"))
    args = FinetuneArgs(steps=d.steps, batch_size=d.batch_size, micro_batch=min(d.micro_batch, d.batch_size),
                        lr=d.lr, seed=d.seed, max_len=d.max_len, eval_every=max(d.steps // 4, 1),
                        checkpoint_every=max(d.steps // 4, 1))
    files = {str(f): stages.file_fingerprint(f) for m in (rd.model, baseline, task_dir) for f in sorted(m.iterdir())
             if f.is_file()}
    seeds = [cfg.compare.seeds] if cfg.compare.seeds > 1 else []  # one seed: the marker of before
    stage = stages.Stage(run_dir, STAGE, rd / RunDir.CLASSIFY_COMPARE, (d.model_dump(), files, *seeds))
    result, ran = stage.run(lambda: compare(run_dir, baseline, data, val=val, test=test, out=rd / RunDir.DOWNSTREAM,
                                            args=args, tasks=[d.task], console=console, head=d.head,
                                            seeds=cfg.compare.seeds)[0],
                            lambda: rd.load(RunDir.CLASSIFY_COMPARE, ClassifyComparison).model_dump(
                                exclude_unset=True))
    if not ran:
        console.print("downstream: done already, skipped")
    return result


def summary_of(run_dir: Path) -> dict | None:
    """`domainlm run`'s summary of the downstream comparison: per task and metric, both models and the
    difference with their 95% intervals, and what the majority class scores; None when it has not run."""
    res = RunDir(run_dir).load(RunDir.CLASSIFY_COMPARE, ClassifyComparison)
    if res is None:
        return None
    return {task: {"majority_accuracy": t.majority_accuracy, "majority_macro_f1": t.majority_macro_f1,
                   "majority_class": t.majority_class, "items": t.items,
                   "metrics": {m: {"domain": t.domain.metrics[m].model_dump(),
                                   "general": t.general.metrics[m].model_dump(),
                                   "domain_minus_general": d.model_dump()} for m, d in t.domain_minus_general.items()}}
            for task, t in res.tasks.items()}


def print_summary(s: dict | None, console: Console) -> None:
    def ci(m: dict, sign: str = "") -> str:
        return f"{m['value']:{sign}.1%} [{m['ci95'][0]:{sign}.1%}, {m['ci95'][1]:{sign}.1%}]"

    for task, t in (s or {}).items():
        for name, m in t["metrics"].items():
            console.print(f"downstream {task} ({t['items']} test items) {name}: domain {ci(m['domain'])}, general "
                          f"{ci(m['general'])}, domain − general {ci(m['domain_minus_general'], '+')}",
                          highlight=False, markup=False)
        if t.get("majority_accuracy") is not None:
            console.print(f"downstream {task}: always {t['majority_class']} (the majority class) scores accuracy "
                          f"{t['majority_accuracy']:.1%}, macro-F1 {t['majority_macro_f1']:.1%}", highlight=False,
                          markup=False)
