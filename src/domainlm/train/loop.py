"""`domainlm train`: pretraining — setup (token files, shape, batch, model, parallelism), the mixture batches,
validation and the Hugging Face export, run by the loop shared with fine-tuning (`train/driver.py`).

Run with one process (``domainlm train CONFIG``) or many (``torchrun --nproc_per_node N -m domainlm train
CONFIG``). Outputs under the run directory: ``checkpoints/``, ``logs/metrics.jsonl``,
``logs/tensorboard/``, the Hugging Face export ``model/`` and, last, the summary ``logs/train.json``.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.markup import escape
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoTokenizer

from domainlm import faults, objectives, stages
from domainlm.config import RunConfig, load_config
from domainlm.data.tokens import counts_path, load_counts, open_tokens
from domainlm.errors import UserError
from domainlm.hardware import accelerator_of
from domainlm.model import (
    MODEL_DIR,
    TOKENIZER_DIR,
    build_model,
    export_hf,
    load_base_model,
    resolve_shape,
    seeded_init,
)
from domainlm.model.base import BaseModel, base_of
from domainlm.objectives import Batches, Causal, Objective
from domainlm.outputs import Plan, Stats, TrainSummary
from domainlm.rundir import RunDir, write_json
from domainlm.shape import ModelShape
from domainlm.train import checkpoint as ckpt
from domainlm.train.data import MixtureLoader, rank_windows, val_windows
from domainlm.train.driver import Driver, Eval
from domainlm.train.parallel import (
    Dist,
    barrier,
    choose_parallel,
    distributed,
    parallelize,
    reshard,
    step_precision,
    unwrap,
)
from domainlm.train.schedule import lr_at
from domainlm.train.step import IGNORE, make_optimizer, train_step, validation_nll

STAGE = "train"
# model section keys a base model (train.init_from) decides instead
SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings", "max_position_embeddings")
# train keys that do not change what a step computes, only when it is logged, checkpointed or how it is laid out on
# devices (rounding aside), and the schedule's length (a changed budget extends or shortens a run: resume says so)
NOT_WEIGHT_KEYS = {"max_tokens", "eval_every", "eval_tokens", "checkpoint_every", "keep_checkpoints", "max_bad_steps",
                   "parallel", "compile", "activation_checkpointing", "cpu_offload", "micro_batch", "precision",
                   "init_from"}


def run_training(config: Path | None, *, restart: bool = False, max_steps: int | None = None,
                 console: Console | None = None) -> dict:
    cfg = load_config(config)
    with distributed() as world:
        return train(cfg, cfg.directory(), world, restart=restart, max_steps=max_steps, console=console)


# ------------------------------------------------------------------------------------------------ setup


def plan_of(run_dir: Path) -> Plan | None:
    """The run's plan (`domainlm plan`), or None when there is none."""
    return RunDir(run_dir).load(RunDir.PLAN, Plan)


def planned_tokens(plan: Plan | None) -> float | None:
    """The tokens the plan says this run trains ("run": the law's tokens, or the budget on the config's shape)."""
    return (plan.run.tokens or plan.tokens) if plan is not None else None


def peak_flops(device: torch.device, precision: str, run_dir: Path, world_size: int) -> float | None:
    """Denominator of MFU: datasheet peak × GPUs on CUDA; on CPU the plan's measured training probe
    (no datasheet exists, so CPU "MFU" is relative to what the probe model achieved)."""
    if device.type == "cuda":  # the card's own peak: an H100 PCIe is not an H100 SXM
        acc = accelerator_of(torch.cuda.get_device_name(device),
                             torch.cuda.get_device_properties(device).total_memory / 1e9)
        if acc is None:
            return None
        return (acc.bf16_flops if precision == "bf16-mixed" else acc.fp32_flops) * world_size
    plan = plan_of(run_dir)
    return plan.compute.get("measured_flops_per_s") if plan is not None else None


