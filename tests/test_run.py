"""End to end: `domainlm run --quick` on the packaged legal demo, then a rerun that does nothing."""

import json

import pytest

from domainlm.ablate import parse_weights, reweighted
from domainlm.config import load_config
from domainlm.errors import UserError


@pytest.mark.slow
def test_run_quick_end_to_end_and_idempotent(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("run", "--quick", "--json")
    assert code == 0, err[-3000:]
    summary = json.loads(out)
    run = tmp_path / "runs" / "legal-demo-quick"
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert set(ev["sources"]) == {"legal", "news"}
    for s in ev["sources"].values():
        assert 0 < s["bpb"] < 8
    # The general-only baseline is in eval.json and the domain model is better on the domain.
    assert set(ev["baseline"]["sources"]) == {"legal", "news"}
    assert ev["sources"]["legal"]["bpb"] < ev["baseline"]["sources"]["legal"]["bpb"]
    assert summary["sources"]["legal"]["change_pct"] < 0
    page = run / "report" / "index.html"
    assert page.exists() and page.read_text().count("data:image/png;base64") >= 5
    for f in ("plan.json", "data/stats.json", "tokenizer/audit.json", "tokens/counts.json", "model/config.json",
              "model/model.safetensors", "logs/metrics.jsonl", "ablate/w0/model/model.safetensors"):
        assert (run / f).exists(), f

    weights = run / "model" / "model.safetensors"
    before = {p: p.stat().st_mtime_ns for p in (weights, page, run / "eval" / "eval.json")}
    code, out, err = cli("run", "--quick")
    assert code == 0, err[-3000:]
    assert "done already" in out and "report: inputs unchanged, skipped" in out
    assert "step " not in out  # no training step ran
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten


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
