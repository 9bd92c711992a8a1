"""Fitting scaling laws to (N, D, C, loss) points, Chinchilla-style (Hoffmann et al. 2022, §3.2–3.3).

- Approach 2: per IsoFLOP budget, a parabola of loss in log N gives N_opt(C); power laws N_opt ∝ C^a and
  D_opt ∝ C^b are then fitted by least squares in log-log space.
- Approach 3: L(N, D) = E + A/N^α + B/D^β, fitted as Chinchilla did: parameters a = log A, b = log B,
  e = log E; predicted log-loss = LSE(a − α log N, b − β log D, e); minimise the Huber loss (δ = 1e-3) between
  predicted and observed log-loss with L-BFGS from a grid of initialisations; keep the best.
- Uncertainty: bootstrap over points (resampled within each budget), percentile 95% intervals.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import ThreadpoolController

from domainlm.errors import UserError

HUBER_DELTA = 1e-3  # Chinchilla §3.3


class NoMinimum(UserError):
    """The IsoFLOP curves do not curve up on both sides: approach 2 has no optimum to fit (approach 3 may)."""

    minima: list[dict] = []


@dataclass
class Points:
    n: np.ndarray  # params
    d: np.ndarray  # tokens
    c: np.ndarray  # budget (FLOPs) the point belongs to
    loss: np.ndarray

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Points:
        arr = {k: np.array([float(r[k]) for r in rows]) for k in ("params", "tokens", "flops", "loss")}
        return cls(arr["params"], arr["tokens"], arr["flops"], arr["loss"])

    def check(self) -> None:
        bad = ~np.isfinite(self.loss) | (self.loss <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise UserError(
                f"scaling: non-finite or non-positive loss {self.loss[i]!r} for N={self.n[i]:.3g}, "
                f"budget {self.c[i]:.3g}; rerun that point or drop the budget"
            )
        if len(self.loss) < 5:
            raise UserError(f"scaling: {len(self.loss)} points are too few for a fit (need ≥ 5: ≥ 3 per budget)")
        if np.ptp(np.log(self.loss)) < 1e-9:
            raise UserError(f"scaling: every point has the loss {self.loss[0]:g}: a law of how the loss falls "
                            "with N and D cannot be fitted to points where it does not change")


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(r)
    quad = a <= delta
    val = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    grad = np.where(quad, r, delta * np.sign(r))
    return val, grad


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray):
    """Σ Huber(predicted − observed log-loss) and its gradient; θ = (a, b, e, α, β), a = log A, b = log B,
    e = log E. Works on one θ (5,) or a batch (G, 5) (the grid is scored in one call)."""
    th = np.atleast_2d(theta)
    a, b, e, alpha, beta = (th[:, i : i + 1] for i in range(5))  # (G, 1)
    t = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(th), len(log_n)))])  # (3, G, P)
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    pred = m + np.log(s)
    val, g = _huber(pred - log_l, HUBER_DELTA)
    p = w / s  # softmax weights: d pred / d t
    grad = np.stack([(g * p[0]).sum(-1), (g * p[1]).sum(-1), (g * p[2]).sum(-1),
                     -(g * p[0] * log_n).sum(-1), -(g * p[1] * log_d).sum(-1)], axis=-1)  # (G, 5)
    if np.ndim(theta) == 1:
        return float(val.sum()), grad[0]
    return val.sum(-1), grad


# Initialisation grid (a coarser version of Chinchilla's: α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −.5, …, 1},
# a, b ∈ {0, 5, …, 25}).
GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, 0.0, 1.0),
    "alpha": (0.0, 0.5, 1.0),
    "beta": (0.0, 0.5, 1.0),
}
GRID_THETA = np.array(list(itertools.product(*GRID.values())))  # (972, 5)


# α, β ≥ 0: loss does not rise with more parameters or data (the premise of the form); unbounded, a sweep that
# does not constrain the N term (tiny budgets) can return a negative α.
BOUNDS = [(None, None)] * 3 + [(0.0, None)] * 2
# Why the objective is rescaled before L-BFGS: the Huber sum is ~1e-4 (residuals of ~δ = 1e-3), and L-BFGS-B's
# stopping tests are absolute below 1 (relative reduction against max(|f|, 1), projected gradient ≤ gtol), so
# on the raw sum every run stopped at once, short of the optimum — the failure Besiroglu et al. 2024 found in
# Chinchilla's own fit. Divided by δ²·P (one point's Huber at r = δ is δ²/2) it is O(1), and tolerances near
# machine precision make L-BFGS stop at the optimum, not before. Also a = log A and α are centred on the
# mean log N (b, β on log D) so the two do not move together along one long valley.
FTOL, GTOL, MAXITER = 1e-12, 1e-10, 20_000


@functools.cache
def _blas():
    return ThreadpoolController()


def one_blas_thread():
    """L-BFGS-B works on 5 numbers; with BLAS threads on a busy 2-core machine each of its steps waited for
    threads (measured here: 3.7–8.6 ms per evaluation instead of 0.06 ms on a 5-variable quadratic)."""
    return _blas().limit(limits=1)


def _lbfgs(theta0: np.ndarray, log_n, log_d, log_l):
    """One L-BFGS run on the scaled, centred objective; returns θ in the original (a, b, e, α, β) form."""
    mn, md = log_n.mean(), log_d.mean()
    scale = 1.0 / (HUBER_DELTA**2 * len(log_l))
    cn, cd = log_n - mn, log_d - md

    def to_theta(u):  # u = (a − α·mean log N, b − β·mean log D, e, α, β) → θ
        return np.array([u[0] + u[3] * mn, u[1] + u[4] * md, u[2], u[3], u[4]])

    def f(u):
        val, g = _objective(u, cn, cd, log_l)
        return val * scale, g * scale

    u0 = np.array([theta0[0] - theta0[3] * mn, theta0[1] - theta0[4] * md, *theta0[2:]])
    res = minimize(f, u0, jac=True, method="L-BFGS-B", bounds=BOUNDS,
                   options={"maxiter": MAXITER, "ftol": FTOL, "gtol": GTOL, "maxcor": 10, "maxls": 50})
    theta = to_theta(res.x)
    return theta, _objective(theta, log_n, log_d, log_l)[0]


def _starts(log_n, log_d, log_l, top_k: int) -> list[np.ndarray]:
    """The ``top_k`` best grid points by objective (scoring the whole grid is one vectorised call)."""
    scores, _ = _objective(GRID_THETA, log_n, log_d, log_l)
    return [GRID_THETA[i] for i in np.argsort(scores)[:top_k]]


def fit_approach3(pts: Points, inits: list[np.ndarray] | None = None, top_k: int = 12) -> dict:
    """Best of L-BFGS runs from the ``top_k`` best grid points (plus ``inits``, e.g. the full-data fit for a
    bootstrap resample). ``objective`` is the unscaled Σ Huber at the optimum."""
    log_n, log_d, log_l = np.log(pts.n), np.log(pts.d), np.log(pts.loss)
    starts = _starts(log_n, log_d, log_l, top_k) + list(inits or [])
    best_theta, best = None, math.inf
    with one_blas_thread():
        for theta0 in starts:
            theta, val = _lbfgs(np.asarray(theta0, dtype=float), log_n, log_d, log_l)
            if val < best:
                best_theta, best = theta, val
    a, b, e, alpha, beta = best_theta
    # A = e^a overflows a float when a term is switched off (α ≫ 1 on points that do not constrain it).
    return {"E": _exp(e), "A": _exp(a), "B": _exp(b), "alpha": float(alpha), "beta": float(beta),
            "objective": float(best), "theta": best_theta.tolist()}


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


def objective_at(pts: Points, E: float, A: float, B: float, alpha: float, beta: float) -> float:
    """Σ Huber of the fit's objective at given constants (to compare a fit with the truth on synthetic data)."""
    theta = np.array([math.log(A), math.log(B), math.log(E), alpha, beta])
    return _objective(theta, np.log(pts.n), np.log(pts.d), np.log(pts.loss))[0]


