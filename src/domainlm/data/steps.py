"""The datatrove pipeline steps of `domainlm prepare` that datatrove does not ship.

Each step writes its counters to ``<work>/counts/<step>/<rank>.json`` when its shard is done (a rerun of a
killed task overwrites them), so the statistics survive resumption and workers on other machines.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.utils.word_tokenizers import WordTokenizer

from domainlm import faults
from domainlm.data import clean, sources
from domainlm.rundir import atomic_write, open_new, publish, write_json


def _save_counts(work: str, step: str, rank: int, counts: Counter, **extra) -> None:
    # sorted keys: the counters' bytes do not depend on the order work finished in (as pipeline.write_json_atomic)
    write_json(Path(work) / "counts" / step / f"{rank:05d}.json", {"counts": dict(counts), **extra}, indent=1,
               sort_keys=True)


def split_key(text: str) -> int:
    """Content hash that decides train/val: independent of file order, shard count and machine."""
    return xxhash.xxh64_intdigest(text.encode("utf-8"))


class ReadAndClean(PipelineStep):
    """Read one shard of a source, normalise, filter; every drop counted by reason."""

    name = "read + clean"
    type = "domainlm"

    def __init__(self, spec: sources.SourceSpec, work: str, min_chars: int, max_chars: int, max_dup: float):
        super().__init__()
        self.spec, self.work = spec, work
        self.min_chars, self.max_chars, self.max_dup = min_chars, max_chars, max_dup

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts, errors = Counter(), []
        for d in sources.read(self.spec, rank, world_size, counts, errors):
            reason, text = clean.check(
                d.text, min_chars=self.min_chars, max_chars=self.max_chars, max_dup_line_frac=self.max_dup
            )
            if reason:
                counts[f"drop/{reason}"] += 1
                continue
            counts["clean_docs"] += 1
            self.stat_update("clean_docs")
            yield Document(text=text, id=d.id, metadata=d.metadata)
        # malformed lines: the first 100 file:line locations are kept, all are counted
        _save_counts(self.work, "clean", rank, counts, errors=errors[:100], n_errors=len(errors))


class CleanReader(PipelineStep):
    """Read back shard ``rank`` of the cleaned documents: exactly one file per rank, so document indices
    line up with the dedup steps' per-rank removal lists even when a shard is empty."""

    name = "read cleaned"
    type = "domainlm"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.folder) / f"{rank:05d}.jsonl"
        if not path.exists():
            return
        with open(path, "rb") as f:
            for line in f:
                rec = orjson.loads(line)
                yield Document(text=rec["text"], id=rec.get("id", ""), metadata=rec.get("metadata", {}))


class CountDocs(PipelineStep):
    """Pass documents through, counting them (the difference of two counts is a dedup step's drops)."""

    name = "count"
    type = "domainlm"

    def __init__(self, work: str, label: str):
        super().__init__()
        self.work, self.label = work, label

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        n = 0
        for doc in data:
            n += 1
            yield doc
        _save_counts(self.work, self.label, rank, Counter(docs=n))


class _Words(WordTokenizer):
    """Whitespace words. datatrove's default English tokenizer needs spaCy; our shingles do not use it."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return text.splitlines()

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", text)]


_P = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime: odd, so it has an inverse mod 2^64
_P_INV = np.uint64(pow(int(_P), -1, 2**64))
# bytes that belong to words: ASCII letters and digits, and every byte of a multi-byte UTF-8 character
_IS_WORD = np.array([chr(b).isalnum() if b < 128 else True for b in range(256)])


_POWERS: list[np.ndarray] = []


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^1..P^m and P^-1..P^-m (mod 2^64) for m ≥ n, computed once per process and grown by doubling."""
    if not _POWERS or len(_POWERS[0]) < n:
        m = max(n, 2 * len(_POWERS[0]) if _POWERS else 1 << 16)
        with np.errstate(over="ignore"):
            _POWERS[:] = [np.cumprod(np.full(m, _P, np.uint64)), np.cumprod(np.full(m, _P_INV, np.uint64))]
    return _POWERS[0], _POWERS[1]


class FastMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash signature step with vectorised hashing (1.1 → ~5 MB/s per core on the demo).

    Shingles: the ``6·n_grams`` bytes (≈ n words of English, 5.1 letters + a space on average) starting at
    each word of the lower-cased text, non-word runs collapsed to one space — word n-gram shingles up to the
    window edge, hashed for all words at once with a polynomial prefix hash mod 2^64 instead of one Python
    call per word. Permutations: ``a·x + b mod 2^64`` with odd ``a`` (a bijection on 64-bit values) instead of
    datatrove's universal hash mod a Mersenne prime, which costs a 64-bit modulo per (shingle, hash)."""

    def __init__(self, output_folder: str, config):
        super().__init__(output_folder, config, language=_Words())
        rng = np.random.RandomState(config.seed)
        h = config.num_buckets * config.hashes_per_bucket
        self._a = rng.randint(1, 2**62, size=(1, h), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.randint(0, 2**62, size=(1, h), dtype=np.uint64)
        self._width = 6 * config.n_grams

    def get_shingles(self, text: str) -> np.ndarray:
        a = np.frombuffer(text.lower().encode("utf-8"), np.uint8)
        w = _IS_WORD[a]
        keep = w.copy()
        keep[1:] |= w[:-1]  # keep a non-word byte only right after a word byte: "a ,  b" -> "a b"
        a, w = np.where(w, a, 32)[keep], w[keep]
        n, width = len(a), self._width
        starts = np.flatnonzero(w & ~np.concatenate(([False], w[:-1])))
        starts = starts[starts + width <= n] if n >= width else starts[:1]
        if n == 0 or len(starts) == 0:
            return np.empty((0, 1), np.uint64)
        width = min(width, n)
        powers, inv = _powers(n)
        with np.errstate(over="ignore"):
            prefix = np.zeros(n + 1, np.uint64)
            np.cumsum((a + np.uint64(1)) * powers[:n], out=prefix[1:])
            h = (prefix[starts + width] - prefix[starts]) * inv[starts]  # = sum_j x[s+j] P^(j+1)
        return h.reshape(-1, 1)  # repeated shingles do not change a minimum: no np.unique needed

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        with np.errstate(over="ignore"):
            phv = shingles * self._a  # (n_shingles, n_hashes), wraps mod 2^64
            phv += self._b
        return phv.min(axis=0).reshape(self.config.num_buckets, -1).tolist()


class CollectKeys(PipelineStep):
    """Save the split key of every surviving document of a shard (8 bytes each) for the split plan."""

    name = "split keys"
    type = "domainlm"

    def __init__(self, work: str):
        super().__init__()
        self.work = work

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        keys = np.fromiter((split_key(doc.text) for doc in data), dtype=np.uint64)
        buf = io.BytesIO()
        np.save(buf, keys)
        atomic_write(Path(self.work) / "keys" / f"{rank:05d}.npy", buf.getvalue())
        return
        yield  # a generator that yields nothing: the last step of its pipeline


class PlanSplit(PipelineStep):
    """One task: the validation set is the ``k`` documents with the smallest split keys,
    ``k = max(val_min_docs, ceil(val_fraction · n))`` (capped at half the corpus) — exact counts, unlike
    a hash threshold chosen blind. Writes ``split.json`` with the largest validation key."""

    name = "plan split"
    type = "domainlm"

    def __init__(self, work: str, val_fraction: float, val_min_docs: int):
        super().__init__()
        self.work, self.val_fraction, self.val_min_docs = work, val_fraction, val_min_docs

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        files = sorted((Path(self.work) / "keys").glob("*.npy"))
        keys = np.concatenate([np.load(f) for f in files]) if files else np.empty(0, np.uint64)
        n = len(keys)
        k = min(max(self.val_min_docs, math.ceil(round(self.val_fraction * n, 6))), n // 2)
        threshold = int(np.partition(keys, k - 1)[k - 1]) if k > 0 else -1
        write_json(Path(self.work) / "split.json", {"docs": n, "val_docs": k, "val_max_key": threshold}, indent=1,
                   sort_keys=True)
        return
        yield


class SplitWriter(PipelineStep):
    """Write the surviving documents of a shard to ``<out>/{train,val}/<rank>.jsonl.gz``.

    gzip with mtime 0 and no file name in the header, so a rerun writes byte-identical files; each file is
    written to ``.tmp`` and renamed, so a killed task never leaves a file that looks complete."""

    name = "write train/val"
    type = "domainlm"

    def __init__(self, work: str, out: str):
        super().__init__()
        self.work, self.out = work, out

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        plan = json.loads((Path(self.work) / "split.json").read_text())
        max_key = plan["val_max_key"]
        counts, handles = Counter(), {}
        for split in ("train", "val"):
            path = Path(self.out) / split / f"{rank:05d}.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            raw = open_new(path.with_name(path.name + ".tmp"))  # closed below
            handles[split] = (path, raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0))
        for doc in data:
            split = "val" if split_key(doc.text) <= max_key else "train"
            meta = {k: v for k, v in doc.metadata.items() if k != "duplicate_count"}
            line = orjson.dumps({"id": doc.id, "text": doc.text, "metadata": meta}) + b"\n"
            if faults.armed("prepare.write.mid_document"):  # half a document in the writer, then the crash
                handles[split][2].write(line[: len(line) // 2])  # (no flush: it would change the gzip bytes)
                faults.hit("prepare.write.mid_document")
                line = line[len(line) // 2 :]
            handles[split][2].write(line)
            counts[f"{split}_docs"] += 1
            counts[f"{split}_bytes"] += len(doc.text.encode("utf-8"))
        for path, raw, gz in handles.values():
            gz.close()
            raw.flush()
            os.fsync(raw.fileno())
            raw.close()
            publish(path.with_name(path.name + ".tmp"), path)
        _save_counts(self.work, "write", rank, counts)
        return
        yield
