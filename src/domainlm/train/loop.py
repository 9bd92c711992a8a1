"""`domainlm train`: the training loop around `train_step` — setup, resume, logging, eval, checkpoints, export.

Run with one process (``domainlm train CONFIG``) or many (``torchrun --nproc_per_node N -m domainlm train
CONFIG``). Outputs under the run directory: ``checkpoints/``, ``logs/metrics.jsonl``,
``logs/tensorboard/`` and the Hugging Face export ``model/``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.markup import escape

from domainlm import faults, stages
from domainlm.config import RunConfig, load_config
from domainlm.data.tokens import counts_path, load_counts, open_tokens
from domainlm.errors import UserError
from domainlm.model import MODEL_DIR, TOKENIZER_DIR, build_model, export_hf, resolve_shape
from domainlm.plan.hardware import ACCELERATORS
from domainlm.rundir import RunDir, atomic_write
from domainlm.train import checkpoint as ckpt
from domainlm.train.data import MixtureLoader, val_windows
from domainlm.train.parallel import (
    Dist,
    barrier,
    choose_parallel,
    init_distributed,
    parallelize,
    shutdown,
    step_precision,
    unwrap,
)
from domainlm.train.schedule import lr_at
from domainlm.train.step import IGNORE, autocast_for, next_token_loss, train_step

STAGE = "train"
LOG2 = math.log(2.0)


def run_training(config: Path | None, *, restart: bool = False, max_steps: int | None = None,
                 console: Console | None = None) -> dict:
    cfg = load_config(config)
    world = init_distributed()
    try:
        return train(cfg, cfg.directory(), world, restart=restart, max_steps=max_steps, console=console)
    finally:
        shutdown()


# ------------------------------------------------------------------------------------------------ setup


def plan_of(run_dir: Path) -> dict:
    p = RunDir(run_dir).plan
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


def planned_tokens(plan: dict) -> float | None:
    """The tokens the plan says this run trains ("run": the law's tokens, or the budget on the config's shape)."""
    return (plan.get("run") or {}).get("tokens") or plan.get("tokens")


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases (1-D) and embeddings (GPT-3 / Llama practice).
    β = (0.9, 0.95), eps 1e-8: Llama 1–2 (Touvron et al. 2023)."""
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied head = the embedding
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or "embed_tokens" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def peak_flops(device: torch.device, precision: str, run_dir: Path, world_size: int) -> float | None:
    """Denominator of MFU: datasheet peak × GPUs on CUDA; on CPU the plan's measured training probe
    (no datasheet exists, so CPU "MFU" is relative to what the probe model achieved)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        mem_gb = torch.cuda.get_device_properties(device).total_memory / 1e9
        for key, acc in ACCELERATORS.items():
            kind = key.split("-")[0]
            size_ok = (key != "a100-40gb" or mem_gb < 60) and (key != "a100-80gb" or mem_gb >= 60)
            if re.search(rf"\b{kind}\b", name) and size_ok:
                return (acc.bf16_flops if precision == "bf16-mixed" else acc.fp32_flops) * world_size
        return None
    return plan_of(run_dir).get("compute", {}).get("measured_flops_per_s")


def _check_batch(cfg: RunConfig, world: Dist) -> tuple[int, int]:
    t = cfg.train
    tokens_per_step = t.tokens_per_step or t.micro_batch * t.seq_len * world.world_size
    if tokens_per_step % t.seq_len:
        raise UserError(f"train.tokens_per_step: {tokens_per_step} is not a multiple of train.seq_len {t.seq_len}")
    global_batch = tokens_per_step // t.seq_len
    per = world.world_size * t.micro_batch
    if global_batch % per:
        raise UserError(
            f"train.tokens_per_step: {global_batch} sequences per step do not divide into {world.world_size} "
            f"process(es) × train.micro_batch {t.micro_batch}; use a multiple of {per * t.seq_len} tokens"
        )
    return tokens_per_step, global_batch


def _metric_rows(path: Path, step: int) -> list[dict]:
    """The log rows of steps up to ``step``. A line that does not parse is dropped: a kill mid-write tears
    the last line, and its step is redone anyway."""
    if not path.exists():
        return []
    rows = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            rows.append(row)
    return rows


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget log lines from steps after the checkpoint (they will be redone) and torn lines."""
    if not path.exists():
        return
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in _metric_rows(path, step)))


# ------------------------------------------------------------------------------------------------ eval


