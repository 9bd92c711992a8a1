"""One definition of bits per byte: training-time validation (train/loop.py `evaluate`) and `domainlm eval`
(evaluate/bpb.py) both score the text tokens only — EOS is context, never a target — and divide by the text's
UTF-8 bytes. Checked by hand on a tiny random model, and against each other on a stream laid out as eval reads."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from domainlm.evaluate.bpb import score_texts  # noqa: E402
from domainlm.train.loop import evaluate  # noqa: E402
from domainlm.train.parallel import Dist  # noqa: E402
from test_train_fixtures import LEGAL, make_tiny_model  # noqa: E402

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = make_tiny_model(tmp_path_factory.mktemp("bpb") / "m", LEGAL)
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


def _nll_by_hand(model, ids: list[int], eos: int) -> tuple[float, int]:
    """Σ −ln p(ids[j] | ids[:j]) over targets j ≥ 1 that are not EOS, from one forward pass; and their count."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
    terms = [-logp[j - 1, ids[j]].item() for j in range(1, len(ids)) if ids[j] != eos]
    return sum(terms), len(terms)


def test_training_validation_bpb_by_hand(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    docs = LEGAL[:3]
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [eos]]  # token-file layout
    n_bytes = sum(len(d.encode()) for d in docs)
    counts = {"eos_id": eos, "sources": {"v": {"val_bytes": n_bytes, "val_tokens": len(stream)}}}
    res = evaluate(model, {"v": np.array(stream)}, counts, seq_len=len(stream) - 1, micro_batch=1,
                   max_tokens=10_000, world=CPU, precision="fp32")["v"]
    nll, scored = _nll_by_hand(model, stream, eos)
    text = len(stream) - len(docs)  # every token but the 3 EOS
    assert scored == text - 1  # the stream's first token is never a target
    assert res["loss"] == pytest.approx(nll / scored, rel=1e-6)
    assert res["bpb"] == pytest.approx(nll / math.log(2) / (n_bytes * scored / text), rel=1e-6)
    # Scoring EOS (the old definition) would give a different number: EOS has a real loss but no bytes.
    eos_nll = _nll_by_hand(model, stream, eos=-1)[0] - nll
    assert eos_nll > 0.01 * nll


def test_training_validation_and_eval_agree_on_one_document(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    doc = LEGAL[0]
    ids = tok(doc, add_special_tokens=False)["input_ids"]
    # [EOS] + document + [EOS]: the start-of-document context eval puts in front (this tokenizer adds no BOS,
    # so it is EOS), the document, and the separator the token files put after it. One window covers it.
    stream = [eos, *ids, eos]
    counts = {"eos_id": eos, "sources": {"v": {"val_bytes": len(doc.encode()), "val_tokens": len(stream)}}}
    train_time = evaluate(model, {"v": np.array(stream)}, counts, seq_len=len(stream) - 1, micro_batch=1,
                          max_tokens=10_000, world=CPU, precision="fp32")["v"]
    eval_time = score_texts(model, tok, [doc], context=64, stride=32).as_dict()
    assert eval_time["tokens"] == len(ids) and eval_time["bytes"] == len(doc.encode())
    assert train_time["bpb"] == pytest.approx(eval_time["bpb"], rel=1e-5)
    assert train_time["loss"] == pytest.approx(eval_time["loss_per_token"], rel=1e-5)
