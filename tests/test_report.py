"""`domainlm report`: a fake but realistic run directory → one self-contained HTML page; gaps become hints."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from domainlm.pipeline import build_report
from domainlm.plan.planner import PlanRequest, make_plan

SOURCES = {"legal": "domain", "news": "general"}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def _plan(run: Path) -> None:
    # the real planner, so plan.json has exactly the fields `domainlm plan` writes
    plan = make_plan(PlanRequest(flops=3e15, law="chinchilla-3", vocab_size=8192, seq_len=256,
                                 weights={"legal": 0.51, "news": 0.49}, roles=SOURCES,
                                 unique_tokens={"legal": 9e6, "news": 1.3e6}))
    _write(run / "plan.json", plan)


def _stats(run: Path) -> None:
    def src(docs_in, bytes_in, drops, docs_out, bytes_out):
        return {"input": "package", "docs_in": docs_in, "bytes_in": bytes_in, "docs_out": docs_out,
                "bytes_out": bytes_out, "train_docs": int(docs_out * 0.98), "train_bytes": int(bytes_out * 0.98),
                "val_docs": docs_out - int(docs_out * 0.98), "val_bytes": bytes_out - int(bytes_out * 0.98),
                "drops": drops, "invalid_utf8_replaced": 0, "decoded_cp1252": 0, "malformed_lines": 0,
                "malformed_at": []}

    _write(run / "data/stats.json", {"version": 1, "fingerprint": "x", "tasks": 2, "sources": {
        "legal": src(37412, 38_000_000, {"too_short": 812, "exact_duplicate": 6120, "near_duplicate": 2210},
                     28270, 33_100_000),
        "news": src(2225, 5_000_000, {"too_short": 3, "exact_duplicate": 98, "near_duplicate": 11}, 2113, 4_700_000),
    }})


def _counts(run: Path) -> None:
    _write(run / "tokens/counts.json", {"version": 1, "dtype": "uint16", "vocab_size": 8192, "eos_id": 1,
                                        "tokenizer_sha256": "0" * 64, "sources": {
        "legal": {"train_tokens": 8_900_000, "val_tokens": 180_000, "train_docs": 27700, "val_docs": 570,
                  "train_bytes": 32_400_000, "val_bytes": 660_000},
        "news": {"train_tokens": 1_290_000, "val_tokens": 26_000, "train_docs": 2070, "val_docs": 43,
                 "train_bytes": 4_600_000, "val_bytes": 94_000}}})


def _audit(run: Path) -> None:
    terms = [("mens rea", ["␣mens", "␣rea"], ["␣m", "ens", "␣re", "a"]),
             ("res judicata", ["␣res", "␣judicata"], ["␣res", "␣jud", "ic", "ata"]),
             ("indemnify", ["␣indemnify"], ["␣ind", "em", "n", "ify"])]
    _write(run / "tokenizer/audit.json", {
        "version": 1, "kind": "bpe", "vocab_size": 8192, "vocab_size_trained": 8192,
        "special_tokens": {"<s>": 0, "</s>": 1, "<pad>": 2}, "sample": {}, "baseline": {
            "sources": ["news"], "vocab_size_trained": 8192, "sample": {}},
        "train_seconds": 3.2,
        "bytes_per_token": {
            "legal": {"role": "domain", "val_bytes": 660000, "tokens": 170000, "baseline_tokens": 230000,
                      "bytes_per_token": 3.88, "baseline_bytes_per_token": 2.87, "gain_pct": 35.2},
            "news": {"role": "general", "val_bytes": 94000, "tokens": 25000, "baseline_tokens": 23000,
                     "bytes_per_token": 3.76, "baseline_bytes_per_token": 4.09, "gain_pct": -8.1}},
        "domain_terms": [{"term": t, "tokens": [p.replace("␣", " ") for p in a], "count": len(a),
                          "baseline_tokens": [p.replace("␣", " ") for p in b], "baseline_count": len(b)}
                         for t, a, b in terms],
        "summary": {"domain": {"bytes_per_token": 3.88, "baseline_bytes_per_token": 2.87, "gain_pct": 35.2},
                    "general": {"bytes_per_token": 3.76, "baseline_bytes_per_token": 4.09, "gain_pct": -8.1},
                    "terms": {"n": 3, "single_token": 1, "mean_tokens": 1.667, "baseline_single_token": 0,
                              "baseline_mean_tokens": 3.667}},
        "path": str(run / "tokenizer")})


def _metrics(run: Path, steps: int = 200) -> None:
    # rows as train/loop.py logs them; the last line half-written, as while training runs
    lines, tokens_per_step = [], 8192
    for step in range(1, steps + 1):
        loss = 2.2 + 7.0 * math.exp(-step / 40) + 0.05 * math.sin(step)
        lines.append({"kind": "train", "step": step, "loss": loss, "lr": 3e-4, "grad_norm": 0.8, "skipped": False,
                      "tokens": step * tokens_per_step, "tokens_per_s": 21000.0, "mfu": None,
                      "epochs/legal": step * tokens_per_step * 0.51 / 8.9e6,
                      "epochs/news": step * tokens_per_step * 0.49 / 1.29e6})
        if step % 50 == 0:
            decay = math.exp(-step / 40)
            lines.append({"kind": "eval", "step": step, "val_loss/legal": 2.1 + 6 * decay,
                          "val_loss/news": 3.0 + 6 * decay, "bpb/legal": 0.8 + 2 * decay, "bpb/news": 1.2 + 2 * decay})
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "train", "st'
    (run / "logs").mkdir(parents=True, exist_ok=True)
    (run / "logs/metrics.jsonl").write_text(text, encoding="utf-8")


def _eval_result(bpb_legal, bpb_news, acc):
    def src(role, bpb, bpt):
        return {"role": role, "bpb": bpb, "loss_per_token": bpb * bpt * math.log(2), "ppl": 2 ** (bpb * bpt),
                "tokens": 20000, "bytes": int(20000 * bpt), "docs": 40, "bytes_per_token": bpt,
                "nll_bits": bpb * 20000 * bpt, "forward_tokens": 39000, "cost": 1.95}

    return {"sources": {"legal": src("domain", bpb_legal, 3.88), "news": src("general", bpb_news, 3.76)},
            "probes": {"file": "legal-probes.jsonl", "items": 4, "acc": acc, "acc_per_byte": acc - 0.25,
                       "chance": 0.25, "results": [
                           {"term": "consideration", "correct": True, "correct_per_byte": True,
                            "logprobs": [-3.1, -5.2, -6.0, -4.4]},
                           {"term": "mens rea", "correct": False, "correct_per_byte": False,
                            "logprobs": [-9.1, -5.2, -6.0, -4.4]}]}}


def _eval(run: Path, baseline: bool = True) -> None:
    def ev(model: Path, *scores) -> dict:
        return {"version": 1, "domainlm": "0.1.0", "model": str(model), "run_dir": str(run), "device": "cpu",
                "processes": 1, "context": 256, "stride": 128, "max_bytes_per_source": 200000, "doc_start_ids": [0],
                **_eval_result(*scores), "seconds": 12.0}

    _write(run / "eval/eval.json", ev(run / "model", 0.91, 1.31, 0.75))
    if baseline:  # `domainlm run`'s general-only baseline: the ablation's weight-0 variant
        _write(run / "ablate/w0/eval.json", ev(run / "ablate/w0/model", 1.42, 1.25, 0.25))


def _ablate(run: Path) -> None:
    _write(run / "ablate/ablate.json", {
        "version": 1, "config": "config.yaml", "model": {"n_layers": 2}, "tokens": 60000.0,
        "configured_domain_weight": 0.51, "results": [
            {"domain_weight": w, "weights": {"legal": w, "news": 1 - w},
             "bpb": {"legal": 1.45 - 0.6 * w, "news": 1.22 + 0.2 * w ** 2}, "roles": SOURCES,
             "model": str(run / f"ablate/w{w:g}/model")} for w in (0, 0.51, 1)]})


def full_run(tmp_path: Path) -> Path:
    run = tmp_path / "legal-demo"
    for write in (_plan, _stats, _counts, _audit, _metrics, _eval, _ablate):
        write(run)
    return run


def _images(html: str) -> int:
    return html.count('src="data:image/png;base64,')


def test_full_report_is_self_contained(tmp_path, cli):
    run = full_run(tmp_path)
    code, out, err = cli("report", str(run), "--json")
    assert code == 0, err
    result = json.loads(out)
    page = run / "report" / "index.html"
    assert result["path"] == str(page) and page.exists()
    html = page.read_text(encoding="utf-8")

    for sid in ("plan", "data", "tokenizer", "training", "eval", "probes", "ablation"):
        assert f'<section id="{sid}">' in html
        assert result["sections"][sid]["complete"], result["sections"][sid]["hints"]
    # plan, drops, tokens, epochs, bytes/token, loss, eval bpb, probes, ablation
    assert _images(html) == 9
    for name in ("plan.png", "drops.png", "loss.png", "eval_bpb.png", "ablation.png"):
        assert (run / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing to fetch and nothing to run: no scripts, no external links or images
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert not re.search(r'(src|href)="(https?:)?//', html)
    # the numbers made it onto the page: eval vs baseline, domain-term splits, probe accuracy
    assert "0.9100" in html and "1.4200" in html and "-35.9%" in html
    assert "␣res|␣judicata" in html and "75.0%" in html
    assert "run <code>domainlm" not in html
    assert not list((run / "report").glob(".*tmp*"))


def test_missing_inputs_say_which_stage_to_run(tmp_path, cli):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text("name: fresh\n")  # what `domainlm plan CONFIG` writes first
    code, out, err = cli("report", str(run))
    assert code == 0, err
    html = (run / "report" / "index.html").read_text(encoding="utf-8")
    assert _images(html) == 0
    for cmd in ("domainlm plan CONFIG", "domainlm prepare CONFIG", "domainlm tokenizer CONFIG",
                "domainlm train CONFIG", f"domainlm eval {run}"):
        assert f"run <code>{cmd}</code>" in html, cmd
        assert cmd in out
    assert 'id="ablation"' not in html  # no ablation run: no section

    # partial run: plan and training only; a corrupt eval.json is a hint, not a crash
    _plan(run)
    _metrics(run, steps=60)
    (run / "eval").mkdir()
    (run / "eval/eval.json").write_text("{not json", encoding="utf-8")
    _write(run / "tokenizer/audit.json", {"version": 99})  # a shape this version does not know
    result = build_report(run)
    html = (run / "report" / "index.html").read_text(encoding="utf-8")
    s = result["sections"]
    assert s["plan"]["complete"] and s["training"]["complete"]
    assert not s["data"]["complete"] and not s["eval"]["complete"]
    assert "eval/eval.json: not a valid EvalOutput" in html
    assert "another domainlm version" in " ".join(s["tokenizer"]["hints"])
    assert _images(html) == 3  # plan, epochs (planned and trained), loss
    assert sorted(p.name for p in (run / "report").glob("*.png")) == ["epochs.png", "loss.png", "plan.png"]


def test_eval_without_baseline_or_probes(tmp_path):
    run = tmp_path / "r"
    _eval(run, baseline=False)
    ev = json.loads((run / "eval/eval.json").read_text())
    ev["probes"] = None
    _write(run / "eval/eval.json", ev)
    result = build_report(run)
    assert result["sections"]["eval"]["complete"]
    assert "--probes FILE" in " ".join(result["sections"]["probes"]["hints"])
    assert "No baseline model" in (run / "report/index.html").read_text(encoding="utf-8")


def test_not_a_directory(tmp_path, cli):
    code, _, err = cli("report", str(tmp_path / "nope"))
    assert code == 2 and "no such run directory" in err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def test_page_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    run = full_run(tmp_path)
    page = Path(build_report(run)["path"])
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--window-size=1200,3000", f"--screenshot={shot}", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    # page errors reach the log as "...:CONSOLE(line)] "Uncaught ..."" or console error lines
    errors = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not errors, errors

    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(shot))
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    # a blank page is one colour; charts and tables give many
    assert pixels[..., :3].std() > 0.05