def _check_batch(cfg: RunConfig, world: Dist) -> tuple[int, int]:
    """The one check of the batch that needs the world size (the config checked the rest at load)."""
    t = cfg.train
    tokens_per_step = t.tokens_per_step or t.micro_batch * t.seq_len * world.world_size
    global_batch = tokens_per_step // t.seq_len
    per = world.world_size * t.micro_batch
    if global_batch % per:
        raise UserError(
            f"train.tokens_per_step: {global_batch} sequences per step do not divide into {world.world_size} "
            f"process(es) × train.micro_batch {t.micro_batch}; use a multiple of {per * t.seq_len} tokens"
        )
    return tokens_per_step, global_batch


# ------------------------------------------------------------------------------------------------ eval


@torch.no_grad()
def evaluate(model, val: dict[str, np.ndarray], counts: dict, *, seq_len: int, micro_batch: int, max_tokens: int,
             world: Dist, precision: str, batches: Batches = Causal().batches()) -> dict[str, dict[str, float]]:
    """Validation per source under the objective's batches (objectives/): the loss in nats per target and the
    objective's metric.

    Causal: loss and bits per byte by the one definition `domainlm eval` uses (evaluate/bpb.py): NLL of the text
    tokens in bits ÷ the text's UTF-8 bytes; the EOS after each document is context, never scored (it has no bytes),
    so neither the loss nor the bpb counts it. Unlike `domainlm eval` (each document alone, after its
    start-of-document context), the windows here are ``seq_len`` chunks of the split's token stream (documents
    joined by EOS), so a window's first tokens have little context and the split's first token is never a target.
    We score windows covering ``text_scored`` of the split's ``text_total`` text tokens and count their bytes as
    ``val_bytes · text_scored / text_total`` — exact when the whole split is scored, else it assumes bytes per token
    is uniform over the split.

    Masked / span: the masked-token (or span-corruption target) loss and top-1 accuracy, on windows corrupted with
    the fixed validation seed, so every model — whatever mask rate it trained with — is scored on the same masks."""
    out = {}
    eos = counts.get("eos_id")
    for name, arr in val.items():
        n = val_windows(arr, seq_len, max_tokens)
        if n == 0:  # shorter than one window: left out at setup (`_val_splits`)
            continue
        mine = rank_windows(n, world.rank, world.world_size)
        windows = _scoring(batches.val(arr, [j or 0 for j in mine], seq_len, micro_batch, eos), mine, micro_batch)
        nll, scored, hits = validation_nll(model, windows, world.device, precision, batches.loss, hits=True)
        if dist.is_initialized():
            for x in (nll, scored, hits):
                dist.all_reduce(x)
        out[name] = batches.scores(nll.item(), scored.item(), hits.item(), arr, eos,
                                   counts["sources"][name]["val_bytes"])
    return out


def _scoring(batches, mine: list[int | None], micro_batch: int):
    """``batches`` of the windows ``mine`` (window 0 in place of each None: padding, see `rank_windows`), with no
    target in the rows of the padding."""
    for i, (ids, labels) in enumerate(batches):
        pad = [k for k, j in enumerate(mine[i * micro_batch : (i + 1) * micro_batch]) if j is None]
        if pad:
            labels = labels.clone()  # may be ``ids`` itself
            labels[pad] = IGNORE
        yield ids, labels


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class Setup:
    """What training reads (token counts and files, mixture weights, tokenizer) and the numbers it fixes before
    anything is built (shape, positions, batch, steps, precision)."""

    counts: dict
    weights: dict[str, float]
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    tokenizer: Path
    shape: ModelShape
    max_pos: int
    tokens_per_step: int
    global_batch: int
    total_steps: int
    precision: str
    plan: Plan | None
    base: BaseModel | None = None  # continued pretraining (train.init_from): the model, shape and tokenizer's source
    objective: Objective = field(default_factory=Causal)  # model.objective with its settings (objectives/)


