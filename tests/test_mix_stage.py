"""`domainlm mix` end to end on a tiny prepared run: 5 weights × 2 seeds × 2 budgets of a tiny model, the law fitted,
the held-out weight predicted, mix.json valid against its schema; a rerun skips; `plan --weights-from` reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from domainlm import faults
from domainlm.mix.stage import run_mix
from domainlm.outputs import Mix
from domainlm.rundir import RunDir
from test_decide import TOKENS_PER_STEP, prepared_run
from test_train_fixtures import one_thread, single_thread  # noqa: F401 (one_thread: autouse fixture)

BUDGETS = f"{3 * TOKENS_PER_STEP},{6 * TOKENS_PER_STEP}"  # 3 and 6 steps


class Stopped(Exception):
    pass


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The design run once, after an attempt stopped at its 3rd finished variant (the `mix.variant_done` fault
    site, raising here instead of killing the test process): the finished variants' times before the rerun."""
    tmp = tmp_path_factory.mktemp("mix")
    hits = []

    def stop_at_third(site):
        hits.append(site)
        if hits.count("mix.variant_done") == 3:
            raise Stopped(site)

    with single_thread():  # a module fixture runs before the autouse one_thread of its first test
        cfg = prepared_run(tmp)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(faults, "hit", stop_at_third)
            with pytest.raises(Stopped):
                run_mix(cfg, seeds=2, budgets=BUDGETS, n_boot=40, console=Console(quiet=True))
        run = Path(cfg).parent / "run"
        first = sorted(run.glob(f"{RunDir.MIX_DIR}/*/{RunDir.TRAIN}"))
        stamps = {str(p.parents[1]): p.stat().st_mtime_ns for p in first}
        stopped = {"mix_json": (run / RunDir.MIX).exists(), "stamps": stamps}
        result = run_mix(cfg, seeds=2, budgets=BUDGETS, n_boot=40, console=Console(quiet=True))
    return {"cfg": cfg, "result": result, "run": run, "stopped": stopped}


def test_a_stopped_design_resumes_without_retraining(mixed):
    stopped = mixed["stopped"]
    assert not stopped["mix_json"] and len(stopped["stamps"]) == 3
    for folder, stamp in stopped["stamps"].items():
        assert (Path(folder) / RunDir.TRAIN).stat().st_mtime_ns == stamp, folder


