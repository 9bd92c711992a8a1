"""`domainlm finetune --head classification`: sequence classification on a pretrained model folder.

The folder is loaded with ``AutoModelForSequenceClassification`` — a decoder export (Llama: the head reads the
last token, here the EOS that ends every example, the token that ended every document in pretraining) or an
encoder export (BERT-style: the head reads the first token, the CLS; a ModernBERT export of
``model.objective: masked`` reads the mean of all tokens instead, because its pretraining windows never start
with a CLS token, so that token's state was never trained) — with a new linear head over the labels, initialised
from ``--seed``. Each example is ``[BOS|CLS] text [EOS|SEP]``, the text cut on the right to the model's context
(the head of a license names it); batches are padded on the right with an attention mask.

Reused, not copied: the one training step (`train/step.train_step`, with its ``loss_fn`` hook: cross-entropy
over the classes, the mean over the micro-batch), the optimizer, the schedule, the loop driver
(`train/driver.py`: checkpoints with exact resume, metrics rows, eval cadence), the example order of
instruction fine-tuning (a pure function of seed and step, so resume needs no loader state) and its export.
Writes under ``--out`` the same files as `finetune/loop.py` (``checkpoints/``, ``logs/metrics.jsonl``,
``model/`` — a folder ``AutoModelForSequenceClassification`` loads, labels in ``config.json``'s ``id2label`` —
and ``finetune.json``).

Data: JSONL lines ``{"text": …, "label": …}``, or the items of `domainlm tasks licensedb` (lines of the
``licensedb-category`` task: the license text before the question, and its category; other tasks' lines are
skipped). Scoring (`score_items`) gives the metrics of `evaluate/tasks.py` (accuracy, macro-F1, bootstrap
intervals), so `finetune/compare.py` compares two classifiers exactly as it compares two instruction-tuned models.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from domainlm import stages
from domainlm.chat import pad_id_of
from domainlm.data.sources import jsonl_lines
from domainlm.errors import UserError
from domainlm.evaluate import tasks as downstream
from domainlm.finetune.loop import (
    FinetuneArgs,
    _save_hf,
    data_name,
    example_order,
    finished_or_start,
    inputs_fingerprint,
    resolve_model,
    weight_inputs,
)
from domainlm.outputs import ClassifierSummary
from domainlm.rundir import RunDir, write_json
from domainlm.train.driver import Driver, Eval
from domainlm.train.parallel import Dist
from domainlm.train.schedule import lr_at
from domainlm.train.step import autocast_for, make_optimizer, train_step

TASK = "licensedb-category"  # the task whose items this head reads (its answer is the class)


@dataclass
class Labelled:
    where: str  # file:line, for errors
    text: str
    label: str


@dataclass
class Example:
    ids: list[int]
    label: int  # index into the label list


# ------------------------------------------------------------------------------------------------ data


def _record(rec: object, where: str) -> Labelled | None:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("text"), str) and isinstance(rec.get("label"), str):
        text, label = rec["text"], rec["label"]
    elif "task" in rec and rec.get("task") != TASK:
        return None  # another task's item (licensedb-name): not a classification example
    elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
        text = rec["prompt"].removesuffix("\n\n" + downstream.QUESTIONS[TASK])  # the question adds nothing here
        label = rec["response"]
    else:
        found = ", ".join(sorted(rec)[:8]) or "none"
        raise UserError(f'{where}: expected "text" and "label" strings, or a {TASK} item with "prompt" and '
                        f'"response" (found keys: {found})')
    if not text.strip() or not label.strip():
        raise UserError(f"{where}: empty text or label")
    return Labelled(where, text, label)


def read_labelled(path: Path) -> list[Labelled]:
    """The classification examples of a JSONL file, or a one-line error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    out = []
    for lineno, line in jsonl_lines(path):
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg})") from None
        if (ex := _record(rec, where)) is not None:
            out.append(ex)
    if not out:
        raise UserError(f"{path}: no classification examples ({{\"text\", \"label\"}} lines or {TASK} items)")
    return out


def check_classes(path: Path, train: list[Labelled]) -> None:
    """At least two classes among the training labels: with one, cross-entropy reaches 0 by predicting it
    everywhere, and the "classifier" has learned nothing."""
    seen = sorted({ex.label for ex in train})
    if len(seen) < 2:
        raise UserError(f"{path}: every example has the label {seen[0]!r}; a classifier needs examples of at "
                        "least two classes")


def label_list(train: list[Labelled]) -> list[str]:
    """The classes: LicenseDB's categories in their fixed order when the labels are LicenseDB categories (so a
    class absent from a small training set still has a head row), else the training labels sorted."""
    seen = {ex.label for ex in train}
    return list(downstream.CATEGORIES) if seen <= set(downstream.CATEGORIES) else sorted(seen)


def _ends(tok) -> tuple[int | None, int | None]:
    start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    return start, end


