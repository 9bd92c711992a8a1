"""The interface every pretraining objective implements, and the loss they share.

An objective is everything that differs between next-token prediction, masked LM and span corruption on the same
packed token windows of the mixture loader: the model it trains (a transformers architecture of the run's
`ModelShape`, with its parameter count and FLOPs per token), the tokens it appends to the run tokenizer, how a
training or validation batch is made from a window, its `Loss`, its validation metric (bits per byte only where the
loss is the probability of the text), the Auto class its Hugging Face export loads with, and what `domainlm plan`
says about it. The training loop, the planner, `domainlm eval` and the report ask the object; none of them names an
objective. The registry (``domainlm.objectives``) maps ``model.objective`` to the object.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from domainlm.shape import ModelShape

IGNORE = -100  # label of a token that contributes no loss (the transformers / PyTorch convention)


@dataclass(frozen=True)
class Loss:
    """The loss of a batch under a pretraining objective: ``forward(model, batch, labels)`` gives (logits [B, T, V],
    targets [B, T]) with -100 on positions that are not targets; the loss is their cross-entropy. ``shift``: how far
    the targets are shifted from ``labels`` — 1 for next-token prediction (targets ``labels[:, 1:]``), 0 for masked
    LM and span corruption (targets where labels ≠ -100). Used by `train/step.train_step` and `validation_nll`."""

    forward: Callable
    shift: int = 1

    def __call__(self, model: torch.nn.Module, batch: torch.Tensor, reduction: str = "mean",
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        logits, y = self.forward(model, batch, labels)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction=reduction, ignore_index=IGNORE)

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        """The number of targets in ``labels``."""
        return (labels[:, self.shift:] != IGNORE).sum()

    def nll_and_hits(self, model: torch.nn.Module, batch: torch.Tensor,
                     labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ NLL of the targets and how many of them are the model's top-1 prediction (accuracy's numerator)."""
        logits, y = self.forward(model, batch, labels)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum", ignore_index=IGNORE)
        return nll, ((logits.argmax(-1) == y) & (y != IGNORE)).sum()


class Batches(ABC):
    """An objective's batches for one tokenizer (`Objective.batches`): training batches from the loader's windows,
    validation batches from the val token stream, and the validation scores of one source."""

    loss: Loss

    @abstractmethod
    def train(self, tokens: torch.Tensor, step: int, first_row: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(inputs, labels) of a loader batch [B, T+1] for `train_step`: labels None = the inputs are their own
        targets (the plain mean loss), else -100 where a position is not a target. ``step``: the loader's step;
        ``first_row``: this rank's first row of the global batch (what a random corruption is a function of)."""

    @abstractmethod
    def val(self, arr: np.ndarray, windows: list[int], seq_len: int, micro_batch: int,
            eos: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(ids, labels) batches of the ``seq_len`` windows ``windows`` of a val token stream, for `validation_nll`
        (identical for every model: a corruption is a function of the fixed validation seed and the window)."""

    @abstractmethod
    def scores(self, nll: float, scored: float, hits: float, arr: np.ndarray, eos: int | None,
               val_bytes: float) -> dict[str, float]:
        """One source's validation numbers from Σ NLL (nats), the targets scored and the top-1 hits: ``loss``
        (nats per target) and the objective's `Objective.metric`; ``arr``, ``eos``, ``val_bytes``: the split's
        tokens and UTF-8 bytes (for bits per byte)."""


@dataclass(frozen=True)
class Objective(ABC):
    """A pretraining objective (``model.objective``). Its dataclass fields are its ``model.*`` settings (their
    names are the config keys); the class attributes say what it is."""

    name: ClassVar[str]  # model.objective
    loss: ClassVar[Loss]
    metric: ClassVar[str]  # the validation number besides the loss: `val_loss/<source>`, `<metric>/<source>`
    bits_per_byte: ClassVar[bool]  # the loss is the probability of the text: bpb is defined (evaluate/bpb.py)
    added_tokens: ClassVar[int] = 0  # tokens appended to the run tokenizer (ids after its vocabulary)
    grouped_query_attention: ClassVar[bool] = True  # its architecture has model.n_kv_heads < n_heads
    init_from_causal: ClassVar[bool] = False  # can continue a causal LM's pretraining (train.init_from)

    @property
    def config_keys(self) -> tuple[str, ...]:
        """The ``model.*`` keys only this objective reads."""
        return tuple(f.name for f in dataclasses.fields(self))

    def configured(self, model_cfg) -> Objective:
        """This objective with the config's ``model`` section's settings."""
        return dataclasses.replace(self, **{k: getattr(model_cfg, k) for k in self.config_keys})

    def check(self, seq_len: int) -> None:  # noqa: B027 - most objectives train any window
        """Raise ValueError (naming the config key) when the objective cannot train ``seq_len`` windows."""

    # ------------------------------------------------------------------------------------- tokenizer and model

    def add_tokens(self, tok):
        """The run tokenizer with the objective's special tokens appended (``added_tokens`` of them); the token
        files never hold these ids, so every objective trains on the same prepared data."""
        return tok

    def model_shape(self, shape: ModelShape) -> ModelShape:
        """The shape it trains: the run's, with the added tokens in the vocabulary and, without grouped-query
        attention, as many key/value heads as heads."""
        heads = shape.n_kv_heads if self.grouped_query_attention else shape.n_heads
        return dataclasses.replace(shape, vocab_size=shape.vocab_size + self.added_tokens, n_kv_heads=heads)

    @abstractmethod
    def hf_model(self, shape: ModelShape, max_positions: int, *, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None) -> tuple[type, object]:
        """(transformers class, its config) of the model it trains on ``shape`` (`model.build_model` builds it)."""

    @abstractmethod
    def auto_model(self) -> type:
        """The transformers Auto class its export loads with."""

    def claims(self, hf_config) -> bool:
        """Whether a Hugging Face model config is one this objective trained (`domainlm eval` of a model folder);
        the default objective takes every model no other claims."""
        return False

    @abstractmethod
    def params(self, shape: ModelShape) -> int:
        """Parameters of the model it trains on ``shape`` (checked against transformers in the tests)."""

    @abstractmethod
    def flops_per_token(self, shape: ModelShape, seq_len: int) -> float:
        """Training FLOPs per token of the window (what the mixture loader reads)."""

    # ------------------------------------------------------------------------------------- batches and metrics

    @abstractmethod
    def batches(self, tok, seed: int = 0) -> Batches:
        """Its batches for a tokenizer that has its tokens (`add_tokens`); ``seed``: train.seed."""

    def show_metric(self, value: float) -> str:
        """The metric as the training log prints it."""
        return f"{self.metric} {value:.3f}"

    def plan_notes(self) -> list[str]:
        """What `domainlm plan` adds about this objective."""
        return []
