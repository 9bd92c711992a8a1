"""`domainlm finetune --head classification`: a sequence-classification head on a decoder export and on an
encoder export, through the one training step and driver; exact resume after SIGKILL; the comparison's metrics
(accuracy, macro-F1, the majority class) against hand-computed values; the report section."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from crashkit import KILLED, python
from domainlm.errors import UserError
from domainlm.evaluate import tasks as T
from domainlm.finetune import classify as C
from domainlm.finetune.loop import FinetuneArgs
from outputs_check import check_outputs
from test_train_fixtures import make_tiny_model, make_tokenizer, one_thread, weights  # noqa: F401

TEXTS = [
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "This program is free software; you can redistribute it under the terms of the GNU General Public License.",
    "The team won the cup final on Saturday after a late goal in extra time.",
]
ARGS = FinetuneArgs(steps=4, batch_size=4, micro_batch=2, lr=1e-3, eval_every=2, checkpoint_every=2,
                    keep_checkpoints=3)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("decoder"), TEXTS * 20)


def make_tiny_encoder(out, texts):
    """An encoder folder AutoModelForMaskedLM loads (a random 2-layer ModernBERT, hidden 32, the architecture of
    model.objective masked), with our tiny BPE."""
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM

    tok = AutoTokenizer.from_pretrained(make_tokenizer(out, 400, texts))
    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           cls_token_id=tok.bos_token_id, sep_token_id=tok.eos_token_id)
    ModernBertForMaskedLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("encoder"), TEXTS * 20)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """LicenseDB items of both tasks (the name items are skipped by the classifier), license held out by license."""
    d = tmp_path_factory.mktemp("tasks")
    built = T.build(max_chars=60)
    return {"train": _write(d / "train.jsonl", built["train"][:32]), "val": _write(d / "val.jsonl", built["val"][:8]),
            "test": _write(d / "test.jsonl", built["test"][:16])}


def test_decoder_classifier_trains_exports_and_scores(decoder, task_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    s = C.finetune_classifier(decoder, task_files["train"], val=task_files["val"], out=tmp_path / "ft", args=ARGS)
    assert s["architecture"] == "LlamaForSequenceClassification" and s["examples"] == 16 and s["steps"] == 4
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft" / "model")  # plain transformers
    assert [model.config.id2label[i] for i in range(11)] == list(T.CATEGORIES)
    rows = [json.loads(x) for x in (tmp_path / "ft" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 4] and 0 <= s["val_accuracy"] <= 1
    items = T.load_test(C.TASK, task_files["test"])
    res = C.score_items(tmp_path / "ft" / "model", items)
    hits = [p["pred"] == p["gold"] for p in res["predictions"]]
    assert res["items"] == 8 and res["metrics"]["accuracy"]["value"] == pytest.approx(sum(hits) / len(hits))
    assert all(p["pred"] in T.CATEGORIES for p in res["predictions"])
    # A finished run with the same inputs is skipped; the head is the decoder's last real token (EOS).
    again = C.finetune_classifier(decoder, task_files["train"], val=task_files["val"], out=tmp_path / "ft", args=ARGS)
    assert again["fingerprint"] == s["fingerprint"]


def test_encoder_classifier_reads_the_first_token(encoder, task_files, tmp_path):
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(encoder)  # the input is an encoder export
    s = C.finetune_classifier(encoder, task_files["train"], out=tmp_path / "ft", args=ARGS)
    assert s["architecture"] == "ModernBertForSequenceClassification" and s["val_loss"] is None
    assert json.loads((tmp_path / "ft" / "model" / "config.json").read_text())["classifier_pooling"] == "mean"
    res = C.score_items(tmp_path / "ft" / "model", T.load_test(C.TASK, task_files["test"]))
    assert res["items"] == 8 and set(res["metrics"]) == {"accuracy", "macro_f1"}
    # Padding changes nothing: an example scored alone and in a padded batch gets the same logits.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "ft" / "model")
    model = C.load_classifier(tmp_path / "ft" / "model", None, tok.pad_token_id, 0)
    ex, _ = C.encode(tok, [C.Labelled("a", "short", "CLA"), C.Labelled("b", TEXTS[1], "CLA")], list(T.CATEGORIES),
                     64, "truncate")
    cpu = torch.device("cpu")
    batched = C.logits_of(model, ex, tok.pad_token_id, cpu, "fp32")
    alone = C.logits_of(model, ex[:1], tok.pad_token_id, cpu, "fp32")
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-4, atol=1e-5)


def test_resume_after_sigkill_equals_uninterrupted(decoder, task_files, tmp_path):
    code = (f"from domainlm.finetune.classify import finetune_classifier\n"
            f"from domainlm.finetune.loop import FinetuneArgs\n"
            f"finetune_classifier({str(decoder)!r}, {str(task_files['train'])!r}, out={str(tmp_path / 'ft')!r}, "
            f"args=FinetuneArgs(steps=4, batch_size=4, micro_batch=2, lr=1e-3, checkpoint_every=2))\n")
    killed = python(code, fault="finetune.step:3", fault_dir=tmp_path)  # after step 3; the last checkpoint is 2
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    assert not (tmp_path / "ft" / "model").exists()
    resumed = python(code)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "step 2" in resumed.stderr
    C.finetune_classifier(decoder, task_files["train"], out=tmp_path / "whole",
                          args=FinetuneArgs(steps=4, batch_size=4, micro_batch=2, lr=1e-3, checkpoint_every=2))
    a, b = weights(tmp_path / "ft" / "model"), weights(tmp_path / "whole" / "model")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    rows = [json.loads(x) for x in (tmp_path / "ft" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]


def test_metrics_against_hand_computed_values():
    gold = ["A", "A", "A", "B", "B", "C"]
    pred = ["A", "A", "B", "B", "C", "C"]
    # F1 per class = 2TP / (2TP + FP + FN): A 4/5, B 2/4, C 2/3 (Sokolova & Lapalme 2009, macro = their mean)
    assert T.macro_f1(gold, pred) == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)
    m = T.summarise(C.TASK, gold, pred)
    assert m["accuracy"]["value"] == pytest.approx(4 / 6)
    # always "A" (the majority class): accuracy 3/6; F1 of A = 6/9, of B and C 0
    assert T.macro_f1(gold, ["A"] * 6) == pytest.approx((6 / 9) / 3)


def test_compare_classifiers_majority_and_report(decoder, task_files, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(decoder, run / "model")  # a run directory: the result also goes to <run>/eval/classify.json
    code, out, err = cli("finetune", str(run), "--head", "classification", "--compare", str(decoder),
                         "--data", str(task_files["train"]), "--test", str(task_files["test"]), "--steps", "2",
                         "--batch-size", "4", "--lr", "1e-3", "--max-len", "24")
    assert code == 0, err
    assert json.loads((run / "finetune" / "classify" / "domain" / "finetune.json").read_text())["args"]["max_len"] == 24
    res = json.loads((run / "eval" / "classify.json").read_text())
    assert res["head"] == "classification" and list(res["tasks"]) == [C.TASK]
    r = res["tasks"][C.TASK]
    # Same base, data, steps and seed: identical classifiers, so the paired difference is exactly 0.
    assert r["domain_minus_general"]["accuracy"] == {"value": 0, "ci95": [0.0, 0.0]}
    gold = [p["gold"] for p in r["domain"]["predictions"]]
    top = max(set(gold), key=gold.count)
    assert r["majority_accuracy"] == pytest.approx(gold.count(top) / len(gold))
    assert r["majority_macro_f1"] == pytest.approx(T.macro_f1(gold, [r["majority_class"]] * len(gold)))
    assert "majori" in out  # the table row (rich may wrap the cell)
    found = check_outputs(run)  # every JSON file the comparison wrote, through its model
    assert {"eval/classify.json", "finetune/classify/compare.json", "finetune/classify/domain/finetune.json",
            "finetune/classify/general/finetune.json"} <= set(found)
    assert found["finetune/classify/domain/finetune.json"].head == "classification"

    from domainlm.pipeline import build_report

    page = build_report(run)
    assert page["sections"]["classify"]["complete"]
    html = (run / "report" / "index.html").read_text()
    assert "Downstream classification" in html and "macro_f1" in html and "majority class" in html


def test_bad_input(decoder, tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "Permissive"}\n{"prompt": "y"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected \"text\" and \"label\""):
        C.read_labelled(bad)
    good = _write(tmp_path / "good.jsonl", [{"text": "x", "label": "Permissive"}])
    with pytest.raises(UserError, match="--lora"):
        C.finetune_classifier(decoder, good, out=tmp_path / "o", args=FinetuneArgs(lora=True))
    code, _, err = cli("finetune", str(decoder), "--head", "nope", "--data", str(good))
    assert code == 2 and "--head: expected lm or classification" in err


def test_run_downstream_stage_compares_the_run_with_its_baseline(tmp_path, decoder, task_files):
    """`domainlm run`'s downstream stage on a run directory whose model and general-only baseline exist: both
    models fine-tuned the same way on the run's LicenseDB split (here a small one written beforehand; the stage
    writes the default split when there is none), eval/classify.json written; a rerun skips."""
    import io

    import yaml
    from rich.console import Console

    from domainlm.config import load_config
    from domainlm.finetune.downstream import run_downstream
    from domainlm.rundir import RunDir
    from test_train_fixtures import make_run

    cfg_path = make_run(tmp_path)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["sources"][0]["exclude_ids"] = "licensedb:test"
    raw["downstream"] = {"task": "licensedb-category", "steps": 2, "batch_size": 4, "max_len": 24}
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    assert cfg.sources[0].exclude_ids == "licensedb:test"  # a name, not a path relative to the config
    run = cfg.directory()
    shutil.copytree(decoder, run / "model")
    shutil.copytree(decoder, run / "ablate" / "w0" / "model")  # the general-only baseline's export
    (run / RunDir.TASK_DATA).mkdir(parents=True)
    for f in task_files.values():
        shutil.copy(f, run / RunDir.TASK_DATA / f.name)
    (run / RunDir.TASK_DATA / "balance.json").write_text("{}")
    out = io.StringIO()
    res = run_downstream(cfg, run, Console(file=out, width=200))
    assert res["head"] == "classification" and res["tasks"][C.TASK]["items"] == 8
    assert (run / RunDir.CLASSIFY_COMPARE).is_file() and "does not exclude" not in out.getvalue()
    assert res["models"] == {"domain": str(run / "model"), "general": str(run / "ablate" / "w0" / "model")}
    again = run_downstream(cfg, run, Console(file=out, width=200))
    assert again == json.loads((run / RunDir.CLASSIFY_COMPARE).read_text()) and "done already" in out.getvalue()


def test_exclude_ids_licensedb_test_drops_the_test_licenses():
    from domainlm.data.sources import _exclude

    split = T.split_licenses(T.load_licenses())
    test_key = next(k for k, v in split.items() if v == "test")
    train_key = next(k for k, v in split.items() if v == "train")
    files = [f"/r/licenses/{test_key}.LICENSE", f"/r/licenses/{train_key}.LICENSE"]
    assert _exclude(files, "/r", "licensedb:test", "sources[0].input") == files[1:]


def test_compare_with_seeds_warns_of_seen_test_items_and_scores_at_the_training_length(decoder, task_files, tmp_path,
                                                                                         cli, monkeypatch):
    """--seeds 2: each classifier fine-tuned twice (seed 0 in domain/, seed 1 in domain-seed1/); metrics are seed
    means with intervals over seeds and items, per-seed values listed. A domain run whose config reads LicenseDB
    without exclude_ids: one warning line. Test texts are cut to the --max-len the classifier trained with, and
    `domainlm eval` refuses the classifier export in one line."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(decoder, run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "leaky", "sources": [
        {"name": "legal", "role": "domain", "weight": 0.5, "input": "package:licensedcode"},
        {"name": "news", "role": "general", "weight": 0.5, "input": "package:bbc-news"}]}))
    lengths = []
    encode = C.encode

    def spy(tok, data, labels, max_len, *a, **k):
        lengths.append(max_len)
        return encode(tok, data, labels, max_len, *a, **k)

    monkeypatch.setattr(C, "encode", spy)
    code, out, err = cli("finetune", str(run), "--head", "classification", "--compare", str(decoder), "--data",
                         str(task_files["train"]), "--test", str(task_files["test"]), "--steps", "2", "--batch-size",
                         "4", "--lr", "1e-3", "--max-len", "24", "--seeds", "2")
    assert code == 0, err
    warn = [ln for ln in err.splitlines() if "saw the test items" in ln]
    assert len(warn) == 1 and "domain model" in warn[0] and "exclude_ids: licensedb:test" in warn[0], err
    assert set(lengths) == {24}  # training and scoring: one maximum length (the model's context is 64)
    res = json.loads((run / "eval" / "classify.json").read_text())
    assert res["seeds"] == [0, 1] and "2 fine-tuning seeds each" in res["verdict"]
    for label in ("domain", "general"):
        assert (run / "finetune" / "classify" / f"{label}-seed1" / "model" / "config.json").is_file()
        m = res["tasks"][C.TASK][label]
        for name, iv in m["metrics"].items():
            assert iv["value"] == pytest.approx(sum(p["metrics"][name] for p in m["seeds"]) / 2)
            assert iv["ci95"][0] <= iv["value"] <= iv["ci95"][1]
    assert json.loads((run / "finetune" / "classify" / "domain" / "finetune.json").read_text())["args"]["seed"] == 0
    assert json.loads((run / "finetune" / "classify" / "domain-seed1" / "finetune.json").read_text())["args"][
        "seed"] == 1
    code, _, err = cli("eval", str(run / "finetune" / "classify" / "domain" / "model"), "--text", f"x={tmp_path}")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "a classifier (LlamaForSequenceClassification)" in lines[0], err
