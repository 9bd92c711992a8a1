"""The params-vs-tokens chart (BloombergGPT Fig. 1 style): optimal lines, iso-FLOP lines, known models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.transforms import Bbox

from domainlm.plan.laws import LAWS, get_law
from domainlm.rundir import save_figure

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


# Where a label may go around its point (offset in points, horizontal alignment), in order of preference.
LABEL_SPOTS = [((4, 3), "left"), ((4, -9), "left"), ((-4, 3), "right"), ((-4, -9), "right"), ((0, 7), "center"),
               ((0, -15), "center"), ((8, -3), "left"), ((-8, -3), "right"), ((4, 12), "left"), ((-4, 12), "right"),
               ((4, -18), "left"), ((-4, -18), "right")]


def place_labels(ax, points: list[tuple[str, float, float, dict]], avoid: list | None = None) -> list:
    """Label each (name, x, y, text style) at the first spot (LABEL_SPOTS) where its text overlaps no label placed
    before it nor a box of ``avoid`` (display coordinates) — neighbours such as Chinchilla / LLaMA / Llama-2 or
    OPT / GPT-3 / BLOOM print over each other at one fixed offset; the first spot if none is free. Returns the
    Text artists."""
    renderer = ax.figure.canvas.get_renderer()
    placed, boxes = [], list(avoid or [])
    for name, x, y, style in points:
        for i, (offset, ha) in enumerate(LABEL_SPOTS):
            t = ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, ha=ha, **style)
            box = t.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(b) for b in boxes) or i == len(LABEL_SPOTS) - 1:
                break
            t.remove()
        placed.append(t)
        boxes.append(box)
    return placed


def plot_plan(plan: dict, path: str | Path) -> Path:
    return save_figure(plan_figure(plan), path)


def plan_figure(plan: dict):
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

    for _, p, t in KNOWN_MODELS:
        ax.scatter(t, p, color="0.3", s=18, zorder=3)

    labels = []
    for alt in plan.get("alternatives", []):
        odd = alt.get("outside_range")  # a heuristic outside its range is marked, not offered
        color = "0.6" if odd else "tab:purple"
        ax.scatter(alt["tokens"], alt["params"], marker="x" if odd else "D", s=30, color=color, zorder=4)
        labels.append((alt["name"] + (" (outside its range)" if odd else ""), alt["tokens"], alt["params"],
                       {"fontsize": 7, "color": color}))
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
    fig.tight_layout()  # the layout first: label positions are measured in display coordinates
    known = [(name, t, p, {"fontsize": 7, "color": "0.25"}) for name, p, t in KNOWN_MODELS]
    x, y = ax.transData.transform((d_plan, n_plan))
    r = 9 * fig.dpi / 72  # the star's radius: s=260 points² is ~16 points across
    place_labels(ax, labels + known, avoid=[Bbox([[x - r, y - r], [x + r, y + r]])])
    return fig
