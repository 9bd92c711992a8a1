"""`domainlm tokenize CONFIG`: the token files of the prepared data (data/tokenize.py), after the base model's
vocabulary extension when the config asks for one (tokenizer_extend.py); a progress bar, a table at the end."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from domainlm import stages
from domainlm.config import load_config
from domainlm.data.command import progress_bar
from domainlm.data.tokenize import tokenize
from domainlm.model.base import base_of
from domainlm.rundir import RunDir
from domainlm.tokenizer_extend import ensure_extended
from domainlm.units import human


def run_tokenize(config: Path | None, console: Console, tokenizer: Path | None = None) -> dict:
    """Token files of the prepared data: with the run's tokenizer in ``tokens/``, with another one (``tokenizer``,
    a Hugging Face tokenizer folder) in its own folder (`RunDir.tokens_for`). With ``train.init_from`` (continued
    pretraining) and no ``tokenizer``, the base model's tokenizer: the one that run trains with."""

    cfg = load_config(config)
    run_dir = cfg.directory()
    if tokenizer is None:
        ensure_extended(cfg, console)  # tokenizer.extend_vocab: base_of(cfg) is then the extended base
    if tokenizer is None and (base := base_of(cfg)) is not None:
        tokenizer = base.path
    t0 = time.perf_counter()
    with stages.locked(run_dir, "tokenize"), progress_bar(console) as progress:
        counts = tokenize(run_dir, tokenizer, progress)
    return {"run_dir": str(run_dir), "tokens": str(RunDir(run_dir).tokens_for(tokenizer)), "counts": counts,
            "seconds": round(time.perf_counter() - t0, 2)}


def print_tokenize(result: dict, console: Console) -> None:
    counts = result["counts"]
    t = Table(title=f"tokens → {escape(result['tokens'])} ({counts['dtype']}, vocab {counts['vocab_size']:,}, "
              f"EOS id {counts['eos_id']}, {result['seconds']:.1f} s)")
    for col in ("source", "train tokens", "val tokens", "train bytes/token"):
        t.add_column(col, justify="left" if col == "source" else "right")
    for name, c in counts["sources"].items():
        bpt = c["train_bytes"] / c["train_tokens"] if c["train_tokens"] else 0
        t.add_row(name, human(c["train_tokens"]), human(c["val_tokens"]), f"{bpt:.2f}")
    console.print(t)
