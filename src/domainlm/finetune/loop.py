"""`domainlm finetune MODEL_OR_RUN --data FILE.jsonl`: instruction fine-tuning around the pretraining step.

Reused from pretraining, not copied: `train_step` (with labels: loss on response tokens only), the AdamW
groups, the LR schedule, the validation scorer, and the loop itself (`train/driver.py`: atomic checkpoints with
exact resume, metrics.jsonl rows, eval and checkpoint cadence). This module brings the batches (a pure function
of seed and step), the masked step and the eval. Writes under ``--out``::

    checkpoints/step-N/   as in pretraining (resume: rerun the same command)
    logs/metrics.jsonl    {"kind": "train"|"eval", "step", "loss" | "val_loss", ...}
    model/                the fine-tuned Hugging Face folder; its tokenizer carries the chat template
    finetune.json         the summary (and the fingerprint that makes a finished run skip)

One process (CPU or one GPU): fine-tuning sets are small; multi-GPU would need a sharded example order.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging as hf_logging

from domainlm import stages
from domainlm.chat import ensure_chat_template, pad_id_of
from domainlm.errors import UserError
from domainlm.evaluate.inputs import check_tokenizer_files, load_model
from domainlm.finetune.data import collate, encode_all, read_jsonl
from domainlm.outputs import AnyFinetune, FinetuneSummary
from domainlm.rundir import (
    HF_CONFIG,
    ModelRef,
    RunDir,
    clear_temp,
    load_output,
    resolve_model_ref,
    swap_dir,
    write_json,
)
from domainlm.train import checkpoint as ckpt
from domainlm.train.driver import Driver, Eval
from domainlm.train.parallel import Dist
from domainlm.train.schedule import lr_at
from domainlm.train.step import IGNORE, make_optimizer, train_step, validation_nll


@dataclass
class FinetuneArgs:
    steps: int = 300
    batch_size: int = 16  # conversations per optimizer step
    micro_batch: int = 16
    lr: float = 3e-4  # full fine-tuning of a small model; LoRA usually wants ~10× more
    warmup_steps: int | None = None  # default: 5% of the steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    lora: bool = False
    lora_rank: int = 8
    too_long: str = "truncate"  # or reject
    max_len: int | None = None  # tokens per example; default: the model's context
    eval_every: int = 50
    checkpoint_every: int = 100
    keep_checkpoints: int = 1


def resolve_model(model_or_run: Path) -> ModelRef:
    """The model to fine-tune (a run directory means its trained ``model/``), with its tokenizer checked."""

    ref = resolve_model_ref(model_or_run)
    check_tokenizer_files(ref.model_dir)
    return ref


def data_name(data: Path) -> str:
    """A fine-tuning's default folder name: its data file's name without suffixes (``sft.jsonl.gz`` → ``sft``)."""
    return Path(data).name.split(".")[0]


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def example_order(n: int, seed: int, step: int, batch_size: int) -> list[int]:
    """The examples of optimizer step ``step``: consecutive slices of a fresh permutation per epoch, a pure
    function of (seed, step) — so resume needs no loader state."""
    return [int(_permutation(n, seed, pos // n)[pos % n]) for pos in range(step * batch_size, (step + 1) * batch_size)]


def apply_lora(model, rank: int):
    try:
        import peft
    except ImportError:
        raise UserError("--lora needs the optional package peft: pip install 'domainlm[lora]'") from None
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")  # α = 2r: the common default (Hu et al. 2021 use α ≈ r…2r)
    return peft.get_peft_model(model, cfg)


def _save_hf(model, tok, out: Path) -> None:
    """Model + tokenizer (with its chat template) through ``<out>.tmp`` and a rename."""

    tmp = clear_temp(out.with_name(out.name + ".tmp"))
    bars = hf_logging.is_progress_bar_enabled()  # off under the CLI unless --debug
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # In tokenizer_config.json ("chat_template"), where every transformers version and vLLM look; newer
    # versions would otherwise write chat_template.jinja, which older ones ignore.
    tok.save_pretrained(tmp, save_jinja_files=False)
    swap_dir(tmp, out)


def inputs_fingerprint(model_dir: Path, data: Path, val: Path | None) -> tuple:
    """What a fine-tuning's result depends on besides its arguments: the model's files and the data files."""
    return ({f.name: stages.file_fingerprint(f) for f in sorted(model_dir.iterdir()) if f.is_file()},
            stages.file_fingerprint(Path(data)), stages.file_fingerprint(Path(val)) if val else None)


# flags that do not change what a step computes (cadence, gradient accumulation) or only the schedule's length
NOT_WEIGHT_ARGS = {"eval_every", "checkpoint_every", "keep_checkpoints", "micro_batch", "steps"}


def weight_inputs(args: FinetuneArgs, model_dir: Path, data: Path, **extra) -> dict:
    """What determines a fine-tuning's weights, as flat keys for its checkpoints (train/driver.py): the flags
    (less `NOT_WEIGHT_ARGS`), the model folder's files and the training data (content hashes), and ``extra``."""
    return {**{f"finetune.{k}": v for k, v in asdict(args).items() if k not in NOT_WEIGHT_ARGS},
            "model": {f.name: stages.file_fingerprint(f) for f in sorted(Path(model_dir).iterdir()) if f.is_file()},
            "data": stages.file_fingerprint(Path(data)), **extra}


