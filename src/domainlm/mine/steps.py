"""The datatrove steps of `domainlm mine`: score a shard of a pool, and write the mined source. Run by the executor
``prepare.executor`` names (local, Slurm, Ray), one task per shard; a task's outputs are written to a temporary
name and renamed, so a rerun of a killed task writes the same bytes."""

from __future__ import annotations

import gzip
import os
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from domainlm.data import clean, sources
from domainlm.data.steps import _save_counts
from domainlm.mine import classifier, index
from domainlm.rundir import publish

BATCH = 256  # documents per fastText predict call


class _GzipOut:
    """A ``.jsonl.gz`` written to ``.tmp`` and renamed on close; gzip without mtime or name: same bytes each run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._raw = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self._gz = gzip.GzipFile(filename="", fileobj=self._raw, mode="wb", compresslevel=6, mtime=0)

    def write(self, rec: dict) -> None:
        self._gz.write(orjson.dumps(rec) + b"\n")

    def close(self) -> None:
        self._gz.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        publish(self.tmp, self.path)


def read_jsonl_gz(path: Path):
    if not path.exists():
        return
    with gzip.open(path, "rb") as f:
        for line in f:
            yield orjson.loads(line)


class ScorePool(PipelineStep):
    """Read and clean shard ``rank`` of a pool (prepare's filters), score every document with the round's classifier,
    and keep the candidates (score ≥ the floor) that are neither an exact nor a near duplicate of the domain source
    nor overlap held-out text, in ``<round>/<pool>/<rank>.jsonl.gz``. Counts (every drop by reason) and the histogram
    of all scores go to ``<round>/counts/<pool>/<rank>.json``."""

    name = "mine: score"
    type = "domainlm"

    def __init__(self, spec: sources.SourceSpec, round_dir: str, model: str, index_dir: str, minhash_config,
                 *, floor_bin: int, max_words: int, ngrams: int, min_chars: int, max_chars: int, max_dup: float):
        super().__init__()
        self.spec, self.round_dir, self.model, self.index_dir = spec, round_dir, model, index_dir
        self.minhash_config = minhash_config
        self.floor_bin, self.max_words, self.ngrams = floor_bin, max_words, ngrams
        self.min_chars, self.max_chars, self.max_dup = min_chars, max_chars, max_dup

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        model = classifier.load(Path(self.model))
        idx = Path(self.index_dir)
        exact, near, decontam = (index.load(idx / f) for f in (index.EXACT, index.NEAR, index.DECONTAM))
        near_keys = index.NearKeys(self.minhash_config, idx / "minhash")
        counts, errors, hist = Counter(), [], np.zeros(classifier.BINS, np.int64)
        out = _GzipOut(Path(self.round_dir) / self.spec.name / f"{rank:05d}.jsonl.gz")

        def flush(batch: list) -> None:
            for d, score in zip(batch, classifier.scores(model, [d.text for d in batch], self.max_words), strict=True):
                b = classifier.bin_of(score)
                hist[b] += 1
                if b < self.floor_bin:
                    counts["below_floor"] += 1
                    continue
                if index.contains(exact, index.exact_key(d.text)):
                    counts["drop/exact_duplicate"] += 1
                elif index.contains(near, near_keys(d.text)):
                    counts["drop/near_duplicate"] += 1
                elif index.contains(decontam, index.ngram_keys(d.text, self.ngrams)):
                    counts["drop/contaminated"] += 1
                else:
                    counts["candidates"] += 1
                    out.write({"id": d.id, "text": d.text, "metadata": d.metadata, "score": score})
            batch.clear()

        batch = []
        for d in sources.read(self.spec, rank, world_size, counts, errors):
            reason, d.text = clean.check(d.text, min_chars=self.min_chars, max_chars=self.max_chars,
                                         max_dup_line_frac=self.max_dup)
            if reason:
                counts[f"drop/{reason}"] += 1
                continue
            counts["scored"] += 1
            batch.append(d)
            if len(batch) >= BATCH:
                flush(batch)
        flush(batch)
        out.close()
        _save_counts(self.round_dir, self.spec.name, rank, counts, histogram=hist.tolist(), errors=errors[:100],
                     n_errors=len(errors))
        return
        yield  # a generator that yields nothing: the last step of its pipeline


class WriteMined(PipelineStep):
    """Shard ``rank`` of the mined source: the candidates of every round at or above that round's threshold, each
    document once (the first round that accepted it), with the pool's metadata and its provenance under ``mine``
    (pool, round, score, its id in the pool)."""

    name = "mine: write"
    type = "domainlm"

    def __init__(self, pool: str, work: str, rounds: list[tuple[int, int]], out: str):
        super().__init__()
        self.pool, self.work, self.rounds, self.out = pool, work, rounds, out

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        seen, counts = set(), Counter()
        out = _GzipOut(Path(self.out) / self.pool / f"{rank:05d}.jsonl.gz")
        for r, threshold in self.rounds:
            for rec in read_jsonl_gz(Path(self.work) / f"round-{r}" / self.pool / f"{rank:05d}.jsonl.gz"):
                if classifier.bin_of(rec["score"]) < threshold or rec["id"] in seen:
                    continue
                seen.add(rec["id"])
                prov = {"pool": self.pool, "round": r, "score": rec["score"], "id": rec["id"]}
                # flat, as a JSONL source's records are: prepare keeps the keys besides id and text as metadata
                out.write({"id": rec["id"], "text": rec["text"], **rec["metadata"], "mine": prov})
                counts["docs"] += 1
                counts["bytes"] += len(rec["text"].encode("utf-8"))
        out.close()
        _save_counts(self.work, f"write-{self.pool}", rank, counts)
        return
        yield