def setup(cfg: RunConfig, data_dir: Path, world: Dist, max_steps: int | None) -> Setup:
    t = cfg.train
    if not cfg.sources:
        raise UserError("sources: no sources in the config; nothing to train on")
    base = base_of(cfg)  # continued pretraining: checked before anything else is read
    tokens = RunDir(data_dir).tokens_for(base.path) if base else data_dir  # the base tokenizer's own token files
    if base and not counts_path(tokens).exists():
        raise UserError(f"{counts_path(tokens)}: no token files for the base model's tokenizer ({base.path}); run "
                        "`domainlm tokenize CONFIG`")
    counts = load_counts(tokens)  # says: run `domainlm prepare`
    weights = {s.name: s.weight for s in cfg.sources if s.weight > 0}
    for name in weights:
        if name not in counts.get("sources", {}):
            raise UserError(f"{counts_path(tokens)}: no tokens for source {name!r}; rerun `domainlm prepare CONFIG`")
    train = {n: open_tokens(tokens, n, "train", counts) for n in weights}
    # a split shorter than one window has no validation loss (`train` says so); any other is spread over the ranks
    val = {n: open_tokens(tokens, n, "val", counts) for n in weights if counts["sources"][n]["val_tokens"] > t.seq_len}
    tok_dir = base.path if base else data_dir / TOKENIZER_DIR
    if not (tok_dir / "tokenizer.json").exists():
        raise UserError(f"{tok_dir}: no tokenizer; run `domainlm tokenizer CONFIG` (the export ships it)")
    shape = base_shape(base, t.seq_len, int(counts["vocab_size"])) if base else \
        resolve_shape(cfg, data_dir, int(counts["vocab_size"]))
    objective = objectives.from_config(cfg.model)
    if base and not objective.init_from_causal:
        raise UserError(f"train.init_from: continued pretraining starts from a causal LM, not with "
                        f"model.objective: {objective.name}")
    shape = objective.model_shape(shape)  # its tokens after the run tokenizer's vocabulary; its attention heads
    tokens_per_step, global_batch = _check_batch(cfg, world)
    plan = plan_of(data_dir)
    budget = t.max_tokens or planned_tokens(plan)
    if budget is None and max_steps is None:
        raise UserError("train.max_tokens: no token budget; set it, run `domainlm plan CONFIG`, or pass --max-steps")
    return Setup(counts, weights, train, val, tok_dir, shape,
                 # ≥ seq_len: checked at load (a base model's: in base_shape)
                 (base.max_positions if base else cfg.model.max_position_embeddings) or t.seq_len,
                 tokens_per_step, global_batch, max_steps or max(1, math.ceil(budget / tokens_per_step)),
                 t.precision if t.precision != "auto" else ("bf16-mixed" if world.device.type == "cuda" else "fp32"),
                 plan, base, objective)


def weight_inputs(cfg: RunConfig, z: Setup, data_dir: Path) -> dict:
    """What determines a training run's weights, as flat keys (recorded in each checkpoint; train/driver.py): the
    model and train config (less `NOT_WEIGHT_KEYS`), the resolved shape, the mixture weights, the tokenizer's hash,
    the token files' counts and the prepared data's fingerprint, and the base model's content hash."""
    stats = RunDir(data_dir).load(RunDir.STATS, Stats)
    return {**{f"model.{k}": v for k, v in cfg.model.model_dump().items()},
            **{f"train.{k}": v for k, v in cfg.train.model_dump().items() if k not in NOT_WEIGHT_KEYS},
            "shape": z.shape.as_dict(), "weights": z.weights, "tokenizer": z.counts.get("tokenizer_sha256"),
            "data.counts": z.counts["sources"], "data.prepared": stats.fingerprint if stats is not None else None,
            "base": z.base.fingerprint if z.base else None}


