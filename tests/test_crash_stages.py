"""Fine-tuning, the scaling sweep and the ablation killed (SIGKILL) at their crash sites, then rerun: the
result equals an uninterrupted run's, and what was finished before the kill is not redone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from crashkit import KILLED, domainlm, python
from domainlm.outputs import Ablation
from domainlm.rundir import RunDir
from test_train_fixtures import make_run, make_tiny_model, run_dir, single_thread, weights

TEXTS = [
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "This program is free software; you can redistribute it under the terms of the GNU General Public License.",
    "The team won the cup final on Saturday after a late goal in extra time.",
]

FINETUNE = """
from pathlib import Path
from domainlm.finetune.loop import FinetuneArgs, finetune
args = FinetuneArgs(steps=6, batch_size=4, micro_batch=2, lr=1e-3, eval_every=3, checkpoint_every=2,
                    keep_checkpoints=3)
finetune(Path({model!r}), Path({data!r}), val=Path({data!r}), out=Path({out!r}), args=args)
"""


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_finetune_killed_mid_run_resumes_to_the_same_weights(tmp_path):
    model = make_tiny_model(tmp_path / "base", TEXTS * 20)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{TEXTS[i % 3][:40]}\n\nWhich category?",
                                        "response": ["Permissive", "Copyleft", "News"][i % 3]}) + "\n"
                            for i in range(12)))
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    for out in (ref, crashed):
        code = FINETUNE.format(model=str(model), data=str(data), out=str(out))
        proc = python(code, fault="finetune.step:5" if out == crashed else None, fault_dir=tmp_path)
        assert proc.returncode == (KILLED if out == crashed else 0), proc.stderr[-2000:]
    # killed after step 5: checkpoints of steps 2 and 4, no model
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert not (crashed / "model").exists() and not (crashed / "finetune.json").exists()
    proc = python(FINETUNE.format(model=str(model), data=str(data), out=str(crashed)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from" in proc.stderr and "at step 4" in proc.stderr
    a, b = weights(ref / "model"), weights(crashed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(crashed / "logs" / "metrics.jsonl") == _rows(ref / "logs" / "metrics.jsonl") or [
        {k: v for k, v in r.items() if k != "tokens_per_s"} for r in _rows(crashed / "logs" / "metrics.jsonl")
    ] == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in _rows(ref / "logs" / "metrics.jsonl")]


def _point_losses(run: Path) -> list[tuple]:
    return [(r["budget"], r["params"], r["loss"], r["val_loss"])
            for r in _rows(run / "scaling" / "points.jsonl")]


@pytest.mark.slow
def test_scaling_sweep_killed_between_and_inside_points(tmp_path):
    with single_thread():
        ref_cfg = make_run(tmp_path / "ref")  # checkpoints every 10 steps
    cfg = make_run(tmp_path / "crashed")
    sweep = ["scaling", str(cfg), "--budgets", "3e9,6e9", "--sizes", "3"]
    proc = domainlm(["scaling", str(ref_cfg), "--budgets", "3e9,6e9", "--sizes", "3"])
    assert proc.returncode == 0, proc.stderr[-2000:]

    # killed between points 1 and 2: point 1 is recorded
    proc = domainlm(sweep, fault="scaling.point_done:1", fault_dir=tmp_path)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    assert len(_point_losses(run_dir(cfg))) == 1
    first = Path(_rows(run_dir(cfg) / "scaling" / "points.jsonl")[0]["dir"])
    first_model = (first / "model" / "model.safetensors").stat().st_mtime_ns
    # killed inside point 2 at its step 25 (after its checkpoint at step 20)
    proc = domainlm(sweep, fault="train.step:25", fault_dir=tmp_path)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    assert "done already" in proc.stdout + proc.stderr  # point 1 was not retrained
    proc = domainlm(sweep)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from" in proc.stderr + proc.stdout and "at step 20" in proc.stderr + proc.stdout
    assert (first / "model" / "model.safetensors").stat().st_mtime_ns == first_model
    assert _point_losses(run_dir(cfg)) == _point_losses(run_dir(ref_cfg))
    ref_law = json.loads((run_dir(ref_cfg) / "scaling" / "law.json").read_text())
    law = json.loads((run_dir(cfg) / "scaling" / "law.json").read_text())
    assert law.get("approach3") == ref_law.get("approach3")


def _prepared_run(tmp: Path) -> Path:
    """A real prepared run (documents, tokenizer, tokens) of two small sources with a tiny model config."""
    import yaml

    from test_prepare import two_sources

    cfg = two_sources(tmp, 50)
    data = yaml.safe_load(cfg.read_text())
    data.update(tokenizer={"vocab_size": 300, "sample_bytes": 200_000, "audit_bytes": 20_000},
                model={"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
                train={"seq_len": 32, "micro_batch": 4, "tokens_per_step": 8 * 32, "max_tokens": 12 * 8 * 32,
                       "eval_every": 100, "checkpoint_every": 100},
                eval={"max_bytes_per_source": 4000})
    cfg.write_text(yaml.safe_dump(data))
    for args in (["prepare", str(cfg)], ["tokenizer", str(cfg)], ["tokenize", str(cfg)]):
        proc = domainlm(args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return cfg


@pytest.mark.slow
def test_ablation_killed_between_variants(tmp_path):
    ref_cfg = _prepared_run(tmp_path / "ref")
    cfg = tmp_path / "crashed" / "cfg.yaml"
    shutil.copytree(tmp_path / "ref", tmp_path / "crashed")
    cfg.write_text(ref_cfg.read_text().replace(str(tmp_path / "ref"), str(tmp_path / "crashed")))
    proc = domainlm(["ablate", str(ref_cfg), "--domain-weights", "0,1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = domainlm(["ablate", str(cfg), "--domain-weights", "0,1"], fault="ablate.variant_done:1",
                    fault_dir=tmp_path)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    assert not (run_dir(cfg) / "ablate" / "ablate.json").exists()
    w0 = run_dir(cfg) / "ablate" / "w0" / "model" / "model.safetensors"
    stamp = w0.stat().st_mtime_ns
    proc = domainlm(["ablate", str(cfg), "--domain-weights", "0,1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert w0.stat().st_mtime_ns == stamp  # the finished variant was not retrained
    ref = json.loads((run_dir(ref_cfg) / "ablate" / "ablate.json").read_text())
    got = json.loads((run_dir(cfg) / "ablate" / "ablate.json").read_text())
    assert [r.domain_weight for r in RunDir(run_dir(cfg)).load(RunDir.ABLATE, Ablation).results] == [0, 1]
    assert [r["bpb"] for r in got["results"]] == [r["bpb"] for r in ref["results"]]
