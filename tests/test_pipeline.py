"""The stage registry (pipeline.py): what derives from it — run order, schemas, hints, report sections, the docs."""

from pathlib import Path

import pytest

from domainlm import pipeline
from domainlm.config import load_config
from domainlm.outputs import Output as OutputModel
from domainlm.rundir import RunDir

DOC = Path(__file__).parents[1] / "docs" / "architecture.md"


def test_architecture_doc_tables_are_the_registry():
    text = DOC.read_text(encoding="utf-8")
    assert pipeline.stages_table() in text, "run `python -m domainlm.pipeline` to regenerate docs/architecture.md"
    assert pipeline.outputs_table() in text, "run `python -m domainlm.pipeline` to regenerate docs/architecture.md"


def test_every_output_is_a_rundir_name_claimed_once():
    names = {v for k, v in vars(RunDir).items() if k.isupper() and isinstance(v, str)}
    seen = {}
    for d in pipeline.REGISTRY:
        for o in d.outputs:
            assert o.rel in names, f"{d.name}: {o.rel} is not spelled in RunDir"
            assert o.rel not in seen, f"{o.rel} declared by {seen[o.rel]} and {d.name}"
            seen[o.rel] = d.name
    # every JSON output of a stage has a model
    assert {rel for rel in seen if rel.endswith(".json")} <= set(pipeline.SCHEMAS) | {RunDir.TASKS}


def test_run_order_follows_the_registry_and_the_config():
    cfg = load_config(None)  # the packaged demo: both roles, no downstream task
    names = [d.name for d in pipeline.run_order(cfg)]
    assert names == ["plan", "prepare", "tokenizer", "tokenize", "plan", "train", "eval", "baseline", "report"]
    titles = [d.title or d.name for d in pipeline.run_order(cfg)]
    assert titles[4] == "plan (real counts)"
    one_role = cfg.model_copy(update={"sources": [s for s in cfg.sources if s.role == "domain"]})
    assert "baseline" not in [d.name for d in pipeline.run_order(one_role)]
    with_task = cfg.model_copy(update={"downstream": cfg.downstream.model_copy(update={"task": "licensedb"})})
    assert [d.name for d in pipeline.run_order(with_task)][-2:] == ["downstream", "report"]


class _Toy(OutputModel):
    n: int


def test_register_adds_schema_hint_and_order(monkeypatch):
    monkeypatch.setattr(pipeline, "REGISTRY", list(pipeline.REGISTRY))
    decl = pipeline.register(pipeline.StageDecl("toy", "domainlm toy CONFIG", "toy.py",
                                                (pipeline.Output("toy/toy.json", _Toy),), run=lambda c: None))
    try:
        assert pipeline.SCHEMAS["toy/toy.json"] is _Toy and pipeline.PRODUCERS["toy/toy.json"] == "domainlm toy CONFIG"
        names = [d.name for d in pipeline.run_order(load_config(None))]
        assert names[-2:] == ["toy", "report"]
        with pytest.raises(ValueError, match="registered already"):
            pipeline.register(decl)
    finally:
        pipeline.unregister("toy")
    assert "toy/toy.json" not in pipeline.SCHEMAS


def test_a_missing_output_names_its_command(tmp_path):
    from domainlm.report.html import Report

    r = Report(tmp_path, pipeline.catalog())
    data, why = r.read(RunDir.DECIDE)
    assert data is None and why == f"no {RunDir.DECIDE} yet: run `domainlm decide CONFIG --base GENERAL_MODEL`"
    data, why = r.read("tokens-0123456789ab/counts.json")  # another tokenizer's token folder: tokenize writes it
    assert data is None and "domainlm tokenize CONFIG" in why


def test_one_token_from_a_raw_file_to_the_loss_in_at_most_eight_files():
    """docs/architecture.md's walk from a raw file to the training loss names at most 8 files, all of which exist, and
    the loss function it names is in the file it names."""
    import re

    text = DOC.read_text(encoding="utf-8")
    walk = text[text.index("Follow one token"):].split("\n\n")[0]
    files = list(dict.fromkeys(re.findall(r"`([\w/]+\.py)`", walk)))
    src = DOC.parents[1] / "src" / "domainlm"
    assert 4 <= len(files) <= 8, files
    for f in files:
        assert (src / f).is_file(), f
    assert "def next_token_loss(" in (src / "train" / "step.py").read_text(encoding="utf-8")
