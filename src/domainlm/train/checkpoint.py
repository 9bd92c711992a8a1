"""Checkpoints that survive crashes, and exact resume.

``<run>/checkpoints/step-00000100/``::

    model.safetensors   weights (one process or DDP)          ┐ or, with FSDP, dcp/: torch.distributed.checkpoint
    optimizer.pt        AdamW state (tensors + numbers only)  ┘ shards of both (resumable on any process count)
    shared.pt           FSDP: what every rank holds alike (optimizer step counts and hyper-parameters)
    rng-<rank>.pt       torch RNG state per rank
    state.json          step, data-loader state, skip counters, schedule length, parallel mode
    manifest-<rank>.json  sha256 of the files rank <rank> wrote (rank 0: also the shared ones)
    manifest.json       the index: the world size and the sha256 of every rank's manifest — written last

Each rank fsyncs and hashes only what it wrote (with FSDP its own ``dcp/__<rank>_*.distcp`` shard), so a save
costs every rank its own shard's read, not rank 0 everyone's; rank 0 writes the index after all ranks' manifests
are on disk. On resume with the same number of processes each rank verifies only its own manifest and reads only
its own shard (plus the small shared files); on another count, rank r verifies the manifests of the old ranks
``j ≡ r (mod world size)``, so every byte is hashed once. The ranks agree on the verdict before loading. dcp
stores a value every rank holds alike once, in one rank's file; those values (the optimizer's step counts and
param groups) go to ``shared.pt`` instead, so that no rank opens another rank's shard for them.

Written into ``.tmp-step-…``, every file fsynced, then renamed: a crash (even SIGKILL) mid-write leaves
only a temp folder, ignored and removed on the next start, and never touches the last good checkpoint.
Loading verifies the manifests first and reads tensors with ``weights_only=True`` (no arbitrary unpickling).
The manifests catch corruption, not a crafted checkpoint (whoever writes the files can write the manifest):
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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

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


INDEX = "manifest.json"  # written last, by rank 0: the world size and every rank's manifest's sha256
SHARED = "shared.pt"  # FSDP: the state every rank holds alike (see the module docstring)


def manifest_name(rank: int) -> str:
    return f"manifest-{rank}.json"


def _gather(obj, world: Dist) -> list:
    """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _split(sd: dict, shared) -> tuple[dict, dict]:
    """A nested state dict as (the leaves ``shared(path, value)`` rejects, the leaves it accepts), both nested."""
    own: dict = {}
    common: dict = {}

    def walk(d: dict, path: tuple, a: dict, b: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, (*path, k), a.setdefault(k, {}), b.setdefault(k, {}))
                for x in (a, b):
                    if not x[k]:
                        del x[k]
            elif shared((*path, k), v):
                b[k] = v.cpu() if isinstance(v, torch.Tensor) else v
            else:
                a[k] = v

    walk(sd, (), own, common)
    return own, common


def _has(tree: dict, path: tuple) -> bool:
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return False
        tree = tree[k]
    return True


def _put(sd: dict, tree: dict) -> None:
    """Set the leaves of the nested ``tree`` into ``sd``."""
    for k, v in tree.items():
        if isinstance(v, dict) and isinstance(sd.get(k), dict):
            _put(sd[k], v)
        else:
            sd[k] = v


def _problem(e: Exception, final: Path, run_dir: Path) -> tuple[bool, str]:
    """(whether it is the user's to fix, one line) for an exception raised while writing ``final``."""
    ck = checkpoints_dir(run_dir)
    # torch.save and safetensors report a failed write as RuntimeError/SafetensorError, not OSError(ENOSPC):
    # ask the filesystem whether it is full.
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(ck).free < 2**26
    if not (full or isinstance(e, OSError)):
        return False, f"{type(e).__name__}: {e}"
    prev = list_checkpoints(run_dir)
    intact = f"the previous checkpoint {prev[-1]} is intact" if prev else "no earlier checkpoint exists"
    what = "disk full" if full else f"{getattr(e, 'strerror', None) or e}"
    return True, f"{final}: {what} while writing the checkpoint; {intact}; free space and rerun to resume"


