"""`domainlm mine CONFIG`: domain documents mined from general pools, DeepSeekMath-style (Shao et al. 2024, §2.1).

After `domainlm prepare`: a fastText classifier is trained on the run's domain sources (positives) against its
general sources (negatives), scores every document of the pools (`steps.ScorePool`, a datatrove step on the
executor of ``prepare.executor``), and a round keeps the documents above the threshold whose estimated precision in
the pool reaches ``mine.target_precision``. A round's finds join the positives of the next round; the rounds stop
when one adds less than ``mine.min_round_yield`` of what is mined so far (or after ``mine.max_rounds``). The mined
source is written to ``mine/docs/<pool>/<rank>.jsonl.gz``, then ``mine/mine.json`` (last: the stage is complete).

Work files in ``<run>/.mine/`` (keyed by a fingerprint of the config, the prepared data and the pools): the
indexes, and per round the classifier, the scored candidates and ``round.json`` (the round's completion mark);
a killed run resumes at the task or round where it stopped.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import numpy as np
import xxhash
from rich.markup import escape
from rich.table import Table

from domainlm import faults, stages
from domainlm.config import RunConfig, load_config
from domainlm.data import pipeline, sources
from domainlm.data.command import progress_bar
from domainlm.data.steps import split_key
from domainlm.errors import UserError
from domainlm.mine import classifier, index
from domainlm.mine.steps import ScorePool, WriteMined, read_jsonl_gz
from domainlm.outputs import Counts, Mine, MineRound, Stats
from domainlm.rundir import RunDir, atomic_write, load_output, write_json
from domainlm.units import human

MINE_VERSION = 1
PIPELINE_VERSION = "mine-1"  # bump when a change here changes what mine writes
# ≈ 4 characters of English text per BPE token (the usual figure for GPT-2-style vocabularies), used for the
# mined tokens until the run's tokenizer has measured its own bytes per token on the domain text.
DEFAULT_BYTES_PER_TOKEN = 4.0
SAMPLES = 5


def _texts(run_dir: Path, names: list[str], split: str) -> Iterator[str]:
    for n in names:
        yield from pipeline.iter_documents(run_dir, n, split)


def _smallest(texts: Callable[[], Iterable[str]], cap: int) -> list[str]:
    """At most ``cap`` of the texts ``texts()`` streams: those with the smallest content hashes (a sample that does
    not depend on their order). Two passes, so that only the sample is held in memory."""
    keys = np.fromiter((split_key(t) for t in texts()), np.uint64)
    if len(keys) <= cap:
        return list(texts())
    cutoff = np.partition(keys, cap - 1)[cap - 1]
    return [t for t in texts() if split_key(t) <= cutoff][:cap]


def _held_out(text: str, fraction: float) -> bool:
    # seed 1: independent of prepare's train/val key (seed 0)
    return xxhash.xxh64_intdigest(text.encode("utf-8"), seed=1) % 10_000 < round(fraction * 10_000)


def _excluded_texts(cfg: RunConfig) -> list[str]:
    """Texts held out of the sources by ``exclude_ids`` (LicenseDB's test licenses, a user's held-out files)."""
    out = []
    for i, s in enumerate(cfg.sources):
        if not s.exclude_ids or s.name == cfg.mine.source:
            continue
        where = f"sources[{i}].input"
        kept = set(sources.resolve(s, where, cfg.prepare.max_chars).files)
        full = sources.resolve(s.model_copy(update={"exclude_ids": None}), where, cfg.prepare.max_chars)
        spec = replace(full, files=tuple(f for f in full.files if f not in kept), max_docs=None, max_bytes=None)
        out += [d.text for d in sources.read(spec, 0, 1, Counter(), [])]
    return out


def _task_texts(run_dir: Path) -> list[str]:
    """The test items of the run's downstream task, if `domainlm run` wrote them (tasks/licensedb/test.jsonl)."""
    path = RunDir(run_dir) / RunDir.TASK_DATA / "test.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_indexes(cfg: RunConfig, run_dir: Path, seeds: list[str], domain: list[str], folder: Path) -> dict:
    """The exact, near-duplicate and decontamination indexes (`index`), once; returns what they hold."""
    done = folder / "index.json"
    if done.exists():
        return json.loads(done.read_text())
    near_keys = index.NearKeys(pipeline.minhash_config(cfg.prepare), folder / "minhash")
    exact, near = [], []
    for t in itertools.chain(_texts(run_dir, domain, "train"), _texts(run_dir, domain, "val")):
        exact.append(index.exact_key(t))
        near.append(near_keys(t))
    held = [*_texts(run_dir, seeds, "val"), *_excluded_texts(cfg), *_task_texts(run_dir)]
    n = cfg.mine.decontam_ngrams
    info = {
        "domain_docs": len(exact),
        "exact_keys": index.save(folder / index.EXACT, exact),
        "near_keys": index.save(folder / index.NEAR, near),
        "heldout_docs": len(held),
        "heldout_too_short": sum(len(index.ngram_keys(t, n)) == 0 for t in held),
        "decontam_keys": index.save(folder / index.DECONTAM, [index.ngram_keys(t, n) for t in held]),
    }
    write_json(done, info)
    return info


