"""The mixing law: each source's validation bits per byte as a function of the domain weight w and the training
tokens D, at the run's model size, knowing that a small domain corpus is repeated.

Ye et al. 2024 ("Data Mixing Laws", arXiv 2403.16952, eq. 1): at a fixed model and budget, source i's loss over
mixture proportions r is L_i(r) = c_i + k_i·exp(Σ_j t_ij·r_j). With the sources in two groups (domain share w,
general share 1 − w) the sum is t_i0 + (t_i1 − t_i0)·w, so L_i(w) = c_i + k_i·exp(t_i·w): three constants a source.
Here it is composed with the token budget D and with repetition:

    L_i(w, D) = c_i + exp(a_i + t_i·ρ − β_i·ln(D′/D_ref))          (k_i = exp(a_i) at D′ = D_ref)

- The run sees D_j = share_j(w)·D tokens of source j, whose corpus has U_j unique tokens: D_j/U_j epochs. Its
  effective data is Muennighoff et al. 2023's D′_j (arXiv 2305.16264, eq. 5; `plan.laws.effective_tokens`, with
  their fitted R*_D = 15.387756): D′_j = D_j up to one epoch, then repeated tokens are worth less and less.
- D′ = Σ_j D′_j is the run's effective data and ρ = Σ_{j domain} D′_j / D′ the domain share of it.
- Without repetition D′ = D and ρ = w: at each budget the law is Ye et al.'s, and its reducible part falls as a
  power of D like the data term of Chinchilla's L(N, D) (Hoffmann et al. 2022, eq. 2). Ye et al. (§4) compose their
  mixing law with scaling laws in steps and model size by nesting fits; this joint form needs fewer runs (the
  mixture and the budget act as a product, the separability Shukor et al. 2025 test in their "multiplicative" law).
- With repetition, a higher w adds less and less to ρ while D′ shrinks: past some weight more domain share stops
  paying, and that weight falls as D grows (tests/test_mix_law.py).

Assumptions (docs/mix.md): the model size N is the run's (the law is fitted and used at one N); the domain sources
keep their configured proportions among themselves, as do the general ones (one mixture axis, w); R*_D is
Muennighoff's, fitted on 10M–9B-parameter models, not refitted here; c_i is the loss at unlimited effective data
for this N, the same for every mixture.

Fit: least squares on bits per byte (seed noise is additive), from a profile over c (for a fixed c the law is
linear in (a, t, β) on ln(L − c)), polished with a trust-region solver under c ≥ 0, β ≥ 0. Uncertainty: a
bootstrap over runs (resampled with replacement, refitted), percentile 95% intervals for the constants, the
predicted bits per byte and the recommended weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from domainlm.errors import UserError
from domainlm.plan.laws import effective_tokens

PARAMS = ("c", "a", "t", "beta")  # per source: L = c + exp(a + t·ρ − β·ln(D′/D_ref))
CI = 95.0  # percent, the intervals' nominal coverage
N_BOOT = 200
GRID_STEP = 0.001  # weights searched for the recommendation
# A well-posed fit converges in ~10 Levenberg-Marquardt iterations; one that runs on slides along a valley of
# the bounded-away constants (c → −∞ on a barely curved source) and is refitted with them held at their bound.
MAX_NFEV = 100


# ------------------------------------------------------------------------------------------------ the mixture


@dataclass(frozen=True)
class Mixture:
    """The sources of a run as the law sees them: each one's role, its share within its role (the configured
    proportions, kept as w moves) and its unique tokens U_j (None: unlimited, never repeated)."""

    roles: dict[str, str]  # source -> domain | general
    within: dict[str, float]  # source -> share of its role's tokens
    unique: dict[str, float | None]  # source -> unique train tokens

    def __post_init__(self):
        for role in ("domain", "general"):
            if role not in self.roles.values():
                raise UserError(f"sources: a mixing law needs a source with role {role!r}; none has it")

    def tokens(self, w: float, d: float) -> dict[str, float]:
        """Tokens of each source seen at domain weight ``w`` and budget ``d``."""
        return {s: (w if r == "domain" else 1.0 - w) * self.within[s] * d for s, r in self.roles.items()}

    def features(self, w, d) -> tuple[np.ndarray, np.ndarray]:
        """(ρ, D′) for arrays (or numbers) of weights and budgets: the effective domain share and the effective
        tokens (Muennighoff's D′ per source, summed)."""
        w, d = np.broadcast_arrays(np.asarray(w, dtype=float), np.asarray(d, dtype=float))
        rho, eff = np.empty(w.shape), np.empty(w.shape)
        for idx in np.ndindex(w.shape):
            dom = tot = 0.0
            for s, n in self.tokens(float(w[idx]), float(d[idx])).items():
                u = self.unique[s]
                e = n if u is None else effective_tokens(u, n)
                tot += e
                dom += e if self.roles[s] == "domain" else 0.0
            rho[idx], eff[idx] = dom / tot, tot
        return rho, eff

    def epochs(self, w: float, d: float) -> dict[str, float | None]:
        """Epochs over each source's unique tokens (None: unlimited)."""
        return {s: (n / self.unique[s] if self.unique[s] else None) for s, n in self.tokens(w, d).items()}


# ------------------------------------------------------------------------------------------------ the law


def law_bpb(theta: np.ndarray, rho: np.ndarray, log_eff: np.ndarray) -> np.ndarray:
    """L = c + exp(a + t·ρ − β·x), x = ln(D′/D_ref); θ = (c, a, t, β)."""
    c, a, t, beta = theta
    return c + np.exp(a + t * rho - beta * log_eff)


@dataclass
class Points:
    """The measured runs of one source: domain weight, budget (tokens), seed and bits per byte; with the law's
    features (ρ, ln(D′/D_ref)) computed once from the mixture."""

    w: np.ndarray
    d: np.ndarray
    bpb: np.ndarray
    rho: np.ndarray
    log_eff: np.ndarray

    def take(self, idx: np.ndarray) -> Points:
        return Points(self.w[idx], self.d[idx], self.bpb[idx], self.rho[idx], self.log_eff[idx])

    def __len__(self) -> int:
        return len(self.bpb)


def _profile_start(p: Points) -> tuple[np.ndarray, float]:
    """For a fixed c, ln(L − c) = a + t·ρ − β·x is linear: one least-squares solve for (a, t, β) at each of 24
    values of c in [0, min L) (denser near min L, where a barely reducible source sits); the θ whose bpb
    residual is smallest, and that residual's sum of squares."""
    y = p.bpb
    cs = float(y.min()) * (1.0 - np.geomspace(1.0, 1e-3, 24))
    X = np.stack([np.ones_like(p.rho), p.rho, -p.log_eff], axis=1)
    coef, *_ = np.linalg.lstsq(X, np.log(y[:, None] - cs[None, :]), rcond=None)  # (3, 24)
    pred = cs[None, :] + np.exp(X @ coef)
    sse = np.sum((pred - y[:, None]) ** 2, axis=0)
    i = int(np.argmin(sse))
    return np.array([cs[i], *coef[:, i]]), float(sse[i])


def _jac(theta: np.ndarray, rho: np.ndarray, log_eff: np.ndarray) -> np.ndarray:
    """∂L/∂(c, a, t, β)."""
    e = np.exp(theta[1] + theta[2] * rho - theta[3] * log_eff)
    return np.stack([np.ones_like(e), e, e * rho, -e * log_eff], axis=1)


def _lm(p: Points, th0: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, bool]:
    """Levenberg-Marquardt over the ``free`` constants (the others held at their values in ``th0``): θ, and
    whether it converged to a finite θ with c ≥ 0, β ≥ 0."""
    def full(u):
        th = th0.copy()
        th[free] = u
        return th

    with np.errstate(over="ignore", invalid="ignore"):
        res = least_squares(lambda u: law_bpb(full(u), p.rho, p.log_eff) - p.bpb, th0[free], method="lm",
                            jac=lambda u: _jac(full(u), p.rho, p.log_eff)[:, free], xtol=1e-10, ftol=1e-10,
                            gtol=1e-10, max_nfev=MAX_NFEV)
    th = full(res.x)
    return th, bool(res.success and np.all(np.isfinite(th)) and th[0] >= 0 and th[3] >= 0)


def fit_points(p: Points, start: np.ndarray | None = None) -> np.ndarray:
    """Least-squares θ = (c, a, t, β) for one source (see the module docstring), under c ≥ 0 and β ≥ 0:
    Levenberg-Marquardt from the better of the profile start and ``start``; when the optimum leaves the bounds,
    the constants that left are held at 0 and the rest refitted (an active set: the sources of a tiny run are
    far from converged, and their c sits at 0); a trust-region solver under the bounds if that fails too."""
    y = p.bpb
    lo = float(y.min())
    candidates = [_profile_start(p)]
    if start is not None:
        th = np.asarray(start, dtype=float)
        candidates.append((th, float(np.sum((law_bpb(th, p.rho, p.log_eff) - y) ** 2))))
    th0 = min(candidates, key=lambda r: r[1])[0].copy()
    th0[0] = min(max(th0[0], 0.0), lo * (1 - 1e-6))
    th0[3] = max(th0[3], 0.0)
    if th0[0] > 0:  # the profile found an interior c: most fits end here
        th, ok = _lm(p, th0, np.ones(4, dtype=bool))
        if ok:
            return th
        left = [i for i in (0, 3) if not np.isfinite(th[i]) or th[i] < 0] or [0]
    else:  # the profile's best c is 0: start on that bound
        left = [0]
    for fixed in (left, [0, 3]):
        free = np.ones(4, dtype=bool)
        free[fixed] = False
        th1 = th0.copy()
        th1[fixed] = 0.0
        th, ok = _lm(p, th1, free)
        if ok:
            # KKT: ∂SSE/∂θ_j = 2·Σ r·∂L/∂θ_j must not point into the bounds' interior for a held constant (else
            # it belongs inside: refit it free from here)
            grad = 2 * (law_bpb(th, p.rho, p.log_eff) - y) @ _jac(th, p.rho, p.log_eff)
            if np.any(grad[fixed] < -1e-9):
                inner, ok_inner = _lm(p, th, np.ones(4, dtype=bool))
                if ok_inner:
                    return inner
            return th
    res = least_squares(lambda th: law_bpb(th, p.rho, p.log_eff) - y, th0, method="trf", x_scale="jac",
                        jac=lambda th: _jac(th, p.rho, p.log_eff), bounds=([0.0, -np.inf, -np.inf, 0.0], [np.inf] * 4),
                        xtol=1e-10, ftol=1e-10, gtol=1e-10, max_nfev=MAX_NFEV)
    return res.x


def check_design(p: Points, source: str) -> None:
    """Enough distinct weights and budgets to pin the four constants down."""
    if not np.all(np.isfinite(p.bpb)) or np.any(p.bpb <= 0):
        raise UserError(f"mix: {source}: a run has a non-finite or non-positive bits per byte; rerun it")
    if len(np.unique(p.w)) < 3:
        raise UserError(f"mix: {source}: {len(np.unique(p.w))} distinct domain weights; the law needs ≥ 3 "
                        "(give ≥ 5 with --weights, both ends included)")
    if len(np.unique(p.d)) < 2:
        raise UserError(f"mix: {source}: one token budget; the law needs ≥ 2 to extrapolate in D (--budgets)")


# ------------------------------------------------------------------------------------------------ the fit


@dataclass
class Fit:
    """The fitted law of every source, with bootstrap resamples of the constants (theta_boot[i]: (B, 4))."""

    mixture: Mixture
    d_ref: float
    theta: dict[str, np.ndarray]
    theta_boot: dict[str, np.ndarray]
    rmse: dict[str, float]  # root mean square residual of the fit (bits per byte)
    runs: int
    weights: list[float]
    budgets: list[float]
    dof: int = 0
    extras: dict = field(default_factory=dict)

    def predict(self, source: str, w, d, boot: bool = False) -> np.ndarray:
        """Predicted bpb at weights ``w`` and budgets ``d`` (broadcast); with ``boot``, one row per resample."""
        rho, eff = self.mixture.features(w, d)
        x = np.log(eff / self.d_ref)
        if not boot:
            return law_bpb(self.theta[source], rho, x)
        tb = self.theta_boot[source]
        return np.stack([law_bpb(th, rho, x) for th in tb])

    def interval(self, source: str, w, d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, lower, upper): the point fit and the percentile 95% bootstrap interval of the mean bpb."""
        boot = self.predict(source, w, d, boot=True)
        lo, hi = np.percentile(boot, [(100 - CI) / 2, (100 + CI) / 2], axis=0)
        return self.predict(source, w, d), lo, hi

    def constants(self, source: str) -> dict:
        """The constants with their 95% intervals, in the readable form (k = e^a)."""
        th, tb = self.theta[source], self.theta_boot[source]
        out = {}
        for i, name in enumerate(PARAMS):
            lo, hi = np.percentile(tb[:, i], [(100 - CI) / 2, (100 + CI) / 2])
            out[name] = {"value": float(th[i]), "ci95": [float(lo), float(hi)]}
        out["k"] = {"value": float(np.exp(th[1])),
                    "ci95": [float(np.exp(out["a"]["ci95"][0])), float(np.exp(out["a"]["ci95"][1]))]}
        return out

    def in_range(self, d: float) -> bool:
        return min(self.budgets) * (1 - 1e-9) <= d <= max(self.budgets) * (1 + 1e-9)


def points_of(runs: list[dict], source: str, mixture: Mixture, d_ref: float) -> Points:
    """``runs``: dicts with ``weight`` (domain share), ``tokens`` and ``bpb`` (source -> bits per byte)."""
    w = np.array([float(r["weight"]) for r in runs])
    d = np.array([float(r["tokens"]) for r in runs])
    rho, eff = mixture.features(w, d)
    return Points(w, d, np.array([float(r["bpb"][source]) for r in runs]), rho, np.log(eff / d_ref))


def fit_mix(runs: list[dict], mixture: Mixture, sources: list[str] | None = None, n_boot: int = N_BOOT,
            seed: int = 0) -> Fit:
    """Fit every source's law to ``runs`` and bootstrap it: ``n_boot`` resamples of the runs (with replacement,
    all sources resampled together), each refitted from the full fit and from its own profile start. A resample
    that lost a budget or all but two weights cannot pin the law down and is drawn again."""
    sources = sources or list(mixture.roles)
    d_ref = float(np.exp(np.mean(np.log([float(r["tokens"]) for r in runs]))))  # centres ln(D′/D_ref)
    pts = {s: points_of(runs, s, mixture, d_ref) for s in sources}
    for s, p in pts.items():
        check_design(p, s)
    theta = {s: fit_points(p) for s, p in pts.items()}
    rmse = {s: float(np.sqrt(np.mean((law_bpb(theta[s], p.rho, p.log_eff) - p.bpb) ** 2))) for s, p in pts.items()}
    rng = np.random.default_rng(seed)
    n = len(runs)
    any_p = next(iter(pts.values()))
    boot: dict[str, list[np.ndarray]] = {s: [] for s in sources}
    tries = 0
    while len(boot[sources[0]]) < n_boot:
        tries += 1
        if tries > 20 * n_boot:
            raise UserError("mix: the runs are too few for a bootstrap (resamples keep losing a budget or "
                            "weights); add seeds or weights")
        idx = rng.integers(0, n, size=n)
        sub = any_p.take(idx)
        if len(np.unique(sub.w)) < 3 or len(np.unique(sub.d)) < 2:
            continue
        for s, p in pts.items():
            boot[s].append(fit_points(p.take(idx), start=theta[s]))
    return Fit(mixture=mixture, d_ref=d_ref, theta=theta, theta_boot={s: np.array(v) for s, v in boot.items()},
               rmse=rmse, runs=n, weights=sorted({float(r["weight"]) for r in runs}),
               budgets=sorted({float(r["tokens"]) for r in runs}), dof=n - len(PARAMS))


# ------------------------------------------------------------------------------------------------ objectives


@dataclass(frozen=True)
class Objective:
    """What "best weight" means. ``max_general_cost`` X: the lowest domain bpb (mean over domain sources) among
    weights whose every general source is at most X (a fraction) worse than at w = 0, the general-only model.
    ``weights`` {source: a}: the lowest Σ a_i·bpb_i."""

    max_general_cost: float | None = None
    weights: dict[str, float] | None = None

    def __post_init__(self):
        if (self.max_general_cost is None) == (self.weights is None):
            raise UserError("mix: give one objective: --max-general-cost X% or --objective-weights NAME=A,...")

    def describe(self) -> str:
        if self.max_general_cost is not None:
            return f"lowest domain bpb with general bpb at most {self.max_general_cost:.1%} worse than general-only"
        return "lowest " + " + ".join(f"{a:g}·{s}" for s, a in self.weights.items()) + " (bpb)"

    def best(self, curves: dict[str, np.ndarray], roles: dict[str, str], grid: np.ndarray) -> tuple[int, bool]:
        """Index of the best weight of ``grid`` given each source's bpb on it, and whether any weight was
        feasible (a cost cap no weight meets falls back to w = 0, general-only)."""
        if self.weights is not None:
            missing = [s for s in self.weights if s not in curves]
            if missing:
                raise UserError(f"--objective-weights: {', '.join(missing)} is not a source of the run "
                                f"(sources: {', '.join(curves)})")
            total = sum(a * curves[s] for s, a in self.weights.items())
            return int(np.argmin(total)), True
        dom = np.mean([curves[s] for s, r in roles.items() if r == "domain" and s in curves], axis=0)
        ok = np.ones_like(grid, dtype=bool)
        for s, r in roles.items():
            if r == "general" and s in curves:
                ok &= curves[s] <= (1.0 + self.max_general_cost) * curves[s][0] + 1e-12
        if not ok.any():
            return 0, False
        return int(np.flatnonzero(ok)[np.argmin(dom[ok])]), True


def weight_grid() -> np.ndarray:
    return np.round(np.arange(0.0, 1.0 + GRID_STEP / 2, GRID_STEP), 6)


def recommend(fit: Fit, objective: Objective, d: float) -> dict:
    """The best weight at budget ``d`` under ``objective``, from the point fit, with a percentile 95% interval
    from the same choice made on every bootstrap resample; and each source's predicted bpb there."""
    grid = weight_grid()
    sources = list(fit.theta)
    rho, eff = fit.mixture.features(grid, np.full_like(grid, d))
    x = np.log(eff / fit.d_ref)
    point = {s: law_bpb(fit.theta[s], rho, x) for s in sources}
    i, feasible = objective.best(point, fit.mixture.roles, grid)
    picks = []
    for b in range(len(fit.theta_boot[sources[0]])):
        curves = {s: law_bpb(fit.theta_boot[s][b], rho, x) for s in sources}
        picks.append(grid[objective.best(curves, fit.mixture.roles, grid)[0]])
    lo, hi = np.percentile(picks, [(100 - CI) / 2, (100 + CI) / 2])
    w = float(grid[i])
    pred = {}
    for s in sources:
        v, plo, phi = fit.interval(s, w, d)
        base, blo, bhi = fit.interval(s, 0.0, d)
        pred[s] = {"bpb": float(v), "ci95": [float(plo), float(phi)], "general_only_bpb": float(base)}
    return {"domain_weight": w, "ci95": [float(lo), float(hi)], "feasible": feasible, "tokens": float(d),
            "objective": objective.describe(), "predicted": pred, "in_fitted_range": fit.in_range(d)}


