"""What masked LM and span corruption share: a window corrupted into (inputs, labels) by a random function.

Corruptions are a pure function of (seed, step, row of the global batch) — not of the process count or of what ran
before — so a resumed run corrupts exactly as an uninterrupted one, and validation (train/loop.py ``evaluate``,
`domainlm eval`) corrupts with a fixed seed and the window's index so that models are compared on identical masks.
Validation corrupts the same way for every model, whatever it was trained with (each objective's ``eval_fn``).
Their loss is not the probability of the text: no bits per byte; validation reports the loss per target and its
top-1 accuracy.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from domainlm.objectives.base import Batches, Loss, Objective

EVAL_SEED = 0
_TRAIN, _EVAL = 1, 2  # tags of the RNG streams (the mixture loader draws from (seed, step) alone)
Corrupt = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class CorruptedBatches(Batches):
    """Training windows corrupted by (seed, step, row), validation windows by (fixed seed, window index)."""

    loss: Loss
    train_fn: Corrupt
    eval_fn: Corrupt
    seed: int = 0

    def train(self, tokens: torch.Tensor, step: int, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each window's first T tokens (the loader's windows overlap by one token, so these cover the stream
        once), corrupted."""
        rows = tokens[:, :-1].cpu().numpy()
        return _stack([self.train_fn(r, np.random.default_rng([self.seed, step, first_row + j, _TRAIN]))
                       for j, r in enumerate(rows)])

    def eval_batch(self, rows: list[np.ndarray], indices: list[int],
                   seed: int = EVAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation windows, corrupted by (seed, window index) alone: identical for every model."""
        return _stack([self.eval_fn(np.asarray(r, dtype=np.int64), np.random.default_rng([seed, i, _EVAL]))
                       for r, i in zip(rows, indices, strict=True)])

    def val(self, arr: np.ndarray, windows: list[int], seq_len: int, micro_batch: int,
            eos: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(windows), micro_batch):
            mine = windows[i : i + micro_batch]
            yield self.eval_batch([arr[j * seq_len : (j + 1) * seq_len] for j in mine], mine)

    def scores(self, nll: float, scored: float, hits: float, arr: np.ndarray, eos: int | None,
               val_bytes: float) -> dict[str, float]:
        """Loss in nats per predicted token and top-1 accuracy."""
        return {"loss": nll / max(scored, 1), "accuracy": hits / max(scored, 1), "targets": int(scored)}


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs])))


@dataclass(frozen=True)
class Corruption(Objective):
    """An objective that trains an encoder (or encoder-decoder) to restore a corrupted window."""

    metric: ClassVar[str] = "accuracy"
    bits_per_byte: ClassVar[bool] = False
    grouped_query_attention: ClassVar[bool] = False  # ModernBERT and T5 have none
    model_description: ClassVar[str]  # the plan's note: "a ModernBERT encoder (masked LM)"
    flops_note: ClassVar[str]  # the plan's note on what its FLOPs per token count
    eval_what: ClassVar[str]  # `domainlm eval`: "masked-token loss and accuracy"
    targets_name: ClassVar[str]  # its table's column of targets: "masked tokens"
    targets_title: ClassVar[str]  # the report's title: "masked tokens"

    def show_metric(self, value: float) -> str:
        return f"acc {value:.1%}"

    @abstractmethod
    def eval_masking(self) -> dict:
        """How `domainlm eval` corrupts the windows (eval.json's ``masking``)."""

    def plan_notes(self) -> list[str]:
        """What the plan of such a run means: its laws were fitted on causal decoders."""
        return [
            f"model.objective {self.name}: the scaling laws here (Kaplan et al. 2020, Hoffmann et al. 2022, "
            f"Muennighoff et al. 2023) were fitted on causal decoder LMs; for {self.model_description} the law's N and "
            "D are a starting point, not a compute-optimal size, and predicted_loss is a causal LM's next-token loss, "
            "not this objective's.",
            "FLOPs per token count every position of the window, forward and backward" + self.flops_note
            + "; the CPU speed probe measures the decoder of the same shape.",
        ]
