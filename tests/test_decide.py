"""`domainlm decide`: from scratch vs the general model continued vs the general model as is, at equal tokens, on a
tiny prepared run (documents, tokenizer, token files) with a tiny non-domainlm base model (its own BPE)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from crashkit import KILLED, domainlm, stamps
from domainlm import decide
from domainlm.config import load_config, write_resolved
from domainlm.errors import UserError
from outputs_check import check_outputs
from test_train_fixtures import (  # noqa: F401 (one_thread: autouse fixture)
    LEGAL,
    NEWS,
    make_tiny_model,
    make_tokenizer,
    one_thread,
)

STEPS = 6
PROBES = [{"context": "The licensee shall", "answer": "indemnify", "distractors": ["compliment", "entertain"]},
          {"context": "This license is irrevocable, royalty-free and", "answer": "worldwide",
           "distractors": ["sideways", "yesterday"]}]
TOKENS_PER_STEP = 8 * 32


def _write_docs(folder: Path, docs: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": d, "metadata": {}}) + "\n")


def prepared_run(tmp: Path) -> Path:
    """A prepared run (documents, stats, the run's tokenizer and its token files) and its config; returns the
    config path."""
    from domainlm.data.tokenize import tokenize

    run = tmp / "run"
    make_tokenizer(run / "tokenizer", 300)
    rng = np.random.default_rng(0)
    for name, texts in (("legal", LEGAL), ("news", NEWS)):
        for split, n in (("train", 40), ("val", 10)):
            _write_docs(run / "data" / name / split, [" ".join(rng.choice(texts, size=2)) for _ in range(n)])
    counts = {"input": "test", "docs_in": 50, "bytes_in": 0, "docs_out": 50, "bytes_out": 0, "train_docs": 40,
              "train_bytes": 0, "val_docs": 10, "val_bytes": 0, "drops": {}, "invalid_utf8_replaced": 0,
              "decoded_cp1252": 0, "malformed_lines": 0, "malformed_at": []}  # what `domainlm tokenize` reads
    (run / "data" / "stats.json").write_text(json.dumps({"version": 1, "fingerprint": "test", "tasks": 1,
                                                         "sources": {"legal": counts, "news": counts}}))
    tokenize(run)
    cfg = {
        "name": "tiny", "run_dir": str(run),
        "sources": [{"name": "legal", "role": "domain", "weight": 0.5, "input": "package:licensedcode"},
                    {"name": "news", "role": "general", "weight": 0.5, "input": "package:bbc-news"}],
        "tokenizer": {"vocab_size": 300, "sample_bytes": 100_000},
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
        "train": {"seq_len": 32, "micro_batch": 4, "tokens_per_step": TOKENS_PER_STEP,
                  "max_tokens": STEPS * TOKENS_PER_STEP, "lr": 1e-2, "warmup_steps": 2, "eval_every": 100,
                  "checkpoint_every": 100, "eval_tokens": 128},
        "eval": {"max_bytes_per_source": 2000, "probes": str(tmp / "probes.jsonl")},
    }
    (tmp / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBES), encoding="utf-8")
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    write_resolved(load_config(path), run)  # as `domainlm plan`/`prepare` do
    return path


@pytest.fixture(scope="module")
def decided(tmp_path_factory):
    """A pristine prepared run (for the crash test), and a copy with `decide` run on it once, in-process."""
    from rich.console import Console

    tmp = tmp_path_factory.mktemp("decide")
    pristine = prepared_run(tmp / "pristine")
    base = make_tiny_model(tmp / "base", NEWS)  # a general model: another architecture's folder, its own BPE
    extra = tmp / "extra"
    extra.mkdir()
    (extra / "a.txt").write_text(LEGAL[0] + " " + NEWS[1], encoding="utf-8")
    (extra / "b.txt").write_text(LEGAL[3] + " " + LEGAL[4], encoding="utf-8")
    shutil.copytree(tmp / "pristine", tmp / "done")
    cfg = tmp / "done" / "tiny.yaml"
    cfg.write_text(pristine.read_text().replace(str(tmp / "pristine"), str(tmp / "done")))
    texts = [f"extra={extra}"]
    result = decide.run_decide(cfg, base=base, extend_vocab=8, texts=texts, base_tokens=1e6,
                               console=Console(quiet=True))
    return {"pristine": pristine, "cfg": cfg, "base": base, "texts": texts, "result": result, "tmp": tmp}


def test_three_arms_and_the_extended_one_at_equal_tokens(decided):
    d, base = decided["result"], decided["base"]
    run = Path(d["run_dir"])
    assert list(d["arms"]) == ["scratch", "continued", "continued-vocab8", "base"]
    assert json.loads((run / "decide" / "decide.json").read_text()) == d
    tokens = STEPS * TOKENS_PER_STEP
    assert d["tokens"] == tokens
    for arm in ("scratch", "continued", "continued-vocab8"):
        r = d["arms"][arm]
        assert r["trained_tokens"] == tokens  # equal training tokens
        assert r["flops_run"] == 6 * r["params"] * tokens  # 6·N·D
    assert d["arms"]["base"]["trained_tokens"] == 0 and d["arms"]["base"]["flops_run"] == 0
    # the base's pretraining (--base-tokens) counts in the total of the arms built on it, not in scratch's
    assert d["base"]["flops"] == 6 * d["base"]["params"] * 1e6
    assert d["arms"]["continued"]["flops_total"] == d["arms"]["continued"]["flops_run"] + d["base"]["flops"]
    assert d["arms"]["scratch"]["flops_total"] == d["arms"]["scratch"]["flops_run"]
    ext = d["arms"]["continued-vocab8"]["extension"]
    assert ext["added"] == 8 and ext["vocab"] == ext["base_vocab"] + 8
    assert d["arms"]["continued-vocab8"]["params"] == d["arms"]["continued"]["params"] + 8 * 32 * 2  # emb + head
    # the continued arms start from the base: their model folders have the base's architecture and tokenizer
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(run / "decide" / "continued" / "model")) == \
        len(AutoTokenizer.from_pretrained(base))
    for arm, r in d["arms"].items():
        assert set(r["bpb"]) == {"legal", "news", "extra"}, arm
        assert all(0 < v < 20 for v in r["bpb"].values())
        assert r["probes"]["items"] > 0
        ev = json.loads((run / "decide" / arm / "eval.json").read_text())
        for s in ev["sources"].values():  # per-document bits add up to the text's total
            assert sum(s["doc_bits"]) == pytest.approx(s["nll_bits"], rel=1e-9)
            assert sum(s["doc_bytes"]) == s["bytes"]


def test_every_json_decide_writes_has_a_model(decided):
    """decide.json, each arm's eval.json and training summary, the extended base's extension.json and audit.json,
    the base tokenizer's counts.json: all load through their models (outputs.py)."""
    found = check_outputs(Path(decided["result"]["run_dir"]))
    assert {"decide/decide.json", "decide/scratch/eval.json", "decide/continued/logs/train.json",
            "decide/continued-vocab8/base/extension.json", "decide/continued-vocab8/base/audit.json",
            "logs/train.json"} <= set(found)
    ext = found["decide/continued-vocab8/base/extension.json"]
    assert ext.added == decided["result"]["arms"]["continued-vocab8"]["extension"]["added"] == len(ext.tokens)


def test_verdict_names_the_winner_with_a_paired_interval(decided):
    d = decided["result"]
    for name, t in d["texts"].items():
        ranked = sorted(d["arms"], key=lambda a: d["arms"][a]["bpb"][name])
        assert t["winner"] == ranked[0] and t["runner_up"] == ranked[1]
        m = t["margin"]
        assert m["value"] == pytest.approx(d["arms"][ranked[1]]["bpb"][name] - d["arms"][ranked[0]]["bpb"][name])
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1]
        assert t["verdict"].startswith(f"{name}: {ranked[0]} wins by")
    assert d["verdict"].count("wins by") == 3