def _together(world: Dist, work, final: Path, run_dir: Path, tmp: Path) -> None:
    """Run ``work`` on this rank; if it fails on any rank, every rank raises (none is left waiting at the next
    collective) and the temp folder goes."""
    err = None
    try:
        work()
    except Exception as e:  # noqa: BLE001 - reported to every rank below, then raised
        err = e
    problems = _gather(None if err is None else (world.rank, *_problem(err, final, run_dir)), world)
    failed = [p for p in problems if p is not None]
    if not failed:
        return
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if err is not None and not failed[[p[0] for p in failed].index(world.rank)][1]:
        raise err  # a bug here, not a full disk: its traceback
    rank, _, text = failed[0]
    raise UserError(text if rank == world.rank or len(problems) == 1 else f"rank {rank}: {text}") from None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, world: Dist, keep: int) -> Path:
    ck = checkpoints_dir(run_dir)
    final = ck / f"{PREFIX}{step:08d}"
    tmp = ck / f".tmp-{final.name}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    digest: list[str] = []

    def write_mine() -> None:
        mine: list[Path] = []  # what this rank writes, fsyncs and hashes
        if is_fsdp(model):
            msd, osd = get_state_dict(model, optimizer)  # sharded: each rank writes its own shards
            sharded, shared = _split({"model": msd, "optim": osd}, lambda _, v: not isinstance(v, DTensor))
            dcp.save(sharded, checkpoint_id=str(tmp / "dcp"))  # a collective; files __<rank>_<n>.distcp
            mine += sorted((tmp / "dcp").glob(f"__{world.rank}_*"))
            if world.is_main:
                torch.save(shared, tmp / SHARED)
                mine += [tmp / "dcp" / ".metadata", tmp / SHARED]
        elif world.is_main:
            save_model(unwrap(model), str(tmp / "model.safetensors"))  # drops the tied head's duplicate
            faults.hit("checkpoint.mid_write")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            mine += [tmp / "model.safetensors", tmp / "optimizer.pt"]
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng-{world.rank}.pt")
        mine.append(tmp / f"rng-{world.rank}.pt")
        if world.is_main:
            (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
            mine.append(tmp / "state.json")
        for p in mine:
            fsync(p)
        mf = tmp / manifest_name(world.rank)
        mf.write_text(json.dumps({str(p.relative_to(tmp)): _sha256(p) for p in mine}, indent=1), encoding="utf-8")
        fsync(mf)
        digest.append(_sha256(mf))

    _together(world, write_mine, final, run_dir, tmp)
    digests = _gather(digest[0], world)  # every rank's files and manifest are on disk

    def publish() -> None:
        if not world.is_main:
            return
        index = {"format": 2, "world_size": len(digests),
                 "manifests": {manifest_name(r): d for r, d in enumerate(digests)}}
        (tmp / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
        fsync(tmp / INDEX)
        for d in (tmp / "dcp", tmp):
            if d.is_dir():
                fsync(d)
        os.replace(tmp, final)  # atomic: the checkpoint exists completely or not at all
        fsync(ck)

    _together(world, publish, final, run_dir, tmp)
    if world.is_main:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


class CorruptCheckpoint(Exception):
    def __init__(self, file: Path, why: str):
        self.file, self.why = file, why


def _check(path: Path, manifest: dict, mf: Path) -> None:
    if not isinstance(manifest, dict):
        raise CorruptCheckpoint(mf, "not a manifest")
    for rel, sha in manifest.items():
        f = path / rel
        if not f.exists():
            raise CorruptCheckpoint(f, "missing file")
        if _sha256(f) != sha:
            raise CorruptCheckpoint(f, "checksum mismatch")


def _read_json(f: Path):
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f, f"unreadable manifest: {e}") from None


def _verify_mine(path: Path, rank: int, size: int) -> None:
    """Verify this rank's share of the checkpoint: the manifests of the ranks that wrote it ``j ≡ rank (mod
    size)`` (with an unchanged world size: its own) against the index, then the files they list."""
    index = _read_json(path / INDEX)
    if not isinstance(index, dict) or "manifests" not in index:  # written before per-rank manifests: all of it
        if rank == 0:
            _check(path, index, path / INDEX)
        return
    names = index["manifests"]
    for j in range(rank, int(index["world_size"]), size):
        mf = path / manifest_name(j)
        if not mf.exists():
            raise CorruptCheckpoint(mf, "missing file")
        if _sha256(mf) != names.get(mf.name):
            raise CorruptCheckpoint(mf, "checksum mismatch")
        _check(path, _read_json(mf), mf)


def _verify(path: Path, world: Dist) -> None:
    """Every rank verifies its share (`_verify_mine`); all raise the first problem any rank found."""
    size = dist.get_world_size() if dist.is_initialized() else 1
    try:
        _verify_mine(path, world.rank, size)
        mine = None
    except CorruptCheckpoint as e:
        mine = (str(e.file), e.why)
    found = [p for p in _gather(mine, world) if p is not None]
    if found:
        raise CorruptCheckpoint(Path(found[0][0]), found[0][1])


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
    _verify(path, world)
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
            sd = {"model": msd, "optim": osd}
            shared = torch.load(path / SHARED, weights_only=True, map_location="cpu") \
                if (path / SHARED).exists() else {}  # absent: written when dcp held everything
            from_shards, _ = _split(sd, lambda key, _: _has(shared, key))
            with warnings.catch_warnings():  # one process without a process group is a supported case
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(from_shards, checkpoint_id=str(path / "dcp"), planner=_safe_load_planner())
            _put(sd, from_shards)  # dcp loads tensors in place, other values into from_shards
            _put(sd, shared)
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


# ------------------------------------------------------------------------------------------------ inputs

# Every checkpoint's state.json carries ``inputs``: a flat {key: value} of what determines the weights of the unit
# that wrote it (config keys, the base model's and the tokenizer's content hashes, the data's counts and hashes,
# the seed), given by the caller (`train/loop.py`, `finetune/*`). A resume compares it with the current inputs:
# any difference discards the unit's checkpoints and starts it from scratch, and says which keys changed.
INPUTS = "inputs"
STALE = ".stale-checkpoints"


def _canonical(inputs: dict) -> dict:
    """``inputs`` as state.json gives it back (tuples as lists, keys as strings): what a comparison sees."""
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


def changed_inputs(recorded: dict, current: dict) -> list[str]:
    """The keys whose values differ between two input records (added or removed keys included), sorted."""
    a, b = _canonical(recorded), _canonical(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, ...) != b.get(k, ...))


