"""The hierarchical bootstrap (evaluate/bootstrap.py): on constructed data with known between-seed and
between-document variance its 95% interval covers the truth ~95% of the time, where the bootstrap over documents
alone does not; one seed per arm gives exactly the paired document bootstrap decide and finetune always used."""

from __future__ import annotations

import numpy as np
import pytest

from domainlm.evaluate import bootstrap as B
from domainlm.evaluate import tasks as T


def _arm(rng, mean: float, k: int, doc_effect: np.ndarray, sd_seed: float, sd_doc: float, sd_noise: float):
    """bits [K, N] of one arm's K seeds on N documents of 1 byte each: mean + seed effect + the documents'
    shared difficulty + this arm's own document effect + noise (a crossed random-effects model)."""
    n = len(doc_effect)
    return (mean + rng.normal(0, sd_seed, (k, 1)) + doc_effect + rng.normal(0, sd_doc, n)
            + rng.normal(0, sd_noise, (k, n)))


def test_interval_covers_the_truth_95_percent_of_the_time():
    """300 repetitions: two arms whose true difference is 0.3, 8 seeds each, 40 shared documents; seed variance
    0.25 per arm, document variance 4 (shared, cancels in the pairing) + 0.25 per arm, noise 0.09."""
    rng = np.random.default_rng(1)
    reps, k, n, truth = 300, 8, 40, 0.3
    hits = hits_docs_only = 0
    for r in range(reps):
        shared = rng.normal(0, 2.0, n)
        a = _arm(rng, truth, k, shared, 0.5, 0.5, 0.3)
        b = _arm(rng, 0.0, k, shared, 0.5, 0.5, 0.3)
        lo, hi = B.ratio_diff(a, b, np.ones(n), resamples=400, seed=r)["ci95"]
        hits += lo <= truth <= hi
        lo, hi = B.ratio_diff(a[:1], b[:1], np.ones(n), resamples=400, seed=r)["ci95"]  # one seed: docs only
        hits_docs_only += lo <= truth <= hi
    assert 0.91 <= hits / reps <= 0.99, hits / reps
    assert hits_docs_only / reps < 0.6, hits_docs_only / reps  # ignoring training variance: far too narrow


def test_one_seed_is_the_paired_document_bootstrap():
    """K = 1: the numbers decide (Σ bits diff / Σ bytes) and finetune (paired metric diff) always reported."""
    rng = np.random.default_rng(0)
    bits_a, bits_b, nbytes = rng.uniform(1, 9, 25), rng.uniform(1, 9, 25), rng.integers(1, 50, 25)
    got = B.ratio_diff(bits_a, bits_b, nbytes)
    idx = T.bootstrap_indices(25)
    diff = list(bits_a - bits_b)
    ref = T.with_ci(lambda b, d: sum(d) / sum(b), list(nbytes), diff, idx)
    assert got["value"] == pytest.approx(ref["value"], rel=1e-12)
    assert got["ci95"] == pytest.approx(ref["ci95"], rel=1e-9)
    gold = list(rng.choice(["x", "y", "z"], 30))
    pa, pb = list(rng.choice(["x", "y", "z"], 30)), list(rng.choice(["x", "y", "z"], 30))
    ref = T.paired_diff("licensedb-category", gold, pa, pb, T.bootstrap_indices(30))["macro_f1"]
    got = B.metric_diff(T.macro_f1, gold, [pa], [pb])
    assert got["value"] == pytest.approx(ref["value"]) and got["ci95"] == pytest.approx(ref["ci95"])


def test_seed_part_by_hand():
    """Every document alike: the interval is the seeds' alone. Its value is the seed mean, and its spread the
    standard error s/√K widened to a t interval: half-width ≈ t_{K−1,0.975}·s/√K (K = 5: 2.776·s/√5)."""
    seeds = np.array([1.0, 2.0, 4.0, 3.0, 5.0])
    bits = np.repeat(seeds[:, None], 6, axis=1)  # [5 seeds, 6 docs], 1 byte each
    m = B.hierarchical([B.ratio_per_seed(bits, np.ones(6))], [5], 6, resamples=20000)
    assert m["value"] == pytest.approx(3.0)
    half = (m["ci95"][1] - m["ci95"][0]) / 2
    assert half == pytest.approx(2.776 * seeds.std(ddof=1) / np.sqrt(5), rel=0.12)
    assert B.seed_inflation(3) == pytest.approx(np.sqrt(3 / 2) * 4.303 / 1.960, rel=1e-3)
    assert B.seed_inflation(1) == 1.0
