"""Parallelism, applied from outside the model: torch.distributed from torchrun's environment, then
DDP (replicated) or FSDP2 (`fully_shard` per decoder layer, ZeRO-3), optionally after `torch.compile`.

Order follows torchtitan: compile each decoder layer → shard/replicate. The same code runs on 1 CPU
process (no process group, no wrapper), N CPU processes (gloo) and N GPUs (nccl), single or multi-node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from domainlm.plan import memory as M
from domainlm.plan.shape import ModelShape


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join torchrun's process group when launched by it (RANK/WORLD_SIZE set); else one plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(rank, world, local, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def choose_parallel(mode: str, shape: ModelShape, world: Dist, *, seq_len: int, micro_batch: int,
                    precision: str) -> str:
    """``none`` for one process; ``auto`` → DDP when replicated training fits the device's memory per the
    plan's memory model (weights + grads + Adam + activations), else FSDP (ZeRO-3)."""
    if world.world_size == 1 and mode != "fsdp":
        return "none"
    if mode != "auto":
        return mode
    if world.device.type != "cuda":
        return "ddp"  # CPU memory is the host's; replication is the simpler, faster choice
    capacity_gb = torch.cuda.get_device_properties(world.device).total_memory / 1e9
    est = M.estimate(
        shape.params_total, precision="fp32" if precision == "fp32" else "bf16-mixed", sharding="ddp",
        gpus=world.world_size, seq_len=seq_len, micro_batch=micro_batch, n_layers=shape.n_layers,
        d_model=shape.d_model, vocab_size=shape.vocab_size,
    )
    return "ddp" if est.total_gb <= 0.9 * capacity_gb else "fsdp"  # 10% headroom: allocator, NCCL buffers


def parallelize(model: torch.nn.Module, mode: str, world: Dist, *, compile: bool = False) -> torch.nn.Module:
    """Return the module to train: ``model`` itself (none/fsdp — `fully_shard` works in place) or a DDP wrapper."""
    if compile:
        for layer in model.model.layers:
            layer.compile()  # per block: small graphs compile fast and reuse (torchtitan)
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():  # FSDP on one process (e.g. resuming a sharded run alone)
            _init_single_process_group(world)
        mesh = init_device_mesh(world.device.type, (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)  # one all-gather per layer in forward and backward
        fully_shard(model, mesh=mesh)  # embeddings, final norm, head
        return model
    raise ValueError(f"unknown parallel mode {mode!r}")


def _init_single_process_group(world: Dist) -> None:
    import tempfile

    store = dist.FileStore(tempfile.mktemp(prefix="domainlm-pg-"), 1)
    dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
