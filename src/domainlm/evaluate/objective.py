"""`domainlm eval` of a masked-LM encoder or a span-corruption encoder-decoder (model.objective masked / span).

Bits per byte needs the probability of the text, which only a causal model gives; an encoder is scored instead
on the task it was trained for, with masks that are the same for every model (seed 0,
window index; objectives/): masked — 15% of each window's tokens replaced by the mask token, the loss (nats per
masked token) and top-1 accuracy of recovering them; span — T5's 15% noise in spans of mean length 3, the loss and
accuracy of the decoder's targets (sentinels, corrupted tokens, EOS) under teacher forcing.

Each text is tokenized like the token files (documents without special tokens, EOS after each), joined, and
cut into windows of ``context`` tokens (the run's ``train.seq_len``; else the model's positions, at most 512);
the last window may be shorter. Comparable: models with the same tokenizer scored with the same seed and context
(the same masks). Not comparable: a causal model's loss or bpb, models with different tokenizers (other tokens
are masked), and a masked with a span score.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging as hf_logging

from domainlm import objectives
from domainlm.errors import UserError
from domainlm.objectives.corruption import EVAL_SEED, CorruptedBatches, Corruption
from domainlm.train.step import validation_nll

DEFAULT_CONTEXT = 512  # BERT's
COMPARABLE = ("{what}: comparable between models with the same tokenizer scored with the same seed and context "
              "(identical masks); not with a causal model's loss or bits per byte (bits per byte is defined for "
              "causal models only), nor across tokenizers")


def model_objective(model_dir: Path) -> objectives.Objective:
    """The objective a model folder was trained with (causal, masked, span), from its config.json."""

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable config: one line naming the folder
        raise UserError(f"{model_dir}/config.json: cannot read the model config ({type(e).__name__})") from None
    return objectives.of_hf_config(config)


def load(model_dir: Path, objective: Corruption, device: str):
    """The objective's Auto class (AutoModelForMaskedLM / AutoModelForSeq2SeqLM) + AutoTokenizer from a local
    folder, fp32."""

    hf_logging.disable_progress_bar()
    auto = objective.auto_model()
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = auto.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{model_dir}: cannot load the {objective.name} model ({type(e).__name__}: {why})") from None
    return model.to(device).eval(), tok


def windows(tok, docs: list[str], context: int) -> list[np.ndarray]:
    """The documents as the token files hold them (text tokens, EOS after each), cut into ``context`` windows."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    ids: list[int] = []
    for enc in tok(list(docs), add_special_tokens=False, verbose=False)["input_ids"] if docs else []:
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
    arr = np.asarray(ids, dtype=np.int64)
    return [arr[i : i + context] for i in range(0, len(arr), context) if len(arr[i : i + context]) >= 2]


def score_texts(model, tok, corrupted: CorruptedBatches, docs: list[str], *, context: int, batch_tokens: int,
                seed: int = EVAL_SEED, progress: Callable[[int, int], None] | None = None) -> dict:
    """Loss (nats per predicted token) and top-1 accuracy of a source's windows, with the validation masks."""
    device = next(model.parameters()).device
    rows = windows(tok, docs, context)
    per_batch = max(1, batch_tokens // context)

    def batches():
        i = 0
        while i < len(rows):  # consecutive windows of one length (only the last can be shorter)
            j = i
            while j < len(rows) and j - i < per_batch and len(rows[j]) == len(rows[i]):
                j += 1
            yield corrupted.eval_batch(rows[i:j], list(range(i, j)), seed=seed)
            if progress is not None:
                progress(j - i, len(rows))
            i = j

    nll, scored, hits = validation_nll(model, batches(), device, "bf16-mixed" if device.type == "cuda" else "fp32",
                                       corrupted.loss, hits=True)
    n = int(scored.item())
    return {"loss": nll.item() / n if n else float("nan"), "accuracy": hits.item() / n if n else float("nan"),
            "targets": n, "tokens": int(sum(len(r) for r in rows)), "windows": len(rows), "docs": len(docs),
            "bytes": sum(len(d.encode("utf-8")) for d in docs)}


def evaluate(model_dir: Path, objective: Corruption, named: list[tuple[str, str, list[str]]], *, context: int | None,
             batch_tokens: int, device: str, progress) -> dict:
    """eval.json's fields for a masked / span model (the caller adds version, paths and timing)."""
    model, tok = load(model_dir, objective, device)
    batches = objective.batches(tok)
    positions = getattr(model.config, "max_position_embeddings", None)
    ctx = min(context or positions or DEFAULT_CONTEXT, positions or DEFAULT_CONTEXT)
    sources = {}
    for name, role, docs in named:
        with progress(f"{name}: {len(docs)} docs") as tick:
            sources[name] = {"role": role, **score_texts(model, tok, batches, docs, context=ctx,
                                                         batch_tokens=batch_tokens, progress=tick)}
    return {"objective": objective.name, "context": ctx, "masking": objective.eval_masking(), "sources": sources,
            "comparable": COMPARABLE.format(what=objective.eval_what)}


def print_result(result: dict, console) -> None:
    what = objectives.get(result["objective"]).targets_name
    table = Table(title=f"{result['objective']} eval of {escape(str(result['model']))} (context {result['context']}, "
                  f"seed {result['masking']['seed']})")
    for col in ("text", "role", "nats/target", "accuracy", what, "windows", "bytes"):
        table.add_column(col, justify="left" if col in ("text", "role") else "right", no_wrap=True)
    for name, s in result["sources"].items():
        table.add_row(name, s["role"], f"{s['loss']:.4f}", f"{s['accuracy']:.1%}", f"{s['targets']:,}",
                      f"{s['windows']:,}", f"{s['bytes']:,}")
    console.print(table)
    console.print(f"[dim]{escape(result['comparable'])}.[/]", highlight=False)
