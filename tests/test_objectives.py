"""model.objective masked / span: masks, training with exact resume after SIGKILL, export, eval, plan FLOPs."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar  # at module level: dataclasses resolve a string annotation's ClassVar here

import numpy as np
import pytest
import torch
import yaml

from crashkit import KILLED, domainlm
from domainlm.errors import UserError
from domainlm.model import build_model
from domainlm.objectives import OBJECTIVES
from domainlm.objectives.base import IGNORE
from domainlm.objectives.masked import Masking, word_starts
from domainlm.objectives.span import SpanCorruption, span_counts, span_lengths
from domainlm.shape import ModelShape
from test_train_fixtures import (  # noqa: F401 (one_thread: autouse fixture)
    clone_run,
    losses,
    make_run,
    one_thread,
    read_metrics,
    run_dir,
    single_thread,
    train_in_process,
    weights,
)

STEPS, EVERY = 8, 4  # checkpoints and evals at 4 and 8; the crash test kills at step 6


def objective_run(tmp, objective: str, **model):
    cfg = make_run(tmp, checkpoint_every=EVERY, eval_every=EVERY)
    data = yaml.safe_load(cfg.read_text())
    data["model"].pop("n_kv_heads")  # ModernBERT and T5 have no grouped-query attention
    data["model"].update(objective=objective, **model)
    cfg.write_text(yaml.safe_dump(data))
    return cfg


@pytest.fixture(scope="module", params=["masked", "span"])
def straight(request, tmp_path_factory):
    """A run of each objective, never interrupted."""
    with single_thread():
        cfg = objective_run(tmp_path_factory.mktemp(request.param), request.param)
        summary = train_in_process(cfg, max_steps=STEPS)
    return request.param, cfg, summary


# ---------------------------------------------------------------------------------------------------- masks


def test_bert_masking_is_a_function_of_the_key():
    special = np.array([0, 1, 2])
    m = Masking(mask_id=99, rate=0.15, special=special, random_ids=np.arange(3, 99))
    row = np.where(np.arange(2000) % 50 == 49, 1, np.arange(2000) % 90 + 3)  # text with an EOS every 50 tokens
    inputs, labels = m(row, np.random.default_rng([7, 3, 5, 1]))
    again = m(row, np.random.default_rng([7, 3, 5, 1]))
    assert np.array_equal(inputs, again[0]) and np.array_equal(labels, again[1])
    chosen = labels != IGNORE
    assert chosen.sum() == round(0.15 * 1960)  # 15% of the text tokens (Devlin et al. 2019); EOS never chosen
    assert not chosen[row == 1].any() and np.array_equal(labels[chosen], row[chosen])
    assert np.array_equal(inputs[~chosen], row[~chosen])
    masked, kept = (inputs[chosen] == 99).mean(), (inputs[chosen] == row[chosen]).mean()
    assert abs(masked - 0.8) < 0.05 and abs(kept - 0.1) < 0.04  # 80% mask, 10% random, 10% unchanged


def test_whole_word_masking_masks_words():
    # ids 10..19 start a word, 20..29 continue one: words of 1-3 tokens
    starts = np.zeros(40, dtype=bool)
    starts[:20] = True
    rng = np.random.default_rng(0)
    row = np.concatenate([[10 + rng.integers(10)] + list(20 + rng.integers(10, size=rng.integers(3)))
                          for _ in range(200)])
    m = Masking(39, 0.15, np.array([0, 1, 2]), np.arange(3, 39), word_start=starts)
    _, labels = m(row, np.random.default_rng(1))
    chosen = labels != IGNORE
    word = np.cumsum(starts[row])  # word number of each token
    for w in np.unique(word[chosen]):
        assert chosen[word == w].all()  # a chosen word is chosen whole
    assert abs(chosen.sum() - 0.15 * len(row)) <= 3


def test_span_corruption_counts_and_reconstruction():
    # T5 (Raffel et al. 2020) trains on 568-token windows: 85 noise tokens in 28 spans → 512 inputs, 114 targets
    assert span_counts(568, 0.15, 3.0) == (85, 28)
    assert span_lengths(568, 0.15, 3.0) == (512, 114)
    sentinels = np.arange(1000, 1100)
    corrupt = SpanCorruption(sentinels, eos_id=1, noise_density=0.15, mean_span_length=3.0)
    row = np.arange(3, 131)
    inputs, targets = corrupt(row, np.random.default_rng([0, 1, 2]))
    assert (len(inputs), len(targets)) == span_lengths(128, 0.15, 3.0) == (116, 26)
    assert inputs[-1] == targets[-1] == 1
    # putting each span back in place of its sentinel gives the window
    spans = np.split(targets[:-1], np.flatnonzero(targets[:-1] >= 1000)[1:])
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t - 1000][1:] if t >= 1000 else [t])
    assert np.array_equal(out, row)


# ---------------------------------------------------------------------------------------------------- training


def test_trains_and_logs_masked_metrics(straight):
    objective, cfg, summary = straight
    ls = losses(cfg)
    assert len(ls) == STEPS and ls[-1] < ls[0] - 0.5, ls
    evals = read_metrics(run_dir(cfg), "eval")
    assert [e["step"] for e in evals] == [4, 8]
    assert set(evals[-1]) == {"kind", "step", "val_loss/legal", "val_loss/news", "accuracy/legal", "accuracy/news"}
    assert evals[-1]["val_loss/legal"] < evals[0]["val_loss/legal"]  # no bpb: a masked loss is not a text's
    assert summary["steps"] == STEPS and summary["skipped_steps"] == 0


@pytest.mark.parametrize("objective", ["masked", "span"])
def test_params_match_transformers(objective):
    shape = ModelShape(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, ffn_dim=96, vocab_size=301)
    model = build_model(shape, 32, objective=OBJECTIVES[objective], bos_id=0, eos_id=1, pad_id=2)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert OBJECTIVES[objective].params(shape) == sum(unique.values())


def test_sigkill_then_resume_is_bitwise_identical(straight, tmp_path):
    objective, ref, ref_summary = straight
    cfg = clone_run(ref, tmp_path, fresh=True)
    proc = domainlm(["train", str(cfg), "--max-steps", str(STEPS)], fault="train.step:6", fault_dir=tmp_path)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    run = run_dir(cfg)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]
    assert read_metrics(run)[-1]["step"] == 6
    summary = train_in_process(cfg, max_steps=STEPS)
    assert losses(cfg) == losses(ref)  # bitwise: the masks of steps 5-8 are redrawn identically
    assert read_metrics(run, "eval") == read_metrics(run_dir(ref), "eval")
    a, b = weights(run_dir(ref) / "model"), weights(run / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary["final_loss"] == ref_summary["final_loss"]


# ---------------------------------------------------------------------------------------------------- export, eval


def test_export_loads_without_domainlm(straight):
    from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

    objective, cfg, summary = straight
    folder = run_dir(cfg) / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    if objective == "masked":
        model = AutoModelForMaskedLM.from_pretrained(folder)
        assert type(model).__name__ == "ModernBertForMaskedLM" and tok.mask_token_id == len(tok) - 1
        fill = pipeline("fill-mask", model=str(folder))
        ranked = fill(f"The licensee shall {fill.tokenizer.mask_token} the software.", top_k=5)
        assert len(ranked) == 5 and ranked[0]["score"] >= ranked[-1]["score"]
        assert all(r["sequence"].startswith("The licensee shall") for r in ranked)
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(folder)
        assert type(model).__name__ == "T5ForConditionalGeneration"
        ids = tok("The licensee shall <extra_id_0> the software.", return_tensors="pt").input_ids
        assert tok.convert_tokens_to_ids("<extra_id_0>") in ids[0].tolist()
        assert model.generate(ids, max_new_tokens=4).shape[1] <= 5
    assert summary["params"] == sum({id(p): p.numel() for p in model.parameters()}.values())


def test_eval_scores_identical_masks(straight, tmp_path):
    from rich.console import Console

    from domainlm.evaluate.command import print_eval, run_eval
    from domainlm.outputs import ObjectiveEvalOutput

    objective, cfg, _ = straight
    text = tmp_path / "legal.txt"
    text.write_text("The licensee shall indemnify the licensor against all claims. " * 20)
    first, written = run_eval(run_dir(cfg) / "model", texts=[f"legal={text}"], out=tmp_path / "eval.json")
    again, _ = run_eval(run_dir(cfg) / "model", texts=[f"legal={text}"])
    s = first["sources"]["legal"]
    assert first["objective"] == objective and "bpb" not in s and first["probes"] is None
    assert 0 <= s["accuracy"] <= 1 and s["targets"] > 0
    assert first["context"] == 32 and s["windows"] == -(-s["tokens"] // 32)  # the windows it trained on
    assert s["loss"] == again["sources"]["legal"]["loss"]  # the same masks every time (seed 0)
    ObjectiveEvalOutput.checked(first)
    assert written.is_file()
    out = io.StringIO()
    print_eval(first, Console(file=out, width=200))
    assert "bits per byte is defined for causal models only" in " ".join(out.getvalue().split())


# ---------------------------------------------------------------------------------------------------- plan, config


def test_flops_per_token_hand_computed():
    shape = ModelShape(n_layers=2, d_model=64, n_heads=2, n_kv_heads=2, ffn_dim=192, vocab_size=1000)
    # masked: 6·(L·(4d² + 3·d·ffn) + d² + V·d) + 12·L·d·T = 6·(2·(16384 + 36864) + 4096 + 64000) + 12·2·64·128
    # — every position of the window, not only the 15% that are masked
    assert OBJECTIVES["masked"].flops_per_token(shape, 128) == 6 * 174_592 + 196_608 == 1_244_160
    # span, T = 128: 19 noise tokens in 6 spans → T_e = 116 encoder, T_d = 26 decoder tokens
    # encoder token: 6·(2·53248 + 2·2·4096) + 12·2·64·116 = 737280 + 178176 = 915456
    # decoder token: 6·(2·(6·4096 + 36864) + 64000) + 12·2·64·(26 + 116) = 1121280 + 218112 = 1339392
    assert OBJECTIVES["span"].flops_per_token(shape, 128) == (116 * 915_456 + 26 * 1_339_392) / 128 == 1_101_696
    assert OBJECTIVES["causal"].flops_per_token(shape, 128) == shape.flops_per_token(128)


def test_plan_says_laws_are_causal():
    from domainlm.plan.planner import PlanRequest, make_plan

    causal = make_plan(PlanRequest(flops=1e15, vocab_size=1000, seq_len=128))
    masked = make_plan(PlanRequest(flops=1e15, vocab_size=1000, seq_len=128, objective=OBJECTIVES["masked"]))
    assert not any("fitted on causal" in n for n in causal["notes"])
    assert any("fitted on causal decoder LMs" in n for n in masked["notes"])
    assert any("not per masked token" in n for n in masked["notes"])
    shape = ModelShape(**{k: masked["model"][k] for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim",
                                                          "vocab_size", "tie_embeddings")})
    assert masked["flops_per_token"] == OBJECTIVES["masked"].flops_per_token(shape, 128)
    assert masked["run"]["params"] == OBJECTIVES["masked"].params(shape) != shape.params_total


@pytest.mark.parametrize(("model", "train", "message"), [
    ({"mask_rate": 0.3}, {}, "model.mask_rate: only for model.objective: masked, not causal"),
    ({"objective": "masked", "n_heads": 4, "n_kv_heads": 2}, {}, "no grouped-query attention"),
    ({"objective": "span"}, {"seq_len": 4096}, "more than the 100 sentinel tokens"),
])
def test_bad_objective_config(tmp_path, cli, model, train, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "model": model, "train": train}))
    code, _, err = cli("train", str(cfg))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_objective_needs_its_tokens(tmp_path):
    from transformers import AutoTokenizer

    from test_train_fixtures import make_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path))
    with pytest.raises(UserError, match="no mask token"):
        OBJECTIVES["masked"].batches(tok)
    with pytest.raises(UserError, match="sentinel"):
        OBJECTIVES["span"].batches(tok)
    windows = torch.arange(10).view(2, 5)
    inputs, labels = OBJECTIVES["causal"].batches(tok).train(windows, 0, 0)
    assert inputs is windows and labels is None  # causal adds nothing: each window is its own target
    starts = word_starts(tok)  # a byte-level token carrying the space before it starts a word
    ids = tok("The licensee shall").input_ids[1:]  # (a text's first token starts a word wherever it is)
    assert [bool(starts[i]) for i in ids] == [tok.decode([t]).startswith(" ") for t in ids]
    assert starts[tok.eos_token_id] and sum(starts[i] for i in ids) == 2


def test_report_and_summary_show_the_objectives_scores(straight, tmp_path):
    """`domainlm run`'s summary and the report read a masked / span eval.json: loss and accuracy, no bpb."""
    from domainlm.config import load_config, write_resolved
    from domainlm.evaluate.command import run_eval
    from domainlm.pipeline import build_report
    from domainlm.run import summary

    objective, ref, _ = straight
    cfg = clone_run(ref, tmp_path)
    run = run_dir(cfg)
    text = tmp_path / "legal.txt"
    text.write_text("The licensee shall indemnify the licensor against all claims. " * 10)
    ev, _ = run_eval(run / "model", texts=[f"legal={text}"], out=run / "eval" / "eval.json")
    write_resolved(load_config(cfg), run)
    html = build_report(run)["path"]
    page = open(html, encoding="utf-8").read()
    assert f"({objective} model)" in page and "bits per byte is defined for causal models only" in page
    s = summary(run, load_config(cfg), 1.0, html)
    assert s["metric"].startswith(objective) and s["sources"]["legal"]["bpb"] == ev["sources"]["legal"]["loss"]


