"""The mixing law (mix/law.py) recovers a known law from noisy synthetic runs, its bootstrap intervals cover the truth
at about their nominal rate, and with a tiny domain corpus the recommended domain weight falls as the budget grows."""

import math

import numpy as np
import pytest

from domainlm.errors import UserError
from domainlm.mix.law import PARAMS, Fit, Mixture, Objective, fit_mix, held_out_check, law_bpb, recommend

# A domain source whose bpb falls steeply with its share, a general one that rises gently with the domain share.
TRUTH = {"legal": np.array([1.0, math.log(1.5), -1.5, 0.30]), "news": np.array([1.2, math.log(0.8), 1.0, 0.25])}
D_REF = 2e6  # the truth's reference budget
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
BUDGETS = (1e6, 4e6)


def _mixture(unique_domain=None):
    return Mixture(roles={"legal": "domain", "news": "general"}, within={"legal": 1.0, "news": 1.0},
                   unique={"legal": unique_domain, "news": None})


def _runs(mix, seed, noise=0.01, weights=WEIGHTS, budgets=BUDGETS, seeds=2):
    """5 weights × 2 budgets × 2 seeds from TRUTH, bpb + noise·z (seed-to-seed scatter of ~0.01 bpb)."""
    rng = np.random.default_rng(seed)
    out = []
    for d in budgets:
        for w in weights:
            rho, eff = mix.features(w, d)
            for _ in range(seeds):
                out.append({"weight": w, "tokens": d,
                            "bpb": {s: float(law_bpb(th, rho, np.log(eff / D_REF))) + noise * rng.standard_normal()
                                    for s, th in TRUTH.items()}})
    return out


def _truth_at(fit: Fit, source: str) -> np.ndarray:
    """TRUTH in the fit's parametrisation: a is taken at the fit's own D_ref (a' = a − β·ln(D_ref'/D_ref))."""
    th = TRUTH[source].copy()
    th[1] -= th[3] * math.log(fit.d_ref / D_REF)
    return th


def test_effective_share_and_data_are_muennighoffs():
    """ρ and D′ by hand: U = 1e6 domain tokens seen 4× (w = 1, D = 4e6): R = 3 repeats,
    D′ = U + U·R*·(1 − e^(−R/R*)), R* = 15.387756 (Muennighoff et al. 2023, eq. 5)."""
    mix = _mixture(1e6)
    r_star = 15.387756
    d_dom = 1e6 + 1e6 * r_star * (1 - math.exp(-3 / r_star))
    rho, eff = mix.features(1.0, 4e6)
    assert eff == pytest.approx(d_dom, rel=1e-9) and d_dom == pytest.approx(3.7257e6, rel=1e-4)
    assert rho == pytest.approx(1.0)
    # w = 0.5: 2e6 domain tokens (1 repeat) + 2e6 general
    d_half = 1e6 + 1e6 * r_star * (1 - math.exp(-1 / r_star))
    rho, eff = mix.features(0.5, 4e6)
    assert eff == pytest.approx(d_half + 2e6) and rho == pytest.approx(d_half / (d_half + 2e6))
    # no repetition: ρ = w, D′ = D, so at one budget the law is Ye et al.'s c + k·e^(t·w)
    rho, eff = _mixture(None).features(np.array(WEIGHTS), 4e6)
    assert rho == pytest.approx(WEIGHTS) and eff == pytest.approx([4e6] * 5)
    c, a, t, beta = TRUTH["legal"]
    k = math.exp(a) * (4e6 / D_REF) ** -beta
    assert law_bpb(TRUTH["legal"], rho, np.log(eff / D_REF)) == pytest.approx(
        [c + k * math.exp(t * w) for w in WEIGHTS])


def test_exact_runs_give_the_exact_law():
    mix = _mixture(1e6)
    fit = fit_mix(_runs(mix, 0, noise=0.0, seeds=1), mix, n_boot=8)
    for s in TRUTH:
        assert fit.theta[s] == pytest.approx(_truth_at(fit, s), abs=1e-5), s


def test_fit_recovers_the_law_and_its_intervals_cover_the_truth():
    """24 synthetic designs (5 weights × 2 budgets × 2 seeds, 0.01 bpb noise, the domain corpus repeated up to 4×):
    the median estimate of every constant is within a few noise-widths of the truth, and each constant's 95%
    bootstrap interval covers it in about 95% of the seeds (measured over 60 seeds with 100 resamples: 92–97%;
    asserted ≥ 19 of 24, and ≥ 88% over all eight constants). Intervals too narrow by half would cover ~70%."""
    mix = _mixture(1e6)
    seeds = 24
    covered = {s: np.zeros(len(PARAMS)) for s in TRUTH}
    est = {s: [] for s in TRUTH}
    for seed in range(seeds):
        fit = fit_mix(_runs(mix, seed), mix, n_boot=60, seed=seed)
        for s in TRUTH:
            truth = _truth_at(fit, s)
            est[s].append(fit.theta[s] - truth)
            c = fit.constants(s)
            for i, p in enumerate(PARAMS):
                lo, hi = c[p]["ci95"]
                assert lo < hi, (seed, s, p)
                covered[s][i] += lo <= truth[i] <= hi
    for s in TRUTH:
        err = np.median(est[s], axis=0)
        assert np.all(np.abs(err) < [0.03, 0.1, 0.1, 0.05]), (s, err)
        assert np.all(covered[s] >= 19), (s, covered[s])
    assert sum(v.sum() for v in covered.values()) >= 0.88 * seeds * 2 * len(PARAMS), covered


