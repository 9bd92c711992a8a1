"""`domainlm prepare` and `domainlm tokenize` killed (SIGKILL of the process group) at named crash sites, then rerun.

Each case: the command dies at the site; nothing partial is visible under a final name; the completion markers
say exactly what is done; a rerun without the fault finishes, its outputs are byte-identical to an uninterrupted
run's, and work finished before the kill is not redone (counted with the same crash sites, armed past the end)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from crashkit import KILLED, assert_no_torn_files, domainlm, stamps, tree
from domainlm.data import pipeline
from domainlm.data.command import run_prepare
from domainlm.tokenize import run_tokenize
from test_prepare import quiet_console, train_tokenizer, two_sources

DOCS = 100  # per source: 19 datatrove tasks per source with 2 tasks per stage, 4 token parts per source
OUTPUTS = ("data", "tokens")
COUNT = 10**6  # a site armed this far never fires: the counter file then says how often it was reached


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted `prepare` and `tokenize` (with a tiny tokenizer): config, its run, its outputs."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = two_sources(tmp, DOCS)
    run = tmp / "run"
    run_prepare(cfg, quiet_console())
    train_tokenizer(run, list(pipeline.iter_documents(run, "a", "train")))
    run_tokenize(cfg, quiet_console())
    return cfg, run, tree(run, *OUTPUTS)


def fresh_copy(reference, tmp: Path) -> tuple[Path, Path]:
    """The reference's inputs and tokenizer in a new run directory with nothing prepared."""
    cfg, run, _ = reference
    new_run = tmp / "run"
    shutil.copytree(run / "tokenizer", new_run / "tokenizer")
    new_cfg = tmp / "cfg.yaml"
    new_cfg.write_text(cfg.read_text().replace(str(run), str(new_run)))
    return new_cfg, new_run


def hits(folder: Path, site: str) -> int:
    found = list(folder.glob(f"domainlm-fault-*-{site}"))
    return sum(p.stat().st_size for p in found)


def completions(run: Path) -> int:
    return len(list((run / ".prepare").rglob("completions/*")))


CASES = [
    # (site, n): where in the run the kill falls
    ("prepare.task_done", 1),  # the first clean task of source a
    ("prepare.task_done", 3),  # a's exact-dedup finder
    ("prepare.task_done", 10),  # among a's MinHash bucket tasks
    ("prepare.task_done", 17),  # a's train/val split planned, nothing written
    ("prepare.task_done", 19),  # source a complete, b not started
    ("prepare.task_done", 25),  # inside source b
    ("prepare.task_done", 38),  # every task done, data/stats.json not written
    ("prepare.write.mid_document", 1),  # half of a's first document in a split file
    ("prepare.write.mid_document", 150),  # half a document of source b
    ("tokenize.part_done", 1),
    ("tokenize.part_done", 5),
    ("tokenize.before_counts", 1),
    ("tokenize.after_counts", 1),
]


@pytest.mark.slow
@pytest.mark.parametrize(("site", "n"), CASES, ids=[f"{s}:{n}" for s, n in CASES])
def test_killed_prepare_resumes_to_identical_outputs(reference, tmp_path, site, n):
    cfg, run = fresh_copy(reference, tmp_path)
    expected = reference[2]
    data_done = site.startswith("tokenize.")
    if data_done:
        run_prepare(cfg, quiet_console())
    proc = domainlm(["tokenize" if data_done else "prepare", str(cfg)], fault=f"{site}:{n}", fault_dir=tmp_path)
    assert proc.returncode == KILLED, f"not killed at {site}:{n} (rc {proc.returncode}): {proc.stderr[-2000:]}"

    # on disk at the kill: no partial file under a final name, markers exactly as far as the work got
    assert_no_torn_files(run, expected, *OUTPUTS)
    assert (run / "data" / "stats.json").exists() == data_done
    assert (run / ".stages" / "prepare.json").exists() == data_done
    assert (run / "tokens" / "counts.json").exists() == (site == "tokenize.after_counts")
    assert not (run / ".stages" / "tokenize.json").exists()
    if site == "prepare.write.mid_document" and n == 1:
        assert not list((run / "data").rglob("*.jsonl.gz")), "a split file was published before it was complete"
    tasks_done = completions(run)
    before = {k: v for k, v in stamps(run, "data").items() if not k.endswith(".tmp")}

    # rerun, counting the tasks and token parts it does
    count_dir = tmp_path / "rerun-counts"
    count_dir.mkdir()
    for command in ("prepare", "tokenize"):
        proc = domainlm([command, str(cfg)], fault=f"prepare.task_done:{COUNT},tokenize.part_done:{COUNT}",
                        fault_dir=count_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(run, *OUTPUTS) == expected
    assert not list(run.rglob("*.tmp")) and not list((run / "tokens").rglob(".parts"))
    assert (run / ".stages" / "tokenize.json").exists()

    # finished work was not redone
    total_tasks = completions(reference[1])
    assert hits(count_dir, "prepare.task_done") == total_tasks - tasks_done
    after = stamps(run, "data")
    assert {k: after[k] for k in before} == before, "a finished split file was rewritten"
    if site == "tokenize.part_done":
        assert hits(count_dir, "tokenize.part_done") == 2 * DOCS // 25 - n  # 8 parts in all
