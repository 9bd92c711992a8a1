"""Learning-rate schedules: linear warmup, then cosine decay or warmup-stable-decay (WSD).

The schedule is a pure function of the step, so its whole state is the step number (checkpointed).
- cosine: decay to ``min_lr_ratio · lr`` at the last step (Loshchilov & Hutter 2017; Chinchilla decays
  10×, i.e. min_lr_ratio 0.1, over the full run — Hoffmann et al. 2022 §3).
- wsd: hold ``lr`` then decay linearly over the last ``decay_fraction`` of steps (Hu et al. 2024,
  MiniCPM; Hägele et al. 2024 find a ~20% cooldown matches cosine).

Continued pretraining (``train.init_from``) runs the same schedule from step 0 — re-warm to ``lr``, then
re-decay — as Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train LLMs",
arXiv 2403.08763) recommend: the base brings weights only, no optimizer state or step (docs/continued.md).
"""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    min_lr = lr * min_lr_ratio
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(total_steps - 1 - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(int(round(decay_fraction * (total_steps - warmup_steps))), 1)
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return lr
        progress = min((step - decay_start + 1) / decay_steps, 1.0)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")
