"""`domainlm finetune DOMAIN --compare GENERAL --data train.jsonl`: did domain pretraining pay off downstream?

Both models are fine-tuned with the same data, steps, seed and flags, then scored on the same test items;
differences carry a paired-bootstrap 95% CI (the same resampled items for both models), so "domain − general"
is significant only when its interval excludes 0. The result goes to ``<out>/compare.json`` and, when DOMAIN
is a run directory, ``<run>/eval/finetune.json`` (shown by `domainlm report`).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from domainlm.errors import UserError
from domainlm.evaluate import tasks as downstream
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


def compare(domain: Path, general: Path, data: Path, *, val: Path | None = None, test: Path | None = None,
            out: Path | None = None, args: FinetuneArgs | None = None, tasks: list[str] | None = None,
            restart: bool = False, console: Console | None = None, head: str = "lm") -> tuple[dict, list[Path]]:
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

    models = {"domain": domain_dir, "general": general_dir}
    runs = {}
    for label, model_dir in models.items():
        console.print(f"[bold]{label}[/]: fine-tuning {escape(str(model_dir))}")
        runs[label] = fit(model_dir, data, val=val, out=out / label, args=args, restart=restart, console=console)

    result = {"data": str(data), "test": str(test) if test else "built (domainlm tasks licensedb defaults)",
              "args": runs["domain"]["args"], "models": {k: str(v) for k, v in models.items()},
              "finetune": {k: {x: r[x] for x in ("final_loss", "val_loss", "steps", "truncated")}
                           for k, r in runs.items()},
              "tasks": {}, **({"head": head} if head != "lm" else {})}
    for task in tasks:
        items = test_items[task]
        scored = {}
        for label in models:
            console.print(f"scoring {label} on {task} ({len(items)} items)")
            scored[label] = (downstream.score_task(Path(runs[label]["out"]), task, items=items) if head == "lm"
                             else classify.score_items(Path(runs[label]["out"]), items, task))
        gold = [it["response"] for it in items]
        idx = downstream.bootstrap_indices(len(items))
        preds = {k: [p["pred"] for p in v["predictions"]] for k, v in scored.items()}
        result["tasks"][task] = {
            "items": len(items),
            **{k: {"metrics": downstream.summarise(task, gold, preds[k], idx), "predictions": v["predictions"]}
               for k, v in scored.items()},
            "domain_minus_general": downstream.paired_diff(task, gold, preds["domain"], preds["general"], idx),
            **{k: v for k, v in scored["domain"].items() if k in ("chance_accuracy", "majority_accuracy",
                                                                  "majority_class")},
        }
        if "majority_class" in scored["domain"]:  # the macro-F1 of always answering the majority class
            result["tasks"][task]["majority_macro_f1"] = downstream.macro_f1(
                gold, [scored["domain"]["majority_class"]] * len(gold))
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
            lines.append(f"{task} {name}: domain − general = {d['value']:+.1%} [{lo:+.1%}, {hi:+.1%}] → {word}")
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
