"""Run `domainlm` in a fresh process, optionally armed to SIGKILL itself at a named crash site
(:mod:`domainlm.faults`), and compare run-directory trees before and after."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

KILLED = -9  # returncode of a process that died by SIGKILL


def domainlm(args: list[str], *, fault: str | None = None, fault_dir: Path | None = None, cwd: Path | None = None,
             timeout: float = 600, torchrun: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m domainlm ARGS`` in its own session (so a fault kills only its process group), one thread per
    process (bit-identical to in-process runs pinned by `single_thread`), offline."""
    if torchrun:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m", "domainlm", *args]
    else:
        cmd = ["-m", "domainlm", *args]
    return _python(cmd, fault, fault_dir, cwd, timeout, env)


def python(code: str, *, fault: str | None = None, fault_dir: Path | None = None, cwd: Path | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -c CODE`` the same way: for entry points whose knobs the CLI does not expose."""
    return _python(["-c", code], fault, fault_dir, cwd, timeout, None)


def _python(args, fault, fault_dir, cwd, timeout, env) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
         "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    e.pop("DOMAINLM_FAULT", None)
    if fault:
        e["DOMAINLM_FAULT"] = fault
        e["DOMAINLM_FAULT_DIR"] = str(fault_dir or cwd or Path.cwd())
    return subprocess.run([sys.executable, *args], env=e, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def files(root: Path, *subdirs: str) -> dict[str, Path]:
    """Every plain file under ``root/<subdir>``, by path relative to ``root``."""
    out = {}
    for sub in subdirs:
        base = root / sub
        if base.is_file():
            out[sub] = base
        elif base.is_dir():
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    out[str(p.relative_to(root))] = p
    return out


def tree(root: Path, *subdirs: str) -> dict[str, bytes]:
    return {k: p.read_bytes() for k, p in files(root, *subdirs).items()}


def stamps(root: Path, *subdirs: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: a file rewritten since has another one of them."""
    return {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in files(root, *subdirs).items()}


def is_temp(rel: str) -> bool:
    """Names that writers use before the rename that publishes a file."""
    name = Path(rel).name
    return name.endswith(".tmp") or ".tmp-" in rel or (name.startswith(".") and ".tmp" in name)


def assert_no_torn_files(root: Path, reference: dict[str, bytes], *subdirs: str) -> None:
    """Every file visible under a final name is either byte-identical to the uninterrupted run's, or (for
    gzip outputs not in the reference) a complete gzip stream: a crash never leaves a partial file behind
    a final name."""
    for rel, p in files(root, *subdirs).items():
        if is_temp(rel):
            continue
        data = p.read_bytes()
        if rel in reference:
            assert data == reference[rel], f"{rel}: differs from the uninterrupted run's file"
        elif rel.endswith(".gz"):
            gzip.decompress(data)  # raises on a truncated stream


def run_dir_of(cfg: Path) -> Path:
    import yaml

    return Path(yaml.safe_load(cfg.read_text())["run_dir"])
