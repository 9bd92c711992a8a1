"""A measured speed probe for CPUs (no datasheet peak): the trainer's own model and step, timed. The accelerator
table with the GPUs' datasheet peaks is `domainlm.hardware`."""

from __future__ import annotations

import time

import torch

from domainlm.model import build_model
from domainlm.shape import make_shape
from domainlm.train.step import make_optimizer, train_step


def measure_cpu_flops(seconds: float = 3.0, seq_len: int = 256, batch: int = 8) -> dict:
    """Sustained fp32 training FLOP/s of this machine's CPU, measured on a small Llama.

    There is no datasheet peak for a CPU, so the probe measures what training actually achieves (the MFU is folded
    in): the trainer's own model (`build_model`), optimizer and `train_step` on a d=256, 4-layer, vocab-8192 decoder
    (7.4M params, the shape of ANCHORS.md's CPU measurement), batch 8×256 of random tokens, one warm-up step then
    timed steps for ~``seconds``."""
    shape = make_shape(256, 4, 8192)
    steps, tokens_per_s = _time_steps(build_model(shape, seq_len, seed=0), shape.vocab_size, seq_len, batch,
                                      seconds, torch.device("cpu"), "fp32", warmup=1, min_steps=2)
    return {
        "flops_per_s": tokens_per_s * shape.flops_per_token(seq_len),
        "tokens_per_s": tokens_per_s,
        "probe": f"d_model=256, n_layers=4, vocab=8192, batch {batch}x{seq_len}, fp32, {steps} steps",
        "threads": torch.get_num_threads(),
    }


def measure_shape_throughput(shape, seq_len: int, micro_batch: int, seconds: float = 4.0, model=None) -> dict:
    """Training tokens/s of ``shape`` itself on this machine: the trainer's model (`build_model`), optimizer and
    `train_step` on micro-batches of ``micro_batch`` × ``seq_len`` random tokens, two warm-up steps, then timed
    steps for ~``seconds``. A probe of another shape is not enough: measured here, a 1.1M-parameter plan ran
    at ~45% of the FLOP/s of the 7.4M-parameter probe model, so a budget sized with the probe took 600 s
    instead of 360 s. ``model``: measure this model instead (continued pretraining's base, whose
    architecture need not be `build_model`'s); ``shape`` then only gives the vocabulary and the FLOPs count."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16-mixed" if cuda else "fp32"
    model = model if model is not None else build_model(shape, seq_len, seed=0)
    steps, tokens_per_s = _time_steps(model, shape.vocab_size, seq_len, micro_batch, seconds, device, precision,
                                      warmup=2, min_steps=3)
    return {"tokens_per_s": tokens_per_s, "flops_per_s": tokens_per_s * shape.flops_per_token(seq_len),
            "steps": steps, "batch": f"{micro_batch}x{seq_len}", "precision": precision, "device": device.type,
            "threads": torch.get_num_threads(),
            "shape": {"d_model": shape.d_model, "n_layers": shape.n_layers, "vocab_size": shape.vocab_size}}


def _time_steps(model: torch.nn.Module, vocab_size: int, seq_len: int, batch: int, seconds: float,
                device: torch.device, precision: str, *, warmup: int, min_steps: int) -> tuple[int, float]:
    """(timed steps, training tokens/s) of `train_step` with AdamW (`make_optimizer`) on one batch of ``batch`` ×
    ``seq_len`` random tokens: ``warmup`` untimed steps (allocator, kernels), then at least ``min_steps`` and
    ~``seconds``."""
    model = model.to(device)
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.0, device=device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=g).to(device)

    def step():
        train_step(model, opt, tokens, lr=1e-4, micro_batch=batch, grad_clip=1.0, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    steps, t0 = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    return steps, steps * batch * seq_len / (time.perf_counter() - t0)
