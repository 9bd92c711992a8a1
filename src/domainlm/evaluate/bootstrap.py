"""Intervals that include training variance: the hierarchical bootstrap over training seeds and test items.

A comparison of two trained arms (decide's arms, ablation weights, fine-tuned models) varies with two things:
which test items were scored (documents, task items) and which training seed made each model. A paired bootstrap
over items alone (evaluate/tasks.py) measures the first only, so it can call a difference that one more seed
flips. Here each arm is trained K times and every one of its models is scored on the same N items. Seeds and
items are crossed (every seed's model scores every item), so one resample is (Davison & Hinkley 1997, §3.8,
two-stage resampling; Owen 2007, "The pigeonhole bootstrap", for crossed factors):

1. the seeds of each arm, K of them with replacement, independently per arm (arms share no seeds);
2. the items, N with replacement, one draw shared by every seed and arm (the pairing over items is kept: an
   item that is hard for one arm is hard for the other, and that variance cancels in a difference).

The statistic of a resample is Σ_arms sign · mean over its resampled seeds of the metric on the resampled items,
and the 95% interval is the 2.5–97.5 percentiles over resamples (Efron & Tibshirani 1993, ch. 13). The bootstrap
variance of a mean of K values is (K−1)/K times the unbiased one (Efron & Tibshirani 1993, §5.2: the plug-in
standard error); each seed's deviation from the mean of its arm is therefore scaled by √(K/(K−1)) before the
seeds are averaged, so K = 3 seeds do not give an interval √(2/3) too narrow on the seed part.

With one seed per arm this is exactly the paired bootstrap over items of evaluate/tasks.py (the same generator,
the same item draws first): K = 1 keeps the intervals a single-seed comparison always had.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import norm, t

BOOTSTRAP = 1000  # resamples (evaluate/tasks.py's)

# An arm's metric per seed on each resample of the items: [R, N] item indices -> [R, K] values.
PerSeed = Callable[[np.ndarray], np.ndarray]


def hierarchical(per_seed: Sequence[PerSeed], n_seeds: Sequence[int], n_items: int,
                 signs: Sequence[float] | None = None, resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Σ_g signs[g] · (mean over arm g's seeds of its metric on all items), with the hierarchical bootstrap 95%
    interval (module docstring). ``per_seed[g]``: item indices [R, N] -> the metric of each of arm g's
    ``n_seeds[g]`` models on those items, [R, K_g]."""
    signs = list(signs) if signs is not None else [1.0] * len(per_seed)
    rng = np.random.default_rng(seed)
    items = rng.integers(0, n_items, size=(resamples, n_items))  # = evaluate/tasks.bootstrap_indices(n_items)
    picks = [rng.integers(0, k, size=(resamples, k)) for k in n_seeds]
    everything = np.arange(n_items)[None, :]
    value, stats = 0.0, np.zeros(resamples)
    for f, k, pick, sign in zip(per_seed, n_seeds, picks, signs, strict=True):
        value += sign * float(np.asarray(f(everything), dtype=float).reshape(1, k).mean())
        v = np.asarray(f(items), dtype=float).reshape(resamples, k)  # every seed on each item resample
        mean = v.mean(axis=1)
        chosen = np.take_along_axis(v, pick, axis=1).mean(axis=1)
        inflate = seed_inflation(k)
        stats += sign * (mean + inflate * (chosen - mean))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"value": value, "ci95": [float(lo), float(hi)]}


def seed_inflation(k: int) -> float:
    """How much a seed's deviation from its arm's mean is scaled (module docstring): √(K/(K−1)) undoes the plug-in
    variance's (K−1)/K, and t_{K−1, 0.975} / z_{0.975} widens the seed part to a t interval's width: the mean of
    K seeds with an estimated spread has K−1 degrees of freedom (Student 1908), 4.30 vs 1.96 for K = 3."""
    if k < 2:
        return 1.0
    return float(np.sqrt(k / (k - 1)) * t.ppf(0.975, k - 1) / norm.ppf(0.975))


def ratio_per_seed(num: np.ndarray, den: np.ndarray) -> PerSeed:
    """The metric Σ num[s, i] / Σ den[i] over the resampled items, for each seed s: bits per byte from per-document
    bits ``num`` [K, N] and bytes ``den`` [N] (a byte-weighted mean, as evaluate/bpb.py defines bpb)."""
    num, den = np.atleast_2d(np.asarray(num, dtype=float)), np.asarray(den, dtype=float)

    def f(idx: np.ndarray) -> np.ndarray:  # [R, N] -> [R, K]
        return (num[:, idx].sum(axis=-1) / den[idx].sum(axis=-1)).T

    return f


def metric_per_seed(fn: Callable[[list, list], float], gold: Sequence, preds: Sequence[Sequence]) -> PerSeed:
    """A metric that is not a mean over items (macro-F1, accuracy, ROUGE-L): ``fn(gold, pred)`` on each resample
    of the items, for each seed's predictions ``preds[s]``."""
    gold = list(gold)

    def f(idx: np.ndarray) -> np.ndarray:
        return np.array([[fn([gold[i] for i in row], [p[i] for i in row]) for p in preds] for row in idx])

    return f


def ratio_diff(num_a: np.ndarray, num_b: np.ndarray, den: np.ndarray, **kw) -> dict:
    """Σ num_a / Σ den − Σ num_b / Σ den (seed means), arms a and b scored on the same items, with its
    hierarchical interval: decide's bpb margin of one arm over another."""
    num_a, num_b = np.atleast_2d(num_a), np.atleast_2d(num_b)
    return hierarchical([ratio_per_seed(num_a, den), ratio_per_seed(num_b, den)], [len(num_a), len(num_b)],
                        len(den), signs=[1.0, -1.0], **kw)


def metric_diff(fn: Callable[[list, list], float], gold: Sequence, preds_a: Sequence[Sequence],
                preds_b: Sequence[Sequence], **kw) -> dict:
    """fn(a) − fn(b) averaged over each arm's seeds, with its hierarchical interval (fine-tuned comparisons)."""
    return hierarchical([metric_per_seed(fn, gold, preds_a), metric_per_seed(fn, gold, preds_b)],
                        [len(preds_a), len(preds_b)], len(gold), signs=[1.0, -1.0], **kw)


def metric_ci(fn: Callable[[list, list], float], gold: Sequence, preds: Sequence[Sequence], **kw) -> dict:
    """One arm's metric averaged over its seeds, with its hierarchical interval."""
    return hierarchical([metric_per_seed(fn, gold, preds)], [len(preds)], len(gold), **kw)
