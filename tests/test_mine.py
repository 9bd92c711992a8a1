"""`domainlm mine`: the fastText classifier learns; a pool whose domain documents are known is mined with the
precision asked for; duplicates of the domain and overlaps with held-out text are dropped; a rerun and a killed
run resumed write the same bytes; local and Ray executors agree."""

from __future__ import annotations

import gzip
import random
import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
import yaml

import crashkit
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


def make_corpora(tmp: Path) -> None:
    """Domain and general seeds; a pool of 30 unseen domain documents among 60 news ones and an exact copy of a
    domain document."""
    rng = random.Random(1)
    write_docs(tmp / "legal", [doc(rng, LEGAL) for _ in range(80)])
    write_docs(tmp / "news", [doc(rng, NEWS) for _ in range(80)])
    pool = [{"id": f"legal-{i}", "text": doc(rng, LEGAL), "truth": "domain"} for i in range(30)]
    pool += [{"id": f"news-{i}", "text": doc(rng, NEWS), "truth": "general"} for i in range(60)]
    pool.append({"id": "copy", "text": (tmp / "legal" / "doc0003.txt").read_text(), "truth": "domain"})
    words = (tmp / "legal" / "doc0005.txt").read_text().split(" ")
    words[40] = "changed"
    pool.append({"id": "near-copy", "text": " ".join(words), "truth": "domain"})
    rng.shuffle(pool)
    write_pool(tmp / "pool.jsonl", pool)


def write_pool(path: Path, pool: list[dict]) -> None:
    path.write_text("".join(orjson.dumps(r).decode() + "\n" for r in pool))


def config(tmp: Path, run: str = "run", executor: str = "local", pool: str = "pool.jsonl", rounds: int = 2) -> Path:
    """Mine ``pool`` into ``run``; the legal source holds doc0007.txt out (exclude_ids), as LicenseDB's test split."""
    (tmp / "exclude.txt").write_text("doc0007.txt\n")
    cfg = {"name": "t", "run_dir": str(tmp / run),
           "sources": [{"name": "legal", "role": "domain", "weight": 0.5, "input": str(tmp / "legal"),
                        "exclude_ids": str(tmp / "exclude.txt")},
                       {"name": "news", "role": "general", "weight": 0.5, "input": str(tmp / "news")}],
           "prepare": {"workers": 2, "tasks": 2, "executor": executor, "near_dup": False},  # mine's near-dup: its own
           "mine": {"pools": [{"name": "web", "input": str(tmp / pool)}], "max_rounds": rounds, "holdout_fraction": 0.3,
                    "classifier": TINY}}
    p = tmp / f"{run}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The corpora and a prepared run directory ``run`` (configs of other run directories copy it)."""
    tmp = tmp_path_factory.mktemp("mine")
    make_corpora(tmp)
    run_prepare(config(tmp), quiet_console())
    return tmp


def copy_run(tmp: Path, run: str) -> None:
    shutil.rmtree(tmp / run, ignore_errors=True)
    shutil.copytree(tmp / "run", tmp / run, ignore=shutil.ignore_patterns("mine", ".mine", ".lock"))
    (tmp / run / ".stages" / "mine.json").unlink(missing_ok=True)


def truth(path: Path) -> dict[str, str]:
    return {r["id"]: r["truth"] for r in map(orjson.loads, path.open("rb"))}


def test_mine_finds_the_hidden_domain_documents(prepared):
    result = run_mine(config(prepared), quiet_console())["mine"]
    got = records(prepared / "run" / "mine" / "docs")
    ids = [r["mine"]["id"].removeprefix("web/") for r in got]
    assert [r["id"] for r in got] == [r["mine"]["id"] for r in got]
    assert "copy" not in ids and result["rounds"][0]["drops"]["exact_duplicate"] == 1
    assert "near-copy" not in ids and result["rounds"][0]["drops"]["near_duplicate"] == 1
    labels = truth(prepared / "pool.jsonl")
    tp = sum(labels[i] == "domain" for i in ids)
    assert tp / len(ids) >= 0.9 and tp >= 0.8 * 30, (tp, len(ids))
    assert result["docs"] == len(got) and result["rounds"][0]["new_docs"] == len(got)
    r1 = result["rounds"][0]
    assert sum(r1["histogram"]) == r1["scored"] == 92
    # round 2 retrains on seeds + round 1's finds and finds nothing new: the rounds stop
    assert result["rounds"][1]["positives"] == r1["positives"] + r1["new_docs"]
    assert result["stopped"] == "round 2: nothing new"
    assert all(r["mine"]["score"] >= r1["threshold"] for r in got)
    # the report's section: complete, with its chart and the samples
    from domainlm.pipeline import build_report

    section = build_report(prepared / "run")["sections"]["mine"]
    assert section["complete"] and section["images"] == ["mine.png"]
    page = (prepared / "run" / "report" / "index.html").read_text()
    assert "Mined domain documents" in page and result["samples"][0]["id"] in page


