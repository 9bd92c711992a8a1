"""Resume checks its inputs (train/driver.py, train/checkpoint.py): a rerun whose inputs changed since its
checkpoints were written (learning rate, seed, base model, data, fine-tuning flags) discards them and trains
from scratch — to the weights of a fresh run with the new inputs — and says which keys changed; a rerun whose
inputs did not change resumes. `decide` and `ablate` reruns: tests/test_decide.py."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from domainlm.finetune.loop import FinetuneArgs, finetune
from domainlm.train import checkpoint as ckpt
from test_train_fixtures import (  # noqa: F401 (one_thread: autouse fixture)
    NEWS,
    clone_run,
    make_run,
    make_tiny_model,
    one_thread,
    run_dir,
    set_train,
    weights,
)

STEPS = 6


def _train(cfg) -> str:
    from domainlm.train.loop import run_training

    out = io.StringIO()
    run_training(cfg, console=Console(file=out, width=400))
    return out.getvalue()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run whose last checkpoint is its final step (what a rerun would resume from)."""
    cfg = make_run(tmp_path_factory.mktemp("train"), max_tokens=STEPS * 8 * 32, checkpoint_every=3, eval_every=100)
    _train(cfg)
    return cfg


@pytest.mark.parametrize("change,key", [({"lr": 5e-3}, "train.lr"), ({"seed": 1}, "train.seed")])
def test_train_rerun_with_changed_inputs_retrains_from_scratch(trained, tmp_path, change, key):
    cfg = clone_run(trained, tmp_path / "rerun", **change)
    old = weights(run_dir(cfg) / "model")
    said = _train(cfg)
    assert key in said and "discarding them and training from scratch" in said and "resuming" not in said
    assert len([ln for ln in said.splitlines() if "changed:" in ln]) == 1
    fresh = clone_run(trained, tmp_path / "fresh", fresh=True, **change)
    _train(fresh)
    new = weights(run_dir(cfg) / "model")
    assert not _same(new, old)
    assert _same(new, weights(run_dir(fresh) / "model"))  # bit for bit the run that never saw the old checkpoints


def test_train_rerun_with_only_cadence_changed_resumes(trained, tmp_path):
    """Keys that do not change the weights (eval/checkpoint cadence) keep the checkpoints."""
    cfg = clone_run(trained, tmp_path / "c", eval_every=2)
    (run_dir(cfg) / ".stages" / "train.json").unlink()  # as if killed before the export
    said = _train(cfg)
    assert "resuming from" in said and "changed:" not in said
    assert _same(weights(run_dir(cfg) / "model"), weights(run_dir(trained) / "model"))


def test_killed_mid_training_then_changed_restarts(trained, tmp_path):
    """A partial run (checkpoint at step 3 of 6) rerun with another lr starts at step 1, not 4."""
    cfg = clone_run(trained, tmp_path / "p", fresh=True)
    from domainlm.train.loop import run_training

    run_training(cfg, max_steps=3, console=Console(file=io.StringIO()))
    set_train(cfg, lr=5e-3)
    said = _train(cfg)
    assert "train.lr" in said
    rows = [json.loads(x) for x in (run_dir(cfg) / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert not (run_dir(cfg) / ckpt.STALE).exists()


def test_changed_inputs_by_hand():
    assert ckpt.changed_inputs({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2)}) == []  # as state.json gives it back
    assert ckpt.changed_inputs({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": None}) == ["b", "c"]
    assert ckpt.describe_changes(list("abcdefgh"), shown=3) == "a, b, c and 5 more"


# ------------------------------------------------------------------------------------------------ finetune


@pytest.fixture(scope="module")
def ft_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ftbase"), NEWS * 10)


def _sft(path):
    rows = [{"prompt": f"{NEWS[i % 4]}\n\nWhat is this about?", "response": ["politics", "business"][i % 2]}
            for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_finetune_rerun_with_changed_inputs_retrains(ft_model, tmp_path):
    from transformers import AutoModelForCausalLM

    data = _sft(tmp_path / "train.jsonl")
    args = FinetuneArgs(steps=4, batch_size=4, micro_batch=4, lr=1e-3, checkpoint_every=2)

    def run(out, a):
        said = io.StringIO()
        finetune(ft_model, data, out=out, args=a, console=Console(file=said, width=400))
        return said.getvalue(), AutoModelForCausalLM.from_pretrained(out / "model").state_dict()

    _, first = run(tmp_path / "ft", args)
    (tmp_path / "ft" / "finetune.json").unlink()  # killed before the summary: the final checkpoint is there
    said, again = run(tmp_path / "ft", args)
    assert "resuming from" in said and _same(first, again)
    (tmp_path / "ft" / "finetune.json").unlink()
    for change, key in (({"seed": 1}, "finetune.seed"), ({"lr": 2e-3}, "finetune.lr")):
        new_args = FinetuneArgs(**{**args.__dict__, **change})
        said, got = run(tmp_path / "ft", new_args)
        assert f"changed: {key})" in said and "resuming" not in said
        _, fresh = run(tmp_path / f"fresh-{key}", new_args)
        assert _same(got, fresh) and not _same(got, first)
        args = new_args
        (tmp_path / "ft" / "finetune.json").unlink()
