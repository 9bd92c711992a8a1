"""Token files: the contract between `domainlm prepare` (writer) and `domainlm train` / `eval` (readers).

Layout of a token folder — ``tokens/`` for the run's own tokenizer, ``tokens-<sha>/`` for any other
(`RunDir.tokens_for`)::

    tokens/<source>/train.bin   raw little-endian uint16 (vocab ≤ 65536) or uint32 token ids;
    tokens/<source>/val.bin     documents concatenated, each followed by the EOS id
    tokens/counts.json          {"version", "dtype", "vocab_size", "eos_id", "tokenizer_sha256",
                                 "sources": {name: {"train_tokens", "val_tokens", "train_docs", "val_docs",
                                                    "train_bytes", "val_bytes"}}}

``train_tokens`` is the number of unique (never repeated) training tokens of a source — the data limit
`domainlm plan` uses. ``*_bytes`` are UTF-8 bytes of the text that was tokenized (bits-per-byte needs them).
A file is written to ``<name>.tmp`` and renamed when complete, so a reader never sees a partial file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from domainlm.errors import UserError
from domainlm.outputs import Counts
from domainlm.rundir import RunDir, open_new, publish, write_json

COUNTS_VERSION = 1
REDO = "rerun `domainlm tokenize CONFIG` (it rewrites the token files)"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def folder(path: Path) -> Path:
    """A token folder (from `RunDir.tokens_for`) as is; a run directory → its own token folder ``tokens/``.
    Every function below takes either."""
    path = Path(path)
    return path if path.name.split("-")[0] == RunDir.TOKENS else RunDir(path).tokens_for()


def token_path(tokens: Path, source: str, split: str) -> Path:
    return folder(tokens) / source / f"{split}.bin"


def counts_path(tokens: Path) -> Path:
    return folder(tokens) / RunDir.COUNTS_FILE


class TokenWriter:
    """Append token arrays to ``path`` through ``path.tmp``; ``close()`` fsyncs and renames into place."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self._f = open_new(self.tmp)  # closed in close()
        self.n_tokens = 0

    def write(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._f.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self.n_tokens += int(arr.size)

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        publish(self.tmp, self.path)

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
            self.tmp.unlink(missing_ok=True)


def load_counts(tokens: Path) -> dict:
    p = counts_path(tokens)
    if not p.exists():
        other = "" if p.parent.name == RunDir.TOKENS else " --tokenizer DIR"  # another tokenizer's folder
        raise UserError(f"{p}: no token files; run `domainlm tokenize CONFIG{other}` first (after `domainlm "
                        "prepare` and `domainlm tokenizer`)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: corrupted counts file ({e.msg} at line {e.lineno}); {REDO}") from None
    if not isinstance(data, dict) or data.get("version") != COUNTS_VERSION:
        raise UserError(f"{p}: token files from an incompatible version; {REDO}")
    try:
        Counts.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise UserError(f"{p}: not a valid counts file ({where}: {first['msg']}); {REDO}") from None
    return data


def write_counts(tokens: Path, data: dict) -> Path:
    return write_json(counts_path(tokens), Counts.checked({"version": COUNTS_VERSION, **data}))


def file_problem(tokens: Path, source: str, split: str, counts: dict) -> str | None:
    """Why ``<source>/<split>.bin`` is not what counts.json says it is (missing, or another size), or None."""
    p = token_path(tokens, source, split)
    if not p.exists():
        return "missing token file"
    itemsize = np.dtype(counts["dtype"]).itemsize
    expected = counts.get("sources", {}).get(source, {}).get(f"{split}_tokens")
    size = p.stat().st_size
    if expected is not None and size != expected * itemsize:
        return (f"{size:,} bytes on disk, but {RunDir.COUNTS_FILE} says {expected:,} tokens "
                f"({expected * itemsize:,} bytes): truncated or replaced")
    if size % itemsize:
        return f"size is not a multiple of {itemsize} bytes"
    return None


_ids_checked: dict[tuple[str, int, int], None] = {}  # (path, size, mtime) checked in this process


def check_ids(path: Path, arr: np.ndarray, vocab_size: int) -> None:
    """Every id below ``vocab_size`` (random bytes in a token file would index past the embedding). One pass
    over the file in 16M-token chunks, once per file version and process: 0.04 s for 256 MB of uint16 ids in
    the page cache on the 2-core dev machine; a cold file costs its disk read."""
    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _ids_checked:
        return
    for i in range(0, len(arr), 1 << 24):
        chunk = arr[i : i + (1 << 24)]
        top = int(chunk.max()) if len(chunk) else 0
        if top >= vocab_size:
            at = i + int(np.argmax(chunk >= vocab_size))
            raise UserError(f"{path}: token id {int(arr[at])} at position {at:,} is outside the vocabulary "
                            f"({vocab_size:,} ids): the file is corrupted; {REDO}")
    _ids_checked[key] = None


def open_tokens(tokens: Path, source: str, split: str, counts: dict | None = None) -> np.memmap:
    """Memory-map one source's token file (read-only), checked against counts.json: its size (the number of
    tokens it says) and its ids (below ``vocab_size``)."""
    counts = counts or load_counts(tokens)
    p = token_path(tokens, source, split)
    problem = file_problem(tokens, source, split, counts)
    if problem is not None:
        raise UserError(f"{p}: {problem}; {REDO}")
    dtype = np.dtype(counts["dtype"]).newbyteorder("<")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: empty token file; the source has no {split} documents")
    arr = np.memmap(p, dtype=dtype, mode="r")
    if counts.get("vocab_size"):
        check_ids(p, arr, int(counts["vocab_size"]))
    return arr
