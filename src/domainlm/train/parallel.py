"""Parallelism, applied from outside the model: torch.distributed from torchrun's environment, then
activation checkpointing, `torch.compile` and DDP (replicated) or FSDP2 (`fully_shard` per decoder layer):
``fsdp`` reshards each layer's weights after its forward (ZeRO-3), ``zero2`` keeps them gathered until its
backward (``reshard_after_forward=False``: ZeRO-2, optimizer states and gradients sharded, one all-gather per
layer per step instead of two).

Order follows torchtitan: checkpoint each decoder layer → compile each decoder layer → shard/replicate. The
same code runs on 1 CPU process (no process group, no wrapper), N CPU processes (gloo) and N GPUs (nccl),
single or multi-node.

Precision: fp32 everywhere on CPU. On CUDA with ``bf16-mixed``, FSDP2 keeps fp32 sharded parameters (the
optimizer's master weights) and all-gathers them as bf16 for compute, reducing gradients in fp32
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, the policy torchtitan trains Llama with), so
the step needs no autocast; DDP and a single GPU keep fp32 weights under bf16 autocast.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from domainlm.memory import TRAIN_PARALLEL, estimate
from domainlm.shape import ModelShape

SHARDED = ("fsdp", "zero2")  # the train.parallel modes that are FSDP2


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


@contextmanager
def distributed() -> Iterator[Dist]:
    """``with distributed() as world:`` — `init_distributed`, and leave the process group however the block ends."""
    world = init_distributed()
    try:
        yield world
    finally:
        shutdown()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def choose_parallel(mode: str, shape: ModelShape, world: Dist, *, seq_len: int, micro_batch: int,
                    precision: str, activation_checkpointing: bool = False, cpu_offload: bool = False) -> str:
    """``none`` for one process; ``auto`` → the least sharding that fits the device's memory per the plan's
    memory model (weights + grads + Adam + activations, `memory.py`): DDP, else ``zero2``, else ``fsdp``
    (ZeRO-3). CPU offload is FSDP's."""
    if cpu_offload and world.device.type == "cuda":
        return "fsdp"
    if world.world_size == 1 and mode not in SHARDED:
        return "none"
    if mode != "auto":
        return mode
    if world.device.type != "cuda":
        return "ddp"  # CPU memory is the host's; replication is the simpler, faster choice
    capacity_gb = torch.cuda.get_device_properties(world.device).total_memory / 1e9
    for sharding, parallel in TRAIN_PARALLEL.items():
        est = estimate(
            shape.params_total, precision="fp32" if precision == "fp32" else "bf16-mixed", sharding=sharding,
            gpus=world.world_size, seq_len=seq_len, micro_batch=micro_batch, n_layers=shape.n_layers,
            d_model=shape.d_model, vocab_size=shape.vocab_size, activation_checkpointing=activation_checkpointing,
            n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads, ffn_dim=shape.ffn_dim,
        )
        if est.total_gb <= 0.9 * capacity_gb:  # 10% headroom: allocator, NCCL buffers
            return parallel
    return "fsdp"


def fsdp_mixed_precision(mode: str, world: Dist, precision: str) -> bool:
    """Whether FSDP2 casts parameters to bf16 itself (CUDA, ``bf16-mixed``) — then the step runs without autocast."""
    return mode in SHARDED and world.device.type == "cuda" and precision == "bf16-mixed"


