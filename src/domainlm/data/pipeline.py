"""`domainlm prepare`: one datatrove pipeline per source, then statistics (token files: `data/tokenize.py`).

Stages of a source (datatrove executors; each skips its completed tasks on a rerun)::

    clean     N tasks  read → normalise → filter → JsonlWriter(.prepare/<s>/clean) + ExactDedupSignature
    exact     1 task   ExactFindDedups
    mh-sig    N tasks  clean → ExactDedupFilter → MinHash signatures
    mh-bucket B tasks  MinhashDedupBuckets (B = minhash_buckets)
    mh-clust  1 task   MinhashDedupCluster
    keys      N tasks  clean → both dedup filters → split keys
    split     1 task   PlanSplit
    write     N tasks  clean → both dedup filters → data/<s>/{train,val}/<rank>.jsonl.gz

Work files live in ``<run>/.prepare/<source>/``, keyed by a fingerprint of the source's config and input
files: a changed source starts over, an unchanged one resumes. ``data/stats.json`` is written last; its
existence means the data stage is complete.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import orjson
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
)
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig

from domainlm import faults, stages
from domainlm.config import PrepareConfig, RunConfig
from domainlm.data import sources, steps
from domainlm.errors import UserError
from domainlm.outputs import Stats
from domainlm.rundir import RunDir, atomic_write, load_output, open_append, write_json

STATS_VERSION = 1
# Part of every fingerprint: bump it when a change to this package changes what prepare writes, so runs
# prepared by older code are redone instead of reused.
PIPELINE_VERSION = "prepare-2"
SPLITS = ("train", "val")


def write_json_atomic(path: Path, obj) -> None:
    """Sorted keys: the bytes of ``stats.json`` and the counters do not depend on the order work finished in."""
    write_json(path, obj, indent=1, sort_keys=True)


# ------------------------------------------------------------------------------------------- reading outputs


def document_files(run_dir: Path, source: str, split: str) -> list[Path]:
    if not RunDir(run_dir).stats.exists():
        raise UserError(f"{RunDir(run_dir).stats}: no prepared data; run `domainlm prepare CONFIG` first")
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    folder = RunDir(run_dir) / RunDir.DATA / source / split
    if not folder.is_dir():
        raise UserError(f"{folder}: no prepared documents for source {source!r}")
    return sorted(folder.glob("*.jsonl.gz"))


def iter_records(run_dir: Path, source: str, split: str) -> Iterator[dict]:
    """Prepared documents (``{"id", "text", "metadata"}``) of one source and split, in a fixed order."""
    for path in document_files(run_dir, source, split):
        with gzip.open(path, "rb") as f:
            for line in f:
                yield orjson.loads(line)


def iter_documents(run_dir: Path, source: str, split: str) -> Iterator[str]:
    """Texts of the prepared documents of one source and split, in a fixed (deterministic) order."""
    for rec in iter_records(run_dir, source, split):
        yield rec["text"]


# ------------------------------------------------------------------------------------------- fingerprints


def _inputs_fingerprint(spec: sources.SourceSpec) -> list:
    if spec.kind == "hf":
        p = Path(spec.dataset)
        return [spec.dataset, spec.split, sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns)
                                                 for f in p.rglob("*") if f.is_file()) if p.is_dir() else None]
    # name, size and mtime of every input file: re-reading 37k files' contents would cost more than the stage
    out = []
    for f in spec.files:
        st = os.stat(f)
        out.append((f, st.st_size, st.st_mtime_ns))
    return out


def source_fingerprint(spec: sources.SourceSpec, pcfg: PrepareConfig, tasks: int) -> str:
    knobs = pcfg.model_dump(exclude={"executor", "workers", "slurm", "ray"})
    knobs["tasks"] = tasks
    spec_fields = spec.__dict__ | {"files": len(spec.files)}  # the files themselves: _inputs_fingerprint
    for unset in [k for k in ("max_docs", "max_bytes") if spec_fields[k] is None]:
        del spec_fields[unset]  # no slice: the fingerprint of runs prepared before slices existed
    return stages.fingerprint(PIPELINE_VERSION, metadata.version("datatrove"), spec_fields, knobs,
                              _inputs_fingerprint(spec))


# ------------------------------------------------------------------------------------------- executors


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _executor(pcfg: PrepareConfig, pipeline: list, tasks: int, workers: int, logdir: Path, name: str, depends=None,
              site: str = "prepare.task_done"):
    """The executor ``prepare.executor`` names for one stage; a local one hits the crash site ``site`` after each
    task's completion marker (`domainlm mine` runs its steps on the same executors)."""
    if pcfg.executor == "slurm":
        # optional: datatrove's Slurm executor, only for prepare.executor: slurm
        from domainlm.launch.slurm_executor import Executor

        s = pcfg.slurm
        return Executor(
            pipeline, wait=s.wait, tasks=tasks, time=s.time, partition=s.partition, cpus_per_task=s.cpus_per_task,
            mem_per_cpu_gb=s.mem_per_cpu_gb, qos=s.qos, sbatch_args=s.sbatch_args or None,
            job_name=f"domainlm-{name}", logging_dir=str(logdir), depends=None if s.wait else depends,
        )
    if pcfg.executor == "ray":
        try:
            import ray  # datatrove expects ray.init() done by the caller
        except ImportError:
            raise UserError("prepare.executor: ray needs the ray package: pip install 'domainlm[ray]'") from None

        if not ray.is_initialized():
            ray.init()  # joins the cluster named by RAY_ADDRESS, else starts a local one

        return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logdir),
                                   cpus_per_task=pcfg.ray.cpus_per_task, mem_per_cpu_gb=pcfg.ray.mem_per_cpu_gb)
    # fork: a worker starts in milliseconds instead of re-importing datatrove (~2 s per stage with forkserver)
    return _local_executor(site)(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logdir),
                             start_method="fork")


