"""`domainlm tokenize`: the prepared documents → the token files of :mod:`domainlm.data.tokens`.

With the run's own tokenizer they go to ``tokens/``; with any other (a base model's) to its own folder
(`RunDir.tokens_for`). Each prepared file (``data/<source>/<split>/<rank>.jsonl.gz``) becomes a part file in
``<tokens>/<source>/.parts/`` with a small JSON of its counts, written last (the part's completion mark); a
rerun skips finished parts. The parts are then concatenated in file order into ``<split>.bin``.
``encode_batch`` runs the Rust tokenizer on all cores, so one Python process is enough.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
from tokenizers import Tokenizer

from domainlm import faults, stages
from domainlm.data import pipeline, tokens
from domainlm.data.pipeline import write_json_atomic
from domainlm.errors import UserError
from domainlm.outputs import Stats
from domainlm.rundir import RunDir

BATCH_BYTES = 1 << 20  # ~1 MB of text per encode_batch call: enough to keep every core busy
EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "[EOS]")


def load_tokenizer(tokenizer_dir: Path):
    """A Hugging Face tokenizer folder's fast tokenizer and its EOS id (``eos_token`` of tokenizer_config.json,
    else ``</s>``…)."""

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        raise UserError(f"{path}: no tokenizer; run `domainlm tokenizer CONFIG` first")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot load tokenizer ({why})") from None
    names = list(EOS_NAMES)
    cfg_path = path.parent / "tokenizer_config.json"
    if cfg_path.exists():
        eos = json.loads(cfg_path.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos:
            names.insert(0, eos)
    for name in names:
        eos_id = tok.token_to_id(name)
        if eos_id is not None:
            return tok, eos_id
    raise UserError(f"{path}: tokenizer has no EOS token (looked for {', '.join(names)})")


def _batches(src: Path, counts: dict) -> Iterator[list[str]]:
    """Texts of one prepared file in ~BATCH_BYTES batches; counts docs and UTF-8 bytes."""
    with gzip.open(src, "rb") as f:
        batch, batch_bytes = [], 0
        for line in f:
            text = orjson.loads(line)["text"]
            n = len(text.encode("utf-8"))
            batch.append(text)
            batch_bytes += n
            counts["bytes"] += n
            counts["docs"] += 1
            if batch_bytes >= BATCH_BYTES:
                yield batch
                batch, batch_bytes = [], 0
        if batch:
            yield batch


def _encode_file(tok, src: Path, eos_id: int, dtype, part: Path) -> dict:
    """Tokenize one prepared file into ``part`` (EOS after every document); return its counts.

    encode_batch releases the GIL, so it runs in a thread while this one parses the next batch."""
    counts = {"docs": 0, "bytes": 0}
    with tokens.TokenWriter(part, dtype) as w, ThreadPoolExecutor(1) as pool:
        pending = None

        def write(encodings):
            for enc in encodings:
                w.write(enc.ids)
                w.write((eos_id,))

        for batch in _batches(src, counts):
            future = pool.submit(tok.encode_batch, batch, add_special_tokens=False)
            if pending is not None:
                write(pending.result())
            pending = future
        if pending is not None:
            write(pending.result())
        n_tokens = w.n_tokens
    return {"tokens": n_tokens, **counts}


def _concat(parts: list[Path], out: Path, dtype) -> None:
    with tokens.TokenWriter(out, dtype) as w:
        for p in parts:
            arr = np.memmap(p, dtype=np.dtype(dtype).newbyteorder("<"), mode="r") if p.stat().st_size else []
            for i in range(0, len(arr), 1 << 24):  # 16M tokens at a time: bounded memory
                w.write(arr[i : i + (1 << 24)])


def tokenize(run_dir: Path, tokenizer_dir: Path | None = None, progress=None) -> dict:
    """Write ``<tokens>/<source>/{train,val}.bin`` and ``<tokens>/counts.json`` for every prepared source, where
    ``<tokens>`` is ``RunDir(run_dir).tokens_for(tokenizer_dir)`` (the run's own tokenizer by default); a no-op
    when up to date. Returns counts.json."""
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else RunDir(run_dir).tokenizer
    out = RunDir(run_dir).tokens_for(tokenizer_dir)
    tok, eos_id = load_tokenizer(tokenizer_dir)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = tokens.dtype_for(vocab_size)
    tok_sha = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    stats = RunDir(run_dir).load(RunDir.STATS, Stats)
    if stats is None:
        raise UserError(f"{RunDir(run_dir).stats}: no prepared data; run `domainlm prepare CONFIG` first")
    names = list(stats.sources)

    def intact() -> bool:  # the files are what counts.json says: "rerun `domainlm tokenize`" repairs a bad one
        try:
            counts = tokens.load_counts(out)
        except UserError:  # a corrupted counts.json
            return False
        return not any(tokens.file_problem(out, n, sp, counts) for n in names for sp in pipeline.SPLITS)

    stage = stages.Stage(run_dir, "tokenize" + out.name.removeprefix(RunDir.TOKENS),  # tokenize, tokenize-<sha>
                         tokens.counts_path(out), ("tokenize-v1", stats.fingerprint, tok_sha, names), intact)
    if stage.done():
        return tokens.load_counts(out)
    stage.start()
    tokens.counts_path(out).unlink(missing_ok=True)  # counts.json is the completion mark: remove it first
    fp = stage.fingerprint
    files = {(n, sp): pipeline.document_files(run_dir, n, sp) for n in names for sp in pipeline.SPLITS}
    total_bytes = sum(f.stat().st_size for fs in files.values() for f in fs)
    bar = progress.add_task("tokenize", total=total_bytes) if progress is not None else None
    result = {}
    for (source, split), srcs in files.items():
        part_dir = out / source / ".parts"
        parts, counts = [], {"tokens": 0, "docs": 0, "bytes": 0}
        for src in srcs:
            part = part_dir / f"{split}-{src.name.removesuffix('.jsonl.gz')}.bin"
            meta = part.with_suffix(".json")
            done = json.loads(meta.read_text()) if meta.exists() else None
            if not done or done.get("fingerprint") != fp or not part.exists():
                done = {**_encode_file(tok, src, eos_id, dtype, part), "fingerprint": fp}
                write_json_atomic(meta, done)  # after the part's rename: the part's completion mark
                faults.hit("tokenize.part_done")
            parts.append(part)
            for k in counts:
                counts[k] += done[k]
            if bar is not None:
                progress.advance(bar, src.stat().st_size)
        _concat(parts, tokens.token_path(out, source, split), dtype)
        src_counts = result.setdefault(source, {})
        src_counts.update({f"{split}_tokens": counts["tokens"], f"{split}_docs": counts["docs"],
                           f"{split}_bytes": counts["bytes"]})
    data = {"dtype": dtype.name, "vocab_size": vocab_size, "eos_id": eos_id, "tokenizer_sha256": tok_sha,
            "sources": result}
    faults.hit("tokenize.before_counts")
    tokens.write_counts(out, data)
    faults.hit("tokenize.after_counts")
    for n in names:  # the parts are copies of the .bin files: drop them once counts.json is written
        shutil.rmtree(out / n / ".parts", ignore_errors=True)
    stage.finish()
    return tokens.load_counts(out)