def test_decontamination_drops_planted_overlaps(prepared):
    """Three domain-like pool documents, quoting 20 words of a validation document, of a file held out of the domain
    source by exclude_ids, and of a task's test item, are dropped."""
    from domainlm.data import pipeline

    copy_run(prepared, "run-dc")
    val = next(pipeline.iter_documents(prepared / "run", "legal", "val"))
    held = (prepared / "legal" / "doc0007.txt").read_text()
    rng = random.Random(5)
    pool = [{"id": f"legal-{i}", "text": doc(rng, LEGAL), "truth": "domain"} for i in range(10)]
    pool += [{"id": f"news-{i}", "text": doc(rng, NEWS), "truth": "general"} for i in range(20)]
    pool += [{"id": "quotes-val", "text": doc(rng, LEGAL) + " ".join(val.split()[:20]), "truth": "domain"},
             {"id": "quotes-held", "text": " ".join(held.split()[5:25]) + "\n" + doc(rng, LEGAL), "truth": "domain"},
             {"id": "quotes-task", "text": doc(rng, LEGAL) + "\nwhich court heard the appeal of the royalty clause "
              "between the licensor and the licensee last year", "truth": "domain"}]
    write_pool(prepared / "pool-dc.jsonl", pool)
    task = prepared / "run-dc" / "tasks" / "licensedb" / "test.jsonl"
    task.parent.mkdir(parents=True)
    task.write_text(orjson.dumps({"prompt": "Q: which court heard the appeal of the royalty clause between the "
                                            "licensor and the licensee? A:"}).decode() + "\n")
    result = run_mine(config(prepared, "run-dc", pool="pool-dc.jsonl"), quiet_console())["mine"]
    ids = {r["id"] for r in records(prepared / "run-dc" / "mine" / "docs")}
    assert result["rounds"][0]["drops"]["contaminated"] == 3
    assert not ids & {"web/quotes-val", "web/quotes-held", "web/quotes-task"} and len(ids) >= 8


def test_rerun_and_kill_resume_write_the_same_bytes(prepared):
    """A killed `domainlm mine` (SIGKILL after round 1 and one task of round 2), resumed, writes the bytes of the run
    that was never killed; a rerun of a finished one writes nothing."""
    copy_run(prepared, "run-k")
    if not (prepared / "run" / "mine" / "mine.json").exists():
        run_mine(config(prepared), quiet_console())
    before = crashkit.stamps(prepared / "run", "mine")
    again = run_mine(config(prepared), quiet_console())["mine"]
    assert crashkit.stamps(prepared / "run", "mine") == before and again["docs"] > 0
    cfg = config(prepared, "run-k")
    killed = crashkit.domainlm(["mine", str(cfg)], fault="mine.task_done:3", fault_dir=prepared)
    assert killed.returncode == crashkit.KILLED, killed.stderr[-2000:]
    assert (prepared / "run-k" / ".mine" / "round-1" / "round.json").exists()
    assert not (prepared / "run-k" / ".mine" / "round-2" / "round.json").exists()
    assert not (prepared / "run-k" / "mine" / "mine.json").exists()
    run_mine(cfg, quiet_console())
    assert crashkit.tree(prepared / "run-k", "mine") == crashkit.tree(prepared / "run", "mine")


def test_mined_source_joins_the_mixture_and_the_plan(prepared):
    """The mined folder listed as a domain source from the start: prepare leaves it for later, mine writes it (it is
    no seed of its own), prepare again reads it (provenance kept), mining is not redone, and the plan counts
    mine.json's tokens as its unique tokens — the order `domainlm run` follows."""
    from domainlm.config import load_config
    from domainlm.data import pipeline as data_pipeline
    from domainlm.pipeline import run_order
    from domainlm.plan.command import request_from

    copy_run(prepared, "run-mix")
    cfg_path = config(prepared, "run-mix")
    data = yaml.safe_load(cfg_path.read_text())
    data["sources"][0]["weight"] = data["sources"][1]["weight"] = 0.4
    data["sources"].append({"name": "mined", "role": "domain", "weight": 0.2,
                            "input": str(prepared / "run-mix" / "mine" / "docs")})
    cfg_path.write_text(yaml.safe_dump(data))
    order = [d.name for d in run_order(load_config(cfg_path))]
    assert order[:5] == ["plan", "prepare", "mine", "prepare", "tokenizer"]
    first = run_prepare(cfg_path, quiet_console())
    assert first["pending"] == ["mined"] and "mined" not in first["stats"]["sources"]
    mined = run_mine(cfg_path, quiet_console())["mine"]
    assert "mined" in run_prepare(cfg_path, quiet_console())["stats"]["sources"]
    rec = next(data_pipeline.iter_records(prepared / "run-mix", "mined", "train"))
    assert rec["metadata"]["mine"]["pool"] == "web" and rec["metadata"]["mine"]["round"] == 1
    assert rec["metadata"]["truth"] == "domain"  # the pool's own fields come along
    before = crashkit.stamps(prepared / "run-mix", "mine")
    assert run_mine(cfg_path, quiet_console())["mine"] == mined
    assert crashkit.stamps(prepared / "run-mix", "mine") == before
    req = request_from(load_config(cfg_path))
    assert req.unique_tokens["mined"] == mined["tokens"] == round(mined["bytes"] / 4.0) > 0