def test_with_a_tiny_domain_corpus_the_recommended_weight_falls_as_the_budget_grows():
    """Fitted on 1M and 4M-token runs of a 200K-token domain corpus (up to 20 epochs), the law predicts at 16M, 64M,
    256M tokens: more domain share repeats the corpus more and more, so the best weight falls — every resample's
    choice at 256M is below every one at 16M. With an unlimited domain corpus the same objective's weight rises
    instead (the general cost of a domain share shrinks as the general loss nears its floor)."""
    objective = Objective(max_general_cost=0.10)
    budgets = (1.6e7, 6.4e7, 2.56e8)
    tiny = _mixture(2e5)
    fit = fit_mix(_runs(tiny, 3), tiny, n_boot=60, seed=3)
    recs = [recommend(fit, objective, d) for d in budgets]
    w = [r["domain_weight"] for r in recs]
    assert w[0] > w[1] > w[2], w
    assert recs[2]["ci95"][1] < recs[0]["ci95"][0], [r["ci95"] for r in recs]
    assert not any(r["in_fitted_range"] for r in recs)  # extrapolated, and it says so
    unlimited = _mixture(None)
    fit_u = fit_mix(_runs(unlimited, 3), unlimited, n_boot=8, seed=3)
    wu = [recommend(fit_u, objective, d)["domain_weight"] for d in budgets]
    assert wu[0] < wu[1] < wu[2], wu
    assert wu[2] > w[2] + 0.2


def test_cost_cap_and_weighted_sum_objectives():
    mix = _mixture(None)
    fit = Fit(mixture=mix, d_ref=D_REF, theta=TRUTH, theta_boot={s: v[None] for s, v in TRUTH.items()}, rmse={},
              runs=0, weights=list(WEIGHTS), budgets=list(BUDGETS))
    rec = recommend(fit, Objective(max_general_cost=0.02), 4e6)
    news = rec["predicted"]["news"]
    # the cap binds: general bpb is 2% above general-only at the chosen weight (to the 0.001 grid)
    assert news["bpb"] == pytest.approx(1.02 * news["general_only_bpb"], rel=2e-4)
    assert news["bpb"] <= 1.02 * news["general_only_bpb"]
    # weighted sum: the minimum of legal + news by hand, d/dw [k_l e^(t_l w) + k_n e^(t_n w)] = 0 at one budget
    (_, a_l, t_l, b_l), (_, a_n, t_n, b_n) = TRUTH["legal"], TRUTH["news"]
    k_l, k_n = math.exp(a_l) * 2.0 ** -b_l, math.exp(a_n) * 2.0 ** -b_n  # D = 4e6 = 2·D_ref
    w_star = math.log(-k_l * t_l / (k_n * t_n)) / (t_n - t_l)
    rec = recommend(fit, Objective(weights={"legal": 1.0, "news": 1.0}), 4e6)
    assert rec["domain_weight"] == pytest.approx(w_star, abs=1e-3)
    with pytest.raises(UserError, match="law"):
        recommend(fit, Objective(weights={"law": 1.0}), 4e6)
    with pytest.raises(UserError, match="one objective"):
        Objective()


def test_held_out_weight_is_predicted_within_its_interval():
    mix = _mixture(1e6)
    check = held_out_check(_runs(mix, 5), mix, 0.5, n_boot=60, seed=5)
    assert check["runs_fitted"] == 16 and len(check["rows"]) == 4  # 2 budgets × 2 sources
    for row in check["rows"]:
        lo, hi = row["pi95"]
        assert lo < row["ci95"][0] <= row["predicted"] <= row["ci95"][1] < hi
        assert abs(row["error"]) < 0.03, row
    assert sum(r["inside"] for r in check["rows"]) >= 3


def test_too_few_weights_or_budgets():
    mix = _mixture(None)
    with pytest.raises(UserError, match="≥ 3"):
        fit_mix(_runs(mix, 0, weights=(0.0, 1.0)), mix, n_boot=4)
    with pytest.raises(UserError, match="≥ 2 to extrapolate"):
        fit_mix(_runs(mix, 0, budgets=(1e6,)), mix, n_boot=4)
    with pytest.raises(UserError, match="role 'general'"):
        Mixture(roles={"legal": "domain"}, within={"legal": 1.0}, unique={"legal": None})
