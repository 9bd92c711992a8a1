"""Measure the activation memory of one training micro-step, to hold `domainlm memory`'s model (memory.py)
against what the trainer really keeps.

On CUDA the allocator counts (``torch.cuda.max_memory_allocated``). A CPU has no such counter, so
`LiveStorages` follows every tensor storage an op creates through a weak reference: after forward, the live
ones are exactly what autograd holds for backward; a snapshot after every op gives the peak. Parameters and
their gradients are left out — the model counts those as weights and gradients, not activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from domainlm.train.step import next_token_loss


class LiveStorages(TorchDispatchMode):
    """Storages created by ops while active: bytes still alive now, and which were alive after each op."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple] = {}  # weak reference's id → (weak reference, bytes, data pointer)
        self.snapshots: list[list[int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ref = StorageWeakRef(st)
                self.storages.setdefault(ref.cdata, (ref, st.nbytes(), st.data_ptr()))
        self.snapshots.append([k for k, (ref, _, _) in self.storages.items() if not ref.expired()])
        return out

    def live_bytes(self, exclude: set[int]) -> int:
        """Bytes of the live storages whose data pointer is not in ``exclude``."""
        return sum(n for ref, n, ptr in self.storages.values() if not ref.expired() and ptr not in exclude)

    def peak_bytes(self, first_op: int, exclude: set[int]) -> int:
        """The most bytes alive after any op from ``first_op`` on, leaving out storages with data pointers in
        ``exclude`` that are still alive (parameters, gradients)."""
        size = {k: n for k, (_, n, _) in self.storages.items()}
        skip = {k for k, (ref, _, ptr) in self.storages.items() if ptr in exclude and not ref.expired()}
        return max((sum(size[k] for k in snap if k not in skip) for snap in self.snapshots[first_op:]), default=0)


@dataclass(frozen=True)
class ActivationBytes:
    held: int  # after forward: what autograd keeps for backward
    peak: int  # the most at any point of backward


def measure_cpu(model: torch.nn.Module, batch: torch.Tensor) -> ActivationBytes:
    """Forward + backward of `next_token_loss` on ``batch`` [B, T+1] (fp32 or the model's own dtype), tracked
    storage by storage. Leaves the gradients in ``model``."""

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    mode = LiveStorages()
    with mode:
        loss = next_token_loss(model, batch)
        held = mode.live_bytes(params | {loss.untyped_storage().data_ptr()})
        first_backward_op = len(mode.snapshots)
        loss.backward()
    grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    return ActivationBytes(held, mode.peak_bytes(first_backward_op, params | grads))