def step_precision(mode: str, world: Dist, precision: str) -> str:
    """The precision `train_step`/`evaluate` should autocast to: none when FSDP2 already computes in bf16."""
    return "fp32" if fsdp_mixed_precision(mode, world, precision) else precision


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Activation checkpointing per decoder layer: each layer keeps only its input for backward and recomputes
    the rest (Chen et al. 2016, arXiv 1604.06174; what BloombergGPT did on every layer). Non-reentrant
    `torch.utils.checkpoint`, which composes with `torch.compile` and FSDP2. Weights keep their names: the
    wrapper strips its own prefix from state dicts, so checkpoints and the HF export are unchanged."""

    for layers in layer_stacks(model):
        for i, layer in enumerate(layers):
            # A layer with dropout (a continued GPT-2, say) replays its RNG so the recomputed masks are the same.
            dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in layer.modules())
            layers[i] = checkpoint_wrapper(layer, preserve_rng_state=dropout)


def layer_stacks(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """Every stack of transformer layers: a decoder's or an encoder's (ModernBERT ``model.layers``), or both of an
    encoder-decoder's (T5 ``encoder.block`` and ``decoder.block``, model.objective span) — each layer is
    checkpointed, compiled and sharded alike."""
    stacks = [decoder_layers(model)]
    kind = type(getattr(stacks[0][0], "_checkpoint_wrapped_module", stacks[0][0]))
    for m in model.modules():  # the other stacks of the same layer class, of the same depth
        if isinstance(m, torch.nn.ModuleList) and m is not stacks[0] and len(m) == len(stacks[0]) and all(
                type(getattr(x, "_checkpoint_wrapped_module", x)) is kind for x in m):
            stacks.append(m)
    return stacks


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers, whatever the architecture calls it (Llama ``model.layers``, GPT-2
    ``transformer.h``, …): the ModuleList of the classes transformers marks as not to be split across devices
    (``_no_split_modules``: LlamaDecoderLayer, GPT2Block, …), else the longest ModuleList of one class."""
    names = set(getattr(model, "_no_split_modules", None) or ())

    def kind(m: torch.nn.Module) -> str:  # a checkpoint-wrapped layer counts as the layer it wraps
        return type(getattr(m, "_checkpoint_wrapped_module", m)).__name__

    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
              and len({kind(x) for x in m}) == 1]
    marked = [m for m in stacks if kind(m[0]) in names]
    found = max(marked or stacks, key=len, default=None)
    if found is None:
        raise ValueError(f"{type(model).__name__}: no stack of decoder layers found")
    return found


def parallelize(model: torch.nn.Module, mode: str, world: Dist, *, compile: bool = False,
                activation_checkpointing: bool = False, precision: str = "fp32",
                cpu_offload: bool = False, init: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """Return the module to train: ``model`` itself (none/fsdp — `fully_shard` works in place) or a DDP wrapper.

    ``cpu_offload`` (FSDP only): sharded parameters, gradients and the optimizer step live in host memory
    (`CPUOffloadPolicy`), for a model whose states do not fit the GPUs even fully sharded.

    A model on the meta device (`build_model(meta=True)`) is materialised here and initialised by ``init``: with
    FSDP after sharding, so each rank only ever allocates its shard (torchtitan's order); otherwise on the
    training device directly, without a full copy in host memory first."""
    meta = any(p.is_meta for p in model.parameters())
    if meta and init is None:
        raise ValueError("a model on the meta device needs init")

    def materialise(m: torch.nn.Module, device: torch.device) -> None:
        tied = getattr(m, "config", None) is not None and getattr(m.config, "tie_word_embeddings", False)
        m.to_empty(device=device)
        if tied and mode not in SHARDED:  # to_empty gives the head a tensor of its own: share the embedding's again
            m.tie_weights()
        init(m)

    if activation_checkpointing:
        checkpoint_layers(model)
    if compile:
        for layer in [x for stack in layer_stacks(model) for x in stack]:
            layer.compile()  # per block: small graphs compile fast and reuse (torchtitan)
    cpu_offload = cpu_offload and world.device.type == "cuda"  # on a CPU the states are in host memory already
    if cpu_offload and mode not in SHARDED:
        raise ValueError(f"cpu_offload needs FSDP, not {mode!r}")
    if meta and mode not in SHARDED:
        materialise(model, world.device)
    if mode == "none":
        return model
    if mode == "ddp":

        return DDP(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    if mode in SHARDED:

        if not dist.is_initialized():  # FSDP on one process (e.g. resuming a sharded run alone)
            _init_single_process_group(world)
        mesh = init_device_mesh(world.device.type, (dist.get_world_size(),))
        kw = {"mesh": mesh, "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
        if fsdp_mixed_precision(mode, world, precision):
            # bf16 all-gathers and matmuls; fp32 gradient reduce-scatter (a sum over ranks in bf16 loses bits).
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in [x for stack in layer_stacks(model) for x in stack]:
            # fsdp: one all-gather per layer in forward and one in backward; zero2: one, kept until backward
            fully_shard(layer, reshard_after_forward=mode == "fsdp", **kw)
        fully_shard(model, **kw)  # embeddings, final norm, head
        if meta:
            materialise(model, torch.device("cpu") if cpu_offload else world.device)
        return model
    raise ValueError(f"unknown parallel mode {mode!r}")


def _init_single_process_group(world: Dist) -> None:
    # The store's file lives in a private (0700) folder of our own: a name from mktemp could be taken by
    # another user between choosing and creating it. Removed at exit.
    folder = tempfile.mkdtemp(prefix="domainlm-pg-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    store = dist.FileStore(os.path.join(folder, "store"), 1)
    dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights a forward without backward (an eval) left behind under ``zero2``."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def is_fsdp(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)
