"""Downstream tasks built from ScanCode LicenseDB metadata (data nobody here wrote), and their scoring.

Each ``licenses/<key>.LICENSE`` file carries YAML front matter: ``category`` (Permissive, Copyleft, …) and
``short_name``. Two instruction tasks come from it:

- ``licensedb-category``: "Which category does this license fall under?" → category. Scored without
  generation: every category is ranked by log p(category + EOS | prompt), the probability of emitting exactly
  that answer and stopping. Accuracy and macro-F1 (small classes count as much as Permissive).
- ``licensedb-name``: "Name this license." → short name. Greedy generation; exact match (case- and
  space-insensitive) and ROUGE-L F1 over words (Lin 2004).

The split is by license and deterministic: within each category, licenses are ordered by sha256(seed:key) and
the first ``test_fraction`` go to test, the next ``val_fraction`` to val. Deprecated licenses (duplicates of
others) and ones without text are left out. Every score carries a 95% bootstrap CI over test items.
"""

from __future__ import annotations

import inspect
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from domainlm.chat import ensure_chat_template, pad_id_of, segments
from domainlm.data.packaged import (  # noqa: F401 (License, load_licenses, split_licenses: the task API)
    TEST_FRACTION,
    VAL_FRACTION,
    License,
    excluded_files,
    load_licenses,
    split_licenses,
)
from domainlm.data.sources import jsonl_lines
from domainlm.errors import UserError
from domainlm.evaluate.inputs import load_model
from domainlm.outputs import TaskData
from domainlm.rundir import RunDir, atomic_write

TASKS = ("licensedb-category", "licensedb-name")
QUESTIONS = {"licensedb-category": "Which category does this license fall under?",
             "licensedb-name": "Name this license."}
# License text kept per prompt: the head, where the name usually is. ~500 chars ≈ 120–170 tokens with the
# demo's 8k BPE, so prompt + answer fit the demo's 256-token context with either tokenizer.
MAX_TEXT_CHARS = 500
# The categories of LicenseDB (licensedcode-data 32): every one is a candidate answer.
CATEGORIES = ("Permissive", "Proprietary Free", "Copyleft Limited", "Copyleft", "Commercial", "Free Restricted",
              "Source-available", "Public Domain", "Patent License", "CLA", "Unstated License")
BOOTSTRAP = 1000  # resamples; percentile CI (Efron & Tibshirani 1993)


