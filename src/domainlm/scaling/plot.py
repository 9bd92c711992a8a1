"""scaling.png: the three views of Chinchilla's Figures 3–4 for your sweep.

1. IsoFLOP curves: loss vs N per budget, with each fitted parabola (in log N) and its minimum.
2. N_opt(C): the parabola minima, the fitted power law (approach 2), the approach-3 optimum, and Chinchilla's.
3. The fitted loss surface L(N, D) = E + A/N^α + B/D^β as contours over log N, log D, with the points and
   the IsoFLOP lines D = C / (6N).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from domainlm.errors import UserError
from domainlm.plan.laws import LAWS, Law, get_law
from domainlm.rundir import save_figure


def usable_law(law_path: Path) -> Law | None:
    """The fitted law for the plot's N_opt line, or None when the fit is degenerate (load_fitted says why)."""

    try:
        return get_law(f"fitted:{law_path}")
    except UserError:
        return None


def plot_scaling(rows: list[dict], law: dict, fitted: Law | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows})
    colors = plt.cm.viridis(np.linspace(0.1, 0.85, len(budgets)))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8), dpi=110)

    minima = {m["flops"]: m for m in law["approach2"]["minima"]}
    for c, col in zip(budgets, colors, strict=True):
        pts = sorted((r["params"], r["loss"]) for r in rows if r["budget"] == c)
        n, loss = np.array(pts).T
        ax1.plot(n, loss, "o", color=col, label=f"C={c:.2g}")
        m = minima.get(c)
        if m and "parabola" in m:
            lo, hi = np.log(n.min() / 1.3), np.log(n.max() * 1.3)
            if m["params"]:  # reach an extrapolated minimum too
                lo, hi = min(lo, np.log(m["params"])), max(hi, np.log(m["params"]))
            x = np.linspace(lo, hi, 100)
            ax1.plot(np.exp(x), np.polyval(m["parabola"], x - m["log_n_center"]), "-", color=col, alpha=0.7)
            if m["params"]:
                ax1.plot(m["params"], m["loss"], "*", color=col, ms=14, mec="k")
    ax1.set_xscale("log")
    ax1.set_xlabel("parameters N (total)")
    ax1.set_ylabel("val loss (nats/token, mixture)")
    ax1.set_title("IsoFLOP curves (★ parabola minimum)")
    ax1.legend(fontsize=8)

    cs = np.geomspace(min(budgets) / 3, max(budgets) * 3, 50)
    ok = [m for m in law["approach2"]["minima"] if m["params"]]
    ax2.plot([m["flops"] for m in ok], [m["params"] for m in ok], "*", ms=12, color="tab:blue", mec="k",
             label="IsoFLOP minima")
    a2 = law["approach2"]
    if a2["a"] is not None:
        ax2.plot(cs, a2["g"] * cs ** a2["a"], "-", color="tab:blue", label=f"fitted, approach 2 (a={a2['a']:.2f})")
    if fitted is not None:  # None: a degenerate fit (α or β = 0) has no optimum to draw
        ax2.plot(cs, [fitted.optimal_params(c) for c in cs], "--", color="tab:green",
                 label=f"fitted, approach 3 (a={fitted.a:.2f})")
    ch = LAWS["chinchilla-3"]
    ax2.plot(cs, [ch.optimal_params(c) for c in cs], ":", color="tab:red", label=f"Chinchilla (a={ch.a:.2f})")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    sizes = [r["params"] for r in rows]
    ax2.set_ylim(min(sizes) / 30, max(sizes) * 30)  # a degenerate fit's N_opt would flatten the view
    ax2.set_xlabel("compute C (FLOPs)")
    ax2.set_ylabel("optimal parameters N_opt")
    ax2.set_title("N_opt(C)")
    ax2.legend(fontsize=8)

    n_all = np.array([r["params"] for r in rows], dtype=float)
    d_all = np.array([r["tokens"] for r in rows], dtype=float)
    ln = np.linspace(np.log(n_all.min() / 3), np.log(n_all.max() * 3), 80)
    ld = np.linspace(np.log(d_all.min() / 3), np.log(d_all.max() * 3), 80)
    gn, gd = np.meshgrid(ln, ld)
    # In log space: a degenerate fit (α ≫ 1 on a tiny sweep) would overflow N^α.
    a3 = law["approach3"]
    surface = a3["E"] + np.exp(np.log(a3["A"]) - a3["alpha"] * gn) + np.exp(np.log(a3["B"]) - a3["beta"] * gd)
    cont = ax3.contourf(np.exp(gn), np.exp(gd), surface, levels=20, cmap="magma_r")
    fig.colorbar(cont, ax=ax3, label="fitted loss")
    for c, col in zip(budgets, colors, strict=True):
        ax3.plot(np.exp(ln), c / (6 * np.exp(ln)), "-", color=col, lw=1)
    ax3.scatter(n_all, d_all, c="w", edgecolors="k", s=25, zorder=3)
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    ax3.set_xlim(np.exp(ln[0]), np.exp(ln[-1]))
    ax3.set_ylim(np.exp(ld[0]), np.exp(ld[-1]))
    ax3.set_xlabel("parameters N")
    ax3.set_ylabel("tokens D")
    ax3.set_title("fitted L(N, D) (approach 3); lines: C = 6ND")

    fig.tight_layout()
    return save_figure(fig, path)
