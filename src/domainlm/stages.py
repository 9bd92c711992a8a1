"""Stage bookkeeping: each stage records a fingerprint of its inputs and config in ``<run>/.stages/``;
a rerun with the same fingerprint skips the stage, a different one redoes it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path


def fingerprint(*parts) -> str:
    """sha256 of a JSON rendering of ``parts`` (configs as dicts, file stats, versions)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def file_fingerprint(path: Path) -> str:
    """Content hash of a file (small files) or of its size+mtime (large ones, > 64 MB)."""
    path = Path(path)
    st = path.stat()
    if st.st_size > 64 * 2**20:
        return f"{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _marker(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / ".stages" / f"{stage}.json"


def is_done(run_dir: Path, stage: str, fp: str) -> bool:
    m = _marker(run_dir, stage)
    if not m.exists():
        return False
    try:
        return json.loads(m.read_text())["fingerprint"] == fp
    except (json.JSONDecodeError, KeyError):
        return False


def mark_done(run_dir: Path, stage: str, fp: str, info: dict | None = None) -> None:
    m = _marker(run_dir, stage)
    m.parent.mkdir(parents=True, exist_ok=True)
    tmp = m.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fp, "finished": time.time(), **(info or {})}, indent=2))
    os.replace(tmp, m)


def clear(run_dir: Path, stage: str) -> None:
    _marker(run_dir, stage).unlink(missing_ok=True)
