"""The report's charts: one function per figure, each takes already-loaded run files and writes one PNG.

Every function returns the path it wrote. Files are saved under a temporary name and renamed, so a reader
never sees half a PNG. Colours are fixed per source (``colours``) so a source looks the same in every chart.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from domainlm.outputs import Ablation, Audit, Counts, Decision, EvalOutput, Mine, Mix, ProbeScores, Stats  # noqa: E402
from domainlm.plan.laws import MAX_USEFUL_EPOCHS  # noqa: E402
from domainlm.rundir import save_figure  # noqa: E402
from domainlm.units import human  # noqa: E402

DPI = 110
OURS = "tab:blue"
BASELINES = ("0.6", "0.4", "0.8", "0.25")  # greys: baseline models and tokenizers, in the order given
HUMAN = FuncFormatter(lambda v, _: human(v))  # 1.6M rather than 1.6 with a "1e6" offset


def colours(names: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(names)}


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path, format="png", dpi=DPI)


def _label_bars(ax, bars, fmt=human, horizontal: bool = False) -> None:
    for b in bars:
        v = b.get_width() if horizontal else b.get_height()
        if not np.isfinite(v) or v == 0:
            continue
        if horizontal:
            ax.annotate(fmt(v), (v, b.get_y() + b.get_height() / 2), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)
        else:
            ax.annotate(fmt(v), (b.get_x() + b.get_width() / 2, v), xytext=(0, 2), textcoords="offset points",
                        ha="center", fontsize=7)


def _grouped(ax, groups: list[str], series: list[tuple[str, list[float], str]], *, horizontal=False, fmt=human):
    """Bars for each of ``groups``, one bar per series (label, values, colour) side by side."""
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    for i, (label, values, colour) in enumerate(series):
        pos = x - 0.4 + width * (i + 0.5)
        vals = [np.nan if v is None else v for v in values]
        bars = (ax.barh if horizontal else ax.bar)(pos, vals, width, label=label, color=colour)
        _label_bars(ax, bars, fmt, horizontal)
    if horizontal:
        ax.set_yticks(x, groups)
        ax.invert_yaxis()
    else:
        ax.set_xticks(x, groups)


# ------------------------------------------------------------------------------------------------ data


def drops_chart(stats: Stats, path: Path) -> Path:
    """Documents dropped per reason (rows), one bar per source; datatrove gives every drop a reason."""
    srcs = stats.sources
    reasons = sorted({r for s in srcs.values() for r in s.drops})
    col = colours(list(srcs))
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(reasons), 2) * max(len(srcs), 1) + 1.2))
    series = [(f"{n} ({human(s.docs_in)} docs in)", [s.drops.get(r, 0) for r in reasons], col[n])
              for n, s in srcs.items()]
    _grouped(ax, reasons, series, horizontal=True, fmt=lambda v: f"{v:,.0f}")
    ax.set_xlabel("documents dropped")
    ax.set_title("Why documents were dropped (per source)")
    ax.legend(fontsize=8, loc="lower right")
    ax.margins(x=0.15)
    return save(fig, path)


def tokens_chart(counts: Counts, path: Path) -> Path:
    """Train and val tokens per source (train = unique tokens: the data limit the planner uses)."""
    srcs = counts.sources
    fig, ax = plt.subplots(figsize=(6, 3.8))
    _grouped(ax, list(srcs), [("train", [s.train_tokens for s in srcs.values()], "tab:blue"),
                              ("val", [s.val_tokens for s in srcs.values()], "tab:orange")])
    ax.set_ylabel("tokens")
    ax.yaxis.set_major_formatter(HUMAN)
    ax.set_title(f"Tokens per source (vocab {human(counts.vocab_size)})")
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    return save(fig, path)


def epochs_chart(planned: dict[str, float | None], trained: dict[str, float], path: Path) -> Path:
    """Passes over each source's unique tokens: what the plan asked for and what training did."""
    names = list(dict.fromkeys([*planned, *trained]))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    series = []
    if planned:
        series.append(("planned", [planned.get(n) for n in names], "0.6"))
    if trained:
        series.append(("trained", [trained.get(n) for n in names], "tab:green"))
    _grouped(ax, names, series, fmt=lambda v: f"{v:.2g}")
    top = max([v for s in series for v in s[1] if v is not None] or [0])
    if top > MAX_USEFUL_EPOCHS / 2:  # only worth drawing when the bars come near it
        ax.axhline(MAX_USEFUL_EPOCHS, color="tab:red", ls="--", lw=1,
                   label=f"~{MAX_USEFUL_EPOCHS:g} epochs: repeats stop paying (Muennighoff 2023)")
    ax.set_ylabel("epochs")
    ax.set_title("Epochs per source")
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    return save(fig, path)


