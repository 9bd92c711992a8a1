"""Throughput of `domainlm prepare` on the packaged demo corpora (ScanCode LicenseDB + BBC News).

    .venv/bin/python benchmarks/prepare.py [--run-dir DIR] [--vocab-size 8192]

Measures, in one process on this machine: clean+dedup MB/s (raw input bytes / wall time of the datatrove
stages), tokenization MB/s (text bytes / wall time of the tokenize step, reading and writing files included),
end to end, and raw `tokenizers` ``encode_batch`` MB/s on the same texts held in memory — the ceiling the
tokenize step is compared with (goal: ≥ 0.7×).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from domainlm.config import load_config, validate
from domainlm.data import pipeline, tokenize


def train_bpe(run_dir: Path, texts, vocab_size: int) -> None:
    """A byte-level BPE like `domainlm tokenizer` trains (the benchmark must not depend on that module)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    (run_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok.save(str(run_dir / "tokenizer" / "tokenizer.json"))
    (run_dir / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


def cpu_seconds() -> float:
    """User+system CPU time of this process, its threads and its finished children (datatrove's workers):
    less sensitive than wall time to other jobs sharing the machine."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def raw_encode_mb_s(run_dir: Path, sources: list[str]) -> tuple[float, int, float]:
    """encode_batch on the same texts, already in memory, in the same ~1 MB batches as the tokenize step."""
    tok, _ = tokenize.load_tokenizer(run_dir / "tokenizer")
    texts = [t for s in sources for sp in pipeline.SPLITS for t in pipeline.iter_documents(run_dir, s, sp)]
    batches, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t.encode("utf-8"))
        if size >= tokenize.BATCH_BYTES * len(batches) + tokenize.BATCH_BYTES:
            batches.append(cur)
            cur = []
    batches.append(cur)
    total = sum(len(t.encode("utf-8")) for t in texts)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for b in batches:
        tok.encode_batch(b, add_special_tokens=False)
    return total / 1e6 / (time.perf_counter() - t0), total, cpu_seconds() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=None, help="scratch run directory (default: a temp dir)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="domainlm-bench-"))
    shutil.rmtree(run_dir, ignore_errors=True)
    demo = load_config(None).model_dump(mode="json")
    cfg = validate({**demo, "run_dir": str(run_dir)}, "benchmark")
    console = Console(stderr=True)

    with Progress(console=console) as progress:
        t0, c0 = time.perf_counter(), cpu_seconds()
        stats = pipeline.prepare_sources(cfg, run_dir, progress)
        clean_s, clean_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    names = [s.name for s in cfg.sources]
    bytes_in = sum(stats["sources"][n]["bytes_in"] for n in names)
    train_bpe(run_dir, (t for n in names for t in pipeline.iter_documents(run_dir, n, "train")), args.vocab_size)
    # raw encode_batch just before and just after the tokenize step, averaged: the same load window, on a
    # machine shared with other jobs
    raw1, raw_bytes, raw_cpu1 = raw_encode_mb_s(run_dir, names)
    with Progress(console=console) as progress:
        t0, c0 = time.perf_counter(), cpu_seconds()
        counts = tokenize.tokenize(run_dir, progress=progress)
        tok_s, tok_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    tok_bytes = sum(c[f"{sp}_bytes"] for c in counts["sources"].values() for sp in pipeline.SPLITS)
    raw2, _, raw_cpu2 = raw_encode_mb_s(run_dir, names)
    raw, raw_cpu = (raw1 + raw2) / 2, (raw_cpu1 + raw_cpu2) / 2
    assert raw_bytes == tok_bytes
    tok_mb_s = tok_bytes / 1e6 / tok_s
    mb_in, mb_tok, mb_raw = bytes_in / 1e6, tok_bytes / 1e6, raw_bytes / 1e6
    rows = [
        ("clean + dedup (read, normalise, filter, exact + MinHash dedup, split, write)", f"{mb_in:.1f} MB raw",
         clean_s, clean_cpu, mb_in),
        ("tokenize (read prepared docs, encode_batch, write token files)", f"{mb_tok:.1f} MB text",
         tok_s, tok_cpu, mb_tok),
        ("raw `tokenizers` encode_batch, same texts in memory", f"{mb_raw:.1f} MB text", mb_raw / raw, raw_cpu, mb_raw),
        ("end to end (clean + dedup + tokenize)", f"{mb_in:.1f} MB raw", clean_s + tok_s, clean_cpu + tok_cpu, mb_in),
    ]
    print(f"\ncores: {len(os.sched_getaffinity(0))}, load average at end: {os.getloadavg()[0]:.1f}, "
          f"vocab {args.vocab_size}, tasks {stats['tasks']}\n")
    print("| step | input | wall s | MB/s | CPU s | MB per CPU-s |\n|---|---|---|---|---|---|")
    for name, what, wall, cpu, mb in rows:
        print(f"| {name} | {what} | {wall:.1f} | {mb / wall:.2f} | {cpu:.1f} | {mb / cpu:.2f} |")
    print(f"\ntokenize / raw encode_batch = {tok_mb_s / raw:.2f}× by wall time, "
          f"{(mb_tok / tok_cpu) / (mb_raw / raw_cpu):.2f}× per CPU-second (goal ≥ 0.7×)")
    for n in names:
        s = stats["sources"][n]
        print(f"{n}: docs {s['docs_in']:,} → {s['docs_out']:,}, drops {s['drops']}, "
              f"train tokens {counts['sources'][n]['train_tokens']:,}")


if __name__ == "__main__":
    main()
