"""End to end: `domainlm run --quick` on the packaged legal demo, then a rerun that does nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crashkit import KILLED, domainlm, is_temp, stamps, tree
from domainlm.ablate import parse_weights
from domainlm.config import load_config
from domainlm.errors import UserError
from domainlm.outputs import Law
from domainlm.pipeline import SCHEMAS
from domainlm.rundir import RunDir
from domainlm.train.variants import reweighted
from outputs_check import check_outputs


def _comparable(summary: dict) -> dict:
    """What `domainlm run --json` reports about the models (paths and timings differ run to run)."""
    return {k: summary[k] for k in ("sources", "probe_acc", "baseline_probe_acc")}


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    """`domainlm run --quick` on the packaged demo, uninterrupted: its run directory and JSON summary."""
    cwd = tmp_path_factory.mktemp("quick")
    proc = domainlm(["run", "--quick", "--json"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "runs" / "legal-demo-quick", json.loads(proc.stdout)


@pytest.mark.slow
def test_run_quick_end_to_end_and_idempotent(quick):
    run, summary = quick
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert set(ev["sources"]) == {"legal", "news"}
    for s in ev["sources"].values():
        assert 0 < s["bpb"] < 8
    # The general-only baseline (the weight-0 variant) has its own eval.json; the domain model is better on the domain.
    base = json.loads((run / "ablate" / "w0" / "eval.json").read_text())
    assert set(base["sources"]) == {"legal", "news"} and "baseline" not in ev
    assert ev["sources"]["legal"]["bpb"] < base["sources"]["legal"]["bpb"]
    assert summary["sources"]["legal"]["change_pct"] < 0
    page = run / "report" / "index.html"
    assert page.exists() and page.read_text().count("data:image/png;base64") >= 5
    for f in ("plan.json", "data/stats.json", "tokenizer/audit.json", "tokens/counts.json", "model/config.json",
              "model/model.safetensors", "logs/metrics.jsonl", "logs/train.json", "ablate/w0/model/model.safetensors"):
        assert (run / f).exists(), f

    outputs = ("plan.json", "data", "tokenizer", "tokens", "model", "checkpoints", "logs", "eval", "ablate", "report")
    before = stamps(run, *outputs)
    proc = domainlm(["run", "--quick"], cwd=run.parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "done already" in out and "report: inputs unchanged, skipped" in out
    assert "step " not in out  # no training step ran
    assert stamps(run, *outputs) == before  # nothing rewritten


@pytest.mark.slow
def test_outputs_match_their_models(quick, tmp_path):
    """Every output file of a real run validates against its model in outputs.SCHEMAS (the writers build them
    through the models; this checks the files as written); a damaged one is a one-line error naming it."""
    run, _ = quick
    written = {rel for rel in SCHEMAS if (run / rel).exists()}
    assert written >= {RunDir.PLAN, RunDir.STATS, RunDir.COUNTS, RunDir.AUDIT, RunDir.TRAIN, RunDir.EVAL,
                       RunDir.BASELINE_EVAL}
    for rel in written:
        assert RunDir(run).load(rel, SCHEMAS[rel]) is not None, rel
    assert RunDir(run).load(RunDir.LAW, Law) is None  # not written: None, not an error
    found = check_outputs(run)  # and every other JSON file of the run (the baseline's, the downstream stage's)
    assert set(written) <= set(found) and "ablate/w0/logs/train.json" in found

    copy = RunDir(tmp_path)
    for rel, damage in ((RunDir.EVAL, lambda t: t[: len(t) // 2]),  # torn
                        (RunDir.TRAIN, lambda t: t.replace('"steps"', '"step"')),  # another version's field
                        (RunDir.PLAN, lambda t: t.replace('"follows_plan": true', '"follows_plan": []')
                         .replace('"follows_plan": false', '"follows_plan": []'))):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_text(damage((run / rel).read_text()))
        with pytest.raises(UserError) as e:
            copy.load(rel, SCHEMAS[rel])
        msg = str(e.value)
        assert msg.startswith(f"{copy / rel}: not a valid ") and "\n" not in msg, msg


# One kill inside each stage of the main job, each rerun resuming the previous one's work and dying in the next
# stage; the last rerun finishes. (plan has no site: it writes one file atomically and is redone in seconds.)
KILLS = [
    "prepare.task_done:5",  # prepare: a datatrove task of the legal source
    "tokenizer.before_save:1",  # tokenizer: trained, not saved
    "tokenize.part_done:1",  # tokenize: one part written
    "train.step:7",  # train
    "eval.source_done:1",  # eval: one source scored
    "train.step:3",  # baseline: the main model is trained, these are the baseline's steps
    "report.mid_write:1",  # report: figures written, page not published
]


@pytest.mark.slow
def test_run_killed_in_every_stage_finishes_with_the_same_summary(quick, tmp_path):
    ref_run, ref_summary = quick
    for fault in KILLS:
        proc = domainlm(["run", "--quick"], cwd=tmp_path, fault=fault, fault_dir=tmp_path)
        assert proc.returncode == KILLED, f"{fault}: rc {proc.returncode}; {proc.stderr[-2000:]}"
    run = tmp_path / "runs" / "legal-demo-quick"
    assert not (run / "report" / "index.html").exists()
    proc = domainlm(["run", "--quick", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _comparable(json.loads(proc.stdout)) == _comparable(ref_summary)
    assert tree(run, "data", "tokens", "tokenizer/tokenizer.json") == tree(
        ref_run, "data", "tokens", "tokenizer/tokenizer.json")
    assert not [p for p in run.rglob("*") if is_temp(str(p.relative_to(run)))]


@pytest.mark.slow
def test_quick_demo_gives_the_same_summary_beside_a_busy_core(quick, tmp_path):
    """The demo fixes its token count and every seed (a FLOPs budget: no speed probe sizes anything), so
    `domainlm run --quick` beside a process keeping a core busy gives the undisturbed run's summary bit for bit."""
    ref_run, ref_summary = quick
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        proc = domainlm(["run", "--quick", "--json"], cwd=tmp_path)
    finally:
        hog.kill()
        hog.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert _comparable(summary) == _comparable(ref_summary)  # floats compared exactly
    same = ("planned_tokens", "params", "steps")
    assert {k: summary["training"][k] for k in same} == {k: ref_summary["training"][k] for k in same}
    run = tmp_path / "runs" / "legal-demo-quick"
    plan, ref_plan = (json.loads((r / "plan.json").read_text()) for r in (run, ref_run))
    assert plan["run"] == ref_plan["run"] and plan["compute"] == ref_plan["compute"]
    assert plan["compute"]["method"] == "flops" and "shape_probe" not in plan["compute"]
    assert plan["run"]["follows_plan"] and not summary["training"]["overrides"]