# ------------------------------------------------------------------------------------------------ tokenizer


def bytes_per_token_chart(audit: Audit, path: Path) -> Path:
    """Bytes per token on each source's val split: higher = the tokenizer packs that text better."""
    rows = audit.bytes_per_token.values()
    series = [(f"ours ({audit.kind}, vocab {human(audit.vocab_size_trained)})", [r.bytes_per_token for r in rows],
               OURS)]
    if audit.baseline is not None:
        series.append((f"baseline (trained on {', '.join(audit.baseline.sources)} alone)",
                       [r.baseline_bytes_per_token for r in rows], BASELINES[0]))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    _grouped(ax, [f"{n}\n({r.role})" for n, r in audit.bytes_per_token.items()], series, fmt=lambda v: f"{v:.2f}")
    ax.set_ylabel("bytes per token (val split)")
    ax.set_title("Tokenizer compression per source")
    ax.legend(fontsize=8, loc="lower right")
    ax.margins(y=0.15)
    return save(fig, path)


# ------------------------------------------------------------------------------------------------ training


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(y) < k:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def loss_chart(train: list[dict], evals: list[dict], sources: list[str], path: Path) -> Path:
    """Left: train loss and per-source val loss (nats/token); right: per-source val bits per byte.

    The x axis is tokens seen when the train rows carry them (comparable across batch sizes), else steps.
    """
    tokens_at = {r["step"]: r["tokens"] for r in train if r.get("tokens") is not None}
    use_tokens = bool(tokens_at)

    def x_of(step: int) -> float:
        return tokens_at.get(step, np.nan) if use_tokens else step

    col = colours(sources)
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [r for r in train if isinstance(r.get("loss"), (int, float)) and np.isfinite(r["loss"])]
    if rows:
        x = np.array([x_of(r["step"]) for r in rows], dtype=float)
        y = np.array([r["loss"] for r in rows], dtype=float)
        ax_l.plot(x, y, color="0.75", lw=0.8, label="train (per step)")
        k = max(1, len(y) // 50)  # ~50 points of moving average, whatever the run length
        if k > 1:
            ax_l.plot(x[k - 1:], _smooth(y, k), color="k", lw=1.3, label=f"train (mean of {k} steps)")
    for name in sources:
        for ax, key in ((ax_l, f"val_loss/{name}"), (ax_r, f"bpb/{name}")):
            pts = [(x_of(r["step"]), r[key]) for r in evals if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", ms=3, color=col[name], label=f"val {name}")
    xlabel = "tokens seen" if use_tokens else "step"
    ax_l.set(xlabel=xlabel, ylabel="loss (nats/token)", title="Training and validation loss")
    ax_r.set(xlabel=xlabel, ylabel="bits per byte", title="Validation bits per byte (tokenizer-independent)")
    for ax in (ax_l, ax_r):
        if use_tokens:
            ax.xaxis.set_major_formatter(HUMAN)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    return save(fig, path)


# ------------------------------------------------------------------------------------------------ eval


def eval_chart(ours: EvalOutput, baselines: list[tuple[str, EvalOutput]], path: Path) -> Path:
    """Bits per byte per source for our model and any baseline models (lower is better)."""
    models = [("this model", ours, OURS)] + [(label, b, BASELINES[i % len(BASELINES)])
                                             for i, (label, b) in enumerate(baselines)]
    series = [(label, [m.sources[n].bpb if n in m.sources else None for n in ours.sources], colour)
              for label, m, colour in models]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    _grouped(ax, [f"{n}\n({s.role})" for n, s in ours.sources.items()], series, fmt=lambda v: f"{v:.3f}")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("Held-out bits per byte per source")
    ax.legend(fontsize=8, loc="lower right")
    ax.margins(y=0.15)
    return save(fig, path)


def probes_chart(models: list[tuple[str, ProbeScores]], path: Path) -> Path:
    """Domain-term cloze accuracy (raw and per-byte normalised) per model, with the chance level."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    series = [(label, [p.acc, p.acc_per_byte], OURS if i == 0 else BASELINES[(i - 1) % len(BASELINES)])
              for i, (label, p) in enumerate(models)]
    _grouped(ax, ["accuracy", "accuracy (per-byte normalised)"], series, fmt=lambda v: f"{v:.0%}")
    chance = models[0][1].chance
    if chance:
        ax.axhline(chance, color="tab:red", ls="--", lw=1, label=f"chance ({chance:.0%})")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction of items right")
    ax.set_title(f"Domain term probes ({models[0][1].items} items)")
    ax.legend(fontsize=8, loc="upper right")
    return save(fig, path)


def ablation_chart(ab: Ablation, path: Path) -> Path:
    """Domain bpb vs general bpb (means over each role's sources), one point per domain weight: the trade-off
    BloombergGPT chose 51% on. A weight without both roles' bpb is left out."""
    pts = [(r.domain_weight, r.role_bpb("domain"), r.role_bpb("general")) for r in ab.results]
    pts = sorted(p for p in pts if None not in p)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([p[1] for p in pts], [p[2] for p in pts], "-o", color="tab:purple")
    for w, domain, general in pts:
        ax.annotate(f"domain {w:.0%}", (domain, general), xytext=(5, 4), textcoords="offset points", fontsize=8)
    seeds = [(r.role_bpb("domain", p["bpb"]), r.role_bpb("general", p["bpb"])) for r in ab.results
             for p in r.seeds or []]
    seeds = [p for p in seeds if None not in p]
    if seeds:  # each seed's model: the spread the means hide
        ax.scatter([x for x, _ in seeds], [y for _, y in seeds], s=12, color="tab:purple", alpha=0.35,
                   label="each seed")
        ax.legend(fontsize=8)
    ax.set_xlabel("domain bits per byte (lower is better)")
    ax.set_ylabel("general bits per byte (lower is better)")
    ax.set_title("Mixture ablation: domain weight vs held-out bpb")
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    return save(fig, path)


def decide_chart(d: Decision, path: Path) -> Path:
    """`domainlm decide`: bits per byte per text for each arm (lower is better)."""
    texts = list(d.texts)
    arm_colours = {"scratch": OURS, "continued": "tab:orange", "base": BASELINES[0]}
    series = [(arm, [a.bpb.get(n) for n in texts], arm_colours.get(arm, "tab:green")) for arm, a in d.arms.items()]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    _grouped(ax, texts, series, fmt=lambda v: f"{v:.3f}")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(f"From scratch or continued? ({human(d.tokens)} training tokens each)")
    ax.legend(fontsize=8, loc="lower right")
    ax.margins(y=0.15)
    return save(fig, path)


def mix_chart(m: Mix, path: Path) -> Path:
    """`domainlm mix`: left, each source's bpb against the domain weight — the runs (mean over seeds; hollow: the
    held-out weight), the law at each fitted budget (thin) and at the target budget (thick, 95% band); right, the
    frontier at the target budget — domain against general bpb as the weight moves, the recommended weight on it."""
    sources = list(m.law)
    col = colours(sources)
    fig, (ax, fx) = plt.subplots(1, 2, figsize=(11, 4.5))
    target = m.curves[0]
    markers = "osD^v"
    budgets = sorted({r.tokens for r in m.runs})
    for s in sources:
        for c in m.curves[1:]:
            ax.plot(c.weights, c.bpb[s], "-", color=col[s], lw=0.8, alpha=0.5)
        ax.plot(target.weights, target.bpb[s], "-", color=col[s], lw=2, label=f"{s}: law at {human(target.tokens)}")
        ax.fill_between(target.weights, target.lo[s], target.hi[s], color=col[s], alpha=0.15, lw=0)
        for j, d in enumerate(budgets):
            for w in sorted({r.domain_weight for r in m.runs}):
                vals = [r.bpb[s] for r in m.runs if r.tokens == d and r.domain_weight == w]
                held = w == m.held_out.weight
                ax.plot([w], [float(np.mean(vals))], markers[j % len(markers)], color=col[s],
                        mfc="none" if held else col[s], ms=6)
    for j, d in enumerate(budgets):
        ax.plot([], [], markers[j % len(markers)], color="0.4", label=f"runs at {human(d)} tokens")
    ax.axvline(m.recommended.domain_weight, color="0.3", ls="--", lw=1)
    ax.set_xlabel("domain weight")
    ax.set_ylabel("bits per byte on the val split (lower is better)")
    ax.set_title("Each source's bpb vs the domain weight")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    def role_mean(c, role):
        rows = [np.array(c.bpb[s]) for s in sources if m.sources[s].role == role]
        return np.mean(rows, axis=0)

    dom, gen = role_mean(target, "domain"), role_mean(target, "general")
    fx.plot(gen, dom, "-", color="tab:purple", lw=2)
    for w in (0.0, 0.25, 0.5, 0.75, 1.0):
        i = int(round(w * (len(target.weights) - 1)))
        fx.plot(gen[i], dom[i], "o", color="tab:purple", ms=4)
        fx.annotate(f"{w:.0%}", (gen[i], dom[i]), xytext=(4, 3), textcoords="offset points", fontsize=7)
    rec = m.recommended
    rd = np.mean([p.bpb for s, p in rec.predicted.items() if m.sources[s].role == "domain"])
    rg = np.mean([p.bpb for s, p in rec.predicted.items() if m.sources[s].role == "general"])
    fx.plot(rg, rd, "*", color="tab:red", ms=14,
            label=f"recommended {rec.domain_weight:.0%} [{rec.ci95[0]:.0%}, {rec.ci95[1]:.0%}]")
    cap = (m.design.get("objective") or {}).get("max_general_cost")
    if cap is not None:
        fx.axvline(gen[0] * (1 + cap), color="0.5", ls=":", lw=1, label=f"general-only + {cap:.1%}")
    fx.set_xlabel("general bits per byte")
    fx.set_ylabel("domain bits per byte")
    fx.set_title(f"Frontier at {human(target.tokens)} tokens (the law)")
    fx.legend(fontsize=7)
    fx.grid(alpha=0.3)
    return save(fig, path)


def mine_chart(m: Mine, path: Path) -> Path:
    """`domainlm mine`: each round's score histogram over the pool with its threshold (left), and its held-out
    precision-recall curve with the estimated precision in the pool (right)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    edges = np.arange(len(m.rounds[0].histogram) + 1) / len(m.rounds[0].histogram) if m.rounds else []
    for i, r in enumerate(m.rounds):
        c = cycle[i % len(cycle)]
        ax.stairs(np.maximum(r.histogram, 0.5), edges, color=c, label=f"round {r.round}")
        if r.threshold is not None:
            ax.axvline(r.threshold, color=c, ls="--", lw=1)
        pts = [(p.heldout_recall, p.heldout_precision) for p in r.curve if p.heldout_precision is not None]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], color=c, label=f"round {r.round}: held-out")
        est = [(p.heldout_recall, p.pool_precision) for p in r.curve if p.pool_precision is not None]
        ax2.plot([p[0] for p in est], [p[1] for p in est], color=c, ls=":", label=f"round {r.round}: est. in pool")
        if r.threshold is not None:
            ax2.plot([r.heldout_recall], [r.est_precision], "o", color=c)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)  # empty bins are drawn at 0.5, below the axis
    ax.set_xlabel("classifier score P(domain)")
    ax.set_ylabel("pool documents")
    ax.set_title("Pool scores (dashed: threshold)")
    ax.legend(fontsize=8)
    ax2.axhline(m.target_precision, color="0.5", lw=1, ls="--")
    ax2.set_xlabel("recall (held-out domain seeds)")
    ax2.set_ylabel("precision")
    ax2.set_title("Precision-recall (dot: the chosen threshold)")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=7, loc="lower left")
    return save(fig, path)