def base_shape(base: BaseModel, seq_len: int, token_vocab: int) -> ModelShape:
    """The base model's shape, checked against what training feeds it: windows no longer than its context, and
    token ids (from its tokenizer) inside its embedding table."""
    if base.max_positions and seq_len > base.max_positions:
        raise UserError(f"train.seq_len: {seq_len} is longer than the base model's context {base.max_positions} "
                        f"(train.init_from {base.path})")
    if token_vocab > base.shape.vocab_size:
        raise UserError(f"train.init_from: {base.path}: its tokenizer has {token_vocab:,} ids but the model's "
                        f"embedding only {base.shape.vocab_size:,} rows")
    return base.shape


def initial_model(z: Setup, seed: int, tok, eos_id: int | None, *, meta: bool = False) -> torch.nn.Module:
    """Where the model comes from: the base model's weights (continued pretraining, ``train.init_from``) or a
    new model of the resolved shape (from scratch). fp32, on the CPU — with ``meta``, a new causal LM is built on
    the meta device instead, for `parallelize` to materialise shard by shard (`seeded_init`: the same weights)."""
    if z.base is None:
        return build_model(z.shape, z.max_pos, seed=seed, objective=z.objective, bos_id=tok.bos_token_id,
                           eos_id=eos_id, pad_id=tok.pad_token_id, meta=meta and isinstance(z.objective, Causal))
    model = load_base_model(z.base)
    torch.manual_seed(seed)  # a base with dropout (GPT-2): its masks are a function of the seed (resume: the RNG)
    return model


