"""Accelerator table (dense peaks from vendor datasheets) and a measured probe for CPUs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from domainlm.errors import UserError
from domainlm.model import build_model
from domainlm.plan.shape import make_shape
from domainlm.train.step import make_optimizer, train_step

DEFAULT_MFU = 0.40  # between torchtitan's 33–39% (8B, 8×H100) and llm-foundry/Megatron's 46–47% (H100)


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_flops: float  # dense bf16 peak FLOP/s, no sparsity
    fp32_flops: float
    memory_gb: float
    note: str


# Dense peaks, vendor datasheets (no structured sparsity).
ACCELERATORS: dict[str, Accelerator] = {
    "a100-40gb": Accelerator("a100-40gb", 312e12, 19.5e12, 40, "NVIDIA A100 SXM 40GB (BloombergGPT's GPU)"),
    "a100-80gb": Accelerator("a100-80gb", 312e12, 19.5e12, 80, "NVIDIA A100 SXM 80GB"),
    "h100": Accelerator("h100", 989e12, 67e12, 80, "NVIDIA H100 SXM 80GB"),
    "h200": Accelerator("h200", 989e12, 67e12, 141, "NVIDIA H200 SXM 141GB"),
    "l4": Accelerator("l4", 121e12, 30.3e12, 24, "NVIDIA L4 24GB"),
}
GPU_KINDS = (*ACCELERATORS, "cpu")


def get_accelerator(kind: str) -> Accelerator:
    if kind not in ACCELERATORS:
        raise UserError(f"--gpu: unknown GPU kind {kind!r}; expected one of {', '.join(GPU_KINDS)}")
    return ACCELERATORS[kind]


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