# ---------------------------------------------------------------------------------------------------- the interface


def test_a_new_objective_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    """A prefix-LM variant of causal (next-token loss on the second half of each window only, the first half is
    context), defined here and registered with one line, trains through the real `domainlm train` path: config
    validation, the loop, `train_step`, validation and the export — no other file knows its name."""
    from domainlm import objectives
    from domainlm.config import load_config
    from domainlm.errors import ConfigError
    from domainlm.objectives.causal import NEXT_TOKEN, Causal, NextTokenBatches
    from domainlm.train.data import MixtureLoader
    from domainlm.train.loop import initial_model, setup
    from domainlm.train.parallel import Dist

    calls = []

    class PrefixBatches(NextTokenBatches):
        def train(self, tokens, step, first_row):
            calls.append(step)
            labels = tokens.clone()
            labels[:, : tokens.shape[1] // 2] = IGNORE
            return tokens, labels

    @dataclass(frozen=True)
    class PrefixLM(Causal):
        name: ClassVar[str] = "prefix"

        def batches(self, tok=None, seed: int = 0):
            return PrefixBatches()

    cfg = make_run(tmp_path, eval_every=3, checkpoint_every=3)
    data = yaml.safe_load(cfg.read_text())
    data["model"]["objective"] = "prefix"
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="model.objective: expected one of causal, masked, span"):
        load_config(cfg)  # not registered yet
    monkeypatch.setattr(objectives, "OBJECTIVES", dict(objectives.OBJECTIVES))  # (undone after the test)
    objectives.register(PrefixLM())  # the registry line

    summary = train_in_process(cfg, max_steps=3)
    assert calls == [0, 1, 2] and summary["steps"] == 3 and summary["skipped_steps"] == 0
    # The first step's loss is the mean next-token loss of the first batch's second halves, before any update.
    rc = load_config(cfg)
    z = setup(rc, run_dir(cfg), Dist(0, 1, 0, torch.device("cpu")), 3)
    assert z.objective == PrefixLM()
    from transformers import AutoTokenizer

    model = initial_model(z, rc.train.seed, AutoTokenizer.from_pretrained(z.tokenizer), z.counts["eos_id"])
    batch, _ = MixtureLoader(z.train, z.weights, seq_len=rc.train.seq_len, global_batch=z.global_batch, rank=0,
                             world_size=1, seed=rc.train.seed).next_batch()
    _, labels = PrefixBatches().train(batch, 0, 0)
    with torch.no_grad():
        want = (NEXT_TOKEN(model, batch, "sum", labels) / NEXT_TOKEN.count(labels)).item()
        causal = NEXT_TOKEN(model, batch).item()
    assert losses(cfg)[0] == pytest.approx(want, rel=1e-5) and abs(want - causal) > 1e-3
    evals = read_metrics(run_dir(cfg), "eval")  # its validation and metric are causal's: loss and bpb
    assert [e["step"] for e in evals] == [3] and {"bpb/legal", "val_loss/news"} <= set(evals[0])
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(run_dir(cfg) / "model")).__name__ == "LlamaForCausalLM"