def test_mix_trains_the_design_fits_and_writes_its_schema(mixed):
    m, run = mixed["result"], mixed["run"]
    on_disk = RunDir(run).load(RunDir.MIX, Mix)  # the schema, through RunDir
    assert on_disk.model_dump(exclude_unset=True) == m
    assert m["design"]["weights"] == [0.0, 0.25, 0.5, 0.75, 1.0] and m["design"]["seeds"] == 2
    assert m["design"]["budgets"] == [3 * TOKENS_PER_STEP, 6 * TOKENS_PER_STEP]
    assert len(m["runs"]) == 20 and len({r["dir"] for r in m["runs"]}) == 20
    for r in m["runs"]:  # one variant per weight, seed and budget, each trained and scored
        folder = Path(r["dir"])
        assert folder.parent == run / RunDir.MIX_DIR
        summary = json.loads((folder / RunDir.TRAIN).read_text())
        assert summary["steps"] * TOKENS_PER_STEP == r["tokens"]
        ev = json.loads((folder / RunDir.VARIANT_EVAL).read_text())
        assert {k: v["bpb"] for k, v in ev["sources"].items()} == r["bpb"]
        cfg = (folder / RunDir.CONFIG).read_text()
        assert f"seed: {r['seed']}" in cfg
    # seeds differ: the same weight and budget, two different models
    last = m["runs"][-1]["tokens"]
    a, b = (r["bpb"]["legal"] for r in m["runs"] if r["domain_weight"] == 0.5 and r["tokens"] == last)
    assert a != b
    # the law per source, with intervals; the held-out weight (the configured 0.5) predicted beside its runs
    assert set(m["law"]) == {"legal", "news"}
    for c in m["law"].values():
        for k in ("c", "a", "t", "beta", "k"):
            lo, hi = c[k]["ci95"]
            assert lo <= hi
    h = m["held_out"]
    assert h["weight"] == 0.5 and h["runs_fitted"] == 16 and len(h["rows"]) == 4
    for row in h["rows"]:
        measured = [r["bpb"][row["source"]] for r in m["runs"] if r["domain_weight"] == 0.5
                    and r["tokens"] == row["tokens"]]
        assert row["measured"] == pytest.approx(sum(measured) / 2)
        assert row["pi95"][0] <= row["predicted"] <= row["pi95"][1]
    # the recommendation: at the run's own budget (6 steps: inside the fitted budgets), weights for the plan
    rec = m["recommended"]
    assert rec["tokens"] == 6 * TOKENS_PER_STEP and rec["in_fitted_range"]
    assert 0 <= rec["ci95"][0] <= rec["ci95"][1] <= 1
    assert m["weights"] == pytest.approx({"legal": rec["domain_weight"], "news": 1 - rec["domain_weight"]})
    cap = 1.02 * rec["predicted"]["news"]["general_only_bpb"]
    assert rec["predicted"]["news"]["bpb"] <= cap + 1e-9 or not rec["feasible"]
    assert (run / RunDir.MIX_CHART).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_section(mixed):
    from domainlm.pipeline import build_report

    rep = build_report(mixed["run"])
    s = rep["sections"]["mix"]
    assert s["complete"] and s["images"] == ["mix.png"], s
    page = (mixed["run"] / RunDir.REPORT).read_text()
    rec = mixed["result"]["recommended"]
    assert "Recommended domain weight at" in page and f"{rec['domain_weight']:.3f}" in page


def test_rerun_skips_and_plan_takes_the_weights(mixed, cli):
    run = mixed["run"]
    stamps = {r["dir"]: (Path(r["dir"]) / RunDir.TRAIN).stat().st_mtime_ns for r in mixed["result"]["runs"]}
    again = run_mix(mixed["cfg"], seeds=2, budgets=BUDGETS, n_boot=40, console=Console(quiet=True))
    assert again.pop("skipped") is True and again == mixed["result"]
    assert {d: (Path(d) / RunDir.TRAIN).stat().st_mtime_ns for d in stamps} == stamps
    code, out, err = cli("plan", "--flops", "1e15", "--weights-from", str(run / RunDir.MIX), "--json")
    assert code == 0, err
    plan = json.loads(out)
    got = {k: v["weight"] for k, v in plan["sources"].items()}
    assert got == pytest.approx(mixed["result"]["weights"])


@pytest.mark.parametrize("args,msg", [
    (["--weights", "0,0.5,1"], "--weights"),
    (["--weights", "0.1,0.25,0.5,0.75,0.9"], "both ends"),
    (["--seeds", "1"], "--seeds"),
    (["--budgets", "1000"], "--budgets"),
    (["--max-general-cost", "two"], "--max-general-cost"),
    (["--objective-weights", "legal"], "--objective-weights"),
    (["--objective-weights", "law=1,news=1"], "not a source of the run"),
    (["--weights", "0,0.25,half,0.75,1"], "--weights"),
    (["--held-out", "0"], "--held-out"),
])
def test_bad_design_is_one_line(mixed, cli, args, msg):
    code, _, err = cli("mix", str(mixed["cfg"]), *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and msg in lines[0] and "Traceback" not in err, err


def test_plan_weights_from_a_missing_file(tmp_path, cli):
    code, _, err = cli("plan", "--flops", "1e15", "--weights-from", str(tmp_path / "mix.json"))
    assert code == 2 and "domainlm mix" in err and str(tmp_path / "mix.json") in err, err
