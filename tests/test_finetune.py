"""`domainlm finetune` and the LicenseDB downstream tasks: loss mask, chat template, resume, task split, metrics,
bad input. Tiny tokenizer and model made here; the whole file runs in well under a minute on 2 CPU cores."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from domainlm import chat
from domainlm.errors import UserError
from domainlm.evaluate import tasks as T
from domainlm.finetune import data as D
from domainlm.finetune.loop import FinetuneArgs, example_order, finetune
from domainlm.outputs import FinetuneComparison, TaskResults
from domainlm.rundir import load_output
from domainlm.train.step import IGNORE, next_token_loss, train_step
from outputs_check import check_outputs
from test_train_fixtures import make_tiny_model

TEXTS = [
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "This program is free software; you can redistribute it under the terms of the GNU General Public License.",
    "Which category does this license fall under? Name this license. Permissive Copyleft MIT License",
    "The team won the cup final on Saturday after a late goal in extra time.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("base"), TEXTS * 20)


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(model_dir)
    chat.ensure_chat_template(t)
    return t


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _sft_file(tmp_path, n=12):
    rows = []
    for i in range(n):
        rows.append({"prompt": f"{TEXTS[i % 2][:40]}\n\nWhich category does this license fall under?",
                     "response": ["Permissive", "Copyleft"][i % 2]})
    rows.append({"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Name this license."},
                              {"role": "assistant", "content": "MIT License"}]})
    return _write(tmp_path / "train.jsonl", rows)


# ------------------------------------------------------------------------------------------------ loss mask


def test_prompt_tokens_get_no_label(tok):
    msgs = [{"role": "user", "content": "Name this license."}, {"role": "assistant", "content": "MIT License"}]
    ids, labels = D.encode(tok, msgs)
    trained = [i for i, x in zip(ids, labels, strict=True) if x != IGNORE]
    assert tok.decode(trained) == "MIT License</s>"  # the answer and the stop token, nothing of the prompt
    assert all(x in (IGNORE, i) for i, x in zip(ids, labels, strict=True))


def test_train_step_loss_and_grad_equal_manual_masked_ce(model_dir, tok):
    from transformers import AutoModelForCausalLM

    convs = [[{"role": "user", "content": "Which category does this license fall under?"},
              {"role": "assistant", "content": "Permissive"}],
             [{"role": "user", "content": "Name this license."},
              {"role": "assistant", "content": "GNU General Public License"}]]
    ids, labels = D.collate([D.Example(*D.encode(tok, m), "x") for m in convs], chat.pad_id_of(tok))

    ref = AutoModelForCausalLM.from_pretrained(model_dir).train()
    logits = ref(input_ids=ids[:, :-1]).logits
    y, keep = ids[:, 1:], labels[:, 1:] != IGNORE
    manual = F.cross_entropy(logits[keep], y[keep])  # mean over response tokens of the whole batch
    manual.backward()
    assert next_token_loss(ref, ids, labels=labels).item() == pytest.approx(manual.item(), rel=1e-5)

    # The shared step (2 micro-batches of different response lengths): plain SGD with lr 1 moves each weight by
    # -grad, so the update is the gradient.
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    res = train_step(model, opt, ids, lr=1.0, micro_batch=1, grad_clip=1e9, labels=labels)
    assert res.loss == pytest.approx(manual.item(), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), dict(ref.named_parameters())[n].grad, rtol=1e-4, atol=1e-6)

    # The step's loss sends no gradient at all to the logits of prompt (and pad) positions.
    seen = {}

    def keep_logits(mod, inp, out):
        out.retain_grad()
        seen["logits"] = out

    ref.lm_head.register_forward_hook(keep_logits)
    next_token_loss(ref, ids, labels=labels).backward()
    g = seen["logits"].grad.abs().sum(-1)  # [B, T]
    assert (g[~keep] == 0).all() and (g[keep] > 0).all()


def test_train_step_without_labels_unchanged(model_dir):
    from transformers import AutoModelForCausalLM

    batch = torch.randint(3, 300, (2, 9))
    m1, m2 = (AutoModelForCausalLM.from_pretrained(model_dir) for _ in range(2))
    m0 = {k: v.detach().clone() for k, v in m1.named_parameters()}
    r1 = train_step(m1, torch.optim.SGD(m1.parameters(), lr=0.1), batch, lr=0.1, micro_batch=1, grad_clip=1.0)
    r2 = train_step(m2, torch.optim.SGD(m2.parameters(), lr=0.1), batch, lr=0.1, micro_batch=1, grad_clip=1.0,
                    labels=batch.clone())  # every token trained: the same mean loss, gradients and update
    assert r1.loss == pytest.approx(r2.loss, rel=1e-6) and r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-6)
    # plain SGD: w' = w − lr·clip(g), so equal updated weights mean equal (clipped) gradients, tensor by tensor
    moved = 0
    for (name, a), b in zip(m1.named_parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
        moved += int(not torch.equal(a, m0[name]))
    assert moved == len(m0)  # every tensor got a gradient and moved


# ------------------------------------------------------------------------------------------------ chat template


def test_chat_template_round_trips(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name this license."},
            {"role": "assistant", "content": "MIT License"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "Be brief.\n\n### User:\nName this license.\n\n### Assistant:\nMIT License</s>"
    assert "".join(t for t, _ in chat.segments(tok, msgs)) == text
    ids, _ = D.encode(tok, msgs)
    assert ids == tok(text, add_special_tokens=False).input_ids  # piecewise tokenizing = tokenizing the whole
    assert tok.decode(ids) == text


def test_finetune_writes_hf_folder_with_template_and_resumes(model_dir, tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _sft_file(tmp_path)
    args = FinetuneArgs(steps=4, batch_size=4, micro_batch=2, lr=1e-3, checkpoint_every=2, keep_checkpoints=3)
    out = tmp_path / "ft"
    s = finetune(model_dir, data, val=data, out=out, args=args)
    model = out / "model"
    tok = AutoTokenizer.from_pretrained(model)
    assert tok.chat_template == chat.CHAT_TEMPLATE
    assert json.loads((model / "tokenizer_config.json").read_text())["chat_template"] == chat.CHAT_TEMPLATE
    assert "### Assistant:" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                        add_generation_prompt=True)
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert any(r["kind"] == "eval" for r in rows) and s["val_loss"] is not None
    w_full = AutoModelForCausalLM.from_pretrained(model).state_dict()

    # Killed after step 2: the rerun resumes there and ends with the same weights.
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "finetune.json").unlink()
    s2 = finetune(model_dir, data, val=data, out=out, args=args)
    assert s2["steps"] == 4
    w_resumed = AutoModelForCausalLM.from_pretrained(model).state_dict()
    for k in w_full:
        torch.testing.assert_close(w_full[k], w_resumed[k], rtol=0, atol=0)
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]

    code, stdout, _ = cli("generate", str(model), "--prompt", "Name this license.", "--max-new-tokens", "3",
                          "--temperature", "0")
    assert code == 0 and "### User" not in stdout  # the reply only, prompt wrapped by the template


def test_example_order_is_a_pure_function_of_step():
    a = [i for s in range(3) for i in example_order(5, 0, s, 5)]
    assert sorted(a[:5]) == list(range(5)) and sorted(a[5:10]) == list(range(5))
    assert example_order(5, 0, 2, 5) == a[10:]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("row", "msg"), [
    ({"prompt": "x"}, "missing string field(s) response"),
    ({"prompt": "x", "response": "  "}, "empty response"),
    ({"messages": [{"role": "user", "content": "x"}]}, "last message must be the assistant"),
    ("{not json", "not JSON"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, row, msg):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, "", row])
    with pytest.raises(UserError) as e:
        D.read_jsonl(f)
    assert f"{f}:3:" in str(e.value) and msg in str(e.value) and "\n" not in str(e.value)


def test_too_long_is_truncated_and_counted_or_rejected(tok, tmp_path):
    f = _write(tmp_path / "d.jsonl", [{"prompt": "word " * 200, "response": "Permissive"},
                                      {"prompt": "short", "response": "Copyleft"}])
    convs = D.read_jsonl(f)
    enc = D.encode_all(tok, convs, 65, "truncate")
    assert enc.truncated == 1 and len(enc.examples[0].ids) == 65
    assert tok.decode([x for x in enc.examples[0].labels if x != IGNORE]) == "Permissive</s>"
    with pytest.raises(UserError, match=rf"{f}:1: \d+ tokens, longer than the model's context of 64"):
        D.encode_all(tok, convs, 65, "reject")


def test_model_folder_without_tokenizer(model_dir, tmp_path, cli):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / f, bare / f)
    data = _sft_file(tmp_path)
    code, _, err = cli("finetune", str(bare), "--data", str(data))
    assert code == 2 and "no tokenizer in the model folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("finetune", str(model_dir), "--data", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "no such file" in err


def test_lora_without_peft_is_a_clear_error(model_dir, tmp_path):
    try:
        import peft  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"--lora needs the optional package peft"):
            finetune(model_dir, _sft_file(tmp_path), out=tmp_path / "l", args=FinetuneArgs(steps=1, lora=True))
        return
    s = finetune(model_dir, _sft_file(tmp_path), out=tmp_path / "l", args=FinetuneArgs(steps=2, lora=True))
    assert (tmp_path / "l" / "model" / "config.json").is_file() and s["steps"] == 2


# ------------------------------------------------------------------------------------------------ tasks


def test_licensedb_split_is_by_license_and_deterministic(cli, tmp_path):
    code, out, _ = cli("tasks", "licensedb", "--out", str(tmp_path / "t"))
    assert code == 0 and "class balance" in out and "Permissive" in out
    splits = {s: [json.loads(x) for x in (tmp_path / "t" / f"{s}.jsonl").read_text().splitlines()]
              for s in ("train", "val", "test")}
    lic = {s: {it["license"] for it in v} for s, v in splits.items()}
    assert not (lic["train"] & lic["test"]) and not (lic["val"] & lic["test"]) and not (lic["train"] & lic["val"])
    assert 0.15 < len(lic["test"]) / sum(map(len, lic.values())) < 0.25
    assert {it["task"] for it in splits["test"]} == set(T.TASKS)
    assert splits["test"] == T.build()["test"]  # rebuilt identically (what `eval --task` scores)
    excl = (tmp_path / "t" / "exclude_ids.txt").read_text().splitlines()
    assert {f"licenses/{k}.LICENSE" for k in lic["test"]} <= set(excl)
    assert not {f"licenses/{k}.LICENSE" for k in lic["train"]} & set(excl)


def test_exclude_ids_drop_files_from_a_source(tmp_path):
    from domainlm.config import SourceConfig
    from domainlm.data.sources import resolve

    (tmp_path / "docs").mkdir()
    for n in ("a", "b", "c"):
        (tmp_path / "docs" / f"{n}.txt").write_text(n)
    ex = _write(tmp_path / "ex.txt", ["# held out", "b.txt"])
    src = SourceConfig(name="s", role="domain", weight=1.0, input=str(tmp_path / "docs"), exclude_ids=str(ex))
    assert [p.rsplit("/", 1)[1] for p in resolve(src, "sources[0].input").files] == ["a.txt", "c.txt"]
    _write(ex, ["nope.txt"])
    with pytest.raises(UserError, match="none of its 1 ids"):
        resolve(src, "sources[0].input")


def test_metrics():
    # words: gnu general public license 2 0 / gpl 2 0 → LCS "2 0": P 2/6, R 2/3
    p, r = 2 / 6, 2 / 3
    assert T.rouge_l("GNU General Public License 2.0", "GPL 2.0") == pytest.approx(2 * p * r / (p + r))
    assert T.rouge_l("MIT License", "mit license") == 1.0 and T.rouge_l("", "x") == 0.0
    assert T.macro_f1(["a", "a", "b"], ["a", "a", "b"]) == 1.0
    assert T.macro_f1(["a", "a", "b"], ["a", "a", "a"]) == pytest.approx((0.8 + 0) / 2)
    s = T.summarise("licensedb-category", ["a", "b"] * 20, ["a", "a"] * 20)
    lo, hi = s["accuracy"]["ci95"]
    assert lo <= s["accuracy"]["value"] == 0.5 <= hi


def test_choice_logprobs_match_full_sequence_loss(model_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    choices = ["Permissive", "Copyleft Limited", "CLA"]
    got = T.choice_logprobs(model, tok, "Which category does this license fall under?", choices)
    for k, c in enumerate(choices):
        ids, labels = D.encode(tok, [{"role": "user", "content": "Which category does this license fall under?"},
                                     {"role": "assistant", "content": c}])
        want = -next_token_loss(model, torch.tensor([ids]), "sum", torch.tensor([labels]))
        assert got[k].item() == pytest.approx(want.item(), rel=1e-4)


def test_eval_task_scores_a_model_folder(model_dir, tmp_path, cli):
    items = [it for it in T.build(max_chars=60)["test"][:12]]
    test = _write(tmp_path / "test.jsonl", items)
    code, out, err = cli("eval", str(model_dir), "--task", "licensedb-category", "--task", "licensedb-name",
                         "--task-data", str(test), "--out", str(tmp_path / "tasks.json"), "--json")
    assert code == 0, err
    res = json.loads(out)
    cat = res["licensedb-category"]
    assert cat["items"] == 6
    hits = [p["pred"] == p["gold"] for p in cat["predictions"]]
    assert cat["metrics"]["accuracy"]["value"] == pytest.approx(sum(hits) / len(hits))
    assert set(cat["metrics"]) == {"accuracy", "macro_f1"} and set(res["licensedb-name"]["metrics"]) == {
        "exact_match", "rouge_l"}
    assert all(p["pred"] in cat["choices"] for p in cat["predictions"])
    assert load_output(tmp_path / "tasks.json", TaskResults).model_dump(exclude_unset=True) == res  # through its model
    code, _, err = cli("eval", str(model_dir), "--task", "licensedb-nope")
    assert code == 2 and "unknown task" in err


def test_compare_writes_side_by_side_result(model_dir, tmp_path):
    from domainlm.finetune.compare import compare

    built = T.build(max_chars=60)
    data = _write(tmp_path / "train.jsonl", built["train"][:16])
    test = _write(tmp_path / "test.jsonl", built["test"][:8])
    res, written = compare(model_dir, model_dir, data, test=test, out=tmp_path / "cmp",
                           args=FinetuneArgs(steps=2, batch_size=4, micro_batch=4))
    assert written == [tmp_path / "cmp" / "compare.json"]
    found = check_outputs(tmp_path / "cmp")  # the comparison and both fine-tunings' summaries, each through its model
    assert set(found) == {"compare.json", "domain/finetune.json", "general/finetune.json"}
    assert found["domain/finetune.json"].fingerprint == found["general/finetune.json"].fingerprint
    assert FinetuneComparison.model_validate_json(written[0].read_text()).verdict == res["verdict"]
    r = res["tasks"]["licensedb-category"]
    # Same base, data, steps and seed: identical fine-tunes, so the difference is exactly 0.
    assert r["domain_minus_general"]["accuracy"]["value"] == 0 and "no detectable difference" in res["verdict"]

    from domainlm.pipeline import build_report

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "finetune.json").write_text(json.dumps(res))
    page = build_report(run)
    assert page["sections"]["finetune"]["complete"]
    assert "domain − general" in (run / "report" / "index.html").read_text()
    with pytest.raises(UserError, match="also in the test split"):
        compare(model_dir, model_dir, _write(tmp_path / "leak.jsonl", built["test"][:2]), test=test,
                out=tmp_path / "c2")