def test_domain_weights_parsing():
    assert parse_weights("1, 0,0.51") == [0.0, 0.51, 1.0]
    for bad in ("0,x", "1.5", ""):
        with pytest.raises(UserError, match="--domain-weights"):
            parse_weights(bad)


def test_reweighting_keeps_proportions():
    cfg = load_config(None)
    assert reweighted(cfg, 0.0) == {"legal": 0.0, "news": 1.0}
    w = reweighted(cfg, 0.3)
    assert w["legal"] == pytest.approx(0.3) and sum(w.values()) == pytest.approx(1.0)


# A toy stage: a module and its declaration, registered from outside the package (no file of domainlm touched).
TOY_STAGE = '''
from domainlm.outputs import Output as OutputModel
from domainlm.pipeline import Output, StageDecl, register
from domainlm.report.html import Section
from domainlm.rundir import RunDir, load_output, write_json

TOY = "toy/toy.json"


class Toy(OutputModel):
    legal_docs: int


def run(c):
    stats = RunDir(c.run_dir).load(RunDir.STATS, __import__("domainlm.outputs").outputs.Stats)
    write_json(c.run_dir / TOY, Toy.checked({"legal_docs": stats.sources["legal"].train_docs}))
    print("toy: counted")


def section(r):
    toy, why = r.read(TOY)
    s = Section("toy", "Toy stage")
    if toy is None:
        s.hints.append(why)
    else:
        s.body.append(f"<p>toy legal docs: {toy.legal_docs}</p>")
    return s


register(StageDecl("toy", "domainlm toy CONFIG", "toy_stage.py", (Output(TOY, Toy, readers="report"),), run=run,
                   inputs=lambda c: (c.cfg.name,), sections=(section,)))
'''


@pytest.mark.slow
def test_a_registered_stage_runs_in_order_skips_is_checked_and_reported(quick, tmp_path):
    """issue 20: adding a stage is a module plus a declaration: under `domainlm run` it runs in registry order (before
    the report, after the stages whose outputs it reads), skips on a rerun by its fingerprint, has its output checked
    against its schema (a damaged one is redone) and gets its report section."""
    import shutil

    from crashkit import python

    ref_run, _ = quick
    shutil.copytree(ref_run.parent, tmp_path / "runs")
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "toy_stage.py").write_text(TOY_STAGE)
    code = ("import sys; sys.path.insert(0, 'plugin'); import toy_stage; from domainlm.cli import main; "
            "main(['run', '--quick'])")
    run = tmp_path / "runs" / "legal-demo-quick"

    proc = python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    titles = [line.split(": ", 1)[1].strip(" ─") for line in out.splitlines() if "stage " in line and "/" in line]
    assert titles.index("toy") == len(titles) - 2 and titles[-1] == "report", titles
    assert "toy: counted" in out and "step " not in out  # the finished stages were skipped
    toy = json.loads((run / "toy" / "toy.json").read_text())
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert toy == {"legal_docs": stats["sources"]["legal"]["train_docs"]}
    page = (run / "report" / "index.html").read_text()
    assert f"toy legal docs: {toy['legal_docs']}" in page  # the report was rebuilt: a new input

    proc = python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "toy: counted" not in proc.stdout and "toy: inputs unchanged, skipped" in proc.stdout
    assert "report: inputs unchanged, skipped" in proc.stdout

    (run / "toy" / "toy.json").write_text('{"legal_docs": "many"}\n')  # damaged: not what its schema says
    proc = python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "toy: counted" in proc.stdout
    assert json.loads((run / "toy" / "toy.json").read_text()) == toy
