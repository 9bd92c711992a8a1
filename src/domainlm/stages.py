"""Stage bookkeeping: a `Stage` records a fingerprint of its inputs and config in ``<run>/.stages/``;
a rerun with the same fingerprint skips the stage, a different one redoes it. ``locked`` keeps a run
directory to one writing command at a time."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from domainlm.errors import UserError
from domainlm.rundir import RunDir, write_json

LOCK = ".lock"
_held: dict[str, int] = {}  # lock files this process holds → nesting depth (`run` calls the other stages)


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
    return RunDir(run_dir) / RunDir.STAGES / f"{stage}.json"


def _is_done(run_dir: Path, stage: str, fp: str) -> bool:
    m = _marker(run_dir, stage)
    if not m.exists():
        return False
    try:
        return json.loads(m.read_text())["fingerprint"] == fp
    except (json.JSONDecodeError, KeyError):
        return False


def _mark_done(run_dir: Path, stage: str, fp: str, info: dict | None = None) -> None:
    write_json(_marker(run_dir, stage), {"fingerprint": fp, "finished": time.time(), **(info or {})})


def recorded(run_dir: Path, stage: str) -> dict:
    """What `Stage.finish` recorded for ``stage`` (fingerprint, finish time, the stage's summary), or {} if not done."""
    m = _marker(run_dir, stage)
    return json.loads(m.read_text(encoding="utf-8")) if m.exists() else {}


def clear(run_dir: Path, stage: str) -> None:
    _marker(run_dir, stage).unlink(missing_ok=True)


@dataclass
class Stage:
    """One pipeline stage of a run: ``inputs`` (configs as dicts, input files' hashes, versions) → fingerprint →
    the work → ``output``, the file the stage writes last (its completion mark). Done when ``output`` exists, the
    marker ``.stages/<name>.json`` holds the same fingerprint and ``intact`` (if given) finds the outputs whole;
    a stage that is not done resumes its own unfinished work (datatrove tasks, token parts, checkpoints)."""

    run_dir: Path
    name: str
    output: Path
    inputs: tuple = ()
    intact: Callable[[], bool] | None = None

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(*self.inputs)

    def done(self) -> bool:
        return (self.output.exists() and _is_done(self.run_dir, self.name, self.fingerprint)
                and (self.intact is None or self.intact()))

    def start(self) -> None:
        """Before redoing the work: the marker goes first (the stage removes its completion mark if others read
        it as "done")."""
        clear(self.run_dir, self.name)

    def finish(self, info: dict | None = None) -> None:
        _mark_done(self.run_dir, self.name, self.fingerprint, info)

    def run(self, work: Callable[[], object], load: Callable[[], object]) -> tuple[object, bool]:
        """``load()`` when done, else ``work()`` between `start` and `finish`; and whether the work ran."""
        if self.done():
            return load(), False
        self.start()
        result = work()
        self.finish()
        return result, True


def writable_dir(folder: Path, what: str = "run directory") -> Path:
    """Create ``folder`` (and parents) or fail with one line: a file in the way, a read-only or full disk."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: the {what} is an existing file, not a folder; move the file or choose another "
                        "path (run_dir in the config)")
    blocking = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{folder}: {blocking} is a file, not a folder; choose another path for the {what} "
                        "(run_dir in the config)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the {what} ({e.strerror}); choose a writable path") from None
    return folder


@contextlib.contextmanager
def locked(run_dir: Path, command: str):
    """Hold ``<run>/.lock`` while ``domainlm <command>`` writes into the run directory; a second writing
    command on the same directory fails at once with one line naming the one that runs. An flock is released
    by the kernel when its process dies, so a killed command never leaves a stale lock. Re-entrant in one
    process; under torchrun only rank 0 takes it (the other ranks are the same command)."""
    run_dir = writable_dir(run_dir)
    path = run_dir / LOCK
    key = str(path.resolve())
    if key in _held or os.environ.get("RANK", "0") != "0":
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    try:
        f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise UserError(f"{run_dir}: the run directory is not writable ({e.strerror}); make it writable or set "
                        "run_dir in the config to another folder") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                f.seek(0)
                holder = f.read().split()
                who = f"`domainlm {holder[0]}` (pid {holder[1]})" if len(holder) == 2 else "domainlm command"
                raise UserError(f"{run_dir}: another {who} is running on this run directory; wait for it to "
                                "finish (or stop it), then rerun") from None
            if e.errno not in NO_FLOCK:
                raise
            # a filesystem without flock (some NFS/Lustre mounts): run unlocked rather than not at all
        else:
            try:
                f.seek(0)
                f.truncate()
                f.write(f"{command} {os.getpid()}\n")
                f.flush()
            except OSError as e:
                raise UserError(f"{path}: cannot write the lock file ({e.strerror}); free space or make the run "
                                "directory writable, then rerun") from None
        _held[key] = 1
        try:
            yield
        except Exception as e:
            env = environment_error(e)
            if env is None:
                raise
            raise UserError(f"{run_dir}: `domainlm {command}` stopped: {describe_environment_error(env)}") from e
        finally:
            del _held[key]


NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # flock unsupported by the filesystem


# OSErrors that are about the machine, not domainlm or its input: a full or read-only disk, permissions.
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                      errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                      errno.EPERM: "operation not permitted"}


def environment_error(e: BaseException) -> OSError | None:
    """The OSError of ``ENVIRONMENT_ERRNOS`` that ``e`` is or was raised from/while handling (datatrove and
    torch wrap them), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def describe_environment_error(e: OSError) -> str:
    where = f" writing {e.filename}" if e.filename is not None else ""
    fix = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the permissions"
    return (f"{ENVIRONMENT_ERRNOS[e.errno]}{where}; {fix} and rerun the same command (finished work is kept: it "
            "resumes where it stopped)")
