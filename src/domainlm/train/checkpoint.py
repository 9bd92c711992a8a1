"""Checkpoints that survive crashes, and exact resume.

``<run>/checkpoints/step-00000100/``::

    model.safetensors   weights (one process or DDP)          ┐ or, with FSDP, dcp/: torch.distributed.checkpoint
    optimizer.pt        AdamW state (tensors + numbers only)  ┘ shards of both (resumable on any process count)
    rng-<rank>.pt       torch RNG state per rank
    state.json          step, data-loader state, skip counters, schedule length, parallel mode
    manifest.json       sha256 of every file above — written last

Written into ``.tmp-step-…``, every file fsynced, then renamed: a crash (even SIGKILL) mid-write leaves
only a temp folder, ignored and removed on the next start, and never touches the last good checkpoint.
Loading verifies the manifest first and reads tensors with ``weights_only=True`` (no arbitrary unpickling).
The manifest catches corruption, not a crafted checkpoint (whoever writes the files can write the manifest):
on the FSDP path torch.distributed.checkpoint keeps its index in ``dcp/.metadata``, a pickle, and pickles
non-tensor optimizer values; both are checked before use — ``.metadata`` is unpickled first with only the
classes dcp writes allowed (`_check_dcp_metadata`), and the values load with ``weights_only=True``
(`_SafeLoadPlanner`) — so loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from domainlm import faults
from domainlm.errors import UserError
from domainlm.rundir import RunDir, fsync
from domainlm.train.parallel import Dist, barrier, is_fsdp, unwrap

CHECKPOINTS = RunDir.CHECKPOINTS
PREFIX = "step-"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of interrupted writes are not listed)."""
    d = checkpoints_dir(run_dir)
    if not d.exists():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_partial(run_dir: Path) -> None:
    d = checkpoints_dir(run_dir)
    if d.exists():
        for p in d.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, world: Dist, keep: int) -> Path:
    ck = checkpoints_dir(run_dir)
    final = ck / f"{PREFIX}{step:08d}"
    tmp = ck / f".tmp-{final.name}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        if is_fsdp(model):

            msd, osd = get_state_dict(model, optimizer)  # sharded: each rank writes its own shards
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
        elif world.is_main:
            save_model(unwrap(model), str(tmp / "model.safetensors"))  # drops the tied head's duplicate
            faults.hit("checkpoint.mid_write")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng-{world.rank}.pt")
        barrier()
        if world.is_main:
            (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            for p in files:
                fsync(p)
            manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            fsync(tmp / "manifest.json")
            for d in {p.parent for p in files} | {tmp}:
                fsync(d)
            os.replace(tmp, final)  # atomic: the checkpoint exists completely or not at all
            fsync(ck)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.save and safetensors report a failed write as RuntimeError/SafetensorError, not OSError(ENOSPC):
        # ask the filesystem whether it is full.
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(ck).free < 2**26
        if not (full or isinstance(e, OSError)):
            raise
        prev = list_checkpoints(run_dir)
        intact = f"the previous checkpoint {prev[-1]} is intact" if prev else "no earlier checkpoint exists"
        what = "disk full" if full else f"{e.strerror or e}"
        raise UserError(
            f"{final}: {what} while writing the checkpoint; {intact}; free space and rerun to resume"
        ) from None
    barrier()
    if world.is_main:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


class CorruptCheckpoint(Exception):
    def __init__(self, file: Path, why: str):
        self.file, self.why = file, why


def _verify(path: Path) -> None:
    mf = path / "manifest.json"
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(mf, f"unreadable manifest: {e}") from None
    for rel, sha in manifest.items():
        f = path / rel
        if not f.exists():
            raise CorruptCheckpoint(f, "missing file")
        if _sha256(f) != sha:
            raise CorruptCheckpoint(f, "checksum mismatch")


# What dcp writes into .metadata (torch 2.x): its metadata dataclasses, sizes, dtypes, layouts, a path.
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


def _check_dcp_metadata(path: Path) -> None:
    """Unpickle ``dcp/.metadata`` allowing only the names dcp writes (its metadata classes, torch sizes and
    dtypes): a crafted file that would call anything else is refused before dcp's own ``pickle.load``."""

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in _DCP_GLOBALS or module == "torch.distributed.checkpoint.metadata" or (
                    module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refusing {module}.{name}")

    meta = path / "dcp" / ".metadata"
    try:
        with open(meta, "rb") as f:
            Restricted(f).load()
    except Exception as e:  # noqa: BLE001 - anything unpickling raises means: do not hand it to pickle.load
        raise CorruptCheckpoint(meta, f"not a torch.distributed.checkpoint index ({e})") from None


def _safe_load_planner():
    """dcp's default planner loads non-tensor values (optimizer hyper-parameters) with ``weights_only=False``;
    this one with ``weights_only=True``: numbers, strings and containers only."""


    class _SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            super().load_bytes(read_item, _saved(obj))

    def _saved(obj) -> io.BytesIO:
        buf = io.BytesIO()
        torch.save(obj, buf)  # re-serialised from the checked object: the parent's load sees only that
        buf.seek(0)
        return buf

    return _SafeLoadPlanner()


def _shape_mismatch(path: Path, model) -> str | None:
    """How the checkpoint's weights differ in shape from ``model`` (a changed model config), or None."""

    params = unwrap(model).state_dict()
    want = {k: tuple(v.shape) for k, v in params.items()}
    ptrs: dict[int, int] = {}
    for v in params.values():
        ptrs[v.data_ptr()] = ptrs.get(v.data_ptr(), 0) + 1
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    for k in sorted(set(got) & set(want)):
        if got[k] != want[k]:
            return f"{k} is {list(got[k])} in the checkpoint, {list(want[k])} in the model"
    extra = sorted(set(got) - set(want))
    missing = sorted(k for k in set(want) - set(got) if ptrs[params[k].data_ptr()] == 1)  # tied: saved once
    if extra or missing:
        return f"{len(extra)} weights only in the checkpoint, {len(missing)} only in the model (e.g. " \
               f"{(extra or missing)[0]})"
    return None


def load_checkpoint(path: Path, model, optimizer, world: Dist) -> dict:
    """Restore model, optimizer and RNG in place; return state.json. Raises CorruptCheckpoint, or UserError
    when the checkpoint is intact but of another model shape (the config changed)."""
    _verify(path)
    if (path / "model.safetensors").exists():
        mismatch = _shape_mismatch(path, model)
        if mismatch:
            raise UserError(f"{path}: the checkpoint is intact but of another model shape ({mismatch}): the "
                            "config's model section changed; use --restart to train the new shape from scratch, "
                            "or restore the old model settings to resume")
    try:
        if (path / "dcp").exists():  # FSDP-written; loads into FSDP of any size, DDP or one process

            _check_dcp_metadata(path)
            msd, osd = get_state_dict(model, optimizer)
            with warnings.catch_warnings():  # one process without a process group is a supported case
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(path / "dcp"), planner=_safe_load_planner())
            set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
        elif is_fsdp(model):
            raise UserError(f"{path}: written without FSDP; resume with train.parallel: ddp, or --restart")
        else:
            load_model(unwrap(model), str(path / "model.safetensors"), strict=True)
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        rng_file = path / f"rng-{world.rank}.pt"
        if rng_file.exists():  # absent when resuming on more processes than wrote it
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (UserError, CorruptCheckpoint):
        raise
    except Exception as e:  # verified files that still fail to load: a format problem, name the folder
        if "size mismatch" in str(e) or "shape" in str(e).lower():  # dcp: the model config changed
            raise UserError(f"{path}: the checkpoint is intact but of another model shape (the config's model "
                            "section changed); use --restart to train the new shape from scratch, or restore the "
                            "old model settings to resume") from None
        raise CorruptCheckpoint(path, f"{type(e).__name__}: {e}") from None


def load_latest(run_dir: Path, model, optimizer, world: Dist) -> tuple[Path, dict] | None:
    """Resume point: the newest checkpoint, or None. A corrupted one is an error that names the bad file and
    offers the previous checkpoint."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    try:
        return ckpts[-1], load_checkpoint(ckpts[-1], model, optimizer, world)
    except CorruptCheckpoint as e:
        if len(ckpts) > 1:
            offer = f"delete {ckpts[-1]} to resume from the previous checkpoint {ckpts[-2].name}, or use --restart"
        else:
            offer = "no earlier checkpoint exists; use --restart to start over"
        raise UserError(f"{e.file}: corrupted checkpoint ({e.why}); {offer}") from None
