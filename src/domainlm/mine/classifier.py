"""The domain classifier of `domainlm mine`: fastText (Joulin et al. 2017, "Bag of Tricks for Efficient Text
Classification"), as DeepSeekMath used it to find math pages in Common Crawl (Shao et al. 2024, §2.1); its held-out
precision-recall curve; and the threshold that reaches a target precision *in the pool*.

Scores are P(domain) from the classifier's softmax, compared in ``BINS`` bins (bin b holds [b/100, (b+1)/100)):
the pool's score histogram, the held-out curve and the kept documents all use the same bins, so "score ≥ the
threshold" means the same thing everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from domainlm.config import ClassifierConfig
from domainlm.errors import UserError
from domainlm.rundir import publish, temp_path

POS, NEG = "__label__domain", "__label__general"
BINS = 100
_TOKEN = re.compile(r"\w+|[^\w\s]")


def features(text: str, max_words: int) -> str:
    """The classifier's view of a document: its first ``max_words`` lower-cased words and punctuation marks,
    one line (fastText reads one example per line)."""
    head = text[: max_words * 16].lower()  # ~5 characters a word: enough text for max_words tokens
    return " ".join(_TOKEN.findall(head)[:max_words])


def _fasttext():
    try:
        import fasttext
    except ImportError:
        raise UserError("domainlm mine needs fastText: pip install 'domainlm[mine]'") from None
    return fasttext


def train(positives: list[str], negatives: list[str], ccfg: ClassifierConfig, out: Path):
    """Train on ``positives`` (domain) and ``negatives`` (general) and save the model to ``out``; return it.

    Examples are written in the order of a content hash of their line (a fixed shuffle: SGD must not see all
    of one class first), and with ``threads: 1`` the saved model is byte-identical run to run."""
    if not positives or not negatives:
        raise UserError(f"the classifier needs both classes: {len(positives)} domain and {len(negatives)} general "
                        "training documents")
    lines = [f"{POS} {features(t, ccfg.max_words)}\n" for t in positives]
    lines += [f"{NEG} {features(t, ccfg.max_words)}\n" for t in negatives]
    lines.sort(key=lambda ln: (xxhash.xxh64_intdigest(ln.encode("utf-8"), seed=ccfg.seed), ln))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = temp_path(out, ".txt")
    data.write_text("".join(lines), encoding="utf-8")
    try:
        model = _fasttext().train_supervised(
            str(data), dim=ccfg.dim, lr=ccfg.lr, wordNgrams=ccfg.word_ngrams, minCount=ccfg.min_count,
            epoch=ccfg.epoch, bucket=ccfg.bucket, thread=ccfg.threads, seed=ccfg.seed, verbose=0)
    finally:
        data.unlink(missing_ok=True)
    tmp = temp_path(out)
    model.save_model(str(tmp))
    publish(tmp, out)
    return model


def load(path: Path):
    return _fasttext().load_model(str(path))


def scores(model, texts: list[str], max_words: int) -> list[float]:
    """P(domain) of each text, rounded to 6 decimals (the number written with a mined document)."""
    if not texts:
        return []
    labels, probs = model.predict([features(t, max_words) for t in texts], k=2)
    out = []
    for lab, p in zip(labels, probs, strict=True):
        d = dict(zip(lab, p.tolist(), strict=True))
        out.append(round(d.get(POS, 1.0 - d.get(NEG, 1.0)), 6))
    return out


def bin_of(score: float) -> int:
    return min(int(score * BINS), BINS - 1)


def threshold_of(b: int) -> float:
    """The score at which bin ``b`` starts (the threshold as written in mine.json)."""
    return round(b / BINS, 6)


def threshold_bin(threshold: float) -> int:
    """The bin a written threshold starts (0.29 * 100 is 28.999…: rounded, not truncated)."""
    return round(threshold * BINS)


def histogram(scores_: list[float]) -> np.ndarray:
    """Counts per score bin."""
    return np.bincount([bin_of(s) for s in scores_], minlength=BINS).astype(np.int64)


def at_least(hist: np.ndarray) -> np.ndarray:
    """``out[b]`` = documents with score bin ≥ b (a reversed cumulative sum)."""
    return np.cumsum(np.asarray(hist)[::-1])[::-1]


@dataclass
class Choice:
    """The threshold of one round and the numbers behind it (one entry per bin in the curves)."""

    threshold_bin: int | None  # None: no threshold reaches the target precision
    heldout_precision: list[float | None]  # on the held-out seeds, at each threshold bin
    heldout_recall: list[float]  # = TPR
    fpr: list[float]
    pool_share: list[float]  # q: share of the pool's documents at or above each threshold
    prevalence: float  # estimated share of domain documents in the pool
    prevalence_bin: int  # the threshold the prevalence estimate used
    pool_precision: list[float | None]  # estimated precision in the pool at each threshold


def choose(pos_hist: np.ndarray, neg_hist: np.ndarray, pool_hist: np.ndarray, target: float,
           floor_bin: int = 0) -> Choice:
    """The lowest threshold (most recall) whose estimated precision *in the pool* reaches ``target``.

    Precision on balanced held-out seeds says little about a pool where domain documents are rare. With the
    held-out true and false positive rates TPR(t), FPR(t) and the pool's share q(t) above t, the pool's domain
    prevalence is π = (q(t) − FPR(t)) / (TPR(t) − FPR(t)) ("adjusted classify and count", Forman 2008, Data
    Mining and Knowledge Discovery 17:164; at the threshold of largest TPR − FPR, his "MAX" method, where the
    division is most stable), and the expected precision of keeping score ≥ t is π·TPR(t) / q(t)."""
    tp, fp, q = at_least(pos_hist).astype(float), at_least(neg_hist).astype(float), at_least(pool_hist).astype(float)
    n_pos, n_neg, n_pool = tp[0], fp[0], q[0]
    if not n_pos or not n_neg:
        raise UserError(f"held-out seeds: {int(n_pos)} domain and {int(n_neg)} general documents; both are needed "
                        "for the precision-recall curve (more seeds, or a larger mine.holdout_fraction)")
    tpr, fpr = tp / n_pos, fp / n_neg
    share = q / n_pool if n_pool else np.zeros(BINS)
    precision = [float(a / (a + b)) if a + b else None for a, b in zip(tp, fp, strict=True)]
    k = int(np.argmax(tpr - fpr))
    gap = tpr[k] - fpr[k]
    prevalence = float(np.clip((share[k] - fpr[k]) / gap, 0.0, 1.0)) if gap > 0 else 0.0
    pool_precision = [float(min(1.0, prevalence * tpr[b] / share[b])) if share[b] > 0 else None for b in range(BINS)]
    chosen = next((b for b in range(floor_bin, BINS) if (pool_precision[b] or 0.0) >= target), None)
    return Choice(chosen, precision, [float(x) for x in tpr], [float(x) for x in fpr], [float(x) for x in share],
                  prevalence, k, pool_precision)