FORBIDDEN = [  # a branch on an objective's name or on None for causal (issue 20): ask the Objective instead
    (r"\bobjective(\.name)?\s+is\s+(not\s+)?None", "if objective is None:"),  # not e.g. objective_weights
    (r"[!=]=\s*[\"'](causal|masked|span)[\"']", "kind = 1 if x == 'masked' else 2"),
    (r"[\"'](causal|masked|span)[\"']\s*[!=]=", 'if "span" != objective:'),
    (r"\bobjective(\.name)?\s*[!=]=", "if cfg.model.objective != CAUSAL:"),
    (r"\bin\s*[(\[{][^)\]}]*[\"'](causal|masked|span)[\"']", 'if kind in ("masked", "span"):'),
    (r"\b(CAUSAL|MASKED|SPAN)\b", "return {CAUSAL: 0, MASKED: 1}[objective]"),
]


def test_no_branch_on_objective_names_in_src():
    import re
    from pathlib import Path

    patterns = [re.compile(p) for p, _ in FORBIDDEN]
    for pattern, (_, example) in zip(patterns, FORBIDDEN, strict=True):
        assert pattern.search(example), example  # each pattern catches what it is meant to
    src = Path(__file__).parents[1] / "src" / "domainlm"
    found = [f"{path.relative_to(src)}:{n}: {line.strip()}"
             for path in sorted(src.rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if any(p.search(line) for p in patterns)]
    assert not found, "\n".join(found)
