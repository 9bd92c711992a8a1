"""A Llama-style decoder shape (d_model, n_layers, heads, SwiGLU ffn) for a target parameter count.

Aspect-ratio rule: published decoders widen with scale — GPT-2 124M d/L = 768/12 = 64, GPT-3 6.7B and
Llama 7B/13B = 128, Llama 65B 8192/80 ≈ 102, BloombergGPT 7680/70 ≈ 110. We target

    d_model / n_layers = clamp(64 · (N / 1e8)^0.15, 32, 128)

(64 at 100M, ~90 at 1B, 128 from ~10B on), head_dim 32/64/128 for d_model below 256/2048/above, SwiGLU
ffn_dim = 8/3 · d_model rounded up to a multiple of 64 (the Llama rule), and search n_layers and d_model
(a multiple of head_dim) for the shape closest to the target count, preferring the target aspect ratio
among shapes within 2% of it. Kaplan et al. 2020 found loss nearly flat across aspect ratios 20–200, so
the rule costs little and keeps shapes familiar.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def params_non_embedding(self) -> int:
        """Transformer blocks + final norm (Kaplan's N): attention, SwiGLU MLP, two RMSNorms per layer."""
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        attn = d * d * 2 + d * kv * 2  # q, o: d×d; k, v: d×kv
        mlp = 3 * d * self.ffn_dim  # gate, up, down
        return self.n_layers * (attn + mlp + 2 * d) + d

    @property
    def params_embedding(self) -> int:
        """Input embedding plus the output head (shared when tied)."""
        return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

    @property
    def params_total(self) -> int:
        return self.params_non_embedding + self.params_embedding

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N_matmul + 12·L·d·T (PaLM, Chowdhery et al. 2022, App. B).

        N_matmul counts the weights that take part in matmuls (blocks and output head, not the input
        embedding lookup); 12·L·d·T is attention's QKᵀ and AV, forward and backward."""
        n_matmul = self.params_non_embedding + self.vocab_size * self.d_model
        return 6.0 * n_matmul + 12.0 * self.n_layers * self.d_model * seq_len

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(
            head_dim=self.head_dim,
            params_non_embedding=self.params_non_embedding,
            params_embedding=self.params_embedding,
            params_total=self.params_total,
        )
        return out


def ffn_for(d_model: int) -> int:
    return 64 * math.ceil(8 * d_model / 3 / 64)


def head_dim_for(d_model: int) -> int:
    return 32 if d_model < 256 else 64 if d_model < 2048 else 128


def target_aspect(params: float) -> float:
    return min(128.0, max(32.0, 64.0 * (params / 1e8) ** 0.15))


def make_shape(d_model: int, n_layers: int, vocab_size: int, tie_embeddings: bool = False) -> ModelShape:
    heads = d_model // head_dim_for(d_model)
    return ModelShape(n_layers, d_model, heads, heads, ffn_for(d_model), vocab_size, tie_embeddings)


# The search's range: depth 1–256, width up to 65536 (GPT-3 175B: 96 × 12288; BloombergGPT 70 × 7680).
MAX_LAYERS, MAX_D_MODEL = 256, 65536


def largest_params(vocab_size: int, *, count: str = "total", tie_embeddings: bool = False) -> int:
    """The largest model ``shape_for_params`` can return (MAX_LAYERS × MAX_D_MODEL)."""
    s = make_shape(MAX_D_MODEL, MAX_LAYERS, vocab_size, tie_embeddings)
    return s.params_total if count == "total" else s.params_non_embedding


def shape_for_params(
    params: float, vocab_size: int, *, count: str = "total", tie_embeddings: bool = False, min_layers: int = 1,
    min_d_model: int = 32,
) -> ModelShape:
    """The shape whose parameter count (``count`` = "total" or "non-embedding") is closest to ``params``, with at
    least ``min_layers`` layers and ``min_d_model`` width (the planner's small-scale rule sets them)."""
    aspect = target_aspect(params)

    def n_of(s: ModelShape) -> int:
        return s.params_total if count == "total" else s.params_non_embedding

    candidates = []
    for n_layers in range(min_layers, MAX_LAYERS + 1):
        # Solve for d on a grid of head_dim multiples around the continuous solution.
        lo, hi = min_d_model, MAX_D_MODEL
        while hi - lo > 32:  # bisection on d for this depth
            mid = (lo + hi) // 2
            if n_of(make_shape(mid, n_layers, vocab_size, tie_embeddings)) < params:
                lo = mid
            else:
                hi = mid
        for d0 in (lo, hi):
            step = head_dim_for(d0)
            for d in {max(step, step * (d0 // step), min_d_model), step * math.ceil(d0 / step)}:
                s = make_shape(d, n_layers, vocab_size, tie_embeddings)
                err = abs(math.log(n_of(s) / params))
                candidates.append((err, abs(math.log((d / n_layers) / aspect)), s))
    # Keep familiar proportions (16 ≤ d/L ≤ 256): a tiny model with a huge vocabulary would otherwise
    # become 50 layers of width 64. When nothing in range is close, the planner warns instead.
    sane = [c for c in candidates if 16 <= c[2].d_model / c[2].n_layers <= 256] or candidates
    candidates = sane
    close = [c for c in candidates if c[0] < math.log(1.02)]
    if close:
        return min(close, key=lambda c: (c[1], c[0]))[2]
    return min(candidates, key=lambda c: c[0])[2]
