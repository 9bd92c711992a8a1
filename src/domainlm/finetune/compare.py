"""`domainlm finetune DOMAIN --compare GENERAL --data train.jsonl`: did domain pretraining pay off downstream?

Both models are fine-tuned with the same data, steps, seed and flags, then scored on the same test items;
differences carry a paired-bootstrap 95% CI (the same resampled items for both models), so "domain − general"
is significant only when its interval excludes 0. With ``--seeds K`` each model is fine-tuned K times (seeds
--seed, +1, …; the others in ``<out>/<domain|general>-seed<S>/``) and every interval is the hierarchical
bootstrap over fine-tuning seeds and test items (evaluate/bootstrap.py): changing the fine-tuning seed
alone can flip a single-seed verdict. A compared model whose pretraining (its run's config) read LicenseDB
without leaving the test licenses out is named in a one-line warning: it saw the test items' texts.

The result goes to ``<out>/compare.json`` and, when DOMAIN
is a run directory, ``<run>/eval/finetune.json`` (shown by `domainlm report`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from domainlm.config import LICENSEDB_TEST
from domainlm.errors import UserError
from domainlm.evaluate import bootstrap
from domainlm.evaluate import tasks as downstream
from domainlm.evaluate.inputs import load_run_config
from domainlm.finetune import classify
from domainlm.finetune.loop import FinetuneArgs, finetune, resolve_model
from domainlm.outputs import ClassifyComparison, FinetuneComparison
from domainlm.rundir import RunDir, write_json


def _licenses_in(path: Path) -> set[str]:
    out = set()
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if line.strip():
            rec = json.loads(line)
            if isinstance(rec, dict) and isinstance(rec.get("license"), str):
                out.add(rec["license"])
    return out


def saw_test_items(model_dir: Path, run_dir: Path | None = None) -> str | None:
    """Why ``model_dir``'s pretraining contained LicenseDB's test licenses (its run config reads the package
    without ``exclude_ids``), or None (it did not, or nothing says: a folder without a domainlm run config)."""
    run = run_dir or (model_dir.parent if model_dir.name == RunDir.MODEL else None)
    if run is None or not RunDir(run).config.is_file():
        return None
    try:
        cfg = load_run_config(run)
    except UserError:
        return None
    leaky = [s.name for s in cfg.sources if s.input == "package:licensedcode" and s.weight > 0 and not s.exclude_ids]
    return (f"its pretraining source {leaky[0]!r} ({RunDir(run).config}) reads LicenseDB without "
            f"exclude_ids: {LICENSEDB_TEST}") if leaky else None


def compare(domain: Path, general: Path, data: Path, *, val: Path | None = None, test: Path | None = None,
            out: Path | None = None, args: FinetuneArgs | None = None, tasks: list[str] | None = None,
            restart: bool = False, console: Console | None = None, head: str = "lm",
            seeds: int = 1) -> tuple[dict, list[Path]]:
    """``head``: ``lm`` (instruction fine-tuning, answers scored by the LM) or ``classification`` (a sequence
    classification head, finetune/classify.py: the category task only; written to ``eval/classify.json``)."""

    console = console or Console(stderr=True)
    args = args or FinetuneArgs()
    if head not in ("lm", "classification"):
        raise UserError(f"--head: expected lm or classification, got {head!r}")
    tasks = list(tasks or (downstream.TASKS if head == "lm" else [classify.TASK]))
    if head == "classification" and tasks != [classify.TASK]:
        raise UserError(f"--task: --head classification scores {classify.TASK} only, got {', '.join(tasks)}")
    fit = finetune if head == "lm" else classify.finetune_classifier
    ref = resolve_model(domain)
    domain_dir, run_dir = ref.model_dir, ref.run_dir
    general_dir = resolve_model(general).model_dir
    test_items = {t: downstream.load_test(t, test) for t in tasks}  # fail fast, before any training
    leaked = _licenses_in(data) & {it["license"] for items in test_items.values() for it in items if "license" in it}
    if leaked:
        raise UserError(f"{data}: {len(leaked)} license(s) also in the test split (e.g. {sorted(leaked)[0]}); "
                        "build both with the same `domainlm tasks licensedb` flags")
    name = "compare" if head == "lm" else "classify"
    out = Path(out) if out is not None else ref.finetune_out(name, standalone=Path(f"finetune-{name}"))

    if seeds < 1:
        raise UserError(f"--seeds: expected a number ≥ 1, got {seeds}")
    models = {"domain": domain_dir, "general": general_dir}
    for label, model_dir in models.items():
        why = saw_test_items(model_dir, run_dir if label == "domain" else None)
        if why:
            console.print(f"warning: the {label} model saw the test items in pretraining: {why}", highlight=False,
                          markup=False, soft_wrap=True)
    seed_list = [args.seed + i for i in range(seeds)]
    runs: dict[str, list[dict]] = {}
    for label, model_dir in models.items():
        runs[label] = []
        for s in seed_list:
            console.print(f"[bold]{label}[/]: fine-tuning {escape(str(model_dir))}"
                          + (f" (seed {s})" if seeds > 1 else ""))
            folder = out / (label if s == args.seed else f"{label}-seed{s}")
            runs[label].append(fit(model_dir, data, val=val, out=folder, args=replace(args, seed=s), restart=restart,
                                   console=console))

    result = {"data": str(data), "test": str(test) if test else "built (domainlm tasks licensedb defaults)",
              "args": runs["domain"][0]["args"], "models": {k: str(v) for k, v in models.items()},
              "finetune": {k: {x: r[0][x] for x in ("final_loss", "val_loss", "steps", "truncated")}
                           for k, r in runs.items()},
              "tasks": {}, **({"head": head} if head != "lm" else {}), **({"seeds": seed_list} if seeds > 1 else {})}
    for task in tasks:
        items = test_items[task]
        scored: dict[str, list[dict]] = {}
        for label in models:
            console.print(f"scoring {label} on {task} ({len(items)} items"
                          + (f", {seeds} seeds)" if seeds > 1 else ")"), markup=False)
            scored[label] = [downstream.score_task(Path(r["out"]), task, items=items) if head == "lm"
                             else classify.score_items(Path(r["out"]), items, task) for r in runs[label]]
        gold = [it["response"] for it in items]
        preds = {k: [[p["pred"] for p in sc["predictions"]] for sc in v] for k, v in scored.items()}
        fns = downstream.metric_fns(task)
        result["tasks"][task] = {
            "items": len(items),
            **{k: {"metrics": {name: bootstrap.metric_ci(fn, gold, preds[k]) for name, fn in fns.items()},
                   "predictions": v[0]["predictions"],
                   **({"seeds": [{"seed": s, "metrics": {name: fn(gold, p) for name, fn in fns.items()}}
                                 for s, p in zip(seed_list, preds[k], strict=True)]} if seeds > 1 else {})}
               for k, v in scored.items()},
            "domain_minus_general": {name: bootstrap.metric_diff(fn, gold, preds["domain"], preds["general"])
                                     for name, fn in fns.items()},
            **{k: v for k, v in scored["domain"][0].items() if k in ("chance_accuracy", "majority_accuracy",
                                                                     "majority_class")},
        }
        if "majority_class" in scored["domain"][0]:  # the macro-F1 of always answering the majority class
            result["tasks"][task]["majority_macro_f1"] = downstream.macro_f1(
                gold, [scored["domain"][0]["majority_class"]] * len(gold))
    result["verdict"] = verdict(result)
    checked = (FinetuneComparison if head == "lm" else ClassifyComparison).checked(result)
    written = [write_json(out / RunDir.COMPARISON, checked, indent=1)]
    if run_dir is not None:
        rel = RunDir.FINETUNE_COMPARE if head == "lm" else RunDir.CLASSIFY_COMPARE
        written.append(write_json(RunDir(run_dir) / rel, checked, indent=1))
    return result, written


def verdict(result: dict) -> str:
    """One honest sentence per metric: better, worse, or no detectable difference (CI contains 0)."""
    lines = []
    for task, r in result["tasks"].items():
        for name, d in r["domain_minus_general"].items():
            lo, hi = d["ci95"]
            word = "better" if lo > 0 else "worse" if hi < 0 else "no detectable difference"
            over = f"; {len(result['seeds'])} fine-tuning seeds each" if result.get("seeds") else ""
            lines.append(f"{task} {name}: domain − general = {d['value']:+.1%} [{lo:+.1%}, {hi:+.1%}{over}] → {word}")
    return "; ".join(lines)


def print_compare(result: dict, console: Console) -> None:
    table = Table(title="fine-tuned: domain vs general (95% bootstrap CI over test items)")
    for col in ("task", "metric", "domain", "general", "domain − general"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")

    def fmt(m: dict, sign: str = "") -> str:
        return f"{m['value']:{sign}.1%} [{m['ci95'][0]:{sign}.1%}, {m['ci95'][1]:{sign}.1%}]"

    for task, r in result["tasks"].items():
        for name in r["domain"]["metrics"]:
            table.add_row(task, name, fmt(r["domain"]["metrics"][name]), fmt(r["general"]["metrics"][name]),
                          fmt(r["domain_minus_general"][name], "+"))
        if "majority_accuracy" in r:
            f1 = f", macro-F1 {r['majority_macro_f1']:.1%}" if r.get("majority_macro_f1") is not None else ""
            table.add_row(task, "majority class", f"accuracy {r['majority_accuracy']:.1%}{f1}", "", "")
    console.print(table)
    for line in result["verdict"].split("; "):
        console.print(line, highlight=False)
