"""`domainlm run`: the whole pipeline, stage after stage, on one run directory."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from domainlm.config import load_config


def run_all(config: Path | None, *, console: Console, as_json: bool = False) -> dict:
    from domainlm.plan.command import run_plan
    from domainlm.plan.report import print_plan

    cfg = load_config(config)
    run_dir = cfg.directory()
    console.rule(f"[bold]domainlm run[/] {cfg.name} → {run_dir}")
    console.print("[bold]stage 1/7: plan[/]")
    result, written = run_plan(config)
    print_plan(result, console)
    for p in written:
        console.print(f"wrote [bold]{p}[/]")
    remaining = ["prepare", "tokenizer", "tokenize", "train", "eval", "report"]
    console.print(
        "[dim]next stages (not yet available in this version): " + " → ".join(remaining) + "[/]", highlight=False
    )
    return result