def held_out_check(runs: list[dict], mixture: Mixture, weight: float, n_boot: int = N_BOOT, seed: int = 0,
                   fit: Callable[..., Fit] = fit_mix) -> dict:
    """Fit without the runs at ``weight``, predict them: per budget and source, the measured mean over seeds
    beside the prediction, its 95% interval for the mean curve and a 95% interval for the mean of that many
    seeds (the curve's bootstrap plus the fit's residual scatter / √seeds), and whether the measurement is in it."""
    train = [r for r in runs if abs(float(r["weight"]) - weight) > 1e-9]
    test = [r for r in runs if abs(float(r["weight"]) - weight) <= 1e-9]
    if not test:
        raise UserError(f"mix: no run at the held-out weight {weight:g}")
    f = fit(train, mixture, n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for d in sorted({float(r["tokens"]) for r in test}):
        at = [r for r in test if float(r["tokens"]) == d]
        for s in f.theta:
            measured = [float(r["bpb"][s]) for r in at]
            m = float(np.mean(measured))
            v, lo, hi = f.interval(s, weight, d)
            boot = f.predict(s, weight, d, boot=True).ravel()
            # scatter of a new mean of len(at) seeds around the curve: the fit's residual RMS, inflated to the
            # unbiased estimate (n − p degrees of freedom), over √seeds
            sigma = f.rmse[s] * math.sqrt(f.runs / max(f.dof, 1)) / math.sqrt(len(at))
            sim = boot + sigma * rng.standard_normal(boot.shape)
            plo, phi = np.percentile(sim, [(100 - CI) / 2, (100 + CI) / 2])
            rows.append({"source": s, "tokens": d, "seeds": len(at), "measured": m, "measured_runs": measured,
                         "predicted": float(v), "ci95": [float(lo), float(hi)],
                         "pi95": [float(plo), float(phi)], "inside": bool(plo <= m <= phi),
                         "error": float(v) - m})
    return {"weight": float(weight), "runs_fitted": f.runs, "rows": rows}
