"""`domainlm eval` at scale: data-parallel under torchrun gives one process's numbers, and the stride's cost (tokens
read per token scored) is reported exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from domainlm.evaluate import bpb, inputs
from domainlm.evaluate.command import run_eval
from test_train_fixtures import LEGAL, NEWS, make_tiny_model, single_thread  # noqa: E402 (tests/ is on sys.path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model"), (LEGAL + NEWS) * 20)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Documents of many lengths: some fit one 64-token window, some need several (padded and full batches)."""
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    docs = [" ".join((LEGAL + NEWS)[: 1 + i % 9] * (1 + i % 4)) for i in range(24)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def test_stride_cost_is_tokens_read_per_token_scored(model_dir, text_file):
    model, tok = inputs.load_model(model_dir, "cpu")
    docs = [json.loads(ln)["text"] for ln in text_file.read_text().splitlines()]
    prefix = bpb.doc_start_ids(tok)
    lengths = [len(prefix) + len(ids) for ids in tok(docs, add_special_tokens=False)["input_ids"]]
    costs = {}
    with single_thread():
        for stride in (64, 32, 16):
            score = bpb.score_texts(model, tok, docs, context=64, stride=stride)
            # by hand: each window reads ids[start:end-1]
            read = sum(b - 1 - a for n in lengths for a, _, b in bpb.windows(n, len(prefix), 64, stride))
            assert score.forward_tokens == read
            costs[stride] = score.as_dict()["cost"]
            assert costs[stride] == pytest.approx(read / score.tokens)
    assert 1.0 <= costs[64] < costs[32] < costs[16] <= 64 / 16


def test_data_parallel_eval_matches_one_process(model_dir, text_file, tmp_path):
    with single_thread():
        one, _ = run_eval(model_dir, texts=[f"docs={text_file}"], context=64, stride=32)
    out = tmp_path / "eval.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "domainlm",
           "eval", str(model_dir), "--text", f"docs={text_file}", "--context", "64", "--stride", "32",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("eval of ") == 1  # the table: rank 0 prints, the other rank only scores
    two = json.loads(out.read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    a, b = one["sources"]["docs"], two["sources"]["docs"]
    assert (a["tokens"], a["bytes"], a["forward_tokens"]) == (b["tokens"], b["bytes"], b["forward_tokens"])
    assert b["nll_bits"] == pytest.approx(a["nll_bits"], rel=1e-9)
    assert b["bpb"] == pytest.approx(a["bpb"], rel=1e-9)
