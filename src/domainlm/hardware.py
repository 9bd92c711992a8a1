"""Accelerators: dense peak FLOP/s and memory from vendor datasheets (ANCHORS.md), for the planner's compute and
the trainer's MFU. Below both `plan/` and `train/`; a CPU has no datasheet peak: `plan/hardware.py` measures it."""

from __future__ import annotations

import re
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
    # the PCIe and NVL cards run lower clocks and power: H100 PCIe 1,513 / NVL 1,671 TFLOP/s bf16 with sparsity
    "h100-pcie": Accelerator("h100-pcie", 756e12, 51e12, 80, "NVIDIA H100 PCIe 80GB"),
    "h100-nvl": Accelerator("h100-nvl", 835e12, 60e12, 94, "NVIDIA H100 NVL 94GB"),
    "h200": Accelerator("h200", 989e12, 67e12, 141, "NVIDIA H200 SXM 141GB"),
    "h200-nvl": Accelerator("h200-nvl", 835e12, 60e12, 141, "NVIDIA H200 NVL 141GB"),
    "l4": Accelerator("l4", 121e12, 30.3e12, 24, "NVIDIA L4 24GB"),
}
GPU_KINDS = (*ACCELERATORS, "cpu")


def accelerator_of(device_name: str, memory_gb: float) -> Accelerator | None:
    """The table's row for a CUDA device (``torch.cuda.get_device_name``, its memory): the most specific key whose
    words the name holds — ``h100-pcie`` for "NVIDIA H100 PCIe", ``h100`` (SXM) for "NVIDIA H100 80GB HBM3" —
    and the A100's 40 or 80 GB by its memory; None for a card not in the table (then no MFU)."""
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    best, best_parts = None, -1
    for key, acc in ACCELERATORS.items():
        kind, *variant = key.split("-")
        if kind not in words:
            continue
        if variant and variant[0].endswith("gb"):
            if (memory_gb >= 60) != (variant[0] == "80gb"):
                continue
        elif not all(v in words for v in variant):
            continue
        if len(variant) > best_parts:
            best, best_parts = acc, len(variant)
    return best


def get_accelerator(kind: str) -> Accelerator:
    if kind not in ACCELERATORS:
        raise UserError(f"--gpu: unknown GPU kind {kind!r}; expected one of {', '.join(GPU_KINDS)}")
    return ACCELERATORS[kind]
