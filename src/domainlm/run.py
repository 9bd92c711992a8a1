"""`domainlm run [CONFIG]`: the whole pipeline on one run directory: a list of stages, each run once and skipped
when done.

plan → prepare → tokenizer → tokenize → plan with the real token counts → train → eval → general-only
baseline (same shape and token budget, domain weight 0) → report. Each stage records a fingerprint of its
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

from domainlm import stages
from domainlm.config import RunConfig, dump_config, load_config
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
        data[section].update(quick[section])
    return RunConfig.model_validate(data)


def _plan(config_path: Path, run_dir: Path, cfg: RunConfig, console: Console) -> dict:
    """Plan, unless the config and the measured token counts are unchanged (keeps the CPU probe's number,
    so a rerun does not re-size the model)."""
    from domainlm.plan.command import run_plan
    from domainlm.plan.report import print_plan

    def work() -> dict:
        result, _ = run_plan(config_path)
        print_plan(result, console)
        return result

    from domainlm.basemodel import base_of
    from domainlm.data.tokens import counts_path

    base = base_of(cfg)  # continued pretraining: the counts of the base tokenizer's token files
    counts = counts_path(RunDir(run_dir).tokens_for(base.path) if base else run_dir)
    stage = stages.Stage(run_dir, "plan", RunDir(run_dir).plan,
                         (dump_config(cfg), counts.read_text() if counts.exists() else None))
    result, ran = stage.run(work, lambda: RunDir(run_dir).load(RunDir.PLAN, Plan).model_dump(exclude_unset=True))
    if not ran:
        console.print("plan: unchanged, skipped")
    return result


def _train(cfg: RunConfig, run_dir: Path, console: Console) -> None:
    from domainlm.train.loop import train
    from domainlm.train.parallel import distributed

    with distributed() as world:
        train(cfg, run_dir, world, console=console)


def _eval(run_dir: Path, console: Console) -> dict:
    from domainlm.evaluate.command import print_eval, run_eval_cached

    result, ran = run_eval_cached(run_dir, console=console)
    if ran:
        print_eval(result, console)
    else:
        console.print("eval: done already, skipped")
    return result


def _baseline(config_path: Path, cfg: RunConfig, run_dir: Path, console: Console) -> dict | None:
    """The general-only model of the same shape and budget: the ablation's weight-0 variant (shared with
    `domainlm ablate`, so either command reuses the other's model); its eval (`RunDir.BASELINE_EVAL`) is what
    the report and the summary compare with."""
    from domainlm.evaluate.command import evaluate_variant
    from domainlm.train.variants import train_variant, variant_config

    if not any(s.role == "general" for s in cfg.sources) or not any(s.role == "domain" for s in cfg.sources):
        console.print("baseline: needs both a domain and a general source; skipped")
        return None
    vcfg = variant_config(cfg, run_dir, 0.0)
    train_variant(vcfg, run_dir, console)
    return evaluate_variant(vcfg.directory(), run_dir, console)


def _report(run_dir: Path, console: Console) -> Path:
    from domainlm import __version__
    from domainlm.report import build_report
    from domainlm.report.html import PRODUCERS  # every file the report reads

    found = [run_dir / f for f in PRODUCERS if (run_dir / f).exists()]
    stage = stages.Stage(run_dir, "report", RunDir(run_dir).report,
                         (__version__, {str(f): stages.file_fingerprint(f) for f in found}))
    _, ran = stage.run(lambda: build_report(run_dir), lambda: None)
    if not ran:
        console.print("report: inputs unchanged, skipped")
    return stage.output


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
    from domainlm.finetune.downstream import summary_of

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
        from domainlm.finetune.downstream import print_summary as print_downstream

        print_downstream(s["downstream"], console)
    console.print(f"report: [bold]{s['report']}[/]  ({s['seconds']:.0f} s)")


def run_all(config: Path | None, *, console: Console, quick: bool = False) -> dict:
    """Every stage in order; the summary (`print_summary` shows it)."""
    from domainlm.data.command import run_prepare, run_tokenize
    from domainlm.tokenizer import run_tokenizer

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

    steps = [  # (title, stage): each stage runs once and skips itself when its inputs are unchanged
        ("plan", lambda: _plan(config_path, run_dir, cfg, console)),
        ("prepare", lambda: run_prepare(config_path, console)),
        ("tokenizer", lambda: run_tokenizer(config_path, console=console)),
        ("tokenize", lambda: run_tokenize(config_path, console)),
        ("plan (real counts)", lambda: _plan(config_path, run_dir, cfg, console)),
        ("train", lambda: _train(cfg, run_dir, console)),
        ("eval", lambda: _eval(run_dir, console)),
        ("baseline (general only: same shape and tokens, domain weight 0)",
         lambda: _baseline(config_path, cfg, run_dir, console)),
        ("report", lambda: _report(run_dir, console)),
    ]
    if cfg.downstream.task is not None:  # docs/finetune.md: both models fine-tuned the same way, then compared
        from domainlm.finetune.downstream import run_downstream

        steps.insert(-1, (f"downstream ({cfg.downstream.task}, {cfg.downstream.head}: domain vs general-only)",
                          lambda: run_downstream(cfg, run_dir, console)))
    seconds = {}
    for i, (title, stage) in enumerate(steps, 1):
        console.rule(f"[bold]stage {i}/{len(steps)}: {title}[/]", align="left")
        t = time.perf_counter()
        stage()
        seconds[title] = round(time.perf_counter() - t, 1)
        console.print(f"[dim]{title}: {seconds[title]:.1f} s[/]")
    return {**summary(run_dir, cfg, time.perf_counter() - t0, RunDir(run_dir).report), "stage_seconds": seconds}
