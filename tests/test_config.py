"""Run config: every shipped recipe loads; bad configs give one line per problem with the key path."""

from pathlib import Path

import pytest
import yaml

from domainlm.config import load_config, write_resolved
from domainlm.errors import ConfigError, UserError

RECIPES = sorted((Path(__file__).parents[1] / "src" / "domainlm" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    from domainlm.run import quick_config

    cfg = load_config(path)
    assert cfg.sources and abs(sum(s.weight for s in cfg.sources) - 1) < 1e-9
    quick = quick_config(cfg)  # recipes/overlays/quick.yaml on top
    # Quick follows its plan like the demo: a small FLOPs budget, no token count, the config's own model keys.
    assert quick.name == f"{cfg.name}-quick" and quick.model == cfg.model and quick.train.max_tokens is None
    assert all(s.max_files <= 400 for s in quick.sources) and quick.budget.flops == 2e11 and not quick.budget.hours


def test_default_is_the_legal_demo():
    cfg = load_config(None)
    assert cfg.name == "legal-demo"
    assert {s.role for s in cfg.sources} == {"domain", "general"}


def _write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


BASE = {
    "name": "t",
    "sources": [
        {"name": "a", "role": "domain", "weight": 0.5, "input": "a/*.txt"},
        {"name": "b", "role": "general", "weight": 0.5, "input": "b/*.txt"},
    ],
}


def test_resolved_config_written(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    out = write_resolved(cfg, tmp_path / "run")
    again = yaml.safe_load(out.read_text())
    assert again["train"]["seq_len"] == cfg.train.seq_len
    assert again["sources"][0]["input"] == str(tmp_path / "a/*.txt")  # relative to the config file


@pytest.mark.parametrize(
    "patch,expect",
    [
        ({"budget": {"mfu": 1.5}}, "budget.mfu"),
        ({"budget": {"law": "nope"}}, "budget.law"),
        ({"budget": {"flops": "lots"}}, "budget.flops"),
        ({"train": {"seq_len": "long"}}, "train.seq_len"),
        ({"trian": {}}, "trian: unknown key"),
        ({"model": {"d_modle": 64}}, "model.d_modle: unknown key"),
        ({"tokenizer": {"kind": "wordpiece"}}, "tokenizer.kind"),
        # across fields, at load (the batch's split over processes waits for the world size, at training)
        ({"model": {"d_model": 64, "n_heads": 3}}, "model.n_heads: 3 does not divide model.d_model 64"),
        ({"model": {"n_heads": 4, "n_kv_heads": 3}}, "model.n_kv_heads: 3 does not divide model.n_heads 4"),
        ({"train": {"seq_len": 32, "tokens_per_step": 100}}, "train.tokens_per_step: 100 is not a multiple of"),
        ({"train": {"seq_len": 32, "micro_batch": 4, "tokens_per_step": 192}}, "do not divide into train.micro_batch"),
        ({"model": {"max_position_embeddings": 16}, "train": {"seq_len": 32}}, "train.seq_len: 32 is longer than"),
    ],
)
def test_bad_keys_name_the_path(tmp_path, patch, expect):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, {**BASE, **patch}))
    assert any(expect in p for p in e.value.problems), e.value.problems
    assert all(p.startswith(str(tmp_path / "c.yaml")) for p in e.value.problems)


def test_source_problems(tmp_path):
    bad = {**BASE, "sources": [dict(BASE["sources"][0], weight=0.7), dict(BASE["sources"][1], weight=-0.1)]}
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, bad))
    assert any("sources[1].weight" in p for p in e.value.problems)
    dup = {**BASE, "sources": [BASE["sources"][0], dict(BASE["sources"][1], name="a")]}
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, dup))
    assert any("sources" in p and "'a'" in p for p in e.value.problems)
    sum_bad = {**BASE, "sources": [BASE["sources"][0], dict(BASE["sources"][1], weight=0.4)]}
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, sum_bad))
    assert any("sum to 1" in p for p in e.value.problems)


def test_several_problems_one_line_each(tmp_path, cli):
    p = _write(tmp_path, {**BASE, "budget": {"mfu": 2, "gpus": 0}, "bogus": 1})
    code, _, err = cli("plan", str(p))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error:") for line in lines)
    assert "Traceback" not in err


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsources: [\n  {name: a\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(p)


def test_missing_config_file(tmp_path, cli):
    code, _, err = cli("plan", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file not found" in err


def test_plan_with_config_writes_run_dir(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = {**BASE, "budget": {"flops": 1e18}, "tokenizer": {"vocab_size": 4096}}
    data["sources"] = [dict(s, unique_tokens=1e6) for s in BASE["sources"]]
    code, out, err = cli("plan", str(_write(tmp_path, data)))
    assert code == 0, err
    run = tmp_path / "runs" / "t"
    assert (run / "plan.json").exists() and (run / "plan.png").exists() and (run / "config.yaml").exists()
    import json

    plan = json.loads((run / "plan.json").read_text())
    assert plan["model"]["vocab_size"] == 4096
    assert plan["sources"]["a"]["epochs"] == pytest.approx(0.5 * plan["tokens"] / 1e6)


def test_cpu_probe_is_measured_once_per_run(tmp_path, monkeypatch):
    from domainlm.plan import planner
    from domainlm.plan.command import run_plan

    calls = []

    def fake_probe():
        calls.append(1)
        return {"flops_per_s": 4e10 * len(calls)}

    monkeypatch.setattr(planner, "measure_cpu_flops", fake_probe)
    monkeypatch.chdir(tmp_path)
    p = _write(tmp_path, {**BASE, "budget": {"gpu": "cpu", "hours": 0.1}})
    first, _ = run_plan(p)
    second, _ = run_plan(p)
    assert len(calls) == 1
    assert second["compute"]["measured_flops_per_s"] == first["compute"]["measured_flops_per_s"] == 4e10
    assert second["params"] == first["params"]
