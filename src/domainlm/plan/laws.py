"""Scaling laws: compute-optimal parameters N and tokens D for a compute budget C (FLOPs = 6·N·D).

Which parameter count each law uses matters when you compare them:
- Chinchilla (Hoffmann et al. 2022, arXiv 2203.15556) and the Epoch AI refit count *all* parameters,
  embeddings included.
- Kaplan et al. 2020 (arXiv 2001.08361) counts *non-embedding* parameters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from domainlm.errors import UserError

PF_DAY = 1e15 * 86400  # FLOPs in one petaflop/s-day (Kaplan's compute unit)

# Chinchilla Table 3 (approach 1): (params, FLOPs, tokens). Reproduced by `chinchilla-1` within 5% (tested).
CHINCHILLA_TABLE3 = [
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
]


@dataclass(frozen=True)
class Law:
    """A scaling law: N_opt(C) = g · C^a, D_opt = C / (6 N_opt); optionally a loss L(N, D)."""

    name: str
    a: float  # N_opt ∝ C^a
    g: float  # coefficient: N_opt = g · C^a (C in FLOPs)
    params_counted: str  # "total" or "non-embedding"
    source: str
    # Parametric loss L(N,D) = E + A/N^alpha + B/D^beta (Chinchilla approach 3 form), if the law has one.
    E: float | None = None
    A: float | None = None
    B: float | None = None
    alpha: float | None = None
    beta: float | None = None
    notes: list[str] = field(default_factory=list)
    # The parameter counts (in ``params_counted``) of the models the law was fitted on; below it, N and D are an
    # extrapolation and the planner picks the shape by its small-scale rule instead (planner._small_scale).
    fitted_params: tuple[float, float] | None = None

    @property
    def b(self) -> float:
        return 1.0 - self.a  # D_opt ∝ C^(1-a) because C = 6ND

    @property
    def has_loss(self) -> bool:
        return self.E is not None

    def optimal_params(self, flops: float) -> float:
        return self.g * flops**self.a

    def optimal(self, flops: float) -> tuple[float, float]:
        n = self.optimal_params(flops)
        return n, flops / (6.0 * n)

    def params_for_tokens(self, tokens: float) -> float:
        """The compute-optimal parameter count whose optimal token count is ``tokens`` (Muennighoff's U_N for
        U_D = tokens): D_opt(C) = C^(1−a) / (6g) solved for C, then N_opt(C) = g·C^a."""
        flops = (6.0 * self.g * tokens) ** (1.0 / (1.0 - self.a))
        return self.optimal_params(flops)

    def loss(self, n: float, d: float) -> float | None:
        """Predicted pre-training loss (nats/token, on the law's own data and tokenizer)."""
        if not self.has_loss:
            return None
        # A·N^-α via exp(log): a degenerate fitted law (α ≫ 1) underflows to 0 instead of overflowing N^α.
        return self.E + self.A * math.exp(-self.alpha * math.log(n)) + self.B * math.exp(-self.beta * math.log(d))

    def constants(self) -> dict:
        out = {"a": round(self.a, 4), "b": round(self.b, 4), "g": self.g}
        if self.has_loss:
            out.update(E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta)
        return out


def _parametric(name: str, E: float, A: float, B: float, alpha: float, beta: float, source: str,
                fitted_params: tuple[float, float] | None = None) -> Law:
    """Closed-form optimum of L(N,D) = E + A/N^α + B/D^β subject to C = 6ND (Chinchilla eq. 4):
    N_opt = G (C/6)^(β/(α+β)), G = (αA / (βB))^(1/(α+β))."""
    a = beta / (alpha + beta)
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    g = G * 6.0 ** (-a)
    return Law(name, a, g, "total", source, E, A, B, alpha, beta, fitted_params=fitted_params)


# Approach 1 as a power law N_opt = g·C^a fitted to Chinchilla Table 3. Each row gives N twice: its params
# column and C/(6·D) from its tokens column; the 67B row's two disagree by 4.7% (6·67e9·1.5e12 ≠ 5.76e23),
# so a least-squares fit leaves that row's tokens 5.3% off. We use the minimax fit (smallest worst-case
# log error over both columns, Nelder-Mead), which keeps every entry of the table within 3.1%;
# a = 0.498 agrees with the paper's a = 0.50. Re-derived in tests/test_plan.py.
CHINCHILLA_1_A = 0.49819497
CHINCHILLA_1_G = 0.09594818
GOPHER_FLOPS = 5.76e23  # Gopher's (and Chinchilla's) training compute, Chinchilla Table 3
# Hoffmann et al. 2022 (abstract, §3): "over 400 language models ranging from 70 million to over 16 billion
# parameters"; Besiroglu et al. 2024 refit approach 3 on the same models (their Fig. 4 data, reconstructed).
CHINCHILLA_FITTED = (70e6, 16e9)
# Kaplan et al. 2020 (abstract, §3): "models ranging in size from 768 to 1.5 billion non-embedding parameters".
KAPLAN_FITTED = (768.0, 1.5e9)

DEFAULT_LAW = "epoch-2024"
LAWS: dict[str, Law] = {
    # Approach 1 (fixed model sizes, varying tokens): a = 0.50; fitted to Table 3 (see above).
    "chinchilla-1": Law("chinchilla-1", CHINCHILLA_1_A, CHINCHILLA_1_G, "total",
                        "Hoffmann et al. 2022, approach 1 (Table 3)", fitted_params=CHINCHILLA_FITTED),
    # Approach 2 (IsoFLOP profiles): a = 0.49, b = 0.51; anchored at 63B params for Gopher's budget
    # (Chinchilla Fig. 1 / Table A3).
    "chinchilla-2": Law(
        "chinchilla-2", 0.49, 63e9 / GOPHER_FLOPS**0.49, "total", "Hoffmann et al. 2022, approach 2 (IsoFLOP)",
        fitted_params=CHINCHILLA_FITTED),
    # Approach 3 (parametric fit), Chinchilla eq. 10: E=1.69, A=406.4, B=410.7, α=0.34, β=0.28 → a ≈ 0.46.
    "chinchilla-3": _parametric(
        "chinchilla-3", 1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, approach 3 (parametric L(N,D))",
        CHINCHILLA_FITTED),
    # Epoch AI's refit of approach 3 (Besiroglu et al. 2024, arXiv 2404.10102, Table 1): E=1.8172, A=482.01,
    # B=2085.43, α=0.3478, β=0.3658 → a = 0.513, agreeing with approaches 1 and 2 where the published approach-3
    # fit (a = 0.45) does not. The default law: its optimum at Gopher's budget is 72.2B (approach 1: 66.0B,
    # approach 2: 63.0B, published approach 3: 32.2B).
    "epoch-2024": _parametric(
        "epoch-2024", 1.8172, 482.01, 2085.43, 0.3478, 0.3658, "Besiroglu et al. 2024 (Epoch AI refit)",
        CHINCHILLA_FITTED),
    # Kaplan et al. 2020, eq. 6.1/Table 6: N_opt ≈ 1.3e9 · (C / PF-day)^0.73, non-embedding parameters.
    "kaplan": Law(
        "kaplan", 0.73, 1.3e9 / PF_DAY**0.73, "non-embedding", "Kaplan et al. 2020 (N ∝ C^0.73, non-embedding)",
        fitted_params=KAPLAN_FITTED),
}

# Kaplan's own L(N, D) (eq. 1.5): [(N_c/N)^(α_N/α_D) + D_c/D]^α_D, WebText2 nats/token with GPT-2's tokenizer.
KAPLAN_NC, KAPLAN_DC, KAPLAN_ALPHA_N, KAPLAN_ALPHA_D = 8.8e13, 5.4e13, 0.076, 0.095


def kaplan_loss(n_non_embedding: float, d: float) -> float:
    return ((KAPLAN_NC / n_non_embedding) ** (KAPLAN_ALPHA_N / KAPLAN_ALPHA_D) + KAPLAN_DC / d) ** KAPLAN_ALPHA_D


def load_fitted(path: str, origin: str = "--law") -> Law:
    """A law fitted by `domainlm scaling` (law.json with E, A, B, alpha, beta); ``origin`` names where the
    name came from in errors (the ``--law`` flag or a config's ``budget.law`` key)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        c = data["approach3"] if "approach3" in data else data
        consts = [float(c[k]) for k in ("E", "A", "B", "alpha", "beta")]
        if not (consts[3] > 0 and consts[4] > 0 and all(math.isfinite(v) for v in consts)):
            # α = 0 (or β = 0): the loss does not fall with N (D), so there is no compute-optimal split (a = 1 or 0).
            raise UserError(f"{origin} fitted:{p}: α = {consts[3]:.3g}, β = {consts[4]:.3g}, A = {consts[1]:.3g}: the "
                            "fitted points do not constrain both terms of L(N, D), so the law has no compute-optimal "
                            "size; refit with sizes that bracket each budget's optimum")
        law = _parametric(f"fitted:{p}", *consts, f"fitted: {p}")
    except FileNotFoundError:
        raise UserError(f"{origin} fitted:{p}: file not found; run `domainlm scaling CONFIG` to fit one") from None
    except IsADirectoryError:
        raise UserError(f"{origin} fitted:{p}: expected a law.json file, got a folder") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{origin} fitted:{p}: expected law.json with E, A, B, alpha, beta ({e})") from None
    return law


def get_law(name: str, origin: str = "--law") -> Law:
    if name.startswith("fitted:"):
        return load_fitted(name.removeprefix("fitted:"), origin)
    if name not in LAWS:
        raise UserError(f"{origin}: unknown law {name!r}; expected one of {', '.join(LAWS)} or fitted:PATH")
    return LAWS[name]


# Muennighoff et al. 2023 (arXiv 2305.16264), data-constrained scaling: fitted decay constants.
MUENNIGHOFF_R_D = 15.387756  # R*_D: repeated tokens lose value with this e-folding (in epochs)
MUENNIGHOFF_R_N = 5.309743  # R*_N: the same for parameters in excess of U_N (eq. 6)
MAX_USEFUL_EPOCHS = 4.0  # "up to ~4 epochs of repeated data is almost as good as new data"


def effective_params(unique_params: float, params: float) -> float:
    """Effective parameters N' = U_N + U_N·R*_N·(1 − exp(−R_N/R*_N)), R_N = N/U_N − 1 (Muennighoff eq. 6):
    parameters beyond U_N, the compute-optimal size for the unique data, decay in value like repeated tokens.

    With params ≤ unique_params nothing is in excess and N' = params."""
    if params <= unique_params:
        return params
    excess = params / unique_params - 1.0
    return unique_params + unique_params * MUENNIGHOFF_R_N * (1.0 - math.exp(-excess / MUENNIGHOFF_R_N))


def effective_tokens(unique_tokens: float, tokens: float) -> float:
    """Effective data D' = U + U·R*·(1 − exp(−R/R*)), R = epochs − 1 (Muennighoff eq. 5).

    With tokens ≤ unique_tokens nothing is repeated and D' = tokens."""
    if tokens <= unique_tokens:
        return tokens
    repeats = tokens / unique_tokens - 1.0
    return unique_tokens + unique_tokens * MUENNIGHOFF_R_D * (1.0 - math.exp(-repeats / MUENNIGHOFF_R_D))
