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


def raw_encode_mb_s(run_dir: Path, sources: list[str]) -> tuple[float, int]:
    """encode_batch on the same texts, already in memory, in the same ~1 MB batches as the tokenize step."""
    tok, _ = tokenize.load_tokenizer(run_dir)
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
    t0 = time.perf_counter()
    for b in batches:
        tok.encode_batch(b, add_special_tokens=False)
    return total / 1e6 / (time.perf_counter() - t0), total


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
        t0 = time.perf_counter()
        stats = pipeline.prepare_sources(cfg, run_dir, progress)
        clean_s = time.perf_counter() - t0
    names = [s.name for s in cfg.sources]
    bytes_in = sum(stats["sources"][n]["bytes_in"] for n in names)
    train_bpe(run_dir, (t for n in names for t in pipeline.iter_documents(run_dir, n, "train")), args.vocab_size)
    with Progress(console=console) as progress:
        t0 = time.perf_counter()
        counts = tokenize.tokenize_run(cfg, run_dir, progress)
        tok_s = time.perf_counter() - t0
    tok_bytes = sum(c[f"{sp}_bytes"] for c in counts["sources"].values() for sp in pipeline.SPLITS)
    raw, raw_bytes = raw_encode_mb_s(run_dir, names)
    assert raw_bytes == tok_bytes
    tok_mb_s = tok_bytes / 1e6 / tok_s
    rows = [
        ("clean + dedup (read, normalise, filter, exact + MinHash dedup, split, write)",
         f"{bytes_in / 1e6:.1f} MB raw", f"{clean_s:.1f}", f"{bytes_in / 1e6 / clean_s:.2f}"),
        ("tokenize (read prepared docs, encode_batch, write token files)", f"{tok_bytes / 1e6:.1f} MB text",
         f"{tok_s:.1f}", f"{tok_mb_s:.2f}"),
        ("raw `tokenizers` encode_batch, same texts in memory", f"{raw_bytes / 1e6:.1f} MB text",
         f"{raw_bytes / 1e6 / raw:.1f}", f"{raw:.2f}"),
        ("end to end (clean + dedup + tokenize)", f"{bytes_in / 1e6:.1f} MB raw", f"{clean_s + tok_s:.1f}",
         f"{bytes_in / 1e6 / (clean_s + tok_s):.2f}"),
    ]
    print(f"\ncores: {len(os.sched_getaffinity(0))}, load average at end: {os.getloadavg()[0]:.1f}, "
          f"vocab {args.vocab_size}, tasks {stats['tasks']}\n")
    print("| step | input | seconds | MB/s |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\ntokenize / raw encode_batch = {tok_mb_s / raw:.2f}× (goal ≥ 0.7×)")
    for n in names:
        s = stats["sources"][n]
        print(f"{n}: docs {s['docs_in']:,} → {s['docs_out']:,}, drops {s['drops']}, "
              f"train tokens {counts['sources'][n]['train_tokens']:,}")


if __name__ == "__main__":
    main()
