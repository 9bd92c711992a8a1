"""What a mined document must not be: an exact or near duplicate of the domain source, or an overlap with text held
out for evaluation. Each is a sorted array of 64-bit hashes on disk (``np.save``), built once in the main process
and loaded by every scoring task; membership is a binary search.

- exact: xxh64 of the cleaned text (the key prepare's split uses).
- near: MinHash LSH with prepare's parameters (``prepare.minhash_*``) and its shingles (`FastMinhashSignature`):
  one key per band of ``hashes_per_bucket`` hashes; a document sharing any band with a domain document is a near
  duplicate of it (with 8 bands of 8 hashes, likely from Jaccard similarity ≈ (1/8)^(1/8) = 0.77 up; Leskovec,
  Rajaraman & Ullman, Mining of Massive Datasets, §3.4.2). The same test as datatrove's MinHash stages against
  an index (``only_dedup_in_index``), in one pass instead of three stages.
- decontamination: the word n-grams of validation, held-out and task test text; a document sharing one is dropped
  (GPT-3: 13-grams, Brown et al. 2020, App. C).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import xxhash

from domainlm.data.steps import FastMinhashSignature, split_key
from domainlm.rundir import atomic_write

EXACT, NEAR, DECONTAM = "exact.npy", "near.npy", "decontam.npy"
_WORD = re.compile(r"\w+")
_P = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime: the rolling hash's base


def save(path: Path, keys: Iterable[np.ndarray] | np.ndarray) -> int:
    """Sorted unique keys to ``path`` (atomically); returns how many."""
    arrays = [keys] if isinstance(keys, np.ndarray) else list(keys)
    arr = np.unique(np.concatenate(arrays).astype(np.uint64)) if arrays else np.empty(0, np.uint64)
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write(path, buf.getvalue())
    return len(arr)


def load(path: Path) -> np.ndarray:
    return np.load(path)


def contains(index: np.ndarray, keys: np.ndarray) -> bool:
    """Whether any of ``keys`` is in the sorted ``index``."""
    if not len(index) or not len(keys):
        return False
    i = np.searchsorted(index, keys)
    i[i == len(index)] = 0
    return bool(np.any(index[i] == keys))


def exact_key(text: str) -> np.ndarray:
    return np.array([split_key(text)], np.uint64)


class NearKeys:
    """The LSH band keys of a text: ``num_buckets`` keys, one per band of the MinHash signature."""

    def __init__(self, minhash_config, folder: Path):
        self._sig = FastMinhashSignature(str(folder), minhash_config)

    def __call__(self, text: str) -> np.ndarray:
        shingles = self._sig.get_shingles(text)
        if not len(shingles):
            return np.empty(0, np.uint64)
        bands = self._sig.get_signature(shingles)
        return np.array([xxhash.xxh64_intdigest(np.array(band, np.uint64).tobytes(), seed=b)
                         for b, band in enumerate(bands)], np.uint64)


def ngram_keys(text: str, n: int) -> np.ndarray:
    """Hashes of the lower-cased word n-grams of ``text`` (punctuation and spacing ignored); none when it has fewer
    than ``n`` words. Each word is hashed, then n consecutive word hashes are combined as a polynomial in ``_P``
    (mod 2^64), for every position at once."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return np.empty(0, np.uint64)
    w = np.fromiter((xxhash.xxh64_intdigest(x.encode("utf-8")) for x in words), np.uint64, len(words))
    m = len(words) - n + 1
    h = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _P + w[j : j + m]
    return h
