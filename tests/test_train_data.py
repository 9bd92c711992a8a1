"""The mixture loader and the LR schedule: shares, determinism, rank slices, epochs, resumable state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from domainlm.errors import UserError
from domainlm.train.data import MixtureLoader
from domainlm.train.schedule import lr_at

T = 8


def sources(sizes=(4001, 1201, 801)) -> dict[str, np.ndarray]:
    # Each source's tokens are its own range of ids, so a sequence's source is visible in its tokens.
    return {name: (np.arange(n) % 1000 + 1000 * i).astype(np.uint16)
            for i, (name, n) in enumerate(zip("abc", sizes, strict=True))}


def loader(rank=0, world=1, batch=32, weights=None, **kw) -> MixtureLoader:
    return MixtureLoader(sources(), weights or {"a": 0.6, "b": 0.3, "c": 0.1}, seq_len=T, global_batch=batch,
                         rank=rank, world_size=world, **kw)


def test_mixture_shares_match_weights():
    ld = loader()
    counts = np.zeros(3)
    for _ in range(400):  # 12,800 sequences
        batch, src = ld.next_batch()
        assert batch.shape == (32, T + 1) and batch.dtype == torch.int64
        assert np.array_equal(batch[:, 0].numpy() // 1000, src)  # the reported source is the real one
        counts += np.bincount(src, minlength=3)
    shares = counts / counts.sum()
    assert np.allclose(shares, [0.6, 0.3, 0.1], atol=0.02), shares
    assert ld.epochs()["c"] > 1  # the small source repeats: more than one epoch


def test_windows_are_packed_and_each_seen_once_per_epoch():
    arr = np.arange(4001, dtype=np.uint32)  # token id = its position
    ld = MixtureLoader({"a": arr}, {"a": 1.0}, seq_len=T, global_batch=10)
    n = ld.windows["a"]  # (4001 - 1) // 8 = 500 windows, stride T, T + 1 tokens each
    starts = []
    for _ in range(n // 10):
        batch, _ = ld.next_batch()
        for row in batch.numpy():
            assert np.array_equal(row, np.arange(row[0], row[0] + T + 1)) and row[0] % T == 0
            starts.append(int(row[0]))
    assert sorted(starts) == list(range(0, n * T, T))  # a permutation: every window exactly once
    assert starts != sorted(starts)  # scrambled, not file order
    assert ld.state["a"].epoch == 1 and ld.state["a"].position == 0
    second = [int(r[0]) for _ in range(5) for r in ld.next_batch()[0]]
    assert second != starts[:50]  # a new order each epoch


def test_ranks_read_disjoint_slices_of_the_same_global_batch():
    one = loader(batch=8)
    two = [loader(rank=r, world=2, batch=8) for r in range(2)]
    for _ in range(20):
        full, src = one.next_batch()
        parts = [ld.next_batch() for ld in two]
        assert torch.equal(torch.cat([p[0] for p in parts]), full)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), src)


def test_state_roundtrip_resumes_the_same_stream():
    a = loader(seed=3)
    for _ in range(37):
        a.next_batch()
    b = loader(seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(50):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_seed_changes_the_stream_and_validation():
    assert not torch.equal(loader(seed=0).next_batch()[0], loader(seed=1).next_batch()[0])
    with pytest.raises(UserError, match="fewer than seq_len"):
        MixtureLoader({"a": np.arange(5, dtype=np.uint16)}, {"a": 1.0}, seq_len=T, global_batch=2)
    with pytest.raises(UserError, match="does not divide"):
        loader(world=3, batch=8)


def test_schedules():
    kw = dict(lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(99, **kw) == pytest.approx(0.1)
    assert lr_at(10 + 89 // 2, **kw) == pytest.approx(0.55, abs=0.02)  # cosine midpoint
    wsd = dict(kw, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, **wsd) == 1.0 and lr_at(81, **wsd) == 1.0
    assert lr_at(99, **wsd) == pytest.approx(0.1)
    assert all(lr_at(s, **wsd) >= lr_at(s + 1, **wsd) for s in range(10, 99))
    assert math.isfinite(lr_at(0, lr=1.0, total_steps=1, warmup_steps=5))
