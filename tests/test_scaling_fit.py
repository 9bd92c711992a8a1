"""Scaling-law fits recover a known law from synthetic IsoFLOP points (Chinchilla constants + 1% noise)."""

import json

import numpy as np
import pytest

from domainlm.errors import UserError
from domainlm.plan.laws import LAWS, get_law
from domainlm.scaling.fit import fit_law


def _sweep(noise=0.01, budgets=(1e18, 1e19, 1e20, 1e21, 1e22), sizes=7, seed=0):
    law = LAWS["chinchilla-3"]
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        n_opt = law.optimal_params(c)
        for f in np.geomspace(1 / 8, 8, sizes):
            n = n_opt * f
            d = c / (6 * n)
            rows.append(dict(params=n, tokens=d, flops=c, loss=law.loss(n, d) * (1 + noise * rng.standard_normal())))
    return rows


def test_recovers_chinchilla_from_noisy_isoflops(tmp_path):
    fit = fit_law(_sweep(), n_boot=20)
    a3 = fit["approach3"]
    assert a3["alpha"] == pytest.approx(0.34, abs=0.03)
    assert a3["beta"] == pytest.approx(0.28, abs=0.03)
    true_a = LAWS["chinchilla-3"].a
    assert fit["approach2"]["a"] == pytest.approx(true_a, abs=0.05)
    assert a3["a"] == pytest.approx(true_a, abs=0.05)
    lo, hi = fit["approach3"]["alpha_ci95"]
    assert lo <= a3["alpha"] <= hi
    # The fitted law plugs into the planner.
    path = tmp_path / "law.json"
    path.write_text(json.dumps(fit))
    law = get_law(f"fitted:{path}")
    assert law.a == pytest.approx(a3["a"])
    assert law.optimal_params(1e21) == pytest.approx(LAWS["chinchilla-3"].optimal_params(1e21), rel=0.35)


def test_exact_points_give_exact_constants():
    fit = fit_law(_sweep(noise=0.0, sizes=5), n_boot=2)
    a3 = fit["approach3"]
    assert a3["alpha"] == pytest.approx(0.34, abs=0.01)
    assert a3["beta"] == pytest.approx(0.28, abs=0.01)
    assert a3["E"] == pytest.approx(1.69, rel=0.05)


def test_too_few_points():
    with pytest.raises(UserError, match="too few"):
        fit_law(_sweep()[:3])
    rows = [r for r in _sweep(sizes=5) if r["flops"] in (1e18, 1e19)][:7]  # second budget has 2 sizes
    with pytest.raises(UserError, match="parabola needs"):
        fit_law(rows)


def test_non_finite_loss():
    rows = _sweep(sizes=4)
    rows[5]["loss"] = float("nan")
    with pytest.raises(UserError, match="non-finite"):
        fit_law(rows)
