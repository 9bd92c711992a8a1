"""`domainlm prepare CONFIG`: a progress bar while it runs, a table at the end (`domainlm tokenize`: tokenize.py)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from domainlm import stages
from domainlm.config import load_config, write_resolved
from domainlm.data import pipeline
from domainlm.rundir import RunDir
from domainlm.units import human


def progress_bar(console: Console) -> Progress:
    """The progress bar of the data commands."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console)


def run_prepare(config: Path | None, console: Console) -> dict:
    """Data stage: clean, dedup, split (``data/``). Token files are `tokenize.run_tokenize`'s."""

    cfg = load_config(config)
    run_dir = cfg.directory()
    t0 = time.perf_counter()
    # One writing command per run directory at a time: two would overwrite each other's shards.
    with stages.locked(run_dir, "prepare"), progress_bar(console) as progress:
        write_resolved(cfg, run_dir)
        stats = pipeline.prepare_sources(cfg, run_dir, progress)
    has_tokenizer = (RunDir(run_dir).tokenizer / "tokenizer.json").exists()
    return {"run_dir": str(run_dir), "stats": stats, "seconds": round(time.perf_counter() - t0, 2),
            "next": "domainlm tokenize" if has_tokenizer else "domainlm tokenizer"}


def print_prepare(result: dict, console: Console) -> None:
    stats = result["stats"]
    if "submitted" in stats:
        console.print(f"submitted the Slurm jobs (logs in {escape(str(stats['logs']))}); rerun `domainlm prepare` "
                      "when they finish")
        return
    srcs = stats["sources"]
    t = Table(title=f"prepared data → {escape(result['run_dir'])}/data ({result['seconds']:.1f} s)")
    t.add_column("", justify="left")
    for name in srcs:
        t.add_column(name, justify="right")
    rows = [("docs in", "docs_in", "{:,}"), ("bytes in", "bytes_in", "B"), ("docs out", "docs_out", "{:,}"),
            ("bytes out", "bytes_out", "B"), ("train docs", "train_docs", "{:,}"), ("val docs", "val_docs", "{:,}"),
            ("invalid UTF-8 (replaced)", "invalid_utf8_replaced", "{:,}")]
    for label, key, fmt in rows:
        t.add_row(label, *(human(s[key], "B") if fmt == "B" else fmt.format(s[key]) for s in srcs.values()))
    reasons = sorted({r for s in srcs.values() for r in s["drops"]})
    for r in reasons:
        t.add_row(f"dropped: {r}", *(f"{s['drops'].get(r, 0):,}" for s in srcs.values()))
    console.print(t)
    for name, s in stats["sources"].items():
        if s.get("malformed_at"):
            console.print(f"[yellow]{name}: {s['malformed_lines']} malformed lines skipped, first at "
                          f"{escape(', '.join(s['malformed_at'][:3]))}[/]", highlight=False)
    if result["next"] == "domainlm tokenize":
        console.print("[dim]next: `domainlm tokenize CONFIG` (token files are no longer written by prepare)[/]")
    else:
        console.print("[dim]next: `domainlm tokenizer CONFIG`, then `domainlm tokenize CONFIG`[/]")