def _fingerprint(cfg: RunConfig, seeds: list[str], specs: list[sources.SourceSpec], tasks: int, run_dir: Path) -> str:
    """Of the config, the prepared files of the seed sources (the mined source itself, once prepared, is not one:
    adding it to the mixture does not redo the mining), the pools' inputs and the task's test items."""
    task_file = RunDir(run_dir) / RunDir.TASK_DATA / "test.jsonl"
    data = [(str(f.relative_to(run_dir)), stages.file_fingerprint(f)) for n in seeds for sp in pipeline.SPLITS
            for f in pipeline.document_files(run_dir, n, sp)]
    return stages.fingerprint(
        PIPELINE_VERSION, metadata.version("fasttext-community") if _has("fasttext-community") else "fasttext",
        cfg.mine.model_dump(mode="json"), cfg.prepare.model_dump(exclude={"executor", "workers", "slurm", "ray"}),
        [s.model_dump(mode="json", exclude={"weight", "unique_tokens"}) for s in cfg.sources if s.name in seeds],
        data, tasks,
        [(s.__dict__ | {"files": len(s.files)}, pipeline._inputs_fingerprint(s)) for s in specs],
        stages.file_fingerprint(task_file) if task_file.exists() else None)


def _has(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _sum_counts(work: Path, step: str) -> tuple[dict, np.ndarray]:
    total, hist = Counter(), np.zeros(classifier.BINS, np.int64)
    for f in sorted((work / "counts" / step).glob("*.json")):
        d = json.loads(f.read_text())
        for k, v in d["counts"].items():
            total[k] += v
        hist += np.asarray(d.get("histogram", np.zeros(classifier.BINS)), np.int64)
    return dict(total), hist


def _accepted(round_dir: Path, pools: list[str], threshold: int | None):
    """The candidates of a round at or above its threshold, in file order."""
    if threshold is None:
        return
    for pool in pools:
        for f in sorted((round_dir / pool).glob("*.jsonl.gz")):
            for rec in read_jsonl_gz(f):
                if classifier.bin_of(rec["score"]) >= threshold:
                    yield rec


def _run_steps(cfg: RunConfig, steps: list, logdir: Path, tasks: int, workers: int, progress, label: str) -> None:
    ex = pipeline._executor(cfg.prepare, steps, tasks, workers, logdir, label.replace(" ", "-").replace(":", ""),
                            site="mine.task_done")
    pipeline._run_stage(ex, logdir, tasks, progress, label)


def _round(cfg: RunConfig, r: int, work: Path, specs, seeds: dict, mined: Callable[[], Iterable[str]],
           seen: set[str], tasks: int, workers: int, progress) -> dict:
    """Train round ``r``'s classifier, score the pools, choose the threshold; returns the round's record."""
    mcfg = cfg.mine
    rd = work / f"round-{r}"
    positives = _smallest(lambda: itertools.chain(seeds["pos"], mined()), mcfg.max_seed_docs)
    model = classifier.train(positives, seeds["neg"], mcfg.classifier, rd / "classifier.bin")
    mw = mcfg.classifier.max_words
    pos_hist = classifier.histogram(classifier.scores(model, seeds["pos_heldout"], mw))
    neg_hist = classifier.histogram(classifier.scores(model, seeds["neg_heldout"], mw))
    floor_bin = classifier.bin_of(mcfg.candidate_floor)
    pcfg = cfg.prepare
    for spec in specs:
        step = ScorePool(spec, str(rd), str(rd / "classifier.bin"), str(work / "index"),
                         pipeline.minhash_config(pcfg), floor_bin=floor_bin, max_words=mw, ngrams=mcfg.decontam_ngrams,
                         min_chars=pcfg.min_chars, max_chars=pcfg.max_chars, max_dup=pcfg.max_dup_line_frac)
        _run_steps(cfg, [step], rd / "stages" / spec.name, tasks, workers, progress, f"round {r}: {spec.name}")
    counts, pool_hist = {}, np.zeros(classifier.BINS, np.int64)
    for spec in specs:
        c, h = _sum_counts(rd, spec.name)
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
        pool_hist += h
    choice = classifier.choose(pos_hist, neg_hist, pool_hist, mcfg.target_precision, floor_bin)
    t = choice.threshold_bin
    accepted = new_docs = new_bytes = 0
    for rec in _accepted(rd, [s.name for s in specs], t):
        accepted += 1
        if rec["id"] not in seen:
            new_docs += 1
            new_bytes += len(rec["text"].encode("utf-8"))
    total = len(seen) + new_docs
    curve = [{"threshold": classifier.threshold_of(b), "heldout_precision": _r(choice.heldout_precision[b]),
              "heldout_recall": _r(choice.heldout_recall[b]), "fpr": _r(choice.fpr[b]),
              "pool_share": _r(choice.pool_share[b]), "pool_precision": _r(choice.pool_precision[b])}
             for b in range(classifier.BINS)]
    return MineRound.model_validate({
        "round": r, "positives": len(positives), "negatives": len(seeds["neg"]),
        "heldout_positives": len(seeds["pos_heldout"]), "heldout_negatives": len(seeds["neg_heldout"]),
        "threshold": None if t is None else classifier.threshold_of(t),
        "heldout_precision": None if t is None else _r(choice.heldout_precision[t]),
        "heldout_recall": None if t is None else _r(choice.heldout_recall[t]),
        "prevalence": _r(choice.prevalence), "est_precision": None if t is None else _r(choice.pool_precision[t]),
        "scored": counts.get("scored", 0), "accepted": accepted, "new_docs": new_docs, "new_bytes": new_bytes,
        "total_docs": total, "yield_fraction": _r(new_docs / total) if total else 0.0,
        "drops": {k.removeprefix("drop/"): v for k, v in sorted(counts.items()) if k.startswith("drop/")},
        "histogram": pool_hist.tolist(), "curve": curve,
    }).model_dump()


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def _stop(rec: dict, mcfg) -> str | None:
    r = rec["round"]
    if rec["threshold"] is None:
        return f"round {r}: no threshold reaches the estimated precision {mcfg.target_precision:g}"
    if rec["new_docs"] == 0:
        return f"round {r}: nothing new"
    if r > 1 and rec["yield_fraction"] < mcfg.min_round_yield:
        return (f"round {r}: added {rec['yield_fraction']:.1%} of the mined documents, below mine.min_round_yield "
                f"{mcfg.min_round_yield:g}")
    if r == mcfg.max_rounds:
        return f"mine.max_rounds: {mcfg.max_rounds}"
    return None


def _bytes_per_token(run_dir: Path, domain: list[str]) -> tuple[float, str]:
    try:
        counts = RunDir(run_dir).load(RunDir.COUNTS, Counts)
    except UserError:
        counts = None
    rows = [counts.sources[n] for n in domain if counts and n in counts.sources]
    tokens = sum(c.train_tokens for c in rows)
    if tokens:
        return round(sum(c.train_bytes for c in rows) / tokens, 4), f"tokens/counts.json ({', '.join(domain)})"
    return DEFAULT_BYTES_PER_TOKEN, "no tokenized data yet: ≈4 bytes per token"


def _samples(out: Path, pools: list[str]) -> list[dict]:
    """A few mined documents across the range of scores (the first 2,000 of the first file of each pool)."""
    recs = []
    for pool in pools:
        files = sorted((out / pool).glob("*.jsonl.gz"))
        for i, rec in enumerate(read_jsonl_gz(files[0]) if files else []):
            if i >= 2000:
                break
            recs.append(rec)
    recs.sort(key=lambda rec: (rec["mine"]["score"], rec["id"]))
    picks = sorted({round(i * (len(recs) - 1) / max(SAMPLES - 1, 1)) for i in range(SAMPLES)}) if recs else []
    return [{"id": recs[i]["id"], "text": recs[i]["text"][:300],
             **{k: recs[i]["mine"][k] for k in ("pool", "round", "score")}} for i in picks]


def mine(cfg: RunConfig, run_dir: Path, progress) -> dict:
    """Run (or resume, or skip when done) the mine stage; returns mine.json."""
    mcfg, pcfg = cfg.mine, cfg.prepare
    if not mcfg.pools:
        raise UserError("config: mine.pools: no pool to mine; list at least one input (a path, hf:<dataset> or "
                        "package:…) under mine.pools")
    if pcfg.executor == "slurm" and not pcfg.slurm.wait:
        raise UserError("prepare.slurm.wait: false: `domainlm mine` needs each round's scores before the next round; "
                        "set prepare.slurm.wait: true")
    rd = RunDir(run_dir)
    stats = rd.load(RunDir.STATS, Stats)
    if stats is None:
        raise UserError(f"{rd.stats}: no prepared data; run `domainlm prepare CONFIG` first")
    # the seeds: every prepared source but the mined one (once it is added to the mixture)
    seed_sources = [s for s in cfg.sources if s.name in stats.sources and s.name != mcfg.source]
    domain = [s.name for s in seed_sources if s.role == "domain"]
    general = [s.name for s in seed_sources if s.role == "general"]
    if not domain or not general:
        raise UserError("config: sources: `domainlm mine` trains on the domain sources against the general ones; "
                        f"prepared: {len(domain)} domain, {len(general)} general")
    specs = [sources.resolve(p, f"mine.pools[{i}].input", pcfg.max_chars) for i, p in enumerate(mcfg.pools)]
    workers = pcfg.workers or pipeline.default_workers()
    tasks = pcfg.tasks or workers
    fp = _fingerprint(cfg, domain + general, specs, tasks, run_dir)
    work = rd / RunDir.MINE_WORK
    out = rd / RunDir.MINE_DOCS
    stage = stages.Stage(run_dir, "mine", rd / RunDir.MINE, (fp,), intact=out.is_dir)
    if stage.done():
        return json.loads(stage.output.read_text(encoding="utf-8"))
    stage.start()
    stage.output.unlink(missing_ok=True)
    if not (work / "fingerprint").exists() or (work / "fingerprint").read_text() != fp:
        shutil.rmtree(work, ignore_errors=True)  # another config or other data: start over
        shutil.rmtree(out, ignore_errors=True)
        atomic_write(work / "fingerprint", fp)
    with pipeline._stderr_to(work / "datatrove.log"):
        build_indexes(cfg, run_dir, domain + general, domain, work / "index")
        pos = _smallest(lambda: _texts(run_dir, domain, "train"), mcfg.max_seed_docs)
        neg = _smallest(lambda: _texts(run_dir, general, "train"), mcfg.max_seed_docs)
        seeds = {"pos": [t for t in pos if not _held_out(t, mcfg.holdout_fraction)],
                 "neg": [t for t in neg if not _held_out(t, mcfg.holdout_fraction)],
                 "pos_heldout": [t for t in pos if _held_out(t, mcfg.holdout_fraction)],
                 "neg_heldout": [t for t in neg if _held_out(t, mcfg.holdout_fraction)]}
        rounds, kept, seen, stopped = [], [], set(), None
        pools = [s.name for s in specs]

        def mined() -> Iterator[str]:
            """The documents the rounds so far accepted, each once (read back: they need not fit in memory)."""
            ids = set()
            for r_, t_ in kept:
                for doc in _accepted(work / f"round-{r_}", pools, t_):
                    if doc["id"] not in ids:
                        ids.add(doc["id"])
                        yield doc["text"]

        for r in range(1, mcfg.max_rounds + 1):
            done = work / f"round-{r}" / "round.json"
            rec = load_output(done, MineRound)
            if rec is None:
                rec = _round(cfg, r, work, specs, seeds, mined, seen, tasks, workers, progress)
                write_json(done, rec)
                faults.hit("mine.round_done")
            else:
                rec = rec.model_dump()
            rounds.append(rec)
            if rec["threshold"] is not None:
                kept.append((r, classifier.threshold_bin(rec["threshold"])))
                seen.update(doc["id"] for doc in _accepted(work / f"round-{r}", pools, kept[-1][1]))
            stopped = _stop(rec, mcfg)
            if stopped:
                break
        for spec in specs:
            _run_steps(cfg, [WriteMined(spec.name, str(work), kept, str(out))], work / "write" / spec.name, tasks,
                       workers, progress, f"write: {spec.name}")
    docs = n_bytes = 0
    for spec in specs:
        c, _ = _sum_counts(work, f"write-{spec.name}")
        docs, n_bytes = docs + c.get("docs", 0), n_bytes + c.get("bytes", 0)
    bpt, bpt_from = _bytes_per_token(run_dir, domain)
    result = Mine.checked({
        "version": MINE_VERSION, "fingerprint": fp, "source": mcfg.source, "pools": pools,
        "target_precision": mcfg.target_precision, "stopped": stopped, "rounds": rounds, "docs": docs,
        "bytes": n_bytes, "tokens": round(n_bytes / bpt), "bytes_per_token": bpt, "bytes_per_token_from": bpt_from,
        "samples": _samples(out, pools),
    })
    write_json(stage.output, result)
    stage.finish({"docs": docs})
    return result


# ------------------------------------------------------------------------------------------------ the command


def run_mine(config: Path | None, console) -> dict:
    cfg = load_config(config)
    run_dir = cfg.directory()
    with stages.locked(run_dir, "mine"), progress_bar(console) as progress:
        result = mine(cfg, run_dir, progress)
    return {"run_dir": str(run_dir), "docs_dir": str(RunDir(run_dir) / RunDir.MINE_DOCS), "mine": result}


def print_mine(result: dict, console) -> None:
    m = result["mine"]
    t = Table(title=f"mined source {m['source']!r} → {escape(result['docs_dir'])} (pools: {', '.join(m['pools'])})")
    for col in ("round", "threshold", "held-out P / R", "est. pool precision", "scored", "accepted", "new", "yield"):
        t.add_column(col, justify="right")
    for r in m["rounds"]:
        thr = "-" if r["threshold"] is None else f"{r['threshold']:.2f}"
        pr = "-" if r["threshold"] is None else f"{r['heldout_precision']:.3f} / {r['heldout_recall']:.3f}"
        est = "-" if r["est_precision"] is None else f"{r['est_precision']:.3f}"
        t.add_row(str(r["round"]), thr, pr, est, f"{r['scored']:,}", f"{r['accepted']:,}", f"{r['new_docs']:,}",
                  f"{r['yield_fraction']:.1%}")
    console.print(t)
    console.print(f"{m['docs']:,} documents, {human(m['bytes'], 'B')}, ≈{human(m['tokens'])} tokens "
                  f"({m['bytes_per_token']:g} bytes/token: {m['bytes_per_token_from']}); stopped: {m['stopped']}",
                  highlight=False)
    console.print(f"[dim]to train on them: a source with role: domain and input: {escape(result['docs_dir'])}[/]")