@torch.no_grad()
def evaluate(model, val: dict[str, np.ndarray], counts: dict, *, seq_len: int, micro_batch: int, max_tokens: int,
             world: Dist, precision: str) -> dict[str, dict[str, float]]:
    """Validation loss (nats/token) and bits per byte per source, by the one definition `domainlm eval` uses
    (evaluate/bpb.py): NLL of the text tokens in bits ÷ the text's UTF-8 bytes; the EOS after each document is
    context, never scored (it has no bytes), so neither the loss nor the bpb counts it.

    Unlike `domainlm eval` (each document alone, after its start-of-document context), the windows here are
    ``seq_len`` chunks of the split's token stream (documents joined by EOS), so a window's first tokens have
    little context and the split's first token is never a target. We score windows covering ``text_scored`` of the
    split's ``text_total`` text tokens and count their bytes as ``val_bytes · text_scored / text_total`` — exact
    when the whole split is scored, else it assumes bytes per token is uniform over the split."""
    model.eval()
    out = {}
    eos = counts.get("eos_id")
    for name, arr in val.items():
        n = val_windows(arr, seq_len, max_tokens, world.world_size)
        if n == 0:
            continue
        mine = list(range(world.rank, n, world.world_size))
        nll = torch.zeros((), dtype=torch.float64, device=world.device)
        scored = torch.zeros((), dtype=torch.float64, device=world.device)
        for i in range(0, len(mine), micro_batch):
            rows = [np.asarray(arr[j * seq_len : (j + 1) * seq_len + 1], dtype=np.int64)
                    for j in mine[i : i + micro_batch]]
            batch = torch.from_numpy(np.stack(rows)).to(world.device)
            labels = batch.masked_fill(batch == eos, IGNORE) if eos is not None else batch
            with autocast_for(world.device, precision):
                nll += next_token_loss(model, batch, reduction="sum", labels=labels).double()
            scored += (labels[:, 1:] != IGNORE).sum().double()
        if dist.is_initialized():
            dist.all_reduce(nll)
            dist.all_reduce(scored)
        src = counts["sources"][name]
        text_total = len(arr) - (int(np.count_nonzero(np.asarray(arr) == eos)) if eos is not None else 0)
        text_scored = scored.item()
        bytes_scored = src["val_bytes"] * text_scored / max(text_total, 1)
        out[name] = {"loss": nll.item() / max(text_scored, 1), "bpb": nll.item() / LOG2 / max(bytes_scored, 1e-9)}
    model.train()
    return out


# ------------------------------------------------------------------------------------------------ the loop