def test_paired_margin_by_hand():
    """Two documents: the margin is Σ(bits_l − bits_w)/Σ bytes, and with every document's difference equal
    per byte the bootstrap interval collapses onto it."""
    m = decide.paired_margin([30.0, 12.0], [20.0, 8.0], [10, 4])
    assert m["value"] == pytest.approx((10 + 4) / 14)
    assert m["ci95"] == pytest.approx([1.0, 1.0])
    m = decide.paired_margin([1.0, 10.0, 3.0], [2.0, 4.0, 3.0], [1, 1, 1])  # diffs −1, 6, 0
    assert m["value"] == pytest.approx(5 / 3)
    assert -1 <= m["ci95"][0] < m["value"] < m["ci95"][1] <= 6


def test_rerun_redoes_nothing(decided):
    from rich.console import Console

    run = Path(decided["result"]["run_dir"])
    before = stamps(run, "model", "decide")
    again = decide.run_decide(decided["cfg"], base=decided["base"], extend_vocab=8, texts=decided["texts"],
                              base_tokens=1e6, console=Console(quiet=True))
    assert again == decided["result"]
    after = stamps(run, "model", "decide")
    assert {k: v for k, v in after.items() if k != "decide/decide.json"} == \
        {k: v for k, v in before.items() if k != "decide/decide.json"}