def finished_or_start(out: Path, fp: str, restart: bool, console: Console) -> tuple[dict | None, stages.Stage]:
    """The fine-tuning into ``out`` as a `stages.Stage` (its marker in ``<out>/.stages/``, its summary written
    last): (the summary of a finished one with fingerprint ``fp``: nothing to do, the stage), else (None, the stage)
    with ``out`` ready to train into (emptied on ``restart``; a half-written checkpoint removed, finished ones
    kept). The caller writes the summary, then ``stage.finish()``."""
    stage = stages.Stage(out, "finetune", out / RunDir.FINETUNE, (fp,),
                         intact=lambda: (out / RunDir.MODEL / HF_CONFIG).is_file())
    if restart:
        shutil.rmtree(out, ignore_errors=True)
    elif stage.done():
        done = None
        with contextlib.suppress(UserError):  # a summary this version cannot read: fine-tune again
            done = load_output(stage.output, AnyFinetune)
        if done is not None:
            console.print(f"finetune: done already ({out / RunDir.MODEL}); --restart to fine-tune again",
                          markup=False)
            return done.model_dump(), stage
    out.mkdir(parents=True, exist_ok=True)
    stage.start()
    ckpt.remove_partial(out)
    return None, stage


def finetune(model_or_run: Path, data: Path, *, val: Path | None = None, out: Path | None = None,
             args: FinetuneArgs | None = None, restart: bool = False, console: Console | None = None) -> dict:
    args = args or FinetuneArgs()
    console = console or Console(stderr=True)
    if args.too_long not in ("truncate", "reject"):
        raise UserError(f"--too-long: expected truncate or reject, got {args.too_long!r}")
    if args.batch_size % args.micro_batch:
        raise UserError(f"--micro-batch: {args.micro_batch} does not divide --batch-size {args.batch_size}")
    ref = resolve_model(model_or_run)
    model_dir, run_dir = ref.model_dir, ref.run_dir
    train_convs = read_jsonl(data)  # bad input fails before any model is loaded
    val_convs = read_jsonl(val) if val is not None else []
    out = Path(out) if out is not None else ref.finetune_out(data_name(data))



    context = int(getattr(AutoConfig.from_pretrained(model_dir, local_files_only=True), "max_position_embeddings",
                          0) or 2048)
    max_tokens = min(args.max_len or context, context) + 1  # +1: the last target
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    added = ensure_chat_template(tok)
    enc = encode_all(tok, train_convs, max_tokens, args.too_long)
    venc = encode_all(tok, val_convs, max_tokens, args.too_long) if val_convs else None
    pad_id = pad_id_of(tok)

    fp = stages.fingerprint(asdict(args), *inputs_fingerprint(model_dir, data, val))
    summary_path = out / RunDir.FINETUNE
    done, stage = finished_or_start(out, fp, restart, console)
    if done is not None:
        return done

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    model, _ = load_model(model_dir, str(device))
    model.train()
    if args.lora:
        model = apply_lora(model, args.lora_rank)
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay, device=device)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    driver: Driver

    def one_step(lr: float):
        idx = example_order(len(enc.examples), args.seed, driver.step, args.batch_size)
        ids, labels = collate([enc.examples[i] for i in idx], pad_id)
        res = train_step(model, optimizer, ids.to(device), lr=lr, micro_batch=args.micro_batch,
                         grad_clip=args.grad_clip, precision=precision, labels=labels.to(device))
        return res, ids.numel(), {"trained_tokens": int((labels[:, 1:] != IGNORE).sum())}

    def evaluate() -> Eval:  # mean loss per response token of the validation conversations (prompt masked)
        batches = (collate(venc.examples[i : i + args.micro_batch], pad_id)
                   for i in range(0, len(venc.examples), args.micro_batch))
        nll, scored = validation_nll(model, batches, device, precision)
        loss = nll.item() / max(scored.item(), 1)
        return Eval({"val_loss": loss}, f"val loss {loss:.4f} per response token")

    driver = Driver("finetune", out, Dist(0, 1, 0, device), model, optimizer, args.steps,
                    lambda step: lr_at(step, lr=args.lr, total_steps=args.steps, warmup_steps=warmup), one_step,
                    evaluate if venc else None, lambda: {"fingerprint": fp}, args.eval_every, args.checkpoint_every,
                    args.keep_checkpoints, console, inputs=weight_inputs(args, model_dir, data))
    resumed = driver.resume()
    if resumed:
        path, state = resumed
        console.print(f"resuming from {path} at step {driver.step}", markup=False)

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(
        f"finetune: {model_dir} ({n_params / 1e6:.2f}M params, {n_train / 1e6:.2f}M trained"
        f"{', LoRA' if args.lora else ''}) on {len(enc.examples)} conversations ({enc.trained_tokens:,} response "
        f"of {enc.tokens:,} tokens; {enc.truncated} left-truncated to {max_tokens - 1} tokens); "
        f"{args.steps} steps × {args.batch_size}, lr {args.lr:g}; chat template "
        f"{'added' if added else 'kept from the model'}; {precision} on {device.type}", highlight=False)
    driver.run()
    last_loss, last_val = driver.last_loss, (driver.last_eval or {}).get("val_loss")

    final = model.merge_and_unload() if args.lora else model  # LoRA: a plain HF folder, adapters merged in
    _save_hf(final, tok, out / RunDir.MODEL)
    summary = {"model": str(model_dir), "run_dir": str(run_dir) if run_dir else None, "data": str(data),
               "val": str(val) if val else None, "out": str(out / RunDir.MODEL), "steps": driver.step,
               "final_loss": last_loss, "val_loss": last_val, "conversations": len(enc.examples),
               "truncated": enc.truncated, "response_tokens": enc.trained_tokens, "tokens": enc.tokens,
               "tokens_per_s": driver.tokens_per_s, "args": asdict(args), "fingerprint": fp,
               "chat_template": "added" if added else "model's"}
    write_json(summary_path, FinetuneSummary.checked(summary), indent=1)
    stage.finish()
    console.print(f"wrote [bold]{escape(str(out / RunDir.MODEL))}[/] (Hugging Face format, chat template in its "
                  "tokenizer); "
                  f"final loss {last_loss:.4f}" + (f", val loss {last_val:.4f}" if last_val is not None else ""))
    return summary