def train(cfg: RunConfig, run_dir: Path, world: Dist, *, restart: bool = False, max_steps: int | None = None,
          console: Console | None = None, data_dir: Path | None = None) -> dict:
    """Train into ``run_dir``. ``data_dir`` (default: ``run_dir``) holds the token files, the tokenizer and the
    plan: `domainlm ablate` and `domainlm scaling` train variants in sub-folders on the parent run's data."""
    console = console or Console(stderr=True)
    t = cfg.train
    run_dir = Path(run_dir)
    data_dir = Path(data_dir) if data_dir is not None else run_dir
    if not cfg.sources:
        raise UserError("sources: no sources in the config; nothing to train on")
    counts = load_counts(data_dir)  # says: run `domainlm prepare`
    weights = {s.name: s.weight for s in cfg.sources if s.weight > 0}
    for name in weights:
        if name not in counts.get("sources", {}):
            raise UserError(f"{counts_path(data_dir)}: no tokens for source {name!r}; rerun `domainlm prepare CONFIG`")
    train_tokens = {n: open_tokens(data_dir, n, "train", counts) for n in weights}
    val_tokens = {n: open_tokens(data_dir, n, "val", counts) for n in weights if counts["sources"][n]["val_tokens"]}
    tok_dir = data_dir / TOKENIZER_DIR
    if not (tok_dir / "tokenizer.json").exists():
        raise UserError(f"{tok_dir}: no tokenizer; run `domainlm tokenizer CONFIG` (the export ships it)")

    shape = resolve_shape(cfg, data_dir, int(counts["vocab_size"]))
    max_pos = cfg.model.max_position_embeddings or t.seq_len
    if t.seq_len > max_pos:
        raise UserError(f"train.seq_len: {t.seq_len} is longer than model.max_position_embeddings {max_pos}")
    tokens_per_step, global_batch = _check_batch(cfg, world)
    plan = plan_of(data_dir)
    budget = t.max_tokens or planned_tokens(plan)
    if budget is None and max_steps is None:
        raise UserError("train.max_tokens: no token budget; set it, run `domainlm plan CONFIG`, or pass --max-steps")
    total_steps = max_steps or max(1, math.ceil(budget / tokens_per_step))
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if world.device.type == "cuda" else "fp32")

    fp = stages.fingerprint(cfg.model.model_dump(), t.model_dump(), shape.as_dict(), total_steps,
                            counts.get("tokenizer_sha256"), counts["sources"])
    if not restart and stages.is_done(run_dir, STAGE, fp):
        if world.is_main:
            console.print(f"train: done already ({total_steps} steps, {run_dir / MODEL_DIR}); --restart to train again",
                          markup=False)
        return json.loads((run_dir / ".stages" / f"{STAGE}.json").read_text())
    logs = run_dir / "logs"
    if world.is_main:
        if restart:
            for p in (ckpt.checkpoints_dir(run_dir), logs, run_dir / MODEL_DIR):
                shutil.rmtree(p, ignore_errors=True)
            stages.clear(run_dir, STAGE)
        ckpt.remove_partial(run_dir)
        logs.mkdir(parents=True, exist_ok=True)
    barrier()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = build_model(shape, max_pos, seed=t.seed, bos_id=tok.bos_token_id, eos_id=counts.get("eos_id"),
                        pad_id=tok.pad_token_id).to(world.device)
    config = model.config
    mode = choose_parallel(t.parallel, shape, world, seq_len=t.seq_len, micro_batch=t.micro_batch, precision=precision,
                           activation_checkpointing=t.activation_checkpointing, cpu_offload=t.cpu_offload)
    model = parallelize(model, mode, world, compile=t.compile, activation_checkpointing=t.activation_checkpointing,
                        precision=precision, cpu_offload=t.cpu_offload)
    amp = step_precision(mode, world, precision)  # autocast, unless FSDP2 on CUDA already computes in bf16
    optimizer = make_optimizer(unwrap(model), t, world.device)
    loader = MixtureLoader(train_tokens, weights, seq_len=t.seq_len, global_batch=global_batch, rank=world.rank,
                           world_size=world.world_size, seed=t.seed)

    step, skipped_total, bad_in_row = 0, 0, 0
    resumed = ckpt.load_latest(run_dir, model, optimizer, world)
    if resumed:
        path, state = resumed
        step, skipped_total, bad_in_row = state["step"], state["skipped_steps"], state["bad_in_row"]
        loader.load_state_dict(state["data"])
        if world.is_main:
            note = "" if state["total_steps"] == total_steps else (
                f" (its schedule had {state['total_steps']} steps, now {total_steps})")
            console.print(f"resuming from {path} at step {step}{note}", markup=False)
    metrics_path = RunDir(run_dir).metrics
    tb = None
    if world.is_main:
        _truncate_metrics(metrics_path, step)
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(logs / "tensorboard"), purge_step=step + 1 if step else None)
        console.print(
            f"train: {shape.params_total / 1e6:.2f}M params (d_model {shape.d_model}, {shape.n_layers} layers, "
            f"{shape.n_heads}/{shape.n_kv_heads} heads), {total_steps} steps × {tokens_per_step} tokens, "
            f"{world.world_size} process(es) ({mode}), {precision} on {world.device.type}"
        )

    flops_per_token = shape.flops_per_token(t.seq_len)
    peak = peak_flops(world.device, precision, data_dir, world.world_size)
    rates: deque[float] = deque(maxlen=20)
    last_ckpt, last_eval, last_loss = (step if resumed else -1), -1, float("nan")
    # Resumed at the last step (killed after the final checkpoint, before the export): its loss, speed and
    # eval are in the log already; every rank reads them, so all agree whether the final eval is due.
    for row in _metric_rows(metrics_path, step) if resumed else []:
        if row.get("step") == step and row.get("kind") == "eval":
            last_eval = step
        elif row.get("step") == step and row.get("kind") == "train":
            last_loss = row["loss"]
            if row.get("tokens_per_s"):
                rates.append(row["tokens_per_s"])
    metrics = open(metrics_path, "a", encoding="utf-8") if world.is_main else None  # noqa: SIM115

    def log(row: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def checkpoint() -> None:
        state = {"step": step, "skipped_steps": skipped_total, "bad_in_row": bad_in_row, "total_steps": total_steps,
                 "parallel": mode, "world_size": world.world_size, "data": loader.state_dict()}
        ckpt.save_checkpoint(run_dir, step, model, optimizer, state, world, t.keep_checkpoints)

    def run_eval() -> None:
        res = evaluate(unwrap(model), val_tokens, counts, seq_len=t.seq_len, micro_batch=t.micro_batch,
                       max_tokens=t.eval_tokens, world=world, precision=amp)
        log({"kind": "eval", "step": step, **{f"val_loss/{k}": v["loss"] for k, v in res.items()},
             **{f"bpb/{k}": v["bpb"] for k, v in res.items()}})
        if tb is not None:
            for k, v in res.items():
                tb.add_scalar(f"val/{k}/loss", v["loss"], step)
                tb.add_scalar(f"val/{k}/bpb", v["bpb"], step)
            shown = ", ".join(f"{k} {v['loss']:.3f} ({v['bpb']:.3f} bpb)" for k, v in res.items())
            progress.console.print(f"step {step}: val loss {shown}")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), console=console, disable=not world.is_main, transient=False)
    loop_start, start_step = time.perf_counter(), step
    try:
        with progress:
            task = progress.add_task("train", total=total_steps, completed=step, info="")
            while step < total_steps:
                lr = lr_at(step, lr=t.lr, total_steps=total_steps, warmup_steps=t.warmup_steps, schedule=t.schedule,
                           min_lr_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)
                t0 = time.perf_counter()
                batch, _ = loader.next_batch()
                res = train_step(model, optimizer, batch.to(world.device, non_blocking=True), lr=lr,
                                 micro_batch=t.micro_batch, grad_clip=t.grad_clip, precision=amp)
                dt = time.perf_counter() - t0
                step += 1
                rates.append(tokens_per_step / dt)
                tokens_per_s = sum(rates) / len(rates)
                mfu = flops_per_token * tokens_per_s / peak if peak else None
                bad_in_row = bad_in_row + 1 if res.skipped else 0
                skipped_total += res.skipped
                last_loss = res.loss
                epochs = loader.epochs()
                log({"kind": "train", "step": step, "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm,
                     "skipped": res.skipped, "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s,
                     "mfu": mfu, **{f"epochs/{k}": v for k, v in epochs.items()}})
                if tb is not None:
                    scalars = {"loss": res.loss, "lr": lr, "grad_norm": res.grad_norm, "tokens_per_s": tokens_per_s,
                               "mfu": mfu or float("nan"), **{f"epochs/{k}": v for k, v in epochs.items()}}
                    for k, v in scalars.items():
                        if math.isfinite(v):
                            tb.add_scalar(f"train/{k}", v, step)
                mfu_text = f" mfu {mfu:.1%}" if mfu else ""
                info = f"loss {res.loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s{mfu_text}"
                progress.update(task, completed=step, info=info)
                faults.hit("train.step")
                if not console.is_terminal and world.is_main and step % max(total_steps // 20, 1) == 0:
                    progress.console.print(f"step {step}/{total_steps}: {info}")  # log files get 20 lines a run
                if bad_in_row >= t.max_bad_steps:
                    prev = ckpt.list_checkpoints(run_dir)
                    where = f"the last checkpoint {prev[-1].name} is intact" if prev else "no checkpoint was written"
                    raise UserError(
                        f"train: loss or gradient NaN/inf for {bad_in_row} steps in a row (steps "
                        f"{step - bad_in_row + 1}–{step}, {skipped_total} skipped in all); stopping — lower "
                        f"train.lr or check the token files; {where}"
                    )
                if step % t.eval_every == 0 and val_tokens:
                    run_eval()
                    last_eval = step
                if step % t.checkpoint_every == 0:
                    checkpoint()
                    last_ckpt = step
            if last_eval != step and val_tokens:
                run_eval()
            if last_ckpt != step:
                checkpoint()
    finally:
        if metrics is not None:
            metrics.close()
        if tb is not None:
            tb.close()

    faults.hit("train.before_export")
    # Hugging Face export: gather the full weights (a collective under FSDP), rank 0 writes.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist.is_initialized():
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = {k: v.cpu() for k, v in unwrap(model).state_dict().items()}
    out = run_dir / MODEL_DIR
    loop_seconds = time.perf_counter() - loop_start  # steps, evals, checkpoints of this invocation
    summary = {"steps": step, "final_loss": last_loss if math.isfinite(last_loss) else None,
               "skipped_steps": skipped_total,
               # planned vs actual training time: only when this invocation ran every step
               "train_seconds": round(loop_seconds, 1) if start_step == 0 else None,
               "planned_seconds": (plan.get("run") or {}).get("planned_seconds"),
               "tokens_per_s": sum(rates) / len(rates) if rates else None, "params": shape.params_total,
               "model_dir": str(out), "parallel": mode, "world_size": world.world_size}
    if world.is_main:
        export_hf(full, config, tok_dir, out)
        stages.mark_done(run_dir, STAGE, fp, summary)
        console.print(f"wrote [bold]{escape(str(out))}[/] (Hugging Face format); final loss {last_loss:.4f}")
    barrier()
    return summary