def test_killed_between_arms_does_not_redo_finished_arms(decided, tmp_path):
    """SIGKILL after the second arm (scratch is already trained: copied from the finished run), rerun in-process:
    the finished arms are not redone and the numbers are the uninterrupted run's."""
    from rich.console import Console

    shutil.copytree(decided["tmp"] / "pristine", tmp_path / "c")
    run, done_run = tmp_path / "c" / "run", Path(decided["result"]["run_dir"])
    for part in ("model", "checkpoints", "logs"):
        shutil.copytree(done_run / part, run / part)
    shutil.copy2(done_run / ".stages" / "train.json", run / ".stages" / "train.json")
    cfg = tmp_path / "c" / "tiny.yaml"
    cfg.write_text(decided["pristine"].read_text().replace(str(decided["tmp"] / "pristine"), str(tmp_path / "c")))
    args = ["decide", str(cfg), "--base", str(decided["base"]), "--text", decided["texts"][0], "--base-tokens", "1e6"]
    proc = domainlm(args, fault="decide.arm_done:2", fault_dir=tmp_path)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    assert not (run / "decide" / "decide.json").exists()
    done = stamps(run, "model", "decide/scratch", "decide/continued")
    assert "decide/continued/eval.json" in done and "decide/continued/model/model.safetensors" in done
    got = decide.run_decide(cfg, base=decided["base"], texts=decided["texts"], base_tokens=1e6,
                            console=Console(quiet=True))
    assert {k: v for k, v in stamps(run, "model", "decide/scratch", "decide/continued").items() if k in done} == done
    ref = decided["result"]["arms"]
    assert list(got["arms"]) == ["scratch", "continued", "base"]
    for arm in got["arms"]:  # the same numbers as the uninterrupted run
        assert got["arms"][arm]["bpb"] == pytest.approx(ref[arm]["bpb"], rel=1e-9)


def test_bad_inputs(decided, tmp_path):
    from rich.console import Console

    with pytest.raises(UserError, match="--base: no general model given"):
        decide.run_decide(decided["pristine"], console=Console(quiet=True))
    with pytest.raises(UserError, match="--text"):
        decide.run_decide(decided["pristine"], base=decided["base"], texts=[f"x={tmp_path / 'nope'}"],
                          console=Console(quiet=True))


def test_report_section(decided):
    from domainlm.pipeline import catalog
    from domainlm.report.html import Report, decide_section

    run = Path(decided["result"]["run_dir"])
    sec = decide_section(Report(run, catalog()))
    assert sec.title == "From scratch or continued?" and sec.complete and sec.images == ["decide.png"]
    page = "".join(sec.body)
    for arm in decided["result"]["arms"]:
        assert f"<b>{arm}</b>" in page
    assert "wins by" in page
    assert "continued-vocab8: 8 domain tokens added to the base tokenizer" in page  # the extension's audit