def encode(tok, data: list[Labelled], labels: list[str], max_len: int, too_long: str,
           unknown: str = "error") -> tuple[list[Example], int]:
    """([START] text [END] ids, label index) per example and how many texts were cut on the right. A label
    not in ``labels``: an error (training data), or -1 (``unknown="keep"``: test items the head cannot
    predict, still scored as wrong)."""
    start, end = _ends(tok)
    room = max_len - (start is not None) - (end is not None)
    index = {c: i for i, c in enumerate(labels)}
    out, cut = [], 0
    for ex in data:
        if ex.label not in index and unknown == "error":
            raise UserError(f"{ex.where}: label {ex.label!r} is not one of the {len(labels)} classes "
                            f"({', '.join(labels[:6])}…)")
        body = tok(ex.text, add_special_tokens=False).input_ids
        if len(body) > room:
            if too_long == "reject":
                raise UserError(f"{ex.where}: {len(body)} tokens, longer than the model's context of {max_len} "
                                "(with start and end tokens); shorten it or use --too-long truncate")
            body, cut = body[:room], cut + 1
        ids = ([start] if start is not None else []) + body + ([end] if end is not None else [])
        out.append(Example(ids, index.get(ex.label, -1)))
    return out, cut


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] ids padded on the right, their attention mask, [B] labels."""
    n = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    return ids, mask, torch.tensor([e.label for e in examples])


# ------------------------------------------------------------------------------------------------ model


def load_classifier(model_dir: Path, labels: list[str] | None, pad_id: int, seed: int):
    """AutoModelForSequenceClassification from a local folder: a pretrained export (``labels`` given: a new
    head, initialised from ``seed``) or a fine-tuned classifier (``labels`` None: its own head and labels)."""

    kw = {} if labels is None else {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                                    "label2id": {c: i for i, c in enumerate(labels)}}
    if labels is not None and AutoConfig.from_pretrained(model_dir, local_files_only=True).model_type == "modernbert":
        kw["classifier_pooling"] = "mean"  # see the module docstring
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: score.weight" is the point of this call
    bars = hf_logging.is_progress_bar_enabled()  # off under the CLI unless --debug
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True,
                                                                   dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError) as e:
        lines = str(e).strip().splitlines()
        raise UserError(f"{model_dir}: cannot load it for sequence classification ({type(e).__name__}: "
                        f"{lines[0] if lines else 'no message'})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if model.config.pad_token_id is None:  # the decoder head finds the last real token by the pad id
        model.config.pad_token_id = pad_id
    return model


def class_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
               reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the head's logits against the class labels."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


@torch.no_grad()
def logits_of(model, examples: list[Example], pad_id: int, device: torch.device, precision: str,
              batch: int = 16) -> torch.Tensor:
    """[N, K] class logits (float32, CPU), in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(examples), batch):
        ids, mask, _ = collate(examples[i : i + batch], pad_id)
        with autocast_for(device, precision):
            out.append(model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             use_cache=False).logits.float().cpu())
    model.train(was_training)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ fine-tune


