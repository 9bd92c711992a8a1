"""`domainlm run [CONFIG]`: the whole pipeline on one run directory: the stages of the registry (pipeline.py), each
run once and skipped when done, and the summary table.

plan → prepare → tokenizer → tokenize → plan with the real token counts → train → eval → general-only
baseline (same shape and token budget, domain weight 0) → [downstream] → report. Each stage records a fingerprint of its
inputs (``<run>/.stages/``), so a rerun is a no-op and an interrupted run resumes the stage it was in (the
trainer from its last checkpoint). ``--quick`` runs a scaled-down copy (``runs/<name>-quick``) for smoke tests.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from domainlm import pipeline
from domainlm.config import RunConfig, dump_config, load_config
from domainlm.finetune.downstream import print_summary as print_downstream
from domainlm.finetune.downstream import summary_of
from domainlm.outputs import AnyEval, ObjectiveEvalOutput, Plan, TrainSummary
from domainlm.rundir import RunDir, atomic_write


def quick_config(cfg: RunConfig) -> RunConfig:
    """The config scaled down by the packaged overlay ``recipes/overlays/quick.yaml`` (`domainlm run --quick`)."""
    quick = yaml.safe_load((resources.files("domainlm") / "recipes" / "overlays" / "quick.yaml").read_text("utf-8"))
    data = cfg.model_dump()
    data["name"] = f"{cfg.name}-quick"
    data["run_dir"] = str(cfg.directory().with_name(cfg.directory().name + "-quick"))
    for s in data["sources"]:
        s["max_files"] = min(s.get("max_files") or quick["max_files"], quick["max_files"])
    for section in ("budget", "tokenizer", "model", "train", "eval", "downstream"):
        data[section].update(quick.get(section, {}))
    return RunConfig.model_validate(data)


def summary(run_dir: Path, cfg: RunConfig, seconds: float, report: Path) -> dict:
    rd = RunDir(run_dir)
    ev = rd.load(RunDir.EVAL, AnyEval)
    base = rd.load(RunDir.BASELINE_EVAL, AnyEval)
    metric = "loss" if isinstance(ev, ObjectiveEvalOutput) else "bpb"  # masked / span models: loss on fixed masks
    rows = {}
    for name, s in ev.sources.items():
        mine, b = getattr(s, metric), getattr(base.sources.get(name), metric, None) if base else None
        rows[name] = {"role": s.role, "bpb": mine, "baseline_bpb": b, "change_pct": (mine / b - 1) * 100 if b else None}
    probes = ev.probes.acc if ev.probes else None
    base_probes = base.probes.acc if base and base.probes else None
    return {"run_dir": str(run_dir), "sources": rows, "probe_acc": probes, "baseline_probe_acc": base_probes,
            **({"metric": f"{ev.objective} loss (nats per predicted token)"} if metric == "loss" else {}),
            "report": str(report), "seconds": round(seconds, 1), "training": training_vs_plan(run_dir),
            **({"downstream": downstream_summary(run_dir)} if cfg.downstream.task is not None else {})}


def downstream_summary(run_dir: Path) -> dict | None:
    return summary_of(run_dir)


def training_vs_plan(run_dir: Path) -> dict:
    """What the plan said the run trains (and any override of the law's plan, with its reason) next to what
    trained and how long it took."""
    plan, done = RunDir(run_dir).load(RunDir.PLAN, Plan), RunDir(run_dir).load(RunDir.TRAIN, TrainSummary)
    run = plan.run if plan else None
    return {"planned_seconds": getattr(run, "planned_seconds", None),
            "budget_seconds": getattr(run, "budget_seconds", None),
            "train_seconds": getattr(done, "train_seconds", None), "planned_tokens": getattr(run, "tokens", None),
            "params": getattr(done, "params", None), "steps": getattr(done, "steps", None),
            "overrides": [o.model_dump() for o in run.overrides] if run else []}


def print_summary(s: dict, console: Console) -> None:
    what = s.get("metric", "bits per byte")  # a masked / span model: its loss on fixed masks (no bpb)
    t = Table(title=f"domainlm run — {what} on held-out text (lower is better)", title_justify="left")
    for col in ("source", "role", "domain model", "general-only baseline", "change"):
        t.add_column(col, justify="left" if col in ("source", "role") else "right")
    for name, r in s["sources"].items():
        ch = "-" if r["change_pct"] is None else f"{r['change_pct']:+.1f}%"
        base = "-" if r["baseline_bpb"] is None else f"{r['baseline_bpb']:.4f}"
        t.add_row(name, r["role"] or "", f"{r['bpb']:.4f}", base, ch)
    console.print(t)
    if s["probe_acc"] is not None:
        b = "" if s["baseline_probe_acc"] is None else f" (baseline {s['baseline_probe_acc']:.1%})"
        console.print(f"domain term probes: accuracy {s['probe_acc']:.1%}{b}")
    tr = s.get("training") or {}
    for o in tr.get("overrides", []):
        console.print(f"[yellow]not the law's plan:[/] {o['what']} {o['run']} instead of {o['plan']} — {o['reason']}",
                      highlight=False)
    if tr.get("train_seconds") is not None:
        planned = "" if tr.get("planned_seconds") is None else f", planned {tr['planned_seconds']:.0f} s"
        budget = "" if tr.get("budget_seconds") is None else f", budget {tr['budget_seconds']:.0f} s"
        console.print(f"training: {tr['train_seconds']:.0f} s{planned}{budget}", highlight=False)
    if s.get("downstream"):
        print_downstream(s["downstream"], console)
    console.print(f"report: [bold]{s['report']}[/]  ({s['seconds']:.0f} s)")


def run_all(config: Path | None, *, console: Console, quick: bool = False) -> dict:
    """Every stage of the registry's `domainlm run` order (pipeline.run_order); the summary (`print_summary`)."""
    t0 = time.perf_counter()
    cfg = load_config(config)
    if quick:
        cfg = quick_config(cfg)
    run_dir = cfg.directory()
    run_dir.mkdir(parents=True, exist_ok=True)
    # Every stage reads the same resolved config file (for --quick, the scaled-down copy).
    config_path = RunDir(run_dir) / RunDir.RUN_CONFIG
    text = dump_config(cfg)
    if not config_path.exists() or config_path.read_text() != text:
        atomic_write(config_path, text)
    console.rule(f"[bold]domainlm run[/] {cfg.name} → {run_dir}")
    seconds = pipeline.run_stages(pipeline.Ctx(config_path, cfg, run_dir, console))
    return {**summary(run_dir, cfg, time.perf_counter() - t0, RunDir(run_dir).report), "stage_seconds": seconds}