def train(cfg: RunConfig, run_dir: Path, world: Dist, *, restart: bool = False, max_steps: int | None = None,
          console: Console | None = None, data_dir: Path | None = None) -> dict:
    """Train into ``run_dir``. ``data_dir`` (default: ``run_dir``) holds the token files, the tokenizer and the
    plan: `domainlm ablate` and `domainlm scaling` train variants in sub-folders on the parent run's data."""
    console = console or Console(stderr=True)
    t = cfg.train
    run_dir = Path(run_dir)
    data_dir = Path(data_dir) if data_dir is not None else run_dir
    z = setup(cfg, data_dir, world, max_steps)
    counts = z.counts
    stage = stages.Stage(run_dir, STAGE, RunDir(run_dir) / RunDir.TRAIN, (
        cfg.model.model_dump(), t.model_dump(exclude={"init_from"}), z.shape.as_dict(), z.total_steps,
        counts.get("tokenizer_sha256"), counts["sources"],
        *([str(z.base.path), z.base.fingerprint] if z.base else [])))  # another base retrains
    done = None
    if not restart and stage.done():
        with contextlib.suppress(UserError):  # a summary that does not parse: resume, export and write it again
            done = RunDir(run_dir).load(RunDir.TRAIN, TrainSummary)
    if done is not None:
        if world.is_main:
            console.print(f"train: done already ({z.total_steps} steps, {run_dir / MODEL_DIR}); --restart to train "
                          "again", markup=False)
        return done.model_dump()
    if world.is_main:
        if restart:
            for p in (ckpt.checkpoints_dir(run_dir), RunDir(run_dir).metrics.parent, run_dir / MODEL_DIR):
                shutil.rmtree(p, ignore_errors=True)
            stage.start()
        ckpt.remove_partial(run_dir)
    barrier()


    tok = AutoTokenizer.from_pretrained(z.tokenizer)
    batches = z.objective.batches(z.objective.add_tokens(tok), t.seed)  # the mask token or sentinels appended
    model = initial_model(z, t.seed, tok, counts.get("eos_id"), meta=True)
    meta = next(model.parameters()).is_meta
    model = model if meta else model.to(world.device)
    hf_config, model_class = model.config, type(model)  # the class before FSDP2 renames it
    generation = model.generation_config if z.base else None  # a base's own generation settings travel on
    mode = choose_parallel(t.parallel, z.shape, world, seq_len=t.seq_len, micro_batch=t.micro_batch,
                           precision=z.precision, activation_checkpointing=t.activation_checkpointing,
                           cpu_offload=t.cpu_offload)
    model = parallelize(model, mode, world, compile=t.compile, activation_checkpointing=t.activation_checkpointing,
                        precision=z.precision, cpu_offload=t.cpu_offload,
                        init=(lambda m: seeded_init(m, t.seed)) if meta else None)
    amp = step_precision(mode, world, z.precision)  # autocast, unless FSDP2 on CUDA already computes in bf16
    optimizer = make_optimizer(unwrap(model), lr=t.lr, weight_decay=t.weight_decay, device=world.device)
    loader = MixtureLoader(z.train, z.weights, seq_len=t.seq_len, global_batch=z.global_batch,
                           rank=world.rank, world_size=world.world_size, seed=t.seed)
    driver = _driver(cfg, run_dir, data_dir, world, model, optimizer, loader, z, mode, amp, console, batches)

    resumed = driver.resume()
    if resumed:
        path, state = resumed
        if "data" not in state:  # a fine-tuning's checkpoint in a pretraining run
            raise UserError(f"{path / 'state.json'}: no data loader state: not a pretraining checkpoint; use "
                            "--restart to start over")
        loader.load_state_dict(state["data"])
        if world.is_main:
            note = "" if state["total_steps"] == z.total_steps else (
                f" (its schedule had {state['total_steps']} steps, now {z.total_steps})")
            console.print(f"resuming from {path} at step {driver.step}{note}", markup=False)
    if world.is_main:
        sh = z.shape
        origin = f" {z.base.architecture} from {z.base.path}," if z.base else ""
        console.print(
            f"train:{origin} {params_of(z) / 1e6:.2f}M params (d_model {sh.d_model}, {sh.n_layers} layers, "
            f"{sh.n_heads}/{sh.n_kv_heads} heads), {z.total_steps} steps × {z.tokens_per_step} tokens, "
            f"{world.world_size} process(es) ({mode}), {z.precision} on {world.device.type}"
        )
        short = [n for n in z.weights if n not in z.val and counts["sources"][n]["val_tokens"]]
        for name in short:
            console.print(f"note: source {name!r}: its val split has {counts['sources'][name]['val_tokens']} tokens, "
                          f"fewer than train.seq_len + 1 = {t.seq_len + 1}: no validation loss for it", markup=False)
        ignored = [k for k in SHAPE_KEYS if getattr(cfg.model, k, None)] if z.base else []
        if ignored:  # a config written for training from scratch, reused with a base
            console.print(f"note: {', '.join('model.' + k for k in ignored)} not used: the shape is train.init_from's",
                          markup=False)
    driver.run()
    faults.hit("train.before_export")
    added = z.objective.added_tokens > 0  # the export ships the run tokenizer with them (mask, sentinels)
    tok_dir = Path(tempfile.mkdtemp(prefix="domainlm-tokenizer-")) if added else z.tokenizer
    if added and world.is_main:
        tok.save_pretrained(tok_dir)
    try:
        export(model, hf_config, tok_dir, run_dir / MODEL_DIR, world, model_class=model_class,
               generation_config=generation)
    finally:
        if added:
            shutil.rmtree(tok_dir, ignore_errors=True)
    summary = TrainSummary(
        steps=driver.step, final_loss=driver.last_loss if math.isfinite(driver.last_loss) else None,
        skipped_steps=driver.skipped,
        # planned vs actual training time: only when this invocation ran every step
        train_seconds=round(driver.seconds, 1) if driver.first_step == 0 else None,
        planned_seconds=z.plan.run.planned_seconds if z.plan else None, tokens_per_s=driver.tokens_per_s,
        params=params_of(z), model_dir=str(run_dir / MODEL_DIR), parallel=mode, world_size=world.world_size,
        finished=time.time()).model_dump()
    if world.is_main:
        write_json(RunDir(run_dir) / RunDir.TRAIN, summary)
        stage.finish()
        console.print(f"wrote [bold]{escape(str(run_dir / MODEL_DIR))}[/] (Hugging Face format); final loss "
                      f"{driver.last_loss:.4f}")
    barrier()
    return summary


