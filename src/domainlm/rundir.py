"""Crash-safe writes for every file and folder of a run directory.

A stage's output is either absent or complete, whatever kills the process and when: each file is written to
a temporary sibling, flushed to disk, and renamed over its final name (``rename`` is atomic on POSIX); a folder
(the tokenizer, the HF export) is built under a temporary name and swapped in. Readers therefore never see a
torn file under a final name — the property the crash tests (tests/test_crash_*.py) check at every fault site.
Temporary names start with ``.`` or end in ``.tmp`` so listings and globs of outputs skip them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a folder: so a rename in it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through ``.<name>.tmp`` + fsync + rename; create the parent folder. (One fixed
    temporary name: a write killed midway leaves it, and the next write of the same file reuses it; two writers of
    one run directory are excluded by its lock.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)
    return path


def write_json(path: Path | str, obj, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """``obj`` as JSON (UTF-8, a final newline), atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def temp_path(path: Path | str, suffix: str = "") -> Path:
    """A temporary sibling of ``path`` for writers that need a file name (savefig, np.save, save_pretrained):
    write it, then ``publish`` it."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{suffix or path.suffix}")


def publish(tmp: Path, path: Path | str) -> Path:
    """Rename a finished temporary file (from ``temp_path``) over ``path``."""
    path = Path(path)
    os.replace(tmp, path)
    fsync(path.parent)
    return path


def swap_dir(tmp: Path, out: Path) -> Path:
    """Replace folder ``out`` by the finished folder ``tmp``: at every moment ``out`` is absent, the old folder
    or the new one (the old one is parked at ``<out>.old`` between the two renames, and restored on the next
    call if a crash came in between)."""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(out.name + ".old")
    if old.exists() and not out.exists():
        os.replace(old, out)  # a crash between the two renames below: the old folder is still whole
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out


class RunDir:
    """Every path of a run directory: the one place the stages' file names are spelled (see docs/architecture.md
    for which stage writes each file and which read it)."""

    CONFIG = "config.yaml"  # the resolved config (plan, prepare)
    PLAN = "plan.json"  # domainlm plan
    PLAN_CHART = "plan.png"
    DATA = "data"  # data/<source>/{train,val}/*.jsonl.gz — domainlm prepare
    STATS = "data/stats.json"  # written last: the data stage is complete
    TOKENIZER = "tokenizer"  # HF tokenizer folder — domainlm tokenizer
    AUDIT = "tokenizer/audit.json"
    TOKENS = "tokens"  # tokens/<source>/{train,val}.bin — prepare, once a tokenizer exists
    COUNTS = "tokens/counts.json"  # written last: the token files are complete
    CHECKPOINTS = "checkpoints"  # domainlm train
    METRICS = "logs/metrics.jsonl"
    MODEL = "model"  # the Hugging Face export
    EVAL = "eval/eval.json"  # domainlm eval
    TASKS = "eval/tasks.json"  # domainlm eval --task
    FINETUNE_COMPARE = "eval/finetune.json"  # domainlm finetune --compare
    ABLATE = "ablate/ablate.json"  # domainlm ablate
    VARIANT_EVAL = "eval.json"  # in a variant's folder (ablate/w<W>/, the baseline): its bpb and probes
    FINETUNE = "finetune.json"  # in a fine-tuning's --out folder: its summary
    LAW = "scaling/law.json"  # domainlm scaling
    POINTS = "scaling/points.jsonl"
    REPORT = "report/index.html"  # domainlm report
    STAGES = ".stages"  # bookkeeping markers (stages.py): not data for other stages

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def plan(self) -> Path:
        return self.root / self.PLAN

    @property
    def stats(self) -> Path:
        return self.root / self.STATS

    @property
    def tokenizer(self) -> Path:
        return self.root / self.TOKENIZER

    @property
    def counts(self) -> Path:
        return self.root / self.COUNTS

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def model(self) -> Path:
        return self.root / self.MODEL

    @property
    def eval(self) -> Path:
        return self.root / self.EVAL

    @property
    def ablate(self) -> Path:
        return self.root / self.ABLATE

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    def read_json(self, rel: str):
        """A JSON output of another stage, or None when that stage has not written it yet."""
        path = self.root / rel
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
