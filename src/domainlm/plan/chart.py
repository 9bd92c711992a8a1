"""The params-vs-tokens chart (BloombergGPT Fig. 1 style): optimal lines, iso-FLOP lines, known models."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from domainlm.plan.laws import LAWS, get_law
from domainlm.rundir import naming, publish, temp_path

# (name, params, training tokens) — ANCHORS.md "Known models".
KNOWN_MODELS = [
    ("GPT-3", 175e9, 300e9),
    ("Gopher", 280e9, 300e9),
    ("Chinchilla", 70e9, 1.4e12),
    ("PaLM", 540e9, 780e9),
    ("OPT", 175e9, 180e9),
    ("BLOOM", 176e9, 366e9),
    ("LLaMA", 65e9, 1.4e12),
    ("Llama-2", 70e9, 2e12),
    ("BloombergGPT", 50.6e9, 569e9),
    ("BioMedLM", 2.7e9, 300e9),
]


def plot_plan(plan: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_plan, d_plan, c_plan = plan["params"], plan["tokens"], plan["compute_flops"]
    lo_n = min(n_plan / 30, 1e8)
    hi_n = max(n_plan * 30, 1e12)
    fig, ax = plt.subplots(figsize=(8, 6), dpi=120)
    cs = np.logspace(np.log10(6 * lo_n * lo_n), np.log10(6 * hi_n * 20 * hi_n), 200)

    # Iso-FLOP lines: N·D = C/6.
    for exp in range(int(np.floor(np.log10(6 * lo_n * lo_n * 5))), int(np.ceil(np.log10(6 * hi_n * hi_n * 20))) + 1, 2):
        c = 10.0**exp
        n = np.logspace(np.log10(lo_n), np.log10(hi_n), 50)
        ax.plot(c / (6 * n), n, color="0.85", lw=0.8, zorder=1)
        nm = np.sqrt(c / 120)
        if lo_n < nm < hi_n:
            ax.text(c / (6 * nm) * 1.15, nm, f"1e{exp}", color="0.55", fontsize=7, rotation=-40)

    n = np.logspace(np.log10(lo_n), np.log10(hi_n), 50)
    ax.plot(20 * n, n, color="tab:blue", lw=2, label="Chinchilla-optimal (~20 tokens/param)", zorder=2)
    kap = LAWS["kaplan"]
    ax.plot(cs / (6 * kap.optimal_params(cs)), kap.optimal_params(cs), color="tab:orange", lw=2, ls="--",
            label="Kaplan et al. 2020 (N ∝ C^0.73)", zorder=2)
    law = get_law(plan["law"]["name"]) if not plan["law"]["name"].startswith("fitted:") else None
    if law is not None and law.name not in ("chinchilla-1", "kaplan"):
        ax.plot(cs / (6 * law.optimal_params(cs)), law.optimal_params(cs), color="tab:green", lw=1.5, ls=":",
                label=f"{law.name} optimum", zorder=2)

    for name, p, t in KNOWN_MODELS:
        ax.scatter(t, p, color="0.3", s=18, zorder=3)
        ax.annotate(name, (t, p), textcoords="offset points", xytext=(4, 3), fontsize=7, color="0.25")

    for alt in plan.get("alternatives", []):
        odd = alt.get("outside_range")  # a heuristic outside its range is marked, not offered
        color = "0.6" if odd else "tab:purple"
        ax.scatter(alt["tokens"], alt["params"], marker="x" if odd else "D", s=30, color=color, zorder=4)
        ax.annotate(alt["name"] + (" (outside its range)" if odd else ""), (alt["tokens"], alt["params"]),
                    textcoords="offset points", xytext=(5, -9), fontsize=7, color=color)
    ax.scatter(d_plan, n_plan, marker="*", s=260, color="tab:red", edgecolor="k", zorder=5,
               label=f"this plan: {n_plan:.3g} params, {d_plan:.3g} tokens")

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(min(d_plan / 30, 2e9), max(d_plan * 30, 3e13))
    ax.set_ylim(lo_n, hi_n)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("parameters")
    ax.set_title(f"Plan: {c_plan:.3g} FLOPs, law {plan['law']['name']}  (grey: iso-FLOP lines)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)  # through a temp file and a rename: never a torn chart, never through a planted link
    try:
        with naming(out):
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return publish(tmp, out)