def fit_approach2(pts: Points) -> dict:
    """Parabola per budget → (C, N_opt, D_opt, L_min) minima; then power laws in C."""
    minima = []
    for c in np.unique(pts.c):
        sel = pts.c == c
        if len(np.unique(pts.n[sel])) < 3:
            n_sizes = len(np.unique(pts.n[sel]))
            raise UserError(f"scaling: budget {c:.3g} has {n_sizes} model sizes; a parabola needs ≥ 3")
        x = np.log(pts.n[sel])
        x0 = x.mean()  # centred for a well-conditioned fit
        coef = np.polyfit(x - x0, pts.loss[sel], 2)
        curve = {"parabola": coef.tolist(), "log_n_center": float(x0)}  # loss = polyval(parabola, ln N − center)
        if coef[0] <= 0:
            # No interior minimum: the sweep did not bracket the optimum for this budget.
            minima.append({"flops": float(c), "params": None, "tokens": None, "loss": None, "bracketed": False}
                          | curve)
            continue
        x_opt = x0 - coef[1] / (2 * coef[0])
        n_opt = math.exp(x_opt)
        bracketed = bool(x.min() <= x_opt <= x.max())
        minima.append({"flops": float(c), "params": n_opt, "tokens": float(c) / (6 * n_opt),
                       "loss": float(np.polyval(coef, x_opt - x0)), "bracketed": bracketed} | curve)
    ok = [m for m in minima if m["params"] is not None]
    if len(ok) < 2:
        err = NoMinimum("scaling: fewer than 2 budgets have a minimum inside their sweep; widen --sizes or budgets")
        err.minima = minima
        raise err
    lc = np.log([m["flops"] for m in ok])
    a, log_g = np.polyfit(lc, np.log([m["params"] for m in ok]), 1)
    b, log_h = np.polyfit(lc, np.log([m["tokens"] for m in ok]), 1)
    if max(abs(log_g), abs(log_h)) > 700:  # e^700 ≈ 1e304: minima extrapolated absurdly far (a bootstrap resample)
        err = NoMinimum("scaling: the IsoFLOP minima give a degenerate power law; widen --sizes or budgets")
        err.minima = minima
        raise err
    return {"a": float(a), "b": float(b), "g": float(math.exp(log_g)), "h": float(math.exp(log_h)), "minima": minima}