def test_extend_vocab_in_the_config(decided, tmp_path):
    """`tokenizer.extend_vocab: N` with `train.init_from`: `domainlm tokenize` builds <run>/base-extended/ (its
    audit: bytes per token before and after) and tokenizes with it; the run then trains from it."""
    from rich.console import Console
    from transformers import AutoTokenizer

    from domainlm.model.base import base_of
    from domainlm.tokenize import run_tokenize

    shutil.copytree(decided["tmp"] / "pristine", tmp_path / "c")
    data = yaml.safe_load(decided["pristine"].read_text().replace(str(decided["tmp"] / "pristine"),
                                                                  str(tmp_path / "c")))
    data["train"]["init_from"] = str(decided["base"])
    data["tokenizer"]["extend_vocab"] = 6
    cfg = tmp_path / "c" / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(data))
    res = run_tokenize(cfg, Console(quiet=True))
    ext = tmp_path / "c" / "run" / "base-extended"
    assert base_of(load_config(cfg)).path == ext.resolve()
    assert res["counts"]["vocab_size"] == len(AutoTokenizer.from_pretrained(decided["base"])) + 6
    audit = json.loads((ext / "audit.json").read_text())
    legal = audit["bytes_per_token"]["legal"]
    assert legal["bytes_per_token"] > legal["baseline_bytes_per_token"]  # after > before on domain text
    ext_arm = decided["result"]["arms"]["continued-vocab8"]["extension"]["bytes_per_token"]["legal"]
    assert ext_arm["after"] > ext_arm["before"]
    assert {"base-extended/extension.json", "base-extended/audit.json"} <= set(check_outputs(tmp_path / "c" / "run"))


def test_a_copy_of_the_runs_tokenizer_shares_its_token_files(decided, tmp_path):
    """The demo's general model (ablate/w0) ships the run's own tokenizer: its continued arm reads tokens/."""
    from domainlm.rundir import RunDir

    run = RunDir(decided["result"]["run_dir"])
    shutil.copytree(run.tokenizer, tmp_path / "copy")
    assert run.tokens_for(tmp_path / "copy") == run.root / "tokens"
    assert run.tokens_for(decided["base"]).name.startswith("tokens-")


def test_train_record_of_a_run_without_logs_train_json(decided, tmp_path):
    """The training summary is read from logs/train.json only, never from the stage marker (bookkeeping, not
    data): a run directory without it is a one-line error saying how to get it."""
    run = Path(decided["result"]["run_dir"])
    summary = json.loads((run / "logs" / "train.json").read_text())
    (tmp_path / ".stages").mkdir()
    (tmp_path / ".stages" / "train.json").write_text(json.dumps({"fingerprint": "f", "finished": 1.0, **summary}))
    assert decide.train_record(run).params == decided["result"]["arms"]["scratch"]["params"]
    with pytest.raises(UserError) as e:
        decide.train_record(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'logs' / 'train.json'}: no training summary; run `domainlm train`")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ seeds, changed inputs


def _copy_done(decided, dst: Path) -> Path:
    """The finished decide run, copied (its config pointing at the copy)."""
    shutil.copytree(decided["tmp"] / "done", dst)
    cfg = dst / "tiny.yaml"
    cfg.write_text(decided["cfg"].read_text().replace(str(decided["tmp"] / "done"), str(dst)))
    return cfg


def _models(run: Path) -> dict[str, bytes]:
    """Each trained arm's exported weights, by arm folder (scratch: the run's own model)."""
    out = {"scratch": (run / "model" / "model.safetensors").read_bytes()}
    for p in sorted((run / "decide").glob("*/model/model.safetensors")):
        out[p.parent.parent.name] = p.read_bytes()
    return out