def finetune_classifier(model_or_run: Path, data: Path, *, val: Path | None = None, out: Path | None = None,
                        args: FinetuneArgs | None = None, restart: bool = False,
                        console: Console | None = None) -> dict:
    """Fine-tune a sequence-classification head and the whole model on ``data``; the summary (also in
    ``<out>/finetune.json``)."""
    args = args or FinetuneArgs()
    console = console or Console(stderr=True)
    if args.lora:
        raise UserError("--lora: not supported with --head classification (full fine-tuning only)")
    if args.too_long not in ("truncate", "reject"):
        raise UserError(f"--too-long: expected truncate or reject, got {args.too_long!r}")
    if args.batch_size % args.micro_batch:
        raise UserError(f"--micro-batch: {args.micro_batch} does not divide --batch-size {args.batch_size}")
    ref = resolve_model(model_or_run)
    model_dir, run_dir = ref.model_dir, ref.run_dir
    train_rows = read_labelled(data)
    check_classes(data, train_rows)
    val_rows = read_labelled(val) if val is not None else []
    out = Path(out) if out is not None else ref.finetune_out(f"{data_name(data)}-classify")
    labels = label_list(train_rows)



    context = int(getattr(AutoConfig.from_pretrained(model_dir, local_files_only=True), "max_position_embeddings",
                          0) or 512)
    max_len = min(args.max_len or context, context)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    pad_id = pad_id_of(tok)
    enc, cut = encode(tok, train_rows, labels, max_len, args.too_long)
    venc = encode(tok, val_rows, labels, max_len, "truncate", unknown="keep")[0] if val_rows else None

    fp = stages.fingerprint("classification", labels, asdict(args), *inputs_fingerprint(model_dir, data, val))
    summary_path = out / RunDir.FINETUNE
    done, stage = finished_or_start(out, fp, restart, console)
    if done is not None:
        return done

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    model = load_classifier(model_dir, labels, pad_id, args.seed).to(device)
    model.train()
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay, device=device)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    driver: Driver

    def one_step(lr: float):
        ids, mask, y = collate([enc[i] for i in example_order(len(enc), args.seed, driver.step, args.batch_size)],
                               pad_id)
        ids, mask, y = ids.to(device), mask.to(device), y.to(device)
        res = train_step(model, optimizer, ids, lr=lr, micro_batch=args.micro_batch, grad_clip=args.grad_clip,
                         precision=precision, loss_fn=lambda rows: class_loss(model, ids[rows], mask[rows], y[rows]))
        return res, int(mask.sum()), {}

    def evaluate() -> Eval:  # mean cross-entropy and accuracy on the validation examples
        logits = logits_of(model, venc, pad_id, device, precision, args.micro_batch)
        y = torch.tensor([e.label for e in venc])
        known = y >= 0
        loss = F.cross_entropy(logits[known], y[known]).item() if known.any() else float("nan")
        acc = (logits.argmax(-1) == y).double().mean().item()
        return Eval({"val_loss": loss, "val_accuracy": acc}, f"val loss {loss:.4f}, accuracy {acc:.1%}")

    driver = Driver("finetune", out, Dist(0, 1, 0, device), model, optimizer, args.steps,
                    lambda step: lr_at(step, lr=args.lr, total_steps=args.steps, warmup_steps=warmup), one_step,
                    evaluate if venc else None, lambda: {"fingerprint": fp}, args.eval_every, args.checkpoint_every,
                    args.keep_checkpoints, console,
                    inputs=weight_inputs(args, model_dir, data, head="classification", labels=labels, max_len=max_len))
    resumed = driver.resume()
    if resumed:
        path, state = resumed
        console.print(f"resuming from {path} at step {driver.step}", markup=False)

    balance = Counter(labels[e.label] for e in enc)
    console.print(
        f"finetune --head classification: {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"params, {type(model).__name__}) on {len(enc)} examples, {len(labels)} classes (largest "
        f"{balance.most_common(1)[0][0]} {balance.most_common(1)[0][1] / len(enc):.0%}); {cut} cut to {max_len} "
        f"tokens; {args.steps} steps × {args.batch_size}, lr {args.lr:g}; {precision} on {device.type}",
        highlight=False, markup=False)
    driver.run()
    last_val = (driver.last_eval or {}).get("val_loss")

    model.config.domainlm_max_len = max_len  # what `score_items` cuts test texts to: the length it trained on
    _save_hf(model, tok, out / RunDir.MODEL)
    summary = {"head": "classification", "model": str(model_dir), "run_dir": str(run_dir) if run_dir else None,
               "data": str(data), "val": str(val) if val else None, "out": str(out / RunDir.MODEL),
               "architecture": type(model).__name__, "labels": labels, "steps": driver.step,
               "final_loss": driver.last_loss, "val_loss": last_val,
               "val_accuracy": (driver.last_eval or {}).get("val_accuracy"), "examples": len(enc), "truncated": cut,
               "tokens_per_s": driver.tokens_per_s, "args": asdict(args), "fingerprint": fp}
    write_json(summary_path, ClassifierSummary.checked(summary), indent=1)
    stage.finish()
    console.print(f"wrote [bold]{escape(str(out / RunDir.MODEL))}[/] (AutoModelForSequenceClassification); final "
                  f"loss {driver.last_loss:.4f}" + (f", val loss {last_val:.4f}" if last_val is not None else ""))
    return summary


# ------------------------------------------------------------------------------------------------ scoring


def score_items(model_dir: Path, items: list[dict], task: str = TASK) -> dict:
    """A fine-tuned classifier's predictions on task items, in the shape of `evaluate.tasks.score_task` (metrics
    with bootstrap CIs, chance and majority-class accuracy, predictions)."""


    model_dir = Path(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = load_classifier(model_dir, None, pad_id_of(tok), 0).to(device)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = [r for i, it in enumerate(items) if (r := _record(it, f"test item {i + 1}")) is not None]
    if len(rows) != len(items):
        raise UserError(f"{task}: {len(items) - len(rows)} test item(s) of another task")
    context = int(getattr(model.config, "max_position_embeddings", 0) or 512)
    max_len = min(int(getattr(model.config, "domainlm_max_len", 0) or context), context)  # the training length
    examples, _ = encode(tok, rows, labels, max_len, "truncate", unknown="keep")
    logits = logits_of(model, examples, pad_id_of(tok), device,
                       "bf16-mixed" if device.type == "cuda" else "fp32")
    preds = [labels[int(k)] for k in logits.argmax(-1)]
    gold = [r.label for r in rows]
    counts = Counter(gold)
    return {"task": task, "model": str(model_dir), "items": len(items), "head": "classification",
            "metrics": downstream.summarise(task, gold, preds), "choices": labels,
            "chance_accuracy": 1 / len(labels), "majority_accuracy": counts.most_common(1)[0][1] / len(gold),
            "majority_class": counts.most_common(1)[0][0],
            "predictions": [{"id": it.get("id", str(i)), "gold": g, "pred": p}
                            for i, (it, g, p) in enumerate(zip(items, gold, preds, strict=True))]}