def bootstrap(pts: Points, n_boot: int = 100, seed: int = 0, fit3: dict | None = None, top_k: int = 2) -> dict:
    """95% percentile intervals for α, β (approach 3) and a, b (approach 2), resampling within budgets.

    Each resample is fitted afresh from its own best ``top_k`` grid points as well as from the full-data fit:
    started only from the full-data fit, L-BFGS stays near it and the intervals come out far too narrow."""
    rng = np.random.default_rng(seed)
    fit3 = fit3 or fit_approach3(pts)
    start = [np.array(fit3["theta"])]
    samples: dict[str, list[float]] = {"alpha": [], "beta": [], "a": [], "b": [], "a3": []}
    budgets = np.unique(pts.c)
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(np.flatnonzero(pts.c == c), size=int((pts.c == c).sum())) for c in budgets])
        sub = Points(pts.n[idx], pts.d[idx], pts.c[idx], pts.loss[idx])
        f3 = fit_approach3(sub, inits=start, top_k=top_k)
        samples["alpha"].append(f3["alpha"])
        samples["beta"].append(f3["beta"])
        if f3["alpha"] + f3["beta"] > 0:  # a = β/(α+β) is undefined for a resample whose N and D terms both vanish
            samples["a3"].append(f3["beta"] / (f3["alpha"] + f3["beta"]))
        try:
            f2 = fit_approach2(sub)
            samples["a"].append(f2["a"])
            samples["b"].append(f2["b"])
        except UserError:
            pass  # a resample that loses a budget's curvature; skipped
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None
            for k, v in samples.items()}


def fit_law(rows: list[dict], n_boot: int = 100, seed: int = 0) -> dict:
    """The content of law.json: approach 2 and 3 fits with 95% bootstrap intervals."""
    pts = Points.from_rows(rows)
    pts.check()
    f3 = fit_approach3(pts)
    try:
        f2 = fit_approach2(pts)
        approach2 = {k: f2[k] for k in ("a", "b", "g", "h")} | {"minima": f2["minima"]}
    except NoMinimum as e:
        # Small budgets often favour the smallest model everywhere; approach 3 still uses every point.
        approach2 = {"error": str(e), "a": None, "b": None, "g": None, "h": None, "minima": e.minima}
    degenerate = [k for k in ("E", "A", "B", "alpha", "beta") if not math.isfinite(f3[k])]
    if f3["alpha"] + f3["beta"] <= 0 or degenerate:
        what = f"{degenerate[0]} = {f3[degenerate[0]]}" if degenerate else "α = β = 0 (the loss depends on neither)"
        raise UserError(f"scaling: the fit of L = E + A/N^α + B/D^β is degenerate ({what}): these points do not "
                        "determine the law; use budgets and sizes where the loss falls with N and D")
    ci = bootstrap(pts, n_boot=n_boot, seed=seed, fit3=f3)
    a3 = f3["beta"] / (f3["alpha"] + f3["beta"])
    return {
        # No interval for a fit that failed on the full data (a few lucky resamples would make one up).
        "approach2": approach2 | ({"a_ci95": None, "b_ci95": None} if "error" in approach2
                                  else {"a_ci95": ci["a"], "b_ci95": ci["b"]}),
        "approach3": {k: f3[k] for k in ("E", "A", "B", "alpha", "beta")}
        | {"a": a3, "b": 1 - a3, "alpha_ci95": ci["alpha"], "beta_ci95": ci["beta"], "a_ci95": ci["a3"]},
        "points": len(rows),
        "huber_delta": HUBER_DELTA,
    }
