"""The compute-optimal vocabulary size (Tao et al. 2024, "Scaling Laws with Vocabulary: Larger Models Deserve
Larger Vocabularies", arXiv 2407.13623, NeurIPS 2024).

Tao et al. count the parameters in two parts: N_nv, the non-vocabulary parameters (the transformer blocks), and
N_v = V·d, the vocabulary parameters (one V × d matrix: the output head, whose matmul is what a token costs —
their FLOPs are 6·(N_nv + V·d)·D). Their approach 3 fits a loss on the unigram-normalised loss L_u (a loss that
does not improve merely because a larger vocabulary makes each token rarer):

    L_u(N_nv, V, D) = −E + A1/N_nv^α1 + A2/(V·d)^α2 + B/D^β        (their eq. 6; α1 = β in the fit)

with N_nv in millions, V·d in millions, D in billions of tokens. At a compute budget F the tokens are
D = F / (6·(N_nv + V·d)): a larger vocabulary lowers A2/(V·d)^α2 and costs tokens. The optimal V solves
∂L_u/∂V = 0:

    α2·A2·d / (V·d)^(α2+1) = β·B·(∂D/∂V) / D^(β+1),   ∂D/∂V = F·d / (6·(N_nv + V·d)²)

The left side falls and the right side rises with V, so the root is unique (found by bisection on log V).
Their approach 2 (derivative-based) is a closed form for compute-optimal budgets, shown beside it as a check:
N_v = 3,145,728 · (N_nv / 33M)^0.8354 (the 33M model's best N_v = 6144 × 512, scaled by their fitted γ).

Published points (tests/test_vocab.py): Llama2-70B's budget → at least 216K (it used 32K); their 3B model
(N_nv 2.87B, d 3200) at 2.3e21 FLOPs → ~43K (32K → 43K raised ARC-Challenge 29.1 → 32.0).
Their fits used models of 33M–2.87B non-vocabulary parameters at ≥ 2.18e17 FLOPs; outside that the vocabulary
is an extrapolation, like the laws' N and D.
"""

from __future__ import annotations

import math

# Approach 3's fitted constants (sail-sg/scaling-with-vocab, optimal_Nv_predict.py / approach3_isoloss.py).
TAO_E = 5.5327846803337435
TAO_A1 = 1.8313851559554126
TAO_A2 = 0.19584238398665638
TAO_B = 2.1241123120064955
TAO_ALPHA1 = 0.44660634152009615  # = β (constrained equal in their fit)
TAO_ALPHA2 = 0.6707374679896795
TAO_BETA = 0.44660634152009615
# Approach 2 (derivative-based, compute-optimal budgets): N_v = N_V0 · (N_nv / N_NV0)^γ.
TAO_NV0, TAO_NNV0, TAO_GAMMA = 3_145_728.0, 33e6, 0.8353974035228025
# The range their laws were fitted on: non-vocabulary parameters and FLOPs (points below 2.18e17 were dropped).
TAO_FITTED_NNV = (33e6, 2.87e9)
TAO_FITTED_FLOPS = 2.18e17

VOCAB_MULTIPLE = 64  # round to a multiple of 64: the embedding and head matmuls tile evenly on GPUs
MIN_VOCAB = 512  # a byte-level BPE holds 256 bytes + 3 specials before its first merge; keep ~250 merges


def unigram_normalised_loss(n_nv: float, vocab: float, d_model: float, flops: float) -> float:
    """Tao et al.'s approach-3 L_u at compute ``flops`` (tokens D = F / (6·(N_nv + V·d)))."""
    nv_m, vd_m = n_nv / 1e6, vocab * d_model / 1e6
    d_b = flops / (6.0 * (n_nv + vocab * d_model)) / 1e9
    return -TAO_E + TAO_A1 / nv_m**TAO_ALPHA1 + TAO_A2 / vd_m**TAO_ALPHA2 + TAO_B / d_b**TAO_BETA


def _dl_dv(vocab: float, n_nv: float, d_model: float, flops: float) -> float:
    """∂L_u/∂V, in the fit's units (N_nv, V·d in millions; D in billions; V in thousands, d in thousands)."""
    v, d, n = vocab / 1e3, d_model / 1e3, n_nv / 1e6
    f = flops / 1e15  # so that D = F / (6·(N_nv + V·d)) comes out in billions
    head = -TAO_ALPHA2 * TAO_A2 * d / (v * d) ** (TAO_ALPHA2 + 1)
    tokens = f / (6.0 * (n + v * d))
    dtokens_dv = f * d / (6.0 * (n + v * d) ** 2)
    return head + TAO_BETA * TAO_B * dtokens_dv / tokens ** (TAO_BETA + 1)


def optimal_vocab_exact(n_nv: float, d_model: float, flops: float) -> float:
    """The V (not rounded) where ∂L_u/∂V = 0 at ``flops``: Tao et al. approach 3."""
    lo, hi = math.log(1.0), math.log(1e8)
    for _ in range(200):  # bisection on log V: ∂L_u/∂V < 0 below the optimum, > 0 above it
        mid = 0.5 * (lo + hi)
        if _dl_dv(math.exp(mid), n_nv, d_model, flops) < 0:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def optimal_vocab(n_nv: float, d_model: float, flops: float) -> int:
    """Approach 3's V, rounded to a multiple of 64 and at least MIN_VOCAB."""
    v = optimal_vocab_exact(n_nv, d_model, flops)
    return max(MIN_VOCAB, VOCAB_MULTIPLE * round(v / VOCAB_MULTIPLE))


def derivative_vocab_params(n_nv: float) -> float:
    """Tao et al. approach 2: the compute-optimal N_v = V·d for N_nv non-vocabulary parameters."""
    return TAO_NV0 * (n_nv / TAO_NNV0) ** TAO_GAMMA


def in_fitted_range(n_nv: float, flops: float) -> bool:
    lo, hi = TAO_FITTED_NNV
    return lo <= n_nv <= hi and flops >= TAO_FITTED_FLOPS