def _excerpt(text: str, max_chars: int) -> str:
    text = text.strip()
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut[max_chars // 2 :] else cut  # end on a word


def items_for(lic: License, max_chars: int = MAX_TEXT_CHARS) -> list[dict]:
    """One instruction per task. The question comes after the text: if a model's context is shorter than the
    prompt, left truncation drops the start of the text, never the question."""
    text = _excerpt(lic.text, max_chars)
    answers = {"licensedb-category": lic.category, "licensedb-name": lic.short_name}
    return [{"id": f"{lic.key}/{t}", "license": lic.key, "task": t, "prompt": f"{text}\n\n{QUESTIONS[t]}",
             "response": answers[t]} for t in TASKS]


def build(test_fraction: float = TEST_FRACTION, val_fraction: float = VAL_FRACTION, seed: int = 0,
          max_chars: int = MAX_TEXT_CHARS) -> dict[str, list[dict]]:
    """split -> instruction items (both tasks), deterministic."""
    licenses = load_licenses()
    split = split_licenses(licenses, test_fraction, val_fraction, seed)
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for lic in licenses:
        out[split[lic.key]] += items_for(lic, max_chars)
    return out


def class_balance(items: list[dict]) -> dict[str, int]:
    return dict(Counter(it["response"] for it in items if it["task"] == "licensedb-category").most_common())


def write_task_data(out_dir: Path, **kw) -> dict:
    """train/val/test JSONL, exclude_ids.txt (for ``sources[].exclude_ids``) and balance.json (written last)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = build(**kw)
    for name, items in data.items():  # ASCII JSON: no U+2028 to split lines on
        atomic_write(out_dir / f"{name}.jsonl", "".join(json.dumps(it) + "\n" for it in items))
    test_keys = {it["license"] for it in data["test"]}
    excl = excluded_files(test_keys)
    atomic_write(out_dir / "exclude_ids.txt",
                 "# licensedcode files of the test licenses (written by `domainlm tasks licensedb`)\n"
                 + "\n".join(excl) + "\n")
    seen = {s: {it["license"] for it in items} for s, items in data.items()}
    overlap = (seen["train"] | seen["val"]) & seen["test"]
    assert not overlap, f"licenses in both fine-tuning and test: {sorted(overlap)[:3]}"
    summary = {"dir": str(out_dir), "licenses": {s: len(v) for s, v in seen.items()},
               "items": {s: len(v) for s, v in data.items()}, "excluded_files": len(excl),
               "balance": {s: class_balance(v) for s, v in data.items()}, "params": kw}
    atomic_write(out_dir / RunDir.TASK_BALANCE, json.dumps(TaskData.checked(summary), indent=1))
    return summary


def load_test(task: str, path: Path | None = None) -> list[dict]:
    """The test items of ``task``: from a file written by `domainlm tasks licensedb`, else built (defaults)."""
    if task not in TASKS:
        raise UserError(f"--task: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if path is None:
        items = build()["test"]
    else:
        items = []
        for lineno, line in jsonl_lines(path):
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{lineno}: not JSON") from None
    items = [it for it in items if it.get("task") == task]
    if not items:
        raise UserError(f"{path or 'the built test split'}: no {task} items")
    return items


# ------------------------------------------------------------------------------------------------ metrics


def norm(s: str) -> str:
    return " ".join(s.casefold().split())


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (β = 1) over lowercased word tokens: LCS-based precision and recall (Lin 2004)."""
    a, b = re.findall(r"\w+", pred.lower()), re.findall(r"\w+", ref.lower())
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def macro_f1(gold: list[str], pred: list[str]) -> float:
    """Mean F1 over the classes present in gold or predictions (a class never predicted scores 0)."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for g, p in zip(gold, pred, strict=True):  # one pass: the bootstrap calls this thousands of times
        if g == p:
            tp[g] += 1
        else:
            fp[p] += 1
            fn[g] += 1
    f1s = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) if tp[c] else 0.0 for c in sorted(set(gold) | set(pred))]
    return float(np.mean(f1s)) if f1s else 0.0


def metric_fns(task: str) -> dict:
    """name -> f(gold list, pred list) -> float."""
    if task == "licensedb-category":
        return {"accuracy": lambda g, p: float(np.mean([a == b for a, b in zip(g, p, strict=True)])),
                "macro_f1": macro_f1}
    return {"exact_match": lambda g, p: float(np.mean([norm(a) == norm(b) for a, b in zip(g, p, strict=True)])),
            "rouge_l": lambda g, p: float(np.mean([rouge_l(b, a) for a, b in zip(g, p, strict=True)]))}


def bootstrap_indices(n: int, resamples: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """The same resamples for every model of a comparison (paired bootstrap)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def with_ci(fn, gold: list[str], pred: list[str], idx: np.ndarray) -> dict:
    vals = [fn([gold[i] for i in row], [pred[i] for i in row]) for row in idx]
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return {"value": fn(gold, pred), "ci95": [float(lo), float(hi)]}


def summarise(task: str, gold: list[str], pred: list[str], idx: np.ndarray | None = None) -> dict:
    idx = bootstrap_indices(len(gold)) if idx is None else idx
    return {name: with_ci(fn, gold, pred, idx) for name, fn in metric_fns(task).items()}


def paired_diff(task: str, gold: list[str], pred_a: list[str], pred_b: list[str], idx: np.ndarray) -> dict:
    """a − b on each metric with a paired-bootstrap 95% CI (same resampled items for both)."""
    out = {}
    for name, fn in metric_fns(task).items():
        d = [fn([gold[i] for i in r], [pred_a[i] for i in r]) - fn([gold[i] for i in r], [pred_b[i] for i in r])
             for r in idx]
        lo, hi = np.percentile(d, [2.5, 97.5])
        out[name] = {"value": fn(gold, pred_a) - fn(gold, pred_b), "ci95": [float(lo), float(hi)]}
    return out


# ------------------------------------------------------------------------------------------------ scoring


def _context(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


def _cache_kwarg(model) -> str:
    """transformers ≥ 5.2x names the KV-cache argument ``cache``; earlier versions ``past_key_values``."""

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def choice_logprobs(model, tok, prompt: str, choices: list[str]):
    """[K] log p(choice + EOS | prompt) under the chat template, tokenized exactly as in fine-tuning. The prompt
    runs once; its KV cache is repeated for the K choices (the prompt is ~50× longer than an answer)."""


    pieces = [segments(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": c}])
              for c in choices]
    answers = [tok(p[1][0], add_special_tokens=False).input_ids for p in pieces]  # [(prompt, False), (answer, True)]
    longest = max(len(a) for a in answers)
    ids = tok(pieces[0][0][0], add_special_tokens=False).input_ids[-(_context(model) - longest):]  # left-truncated
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        score = torch.stack([first[a[0]] for a in answers])
        if longest > 1:
            cache = out.cache if _cache_kwarg(model) == "cache" else out.past_key_values
            cache.batch_repeat_interleave(len(choices))
            pad = pad_id_of(tok)
            # right pads: causal attention, so no answer token sees them
            x = torch.tensor([a[:-1] + [pad] * (longest - len(a)) for a in answers], device=device)
            logp = torch.log_softmax(model(input_ids=x, **{_cache_kwarg(model): cache}).logits.float(), -1)
            for k, a in enumerate(answers):
                score[k] += sum(logp[k, j - 1, a[j]] for j in range(1, len(a)))
    return score


def classify(model, tok, items: list[dict], choices: list[str], progress=None) -> list[str]:
    """For each item, the choice with the highest log p(choice + EOS | prompt)."""
    preds = []
    for it in items:
        preds.append(choices[int(choice_logprobs(model, tok, it["prompt"], choices).argmax())])
        if progress:
            progress(1, len(items))
    return preds


def generate_answers(model, tok, items: list[dict], max_new_tokens: int = 32, batch: int = 32,
                     progress=None) -> list[str]:
    """Greedy answers, batched with left padding (the attention mask hides the pads)."""


    pad, device = pad_id_of(tok), next(model.parameters()).device
    room = _context(model) - max_new_tokens
    prompts = []
    for it in items:  # the untrained first piece of a one-turn conversation is the prompt, as in training
        head = segments(tok, [{"role": "user", "content": it["prompt"]}, {"role": "assistant", "content": "x"}])[0][0]
        prompts.append(tok(head, add_special_tokens=False).input_ids[-room:])  # left-truncated
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        n = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            gen = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id,
                                 temperature=None, top_p=None, top_k=None)
        out += [tok.decode(g[n:], skip_special_tokens=True).strip() for g in gen]
        if progress:
            progress(len(chunk), len(prompts))
    return out


def score_task(model_dir: Path, task: str, *, test: Path | None = None, items: list[dict] | None = None,
               progress=None) -> dict:
    """Predictions and metrics (with CIs) of one model folder on one task."""


    items = items if items is not None else load_test(task, test)
    model, tok = load_model(Path(model_dir), "cuda" if torch.cuda.is_available() else "cpu")
    templated = not ensure_chat_template(tok)  # a model without one is scored zero-shot with ours
    gold = [it["response"] for it in items]
    if task == "licensedb-category":
        choices = sorted(set(gold) | set(CATEGORIES))
        preds = classify(model, tok, items, choices, progress)
        counts = Counter(gold)
        extra = {"choices": choices, "chance_accuracy": 1 / len(choices),
                 "majority_accuracy": counts.most_common(1)[0][1] / len(gold),
                 "majority_class": counts.most_common(1)[0][0]}
    else:
        preds = generate_answers(model, tok, items, progress=progress)
        extra = {}
    return {"task": task, "model": str(model_dir), "items": len(items), "chat_template": templated,
            "metrics": summarise(task, gold, preds), **extra,
            "predictions": [{"id": it["id"], "gold": g, "pred": p}
                            for it, g, p in zip(items, gold, preds, strict=True)]}


def format_metrics(res: dict) -> str:
    return ", ".join(f"{k} {v['value']:.1%} [{v['ci95'][0]:.1%}, {v['ci95'][1]:.1%}]"
                     for k, v in res["metrics"].items())


def print_balance(summary: dict, console) -> None:
    lic, items = summary["licenses"], summary["items"]
    console.print(f"licensedb tasks in {summary['dir']}: licenses train {lic['train']}, val {lic['val']}, test "
                  f"{lic['test']} (no license in two splits); items {items}; {summary['excluded_files']} files "
                  "listed in exclude_ids.txt for pretraining", highlight=False, markup=False)
    cats = list(summary["balance"]["train"])
    console.print("class balance (category task): " + "; ".join(
        f"{c} {summary['balance']['train'].get(c, 0)}/{summary['balance']['val'].get(c, 0)}/"
        f"{summary['balance']['test'].get(c, 0)}" for c in cats) + " (train/val/test)", highlight=False)
