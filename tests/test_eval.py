"""`domainlm eval`: bits per byte, sliding windows, term probes, inputs and errors — on a tiny random Llama and a
tokenizer trained inside the test (no network)."""

from __future__ import annotations

import gzip
import json
import math
import shutil

import pytest
import torch

from domainlm.config import RunConfig, write_resolved
from domainlm.errors import UserError
from domainlm.evaluate import bpb, harness, inputs
from domainlm.evaluate import probes as P
from domainlm.evaluate.command import run_eval
from test_train_fixtures import make_tiny_model

LEGAL = [
    "The licensee shall indemnify and hold harmless the licensor from any claim arising under this agreement.",
    "Notwithstanding the foregoing, the warranty is disclaimed to the extent permitted by applicable law.",
    "In consideration of the mutual covenants herein, the parties agree to the following terms and conditions.",
    "This license is perpetual, worldwide, royalty-free and irrevocable, subject to the conditions below.",
]
NEWS = [
    "The team won the cup final on Saturday after a late goal in extra time.",
    "Shares in the bank rose sharply on Monday as profits beat market expectations.",
    "The minister said the new policy would be announced before the election.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model"), (LEGAL + NEWS) * 20)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return inputs.load_model(model_dir, "cpu")


def _write_docs(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


@pytest.fixture
def run_dir(tmp_path, model_dir):
    run = tmp_path / "run"
    cfg = RunConfig(name="t", run_dir=str(run), sources=[
        {"name": "legal", "role": "domain", "weight": 0.5, "input": "x"},
        {"name": "news", "role": "general", "weight": 0.5, "input": "y"},
    ])
    write_resolved(cfg, run)
    _write_docs(run / "data" / "legal" / "val", LEGAL)
    _write_docs(run / "data" / "news" / "val", NEWS)
    (run / "data" / "stats.json").write_text(json.dumps({"version": 1, "sources": {}}))  # prepare's "done" marker
    shutil.copytree(model_dir, run / "model")
    return run


def _hand_nll_nats(model, ids: list[int]) -> float:
    """−Σ log p(ids[j] | ids[:j]) for j ≥ 1 from one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -sum(logp[j - 1, ids[j]].item() for j in range(1, len(ids)))


def test_bpb_equals_hand_computation(loaded):
    model, tok = loaded
    text = LEGAL[0] + " Ünïcödé €."  # multi-byte characters: bytes, not characters, count
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    nats = _hand_nll_nats(model, ids)
    expected_bpb = nats / math.log(2) / len(text.encode("utf-8"))
    s = bpb.score_texts(model, tok, [text], context=64, stride=32).as_dict()
    assert s["tokens"] == len(ids) - 1
    assert s["bytes"] == len(text.encode("utf-8"))
    assert s["bpb"] == pytest.approx(expected_bpb, rel=1e-5)
    assert s["loss_per_token"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert s["ppl"] == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)
    # Several documents: nats and bytes add up (batched with padding gives the same sums).
    both = bpb.score_texts(model, tok, [text, NEWS[0]], context=64, stride=32, batch_tokens=64)
    ids2 = [tok.eos_token_id] + tok(NEWS[0], add_special_tokens=False)["input_ids"]
    assert both.nll_nats == pytest.approx(nats + _hand_nll_nats(model, ids2), rel=1e-5)


def test_sliding_window_matches_full_pass_when_doc_fits(loaded):
    model, tok = loaded
    text = LEGAL[1]
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n + 1 <= 64
    full = bpb.score_texts(model, tok, [text], context=64, stride=64).nll_nats
    for stride in (1, 5, 17):
        assert bpb.score_texts(model, tok, [text], context=64, stride=stride).nll_nats == pytest.approx(full, rel=1e-6)
    assert full == pytest.approx(_hand_nll_nats(model, [tok.eos_token_id] + tok(text, add_special_tokens=False)
                                                ["input_ids"]), rel=1e-5)


def test_sliding_windows_score_every_token_once(loaded):
    model, tok = loaded
    long_doc = " ".join(LEGAL * 4)  # longer than the 64-token context
    n = len(tok(long_doc, add_special_tokens=False)["input_ids"])
    assert n > 3 * 64
    for context, stride in ((64, 64), (64, 16), (20, 7)):
        s = bpb.score_texts(model, tok, [long_doc], context=context, stride=stride)
        assert s.tokens == n and math.isfinite(s.nll_nats)
    with pytest.raises(UserError, match="stride 65 is larger than the context 64"):
        bpb.windows(100, 1, 64, 65)
    for n_tokens in range(2, 60):  # coverage and left context of the window plan itself
        for s, a, b in bpb.windows(n_tokens, 1, 10, 3):
            assert b - 1 - s <= 10 and (s == 0 or a - s >= 10 - 3)
        covered = [t for _, a, b in bpb.windows(n_tokens, 1, 10, 3) for t in range(a, b)]
        assert covered == list(range(1, n_tokens))


def test_doc_start_is_the_tokenizers_own_prefix(loaded, model_dir):
    from tokenizers import processors
    from transformers import AutoTokenizer

    _, tok = loaded
    assert bpb.doc_start_ids(tok) == [tok.eos_token_id]  # no prefix of its own: the document separator
    tok2 = AutoTokenizer.from_pretrained(model_dir)
    tok2.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok2.bos_token_id), ("</s>", tok2.eos_token_id)])
    assert bpb.doc_start_ids(tok2) == [tok2.bos_token_id]  # Llama-style: BOS added in front


def test_run_dir_and_hf_export_give_the_same_numbers(run_dir, cli):
    code, out, err = cli("eval", str(run_dir), "--json")
    assert code == 0, err
    via_run = json.loads(out)
    saved = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert saved["sources"] == via_run["sources"]
    assert set(via_run["sources"]) == {"legal", "news"}
    assert via_run["sources"]["legal"]["role"] == "domain"
    via_hf, dest = run_eval(run_dir / "model", run=run_dir)
    assert dest is None
    for name in ("legal", "news"):
        assert via_hf["sources"][name]["bpb"] == pytest.approx(via_run["sources"][name]["bpb"], rel=1e-9)
        assert via_run["sources"][name]["bytes"] == sum(len(d.encode()) for d in (LEGAL if name == "legal" else NEWS))
    assert (run_dir / ".stages" / "eval.json").exists()


def test_text_folder_file_and_byte_cap(tmp_path, model_dir, cli):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(LEGAL[0], encoding="utf-8")
    (folder / "sub" / "b.md").write_text(LEGAL[1], encoding="utf-8")
    (folder / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in NEWS) + "\n", encoding="utf-8")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    out = tmp_path / "res.json"
    code, stdout, err = cli("eval", str(model_dir), "--text", f"mine={folder}", "--text", f"one={folder / 'a.txt'}",
                            "--out", str(out), "--context", "32", "--stride", "8")
    assert code == 0, err
    assert "bits/byte" in stdout
    res = json.loads(out.read_text())
    assert (res["context"], res["stride"]) == (32, 8)
    assert res["sources"]["mine"]["docs"] == 5 and res["sources"]["one"]["docs"] == 1
    assert res["sources"]["one"]["bytes"] == len(LEGAL[0])
    assert inputs.cap_bytes(["abc", "dé€f", "gh"], 6) == ["abc", "dé"]  # cut at a character boundary
    assert inputs.cap_bytes(["abc", "dé€f", "gh"], 100) == ["abc", "dé€f", "gh"]


def test_probes_score_and_match_hand_logprob(loaded, tmp_path):
    model, tok = loaded
    f = tmp_path / "p.jsonl"
    items = [
        {"context": "The licensee shall", "answer": "indemnify", "distractors": ["win", "rose", "said"]},
        {"context": "The team won the cup", "answer": "final", "distractors": ["licensor", "warranty"], "term": "x"},
    ]
    f.write_text("\n".join(json.dumps(i) for i in items) + "\n\n", encoding="utf-8")
    probes = P.load_probes(f)
    results = P.score_probes(model, tok, probes, context=64)
    ctx = [tok.eos_token_id] + tok("The licensee shall", add_special_tokens=False)["input_ids"]
    full = [tok.eos_token_id] + tok("The licensee shall indemnify", add_special_tokens=False)["input_ids"]
    assert full[: len(ctx)] == ctx
    hand = -(_hand_nll_nats(model, full) - _hand_nll_nats(model, ctx))
    assert results[0].logprobs[0] == pytest.approx(hand, rel=1e-5)
    summary = P.summarise(results, f)
    # accuracy is the share of items whose answer has the highest log-probability (per byte: ÷ its UTF-8 bytes)
    best = [max(range(len(r.logprobs)), key=r.logprobs.__getitem__) == 0 for r in results]
    best_per_byte = [max(range(len(r.logprobs)), key=lambda k, r=r: r.logprobs[k] / len(
        r.probe.candidates[k].encode())) == 0 for r in results]
    assert summary["items"] == 2
    assert summary["acc"] == sum(best) / 2 and summary["acc_per_byte"] == sum(best_per_byte) / 2
    assert summary["chance"] == pytest.approx((1 / 4 + 1 / 3) / 2)


def test_packaged_legal_probes_are_well_formed():
    probes = P.load_probes(P.packaged_probes("legal"))
    assert len(probes) >= 60
    for p in probes:
        assert len(p.distractors) == 3 and len(set(p.candidates)) == 4, p.where
        assert p.term, p.where
    assert len({(p.context, p.answer) for p in probes}) == len(probes)


# ---------------------------------------------------------------------------------------------------- bad input


def _one_line_error(cli, *args) -> str:
    code, _, err = cli(*args)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_model_folder_without_tokenizer(tmp_path, model_dir, cli):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    (tmp_path / "doc.txt").write_text(LEGAL[0])
    msg = _one_line_error(cli, "eval", str(bare), "--text", f"x={tmp_path / 'doc.txt'}")
    assert "no tokenizer" in msg
    with pytest.raises(UserError, match="no tokenizer"):
        inputs.load_model(bare, "cpu")


def test_empty_text_folder(tmp_path, model_dir, cli):
    (tmp_path / "empty").mkdir()
    msg = _one_line_error(cli, "eval", str(model_dir), "--text", f"mine={tmp_path / 'empty'}")
    assert "no .txt/.md/.jsonl/.jsonl.gz files" in msg
    assert "expected NAME=PATH" in _one_line_error(cli, "eval", str(model_dir), "--text", "nameless")


def test_malformed_probe_line(tmp_path, model_dir, cli):
    f = tmp_path / "probes.jsonl"
    good = {"context": "a", "answer": "b", "distractors": ["c"]}
    f.write_text(json.dumps(good) + "\n" + '{"context": "a", "answer": ' + "\n", encoding="utf-8")
    msg = _one_line_error(cli, "eval", str(model_dir), "--probes", str(f))
    assert f"{f}:2: invalid JSON" in msg
    f.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "distractors": "c"}) + "\n", encoding="utf-8")
    assert f"{f}:3: 'distractors' must be" in _one_line_error(cli, "eval", str(model_dir), "--probes", str(f))


def test_run_dir_from_incompatible_version(run_dir, cli):
    cfg = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(cfg + "format: 0\n")  # a key this version does not know
    msg = _one_line_error(cli, "eval", str(run_dir))
    assert "incompatible version" in msg and "format" in msg
    (run_dir / "config.yaml").write_text(cfg)
    counts = run_dir / "tokens" / "counts.json"
    counts.parent.mkdir()
    counts.write_text(json.dumps({"version": 999}))
    assert "incompatible version" in _one_line_error(cli, "eval", str(run_dir))


def test_not_a_model_or_run(tmp_path, cli):
    assert "neither a Hugging Face model folder" in _one_line_error(cli, "eval", str(tmp_path))
    assert "no such model folder" in _one_line_error(cli, "eval", str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------------- harness


def _choice_logliks(model_dir, context: str, choices: list[str]) -> list[float]:
    """log P(" " + choice | context) under the model, split into context and continuation tokens the way the
    harness does (encode the whole, the continuation is what follows the context's tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = []
    for choice in choices:
        ctx = tok(context, add_special_tokens=False).input_ids
        whole = tok(context + " " + choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].double(), -1)
        out.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    return out


def test_harness_runs_a_local_task_with_our_scores(tmp_path, model_dir):
    cmd = harness.command(model_dir, "arc_easy")
    assert cmd.startswith("lm_eval --model hf --model_args pretrained=") and "--tasks arc_easy" in cmd
    assert harness.available(), "lm-evaluation-harness is installed by `make test` (the harness extra)"
    data = tmp_path / "tiny.jsonl"
    rows = [{"q": q, "choices": c, "label": 0} for q, c in [
        ("The licensee shall", ["indemnify", "rose"]), ("The team won the cup", ["final", "warranty"]),
        ("Shares in the bank", ["rose", "licensor"]), ("The warranty is", ["disclaimed", "goal"]),
        ("In consideration of the mutual", ["covenants", "election"]),
        ("The minister said the", ["policy", "licensee"]),
        ("This license is perpetual,", ["worldwide", "Saturday"]), ("after a late goal in", ["extra", "royalty"]),
    ]]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "tiny.yaml").write_text(
        "task: domainlm_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    results = harness.evaluate(model_dir, ["domainlm_tiny"], include_path=tmp_path, batch_size=2)
    # the harness ran the task offline on the export and scored each item as our own forward pass does
    ours = [max(range(2), key=lambda k, r=r: _choice_logliks(model_dir, r["q"], r["choices"])[k]) == 0 for r in rows]
    assert results["domainlm_tiny"]["acc,none"] == pytest.approx(sum(ours) / len(ours))
