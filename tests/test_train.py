"""`domainlm train` on a tiny model (CPU): learning, resume equivalence, crash-safe checkpoints, export, errors."""

from __future__ import annotations

import errno

import pytest
import torch

from crashkit import KILLED, domainlm
from domainlm.errors import UserError
from domainlm.train.parallel import Dist
from test_train_fixtures import (  # noqa: F401 (one_thread: autouse fixture)
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

STEPS = 20  # 2N of the resume test; checkpoints every N = 10


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference run: 2N steps, never interrupted."""
    with single_thread():
        cfg = make_run(tmp_path_factory.mktemp("straight"))
        summary = train_in_process(cfg, max_steps=STEPS)
    return cfg, summary


def test_loss_goes_down_and_outputs(straight):
    cfg, summary = straight
    run = run_dir(cfg)
    ls = losses(cfg)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 1.0, ls
    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [10, 20]
    assert evals[-1]["bpb/legal"] < evals[0]["bpb/legal"]
    assert 0 < evals[-1]["bpb/news"] < 10
    assert "epochs/legal" in read_metrics(run)[-1]
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000010", "step-00000020"]
    assert summary["steps"] == STEPS and summary["skipped_steps"] == 0


def test_hf_export_reproduces_logits(straight):
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domainlm.config import load_config
    from domainlm.data.tokens import load_counts
    from domainlm.model import build_model, resolve_shape

    cfg, _ = straight
    run = run_dir(cfg)
    rc = load_config(cfg)
    trained = build_model(resolve_shape(rc, run, load_counts(run)["vocab_size"]), rc.train.seq_len, seed=123)
    load_model(trained, str(run / "checkpoints" / "step-00000020" / "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    ids = tok("The licensee shall indemnify the licensor", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (hf(ids).logits - trained(ids).logits).abs().max().item()
    assert diff < 1e-5
    assert tok.eos_token == "</s>" and hf.config.num_key_value_heads == 2


def test_generate(straight, cli):
    cfg, _ = straight
    code, out, err = cli("generate", str(run_dir(cfg) / "model"), "--prompt", "The licensee", "--max-new-tokens", "8")
    assert code == 0, err
    assert out.startswith("The licensee")
    code, _, err = cli("generate", str(run_dir(cfg)), "--prompt", "x")
    assert code == 2 and "not a model folder" in err


def test_rerun_is_skipped(straight):
    cfg, _ = straight
    before = (run_dir(cfg) / "logs" / "metrics.jsonl").read_text()
    summary = train_in_process(cfg, max_steps=STEPS)
    assert summary["steps"] == STEPS
    assert (run_dir(cfg) / "logs" / "metrics.jsonl").read_text() == before


# Crash sites (domainlm.faults) and what the kill leaves: the checkpoints on disk, the last logged step.
CRASHES = [
    # between checkpoints 10 and 20: steps 11-13 are lost and redone
    ("train.step:13", ["step-00000010"], 13),
    # step-20's weights are in its temp folder, the rest of that checkpoint is not
    ("checkpoint.mid_write:2", [".tmp-step-00000020", "step-00000010"], 20),
    # trained and checkpointed, the Hugging Face export not yet written
    ("train.before_export:1", ["step-00000010", "step-00000020"], 20),
]


@pytest.mark.parametrize(("fault", "left", "last_step"), CRASHES, ids=[c[0] for c in CRASHES])
def test_sigkill_then_resume_is_bitwise_identical(straight, tmp_path, fault, left, last_step):
    ref_cfg, ref_summary = straight
    cfg = clone_run(ref_cfg, tmp_path, fresh=True)
    proc = domainlm(["train", str(cfg), "--max-steps", str(STEPS)], fault=fault, fault_dir=tmp_path)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    run = run_dir(cfg)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == left
    assert read_metrics(run)[-1]["step"] == last_step
    assert not (run / "model").exists() and not (run / ".stages" / "train.json").exists()

    summary = train_in_process(cfg, max_steps=STEPS)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert losses(cfg) == losses(ref_cfg)  # bitwise: exact float equality of every step's loss
    assert read_metrics(run, "eval") == read_metrics(run_dir(ref_cfg), "eval")  # no eval lost or repeated
    a, b = weights(run_dir(ref_cfg) / "model"), weights(run / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary["steps"] == STEPS and summary["final_loss"] == ref_summary["final_loss"]


# ---------------------------------------------------------------------------------------------------- bad input


def test_seq_len_longer_than_positions(tmp_path, cli):
    cfg = make_run(tmp_path)
    import yaml

    data = yaml.safe_load(cfg.read_text())
    data["model"]["max_position_embeddings"] = 16
    cfg.write_text(yaml.safe_dump(data))
    code, _, err = cli("train", str(cfg))
    assert code == 2 and "train.seq_len: 32 is longer than model.max_position_embeddings 16" in err
    assert len(err.strip().splitlines()) == 1


def test_batch_not_divisible(tmp_path, cli):
    cfg = set_train(make_run(tmp_path), tokens_per_step=6 * 32)  # 6 sequences, micro_batch 4
    code, _, err = cli("train", str(cfg))  # found at load: no process count makes 6 sequences fit
    assert code == 2 and "6 sequences per step do not divide into train.micro_batch 4" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_token_files(tmp_path, cli):
    cfg = make_run(tmp_path)
    run = run_dir(cfg)
    (run / "tokens" / "news" / "train.bin").unlink()
    code, _, err = cli("train", str(cfg))
    assert code == 2 and "train.bin" in err and "domainlm tokenize" in err
    (run / "tokens" / "counts.json").unlink()
    code, _, err = cli("train", str(cfg))
    assert code == 2 and "counts.json" in err and "domainlm prepare" in err


def test_corrupted_checkpoint_names_file_and_offers_previous(straight, tmp_path, cli):
    cfg = clone_run(straight[0], tmp_path)
    bad = run_dir(cfg) / "checkpoints" / "step-00000020" / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    code, _, err = cli("train", str(cfg), "--max-steps", "30")
    assert code == 2, err
    assert str(bad) in " ".join(err.split()) and "corrupted checkpoint" in err and "step-00000010" in err


def test_disk_full_while_checkpointing(straight, tmp_path, monkeypatch):
    import domainlm.train.checkpoint as C

    cfg = clone_run(straight[0], tmp_path)
    calls = []

    def full(*a, **k):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C, "save_model", full)
    msg = "disk full while writing the checkpoint; the previous checkpoint .*step-00000020 is intact"
    with pytest.raises(UserError, match=msg):
        train_in_process(cfg, max_steps=30)
    ck = run_dir(cfg) / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000010", "step-00000020"]
    monkeypatch.undo()
    C._verify(ck / "step-00000020", Dist(0, 1, 0, torch.device("cpu")))  # still whole


def test_nan_loss_stops_after_k_steps(tmp_path):
    cfg = set_train(make_run(tmp_path), lr=1e30, warmup_steps=0, max_bad_steps=3, checkpoint_every=100)
    with pytest.raises(UserError, match=r"NaN/inf for 3 steps in a row"):
        train_in_process(cfg, max_steps=30)
    rows = read_metrics(run_dir(cfg))
    assert [r["skipped"] for r in rows[-3:]] == [True] * 3