def _local_executor(site: str):
    """datatrove's local executor, with the crash site ``site`` after each completion marker."""

    class Executor(LocalPipelineExecutor):
        def mark_rank_as_completed(self, rank: int):
            super().mark_rank_as_completed(rank)
            faults.hit(site)

    return Executor


def minhash_config(pcfg: PrepareConfig):
    """The MinHash parameters of prepare's near-duplicate stages (also `domainlm mine`'s, against the domain)."""
    return MinhashConfig(
        n_grams=pcfg.minhash_ngrams, num_buckets=pcfg.minhash_buckets,
        hashes_per_bucket=pcfg.minhash_hashes_per_bucket, hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )


def build_stages(spec: sources.SourceSpec, pcfg: PrepareConfig, run_dir: Path, tasks: int):
    """The (name, pipeline, tasks) list of one source's datatrove stages."""
    w = RunDir(run_dir) / RunDir.PREPARE / spec.name
    ws = str(w)
    exact_cfg = ExactDedupConfig(content_getter=_text_of)
    mh_cfg = minhash_config(pcfg)

    def deduped() -> list:
        out = [steps.CleanReader(str(w / "clean")), ExactDedupFilter(str(w / "exact_dups"), exact_cfg)]
        if pcfg.near_dup:
            out.append(MinhashDedupFilter(str(w / "mh_remove")))
        return out

    clean = [
        steps.ReadAndClean(spec, ws, pcfg.min_chars, pcfg.max_chars, pcfg.max_dup_line_frac),
        # uncompressed, with a flat adapter: gzip and dataclasses.asdict were 40% of this stage's time
        JsonlWriter(str(w / "clean"), output_filename="${rank}.jsonl", compression=None, adapter=_as_record),
        ExactDedupSignature(str(w / "exact_sigs"), exact_cfg),
    ]
    out = [("clean", clean, tasks), ("exact", [ExactFindDedups(str(w / "exact_sigs"), str(w / "exact_dups"),
                                                               exact_cfg)], 1)]
    if pcfg.near_dup:
        out += [
            ("mh-sig", [steps.CleanReader(str(w / "clean")), ExactDedupFilter(str(w / "exact_dups"), exact_cfg),
                        steps.CountDocs(ws, "after_exact"), steps.FastMinhashSignature(str(w / "mh_sigs"), mh_cfg)],
             tasks),
            ("mh-bucket", [MinhashDedupBuckets(str(w / "mh_sigs"), str(w / "mh_buckets"), config=mh_cfg)],
             pcfg.minhash_buckets),
            ("mh-cluster", [MinhashDedupCluster(str(w / "mh_buckets"), str(w / "mh_remove"), config=mh_cfg)], 1),
        ]
    else:
        out += [("count", [steps.CleanReader(str(w / "clean")), ExactDedupFilter(str(w / "exact_dups"), exact_cfg),
                           steps.CountDocs(ws, "after_exact")], tasks)]
    out += [
        ("keys", [*deduped(), steps.CollectKeys(ws)], tasks),
        ("split", [steps.PlanSplit(ws, pcfg.val_fraction, pcfg.val_min_docs)], 1),
        ("write", [*deduped(), steps.SplitWriter(ws, str(RunDir(run_dir) / RunDir.DATA / spec.name))], tasks),
    ]
    return out


