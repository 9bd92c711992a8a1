"""The mixture loader: packed training sequences drawn from each source with probability = its weight.

Each source's token file (documents + EOS, concatenated by `domainlm prepare`) is cut into windows of
``seq_len + 1`` tokens with stride ``seq_len`` — packed across document boundaries, so no padding and
every token but a window's first is a target. Windows are visited in a scrambled order that changes each
epoch: an affine permutation ``i → (a·i + b) mod n`` with gcd(a, n) = 1, which needs O(1) memory where a
stored permutation of a 100B-token source would need gigabytes.

Determinism: step ``s`` draws its whole global batch's sources from ``Generator(seed, s)``, so the draw
depends only on the step — every rank draws the same sequence of sources, advances every source's
position the same way, and reads only its own slice ``[rank·B_local, (rank+1)·B_local)`` of the batch.
The loader's state is therefore small and JSON-friendly: step, and position + epoch per source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from domainlm.errors import UserError


@dataclass
class SourceState:
    position: int = 0  # next window index within the current epoch's order
    epoch: int = 0
    sequences: int = 0  # sequences drawn in all (shares, logs)


class MixtureLoader:
    def __init__(
        self,
        tokens: dict[str, np.ndarray],
        weights: dict[str, float],
        *,
        seq_len: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if global_batch % world_size:
            raise UserError(f"global batch {global_batch} sequences does not divide over {world_size} processes")
        self.names = [n for n, w in weights.items() if w > 0]
        total = sum(weights[n] for n in self.names)
        self.probs = np.array([weights[n] / total for n in self.names])
        self.tokens = tokens
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.local_batch = global_batch // world_size
        self.lo = rank * self.local_batch  # this rank's slice of every global batch
        self.windows = {}
        for n in self.names:
            self.windows[n] = (len(tokens[n]) - 1) // seq_len
            if self.windows[n] < 1:
                raise UserError(
                    f"source {n!r}: {len(tokens[n])} training tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                    "lower train.seq_len or add data"
                )
        self.step = 0
        self.state = {n: SourceState() for n in self.names}
        self._perm_cache: dict[tuple[str, int], tuple[int, int]] = {}

    def _affine(self, name: str, epoch: int) -> tuple[int, int]:
        key = (name, epoch)
        if key not in self._perm_cache:
            n = self.windows[name]
            rng = np.random.default_rng([self.seed, self.names.index(name), epoch, 7919])
            a = 1
            if n > 2:
                while True:
                    a = int(rng.integers(1, n))
                    if math.gcd(a, n) == 1:
                        break
            self._perm_cache = {key: (a, int(rng.integers(0, n)))}  # only the current epoch is needed
        return self._perm_cache[key]

    def _next_window(self, name: str) -> int:
        """Start token of the source's next window; advances its position (and epoch at the end)."""
        st = self.state[name]
        a, b = self._affine(name, st.epoch)
        start = ((a * st.position + b) % self.windows[name]) * self.seq_len
        st.position += 1
        st.sequences += 1
        if st.position == self.windows[name]:
            st.position, st.epoch = 0, st.epoch + 1
        return start

    def next_batch(self) -> tuple[torch.Tensor, np.ndarray]:
        """This rank's slice of the next global batch: tokens [B_local, seq_len + 1] (int64) and the source
        index of each of its sequences."""
        rng = np.random.default_rng([self.seed, self.step])
        choice = rng.choice(len(self.names), size=self.global_batch, p=self.probs)
        rows = []
        for j, c in enumerate(choice):
            name = self.names[c]
            start = self._next_window(name)  # every rank advances every source, so states stay equal
            if self.lo <= j < self.lo + self.local_batch:
                rows.append(np.asarray(self.tokens[name][start : start + self.seq_len + 1], dtype=np.int64))
        self.step += 1
        return torch.from_numpy(np.stack(rows)), choice[self.lo : self.lo + self.local_batch]

    def epochs(self) -> dict[str, float]:
        """Epochs seen per source (fractional): > 1 means repeated data (the data-constrained regime)."""
        return {n: st.epoch + st.position / self.windows[n] for n, st in self.state.items()}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "sources": {n: vars(st).copy() for n, st in self.state.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len or set(state["sources"]) != set(self.names):
            raise UserError(
                "checkpoint: data loader state is for another seq_len or set of sources; use --restart to start over"
            )
        self.step = state["step"]
        for n, st in state["sources"].items():
            self.state[n] = SourceState(**st)


def val_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> int:
    """How many validation windows to score: at most ``max_tokens`` tokens, at least one window when the split
    holds one (0 only when it is shorter than ``seq_len + 1`` tokens). They do not depend on the world size, so a
    validation number is the same on any number of processes (`rank_windows` spreads them)."""
    return min((len(tokens) - 1) // seq_len, max(max_tokens // seq_len, 1))


def rank_windows(n: int, rank: int, world_size: int) -> list[int | None]:
    """This rank's share of ``n`` windows: every ``world_size``-th from ``rank``, padded with None (a window
    that is run but scores nothing) to ⌈n / world_size⌉, so every rank runs the same number of forwards — FSDP
    gathers weights collectively in each, and a rank with fewer windows than the others (or none: fewer windows
    than ranks) would leave them waiting."""
    mine: list[int | None] = list(range(rank, n, world_size))
    return mine + [None] * (-(-n // world_size) - len(mine))
