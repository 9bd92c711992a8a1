"""Accelerators: dense peak FLOP/s and memory from vendor datasheets (ANCHORS.md), for the planner's compute and
the trainer's MFU. Below both `plan/` and `train/`; a CPU has no datasheet peak: `plan/hardware.py` measures it."""

from __future__ import annotations

from dataclasses import dataclass

from domainlm.errors import UserError

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