def _driver(cfg: RunConfig, run_dir: Path, data_dir: Path, world: Dist, model, optimizer, loader: MixtureLoader,
            z: Setup, mode: str, amp: str, console: Console, batches: Batches) -> Driver:
    """Pretraining's batches (the mixture loader, made into the objective's ``batches``), step, eval and
    checkpoint state, for the shared driver."""
    t = cfg.train
    driver: Driver

    def lr(step: int) -> float:
        return lr_at(step, lr=t.lr, total_steps=z.total_steps, warmup_steps=t.warmup_steps, schedule=t.schedule,
                     min_lr_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)

    def one_step(lr: float):
        batch, _ = loader.next_batch()
        # masks: a function of (seed, the loader's step, the row of the global batch) — exact on resume
        inputs, labels = batches.train(batch, loader.step - 1, world.rank * loader.local_batch)
        res = train_step(model, optimizer, inputs.to(world.device, non_blocking=True), lr=lr,
                         micro_batch=t.micro_batch, grad_clip=t.grad_clip, precision=amp,
                         labels=labels if labels is None else labels.to(world.device), objective=batches.loss)
        fields = {"tokens": (driver.step + 1) * z.tokens_per_step,
                  **{f"epochs/{k}": v for k, v in loader.epochs().items()}}
        return res, z.tokens_per_step, fields

    def run_eval() -> Eval:
        """The loss and the objective's metric per source: bits per byte (causal), or the top-1 accuracy of the
        masked tokens / span targets (a masked-token loss is not a probability of the text)."""
        res = evaluate(unwrap(model), z.val, z.counts, seq_len=t.seq_len, micro_batch=t.micro_batch,
                       max_tokens=t.eval_tokens, world=world, precision=amp, batches=batches)
        reshard(model)  # zero2 keeps the weights a forward gathered until a backward that an eval never runs
        metric = z.objective.metric
        shown = ", ".join(f"{k} {v['loss']:.3f} ({z.objective.show_metric(v[metric])})" for k, v in res.items())
        fields = {**{f"val_loss/{k}": v["loss"] for k, v in res.items()},
                  **{f"{metric}/{k}": v[metric] for k, v in res.items()}}
        scalars = {f"val/{k}/{m}": v[m] for k, v in res.items() for m in ("loss", metric)}
        return Eval(fields, f"val loss {shown}", scalars)

    flops_per_token = z.base.flops_per_token(t.seq_len) if z.base else z.objective.flops_per_token(z.shape, t.seq_len)
    peak = peak_flops(world.device, z.precision, data_dir, world.world_size)
    driver = Driver(
        STAGE, run_dir, world, model, optimizer, z.total_steps, lr, one_step, run_eval if z.val else None,
        lambda: {"parallel": mode, "world_size": world.world_size, "data": loader.state_dict()},
        t.eval_every, t.checkpoint_every, t.keep_checkpoints, console, max_bad_steps=t.max_bad_steps,
        tensorboard=True, mfu=lambda tokens_per_s: flops_per_token * tokens_per_s / peak if peak else None,
        inputs=weight_inputs(cfg, z, data_dir))
    return driver


def params_of(z: Setup) -> int:
    """Parameters trained: the base model's exact count, or the objective's model's on the shape."""
    return z.base.params if z.base else z.objective.params(z.shape)


def export(model, hf_config, tokenizer_dir: Path, out: Path, world: Dist, **kw) -> None:
    """The Hugging Face export: gather the full weights (a collective under FSDP), rank 0 writes. ``kw``:
    `export_hf`'s (the architecture to save, a base model's generation config)."""

    if dist.is_initialized():
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = {k: v.cpu() for k, v in unwrap(model).state_dict().items()}
    if world.is_main:
        export_hf(full, hf_config, tokenizer_dir, out, **kw)