def recorded_inputs(path: Path) -> dict | None:
    """The inputs a checkpoint recorded, or None (written before inputs were recorded, or state.json unreadable:
    loading it reports that)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    rec = state.get(INPUTS) if isinstance(state, dict) else None
    return rec if isinstance(rec, dict) else None


def stale_checkpoint(run_dir: Path, inputs: dict) -> tuple[Path, list[str] | None] | None:
    """(the newest checkpoint, the input keys that changed since it was written) when ``inputs`` differ from what
    it recorded, or (it, None) when it recorded none (written by an earlier version); None when they match or
    there is no checkpoint."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    rec = recorded_inputs(ckpts[-1])
    if rec is None:
        return ckpts[-1], None
    changed = changed_inputs(rec, inputs)
    return (ckpts[-1], changed) if changed else None


def discard_checkpoints(run_dir: Path) -> None:
    """Remove every checkpoint of ``run_dir``: the folder is renamed away first (one atomic step, so a kill
    mid-removal leaves no checkpoint that a resume could pick up), then deleted."""
    d = checkpoints_dir(run_dir)
    trash = d.with_name(STALE)
    shutil.rmtree(trash, ignore_errors=True)  # left by a kill during an earlier discard
    if d.exists():
        os.replace(d, trash)
        fsync(d.parent)
    shutil.rmtree(trash, ignore_errors=True)


def describe_changes(changed: list[str], shown: int = 6) -> str:
    more = f" and {len(changed) - shown} more" if len(changed) > shown else ""
    return ", ".join(changed[:shown]) + more
