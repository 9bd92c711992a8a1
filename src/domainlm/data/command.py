"""`domainlm prepare CONFIG`: progress bars while it runs, a summary table at the end."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from domainlm import stages
from domainlm.units import human


def run_prepare(config: Path | None, console: Console) -> dict:
    """Data stage (clean, dedup, split), then token files if ``<run>/tokenizer/tokenizer.json`` exists."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from domainlm.config import load_config, write_resolved
    from domainlm.data import pipeline, tokenize

    cfg = load_config(config)
    run_dir = cfg.directory()
    t0 = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # One `prepare` per run directory at a time: two would overwrite each other's shards.
    with stages.locked(run_dir, "prepare"), Progress(*columns, console=console) as progress:
        write_resolved(cfg, run_dir)
        stats = pipeline.prepare_sources(cfg, run_dir, progress)
        result = {"run_dir": str(run_dir), "stats": stats, "tokens": None}
        if "submitted" not in stats and tokenize.tokenizer_file(run_dir).exists():
            result["tokens"] = tokenize.tokenize_run(cfg, run_dir, progress)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


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
    counts = result.get("tokens")
    if counts:
        t = Table(title=f"tokens ({counts['dtype']}, vocab {counts['vocab_size']:,}, EOS id {counts['eos_id']})")
        for col in ("source", "train tokens", "val tokens", "train bytes/token"):
            t.add_column(col, justify="left" if col == "source" else "right")
        for name, c in counts["sources"].items():
            bpt = c["train_bytes"] / c["train_tokens"] if c["train_tokens"] else 0
            t.add_row(name, human(c["train_tokens"]), human(c["val_tokens"]), f"{bpt:.2f}")
        console.print(t)
    else:
        console.print("[dim]no tokenizer yet: run `domainlm tokenizer CONFIG`, then `domainlm prepare CONFIG` "
                      "again to write the token files[/]")
