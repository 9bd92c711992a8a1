"""Distributed training on CPU (torchrun, gloo): 2-process DDP and FSDP2 follow the 1-process loss curve for
the same global batch, and an FSDP checkpoint (torch.distributed.checkpoint) resumes on another process count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train_fixtures import (  # noqa: E402, F401 (one_thread: autouse fixture)
    cli_subprocess,
    clone_run,
    losses,
    make_run,
    one_thread,
    read_metrics,
    run_dir,
    set_train,
    single_thread,
    train_in_process,
    weights,
)

STEPS = 8
REL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 8 × 32 tokens as 2 micro-batches of 4; constant LR so that a run stopped
    early and resumed follows the same curve."""
    with single_thread():
        cfg = set_train(make_run(tmp_path_factory.mktemp("ref")), lr=3e-3, warmup_steps=0, min_lr_ratio=1.0,
                        checkpoint_every=4, eval_every=4)
        train_in_process(cfg, max_steps=STEPS)
    return cfg


def assert_close_curves(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= REL * abs(w), (got, want)


def fresh_clone(reference, dst, **overrides):
    import shutil

    cfg = clone_run(reference, dst, **overrides)
    for p in ("checkpoints", "logs", "model", ".stages"):
        shutil.rmtree(run_dir(cfg) / p, ignore_errors=True)
    return cfg


def test_ddp_two_processes_match_one(reference, tmp_path):
    cfg = fresh_clone(reference, tmp_path, parallel="ddp")
    proc = cli_subprocess(["train", str(cfg), "--max-steps", str(STEPS)], torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) (ddp)" in " ".join(proc.stderr.split())
    assert_close_curves(losses(cfg), losses(reference))
    a, b = weights(run_dir(reference) / "model"), weights(run_dir(cfg) / "model")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_fsdp_two_processes_match_one_and_resume_on_one(reference, tmp_path):
    cfg = fresh_clone(reference, tmp_path, parallel="fsdp")
    proc = cli_subprocess(["train", str(cfg), "--max-steps", str(STEPS // 2)], torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) (fsdp)" in " ".join(proc.stderr.split())
    assert_close_curves(losses(cfg), losses(reference)[: STEPS // 2])
    assert (run_dir(cfg) / "checkpoints" / f"step-{STEPS // 2:08d}" / "dcp").is_dir()
    plain = clone_run(cfg, tmp_path / "plain", parallel="auto")  # before cfg's run goes on
    # Resume the 2-process sharded checkpoint on 1 process (still FSDP): DCP reshards on load.
    train_in_process(cfg, max_steps=STEPS)
    assert_close_curves(losses(cfg), losses(reference))
    # ... and into a plain single-process model (no process group at all).
    train_in_process(plain, max_steps=STEPS)
    assert_close_curves(losses(plain), losses(reference))