def _as_record(writer, doc) -> dict:
    return {"text": doc.text, "id": doc.id, "metadata": doc.metadata}


def _text_of(doc) -> bytes:
    return doc.text.encode("utf-8")  # bytes: datatrove's default xxhash needs them


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send fd 2 (datatrove's loguru output, also of its worker processes) to a log file, so the terminal
    shows our progress bars; errors are in the log, and datatrove keeps per-task logs in each stage folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(2)
    with open_append(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _completed(logdir: Path) -> int:
    done_dir = logdir / "completions"
    return len(list(done_dir.glob("*"))) if done_dir.is_dir() else 0


def _run_stage(executor, logdir: Path, tasks: int, progress, label: str) -> float:
    """Run one executor in a thread and follow its completion markers with a progress bar."""
    bar = progress.add_task(label, total=tasks)
    t0 = time.perf_counter()
    errors: list[BaseException] = []

    def target():
        try:
            executor.run()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)
        progress.update(bar, completed=_completed(logdir))
    done = _completed(logdir)
    progress.update(bar, completed=done)
    if errors:
        raise errors[0]
    if done < tasks:
        raise UserError(f"{label}: {tasks - done} of {tasks} tasks failed; see the logs in {logdir}/logs")
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- statistics


def _sum_counts(work: Path, step: str) -> tuple[Counter, list[str], int]:
    total, errors, n_errors = Counter(), [], 0
    for f in sorted((work / "counts" / step).glob("*.json")):
        d = json.loads(f.read_text())
        total.update(d["counts"])
        errors += d.get("errors", [])
        n_errors += d.get("n_errors", 0)
    return total, errors, n_errors


def check_clean(spec: sources.SourceSpec, pcfg: PrepareConfig, run_dir: Path) -> None:
    """After the clean stage: too many malformed lines, or nothing left, is the user's problem to fix."""
    counts, errors, n_errors = _sum_counts(RunDir(run_dir) / RunDir.PREPARE / spec.name, "clean")
    lines = counts.get("json_lines", 0)
    if lines and n_errors / lines > pcfg.max_error_rate:
        raise UserError(
            f"source {spec.name!r}: {n_errors} of {lines} JSONL lines malformed or without text key "
            f"{spec.text_key!r} (first at {errors[0]}); above prepare.max_error_rate={pcfg.max_error_rate:g}"
        )
    if counts.get("clean_docs", 0) == 0:
        drops = ", ".join(f"{k.removeprefix('drop/')} {v}" for k, v in sorted(counts.items()) if k.startswith("drop/"))
        raise UserError(
            f"source {spec.name!r}: no documents left after filtering "
            f"({counts.get('docs_in', 0)} read; dropped: {drops or 'none'})"
        )


def source_stats(spec: sources.SourceSpec, pcfg: PrepareConfig, run_dir: Path) -> dict:
    w = RunDir(run_dir) / RunDir.PREPARE / spec.name
    c, errors, n_errors = _sum_counts(w, "clean")
    after_exact = _sum_counts(w, "after_exact")[0].get("docs", 0)
    out = _sum_counts(w, "write")[0]
    drops = {k.removeprefix("drop/"): v for k, v in sorted(c.items()) if k.startswith("drop/") and v}
    drops["exact_duplicate"] = c.get("clean_docs", 0) - after_exact
    docs_out = out.get("train_docs", 0) + out.get("val_docs", 0)
    drops["near_duplicate"] = after_exact - docs_out
    return {
        "input": spec.kind if spec.kind != "files" else spec.root,
        "docs_in": c.get("docs_in", 0),
        "bytes_in": c.get("bytes_in", 0),
        "docs_out": docs_out,
        "bytes_out": out.get("train_bytes", 0) + out.get("val_bytes", 0),
        **{f"{s}_{k}": out.get(f"{s}_{k}", 0) for s in SPLITS for k in ("docs", "bytes")},
        "drops": drops,
        "invalid_utf8_replaced": c.get("invalid_utf8", 0),
        "decoded_cp1252": c.get("decoded_cp1252", 0),
        "malformed_lines": n_errors,
        "malformed_at": errors[:20],
    }


# ------------------------------------------------------------------------------------------- the command


def mined_pending(cfg: RunConfig) -> list[str]:
    """The mined source (``mine.source``, listed in ``sources``) while `domainlm mine` has not written its folder:
    prepared without it, then again once it is there (`domainlm mine` needs the other sources prepared first)."""
    return [s.name for s in cfg.sources if cfg.mine.pools and s.name == cfg.mine.source
            and not s.input.startswith(("hf:", "package:")) and not Path(s.input).exists()]


def prepare_sources(cfg: RunConfig, run_dir: Path, progress) -> dict:
    """Clean, dedup and split every source; return (and write) ``data/stats.json``."""
    pcfg = cfg.prepare
    if not cfg.sources:
        raise UserError("config: sources: no sources to prepare")
    workers = pcfg.workers or default_workers()
    tasks = pcfg.tasks or workers
    pending = mined_pending(cfg)
    specs = [sources.resolve(s, f"sources[{i}].input", pcfg.max_chars) for i, s in enumerate(cfg.sources)
             if s.name not in pending]
    fps = {s.name: source_fingerprint(s, pcfg, tasks) for s in specs}
    stage = stages.Stage(run_dir, "prepare", RunDir(run_dir).stats, (fps,))
    if stage.done():
        return load_output(stage.output, Stats).model_dump(exclude_unset=True)
    stage.start()
    stage.output.unlink(missing_ok=True)  # the completion mark of the data stage goes first,
    for counts in Path(run_dir).glob(f"{RunDir.TOKENS}*/{RunDir.COUNTS_FILE}"):  # and every tokenizer's tokens
        counts.unlink()  # of the old data
    stats = {"version": STATS_VERSION, "fingerprint": stage.fingerprint, "tasks": tasks, "sources": {}}
    for spec in specs:
        w = RunDir(run_dir) / RunDir.PREPARE / spec.name
        fp_file = w / "fingerprint"
        if not fp_file.exists() or fp_file.read_text() != fps[spec.name]:
            shutil.rmtree(w, ignore_errors=True)  # another config or changed inputs: start this source over
            shutil.rmtree(RunDir(run_dir) / RunDir.DATA / spec.name, ignore_errors=True)
            w.mkdir(parents=True)
            atomic_write(fp_file, fps[spec.name])
        plan = build_stages(spec, pcfg, run_dir, tasks)
        finished = all(_completed(w / "stages" / name) >= n for name, _, n in plan)
        submitted = False
        depends, seconds = None, {}
        with _stderr_to(w / "datatrove.log"):
            for name, steps_, n in plan:
                logdir = w / "stages" / name
                ex = _executor(pcfg, steps_, n, workers, logdir, f"{spec.name}-{name}", depends)
                if pcfg.executor == "slurm" and not finished and not pcfg.slurm.wait:
                    ex.run()  # submits; the jobs run later, each depending on the previous stage
                    depends, submitted = ex, True
                    continue
                seconds[name] = round(_run_stage(ex, logdir, n, progress, f"{spec.name}: {name}"), 2)
                if name == "clean":
                    check_clean(spec, pcfg, run_dir)
        if submitted:
            continue
        stats["sources"][spec.name] = source_stats(spec, pcfg, run_dir)
        # timings vary run to run: kept out of stats.json, whose bytes must not depend on the machine's load
        write_json_atomic(w / "seconds.json", seconds)
    if len(stats["sources"]) < len(specs):  # Slurm: a rerun after the jobs have finished writes the statistics
        return {"submitted": "slurm", "logs": str(RunDir(run_dir) / RunDir.PREPARE), "sources": {}}
    write_json_atomic(stage.output, Stats.checked(stats))
    stage.finish({"sources": list(fps)})
    return stats
