"""THE training step — the only one: used by pretraining, fine-tuning, `benchmarks/train_step.py` and the tests;
with the optimizer it steps and the one validation scorer (the same loss, summed without gradients).

One optimizer step on this rank's slice of the global batch: split into micro-batches, forward/backward
each (gradients accumulate; DDP all-reduces only on the last), clip, and step — unless the loss or the
gradient norm is NaN/inf, in which case the update is skipped (and the caller counts it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from domainlm.objectives.base import IGNORE as IGNORE  # re-exported: fine-tuning's labels
from domainlm.objectives.base import Loss
from domainlm.objectives.causal import NEXT_TOKEN


@dataclass
class StepResult:
    loss: float  # mean next-token loss over the global batch (nats/token)
    grad_norm: float  # before clipping
    skipped: bool  # NaN/inf: no update
    tokens: int  # tokens trained on by this rank


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA (weights and optimizer stay fp32); plain fp32 on CPU, where bf16 runs ~30×
    slower on CPUs without bf16 units (ANCHORS.md)."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor, reduction: str = "mean",
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of predicting ``batch[:, 1:]`` from ``batch[:, :-1]``; batch [B, T+1] int64.

    ``labels`` (same shape as ``batch``): the targets instead of ``batch``, -100 where a token is not trained
    on (fine-tuning: prompt and padding); ``mean`` is then over the trained tokens only."""
    return NEXT_TOKEN(model, batch, reduction, labels)


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, device: torch.device):
    """AdamW; no weight decay on norms, biases (1-D) and embeddings (GPT-3 / Llama practice).
    β = (0.9, 0.95), eps 1e-8: Llama 1–2 (Touvron et al. 2023)."""
    decay, no_decay = [], []
    seen = set()
    # Embedding tables of any architecture (Llama embed_tokens, GPT-2 wte and wpe, …).
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied head = the embedding
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or "embed_tokens" in name or id(p) in tables else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


@torch.no_grad()
def validation_nll(model: torch.nn.Module, batches, device: torch.device, precision: str,
                   objective: Loss = NEXT_TOKEN, hits: bool = False) -> tuple[torch.Tensor, ...]:
    """The one validation scorer: Σ next-token NLL (nats, float64) over ``(ids, labels)`` batches and the
    number of targets scored (labels ≠ -100), this rank's share; the caller all-reduces and divides.
    Pretraining scores token-stream windows with EOS masked (train/loop.py ``evaluate``: loss and bpb per
    source); fine-tuning scores conversations with the prompt masked (loss per response token). `domainlm eval`
    (evaluate/bpb.py) differs on purpose: each document alone after its start-of-document context.

    ``objective``: the loss of another pretraining objective (masked LM, span corruption: objectives/);
    ``hits``: also return how many targets were the model's top-1 prediction (masked-token accuracy)."""
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    scored = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    for ids, labels in batches:
        ids, labels = ids.to(device), labels.to(device)
        with autocast_for(device, precision):
            if hits:
                n, c = objective.nll_and_hits(model, ids, labels)
                nll += n.double()
                correct += c.double()
            else:
                nll += objective(model, ids, reduction="sum", labels=labels).double()
        scored += objective.count(labels).double()
    model.train()
    return (nll, scored, correct) if hits else (nll, scored)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    *,
    lr: float,
    micro_batch: int,
    grad_clip: float,
    precision: str = "fp32",
    labels: torch.Tensor | None = None,
    loss_fn: Callable[[slice], torch.Tensor] | None = None,
    objective: Loss = NEXT_TOKEN,
) -> StepResult:
    """batch: this rank's [B_local, T+1] token ids (already on the model's device).

    labels: optional [B_local, T+1] targets with -100 on untrained tokens (fine-tuning). The loss is then the
    mean over the trained tokens of the whole global batch, not a mean of per-micro-batch means (which would
    weight a token of a short answer more than one of a long answer).

    loss_fn: the mean loss of the micro-batch ``rows`` (a slice of the batch), for a loss other than next-token
    prediction (a classification head: finetune/classify.py); the caller's closure holds its own tensors.

    objective: the pretraining objective's loss (`Objective.loss`, objectives/). Masked LM and span corruption pass
    their inputs as ``batch`` and their targets as ``labels`` (-100 where nothing is predicted), so their loss is
    the mean over the global batch's targets like fine-tuning's."""
    n_micro = batch.shape[0] // micro_batch
    device = batch.device
    total = torch.zeros((), device=device)
    if labels is not None:
        # Σ over micro-batches of (token-sum × scale) = the mean over all trained tokens of all ranks; × world
        # because DDP averages gradients over ranks.
        n_trained = objective.count(labels).to(torch.float32)
        world = 1
        if dist.is_initialized():
            dist.all_reduce(n_trained)
            world = dist.get_world_size()
        scale = world / n_trained.clamp(min=1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    for i in range(n_micro):
        last = i == n_micro - 1
        # DDP: all-reduce gradients once per step, not once per micro-batch.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            rows = slice(i * micro_batch, (i + 1) * micro_batch)
            with autocast_for(device, precision):
                if loss_fn is not None:
                    loss = loss_fn(rows)
                elif labels is None:
                    loss = objective(model, batch[rows])
                else:  # already this micro-batch's share of the batch mean: undo the ÷ n_micro below
                    loss = objective(model, batch[rows], "sum", labels[rows]) * scale * n_micro
            (loss / n_micro).backward()  # mean over micro-batches = mean over the rank's batch
        total += loss.detach()
    mean_loss = total / n_micro
    if dist.is_initialized():  # the global mean (ranks hold equal batches); also makes every rank agree to skip
        dist.all_reduce(mean_loss)  # SUM: gloo has no AVG
        mean_loss /= dist.get_world_size()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    loss_value, norm_value = mean_loss.item(), grad_norm.item()
    skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, norm_value, skipped, n_micro * micro_batch * (batch.shape[1] - objective.shift))