def test_seeds_then_changed_inputs_retrain_exactly_the_affected_arms(decided, tmp_path):
    """--seeds 2 trains one more model per trained arm (seed 1, in <arm>-seed1/) and reuses seed 0's; the margins
    get hierarchical intervals and the arms their per-seed points. Then a rerun with another --lr retrains the
    continued arms only, another --base the continued arms only, another train.seed every trained arm."""
    from rich.console import Console

    from domainlm.evaluate import bootstrap

    cfg = _copy_done(decided, tmp_path / "c")
    run = Path(decided["result"]["run_dir"].replace(str(decided["tmp"] / "done"), str(tmp_path / "c")))
    kw = {"texts": decided["texts"], "base_tokens": 1e6, "console": Console(quiet=True)}
    before = _models(run)
    d = decide.run_decide(cfg, base=decided["base"], seeds=2, **kw)
    after = _models(run)
    assert set(after) == set(before) | {"scratch-seed1", "continued-seed1"}
    assert all(after[k] == before[k] for k in before)  # seed 0's models reused
    assert after["scratch-seed1"] != after["scratch"] and after["continued-seed1"] != after["continued"]
    assert d["seeds"] == [0, 1] and list(d["arms"]) == ["scratch", "continued", "base"]
    for arm in ("scratch", "continued"):
        pts = d["arms"][arm]["seeds"]
        assert [p["seed"] for p in pts] == [0, 1]
        for name, v in d["arms"][arm]["bpb"].items():
            assert v == pytest.approx(np.mean([p["bpb"][name] for p in pts]))
    assert "seeds" not in d["arms"]["base"]
    for name, t in d["texts"].items():
        evs = {a: [json.loads((run / "decide" / f / "eval.json").read_text())["sources"][name]
                   for f in ((a, f"{a}-seed1") if a != "base" else (a,))] for a in (t["winner"], t["runner_up"])}
        ref = bootstrap.ratio_diff(np.array([e["doc_bits"] for e in evs[t["runner_up"]]]),
                                   np.array([e["doc_bits"] for e in evs[t["winner"]]]),
                                   np.array(evs[t["winner"]][0]["doc_bytes"]))
        assert t["margin"]["value"] == pytest.approx(ref["value"]) and t["margin"]["ci95"] == pytest.approx(ref["ci95"])
        assert "and documents" in t["verdict"]

    def rerun(**change):
        nonlocal before
        before = _models(run)
        data = yaml.safe_load(cfg.read_text())
        data["train"].update(change.pop("train", {}))
        cfg.write_text(yaml.safe_dump(data))
        decide.run_decide(cfg, **{"base": decided["base"], "seeds": 2, **change}, **kw)
        now = _models(run)
        return {k for k in now if now[k] != before.get(k)}

    continued = {"continued", "continued-seed1"}
    assert rerun(lr=5e-3) == continued
    other = tmp_path / "other-base"  # a general model of the same shape with other weights
    shutil.copytree(decided["base"], other)
    from safetensors.torch import load_file, save_file

    w = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in w.items()}, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert rerun(lr=5e-3, base=other) == continued
    # seeds 1, 2 now: seed 1 in the arms' own folders, seed 2 in new -seed2 ones; -seed1's models are left alone
    assert rerun(lr=5e-3, base=other, train={"seed": 1}) == {"scratch", "continued", "scratch-seed2",
                                                             "continued-seed2"}


def test_ablate_rerun_with_changed_inputs_and_seeds(decided, tmp_path):
    """`ablate` with seeds: each weight trained twice (w<weight>/ and w<weight>-seed1/), intervals over seeds and
    documents per source; another lr retrains every variant."""
    from rich.console import Console

    from domainlm.ablate import run_ablate

    cfg = _copy_done(decided, tmp_path / "a")
    run = tmp_path / "a" / "run"
    ab = run_ablate(cfg, "0,1", seeds=2, console=Console(quiet=True))
    assert [r["domain_weight"] for r in ab["results"]] == [0.0, 1.0]
    for r in ab["results"]:
        assert [p["seed"] for p in r["seeds"]] == [0, 1]
        for name, v in r["bpb"].items():
            lo, hi = r["ci95"][name]
            assert lo <= v <= hi and v == pytest.approx(np.mean([p["bpb"][name] for p in r["seeds"]]))
    w = {p.parent.parent.name: p.read_bytes() for p in (run / "ablate").glob("*/model/model.safetensors")}
    assert set(w) == {"w0", "w0-seed1", "w1", "w1-seed1"}
    assert w["w0"] != w["w0-seed1"]
    data = yaml.safe_load(cfg.read_text())
    data["train"]["lr"] = 5e-3
    cfg.write_text(yaml.safe_dump(data))
    run_ablate(cfg, "0,1", seeds=2, console=Console(quiet=True))
    w2 = {p.parent.parent.name: p.read_bytes() for p in (run / "ablate").glob("*/model/model.safetensors")}
    assert all(w2[k] != w[k] for k in w)
