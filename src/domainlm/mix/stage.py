"""`domainlm mix CONFIG`: the domain weight, chosen by a mixing law fitted on small runs of your data.

Trains the run's model shape over a design of domain weights (≥ 5, both ends included) × seeds (≥ 2) × token
budgets (≥ 2), each a variant of the run (train/variants.py: the run's token files and tokenizer, its own folder
``<run>/mix/D<tokens>-w<weight>-s<seed>/`` and checkpoints, so a killed design resumes and a finished variant is
skipped), scores each on every source's val split in bits per byte (`evaluate_variant`), and fits each source's
law (mix/law.py) with a bootstrap over the runs. Then:

- the held-out check: the law fitted without one weight's runs predicts them, beside what they measured;
- the recommendation: the best weight at the target budget (the run's, by default) under the objective
  (``--max-general-cost``: the lowest domain bpb with general text at most X% worse than general-only; or
  ``--objective-weights``: the lowest weighted sum), with a 95% interval from the bootstrap;
- ``mix/mix.json`` (outputs.Mix; `domainlm plan --weights-from` reads its ``weights``) and ``mix/frontier.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from domainlm import faults, objectives, stages
from domainlm.ablate import parse_weights
from domainlm.config import RunConfig, load_config
from domainlm.data.pipeline import document_files
from domainlm.data.tokens import load_counts
from domainlm.errors import UserError
from domainlm.evaluate.command import evaluate_variant
from domainlm.mix import law
from domainlm.outputs import Mix, TrainSummary
from domainlm.plan.laws import MUENNIGHOFF_R_D
from domainlm.report.plots import mix_chart
from domainlm.rundir import RunDir, write_json
from domainlm.train.loop import plan_of, planned_tokens
from domainlm.train.variants import reweighted, train_variant, variant_config
from domainlm.units import parse_number

MIX_VERSION = 1
DEFAULT_WEIGHTS = "0,0.25,0.5,0.75,1"
DEFAULT_BUDGETS = (0.25, 0.5)  # × the target budget: the law is fitted small and extrapolates to the run's D
MIN_WEIGHTS, MIN_SEEDS = 5, 2
CURVE_POINTS = 51  # weights 0, 0.02, …, 1 in the curves of mix.json


# ------------------------------------------------------------------------------------------------ the design


def parse_design_weights(text: str | None) -> list[float]:
    ws = parse_weights(text or DEFAULT_WEIGHTS, "--weights")
    if len(ws) < MIN_WEIGHTS or ws[0] != 0.0 or ws[-1] != 1.0:
        raise UserError(f"--weights: {','.join(f'{w:g}' for w in ws)}: give ≥ {MIN_WEIGHTS} distinct domain weights "
                        "including both ends, e.g. 0,0.25,0.5,0.75,1 (general-only and domain-only pin the law)")
    return ws


def parse_budgets(text: str | None, target: float) -> list[float]:
    if text is None:
        return [f * target for f in DEFAULT_BUDGETS]
    out = sorted({parse_number(part.strip(), "--budgets") for part in str(text).split(",") if part.strip()})
    if len(out) < 2:
        raise UserError("--budgets: give ≥ 2 distinct token budgets, e.g. 3e4,6e4 (the law extrapolates in D "
                        "from them)")
    return out


def parse_cost(text: str | None) -> float | None:
    """``2%`` or ``0.02`` → 0.02."""
    if text is None:
        return None
    t = str(text).strip()
    pct = t.endswith("%")
    try:
        v = float(t.removesuffix("%"))
    except ValueError:
        raise UserError(f"--max-general-cost: expected a percentage like 2% (or a fraction like 0.02), got {t!r}") \
            from None
    v = v / 100 if pct else v
    if not (math.isfinite(v) and v >= 0):
        raise UserError(f"--max-general-cost: {t!r} is not a cost ≥ 0")
    return v


def parse_objective(max_general_cost: str | None, objective_weights: str | None) -> law.Objective:
    if max_general_cost is not None and objective_weights is not None:
        raise UserError("--max-general-cost and --objective-weights: give one objective, not both")
    if objective_weights is None:
        return law.Objective(max_general_cost=parse_cost(max_general_cost or "2%"))
    ws = {}
    for part in objective_weights.split(","):
        name, eq, val = part.partition("=")
        try:
            ws[name.strip()] = float(val) if eq else math.nan
        except ValueError:
            ws[name.strip()] = math.nan
        if not (eq and name.strip() and math.isfinite(ws[name.strip()]) and ws[name.strip()] >= 0):
            raise UserError(f"--objective-weights: expected NAME=A pairs like legal=1,news=1 (A ≥ 0), got {part!r}")
    return law.Objective(weights=ws)


def mixture_of(cfg: RunConfig, counts: dict) -> law.Mixture:
    """Roles, within-role shares (`reweighted` at w = 1 for the domain sources, w = 0 for the general) and the
    unique train tokens each source's corpus has (tokens/counts.json)."""
    dom, gen = reweighted(cfg, 1.0), reweighted(cfg, 0.0)
    roles = {s.name: s.role for s in cfg.sources}
    within = {n: (dom[n] if r == "domain" else gen[n]) for n, r in roles.items()}
    unique = {n: float(counts["sources"][n]["train_tokens"]) if n in counts["sources"] else None for n in roles}
    return law.Mixture(roles=roles, within=within, unique=unique)


def default_held_out(weights: list[float], configured: float) -> float:
    """The interior weight of the design nearest the configured domain weight (its prediction matters most)."""
    inner = weights[1:-1]
    return min(inner, key=lambda w: (abs(w - configured), w))


# ------------------------------------------------------------------------------------------------ the stage


def run_mix(config: Path | None, *, weights: str | None = None, seeds: int = MIN_SEEDS, budgets: str | None = None,
            target_tokens: str | None = None, held_out: float | None = None, max_general_cost: str | None = None,
            objective_weights: str | None = None, n_boot: int = law.N_BOOT, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    cfg = load_config(config)
    run_dir = cfg.directory()
    if not objectives.get(cfg.model.objective).bits_per_byte:  # the law is fitted to bits per byte
        raise UserError(f"model.objective: {cfg.model.objective}: domainlm mix fits laws to a causal LM's bits per "
                        "byte; run it with model.objective: causal")
    if cfg.train.init_from:
        raise UserError("train.init_from: domainlm mix trains its variants from scratch; give a from-scratch config")
    counts = load_counts(run_dir)  # fails early: "run `domainlm tokenize`"
    for s in cfg.sources:  # every variant is scored on the val documents: check them before any training
        document_files(run_dir, s.name, "val")
    mixture = mixture_of(cfg, counts)
    objective = parse_objective(max_general_cost, objective_weights)
    unknown = [n for n in objective.weights or {} if n not in mixture.roles]
    if unknown:
        raise UserError(f"--objective-weights: {', '.join(unknown)} is not a source of the run (sources: "
                        f"{', '.join(mixture.roles)})")
    ws = parse_design_weights(weights)
    if seeds < MIN_SEEDS:
        raise UserError(f"--seeds: {seeds}; give ≥ {MIN_SEEDS} (the bootstrap and the held-out check need the "
                        "scatter between seeds)")
    target = parse_number(target_tokens, "--target-tokens") if target_tokens is not None else \
        (cfg.train.max_tokens or planned_tokens(plan_of(run_dir)))
    if target is None:
        raise UserError("train.max_tokens: no token budget to recommend a weight for; set it, run `domainlm plan "
                        "CONFIG` first, or pass --target-tokens")
    target = float(target)
    ds = parse_budgets(budgets, target)
    configured = sum(s.weight for s in cfg.sources if s.role == "domain")
    hold = default_held_out(ws, configured) if held_out is None else float(held_out)
    if hold not in ws[1:-1]:
        raise UserError(f"--held-out: {hold:g} is not an interior weight of the design ({','.join(map(str, ws))})")
    design = {"weights": ws, "seeds": seeds, "budgets": ds, "held_out": hold,
              "objective": {"max_general_cost": objective.max_general_cost} if objective.weights is None
              else {"weights": objective.weights}}
    stage = stages.Stage(run_dir, "mix", RunDir(run_dir) / RunDir.MIX,
                         inputs=(MIX_VERSION, cfg.model_dump(mode="json"), design, target, objective.describe(),
                                 n_boot, stages.file_fingerprint(RunDir(run_dir).counts)))

    def work() -> dict:
        runs = train_design(cfg, run_dir, ws, seeds, ds, hold, mixture, console)
        return fit_and_write(cfg, config, run_dir, runs, mixture, design, target, objective, n_boot, console)

    def load() -> dict:
        return RunDir(run_dir).load(RunDir.MIX, Mix).model_dump(exclude_unset=True) | {"skipped": True}

    result, _ = stage.run(work, load)
    return result


def train_design(cfg: RunConfig, run_dir: Path, ws: list[float], seeds: int, ds: list[float], hold: float,
                 mixture: law.Mixture, console: Console) -> list[dict]:
    """Train and score every variant of the design (a finished one is skipped, a killed one resumes)."""
    design = [(d, w, k) for d in ds for w in ws for k in range(seeds)]
    runs = []
    for i, (d, w, k) in enumerate(design, 1):
        console.rule(f"mix {i}/{len(design)}: {d:,.0f} tokens, domain weight {w:g}, seed {k}")
        vcfg = variant_config(cfg, run_dir, w, tokens=d, seed=cfg.train.seed + k,
                              folder=RunDir(run_dir).mix_variant(d, w, k))
        train_variant(vcfg, run_dir, console)
        ev = evaluate_variant(vcfg.directory(), run_dir, console)
        runs.append({"domain_weight": w, "seed": k, "tokens": d,
                     "bpb": {n: v["bpb"] for n, v in ev["sources"].items() if n in mixture.roles},
                     "epochs": mixture.epochs(w, d), "held_out": w == hold, "dir": str(vcfg.directory())})
        faults.hit("mix.variant_done")
    return runs


def _curve(fit: law.Fit, tokens: float) -> dict:
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    out = {"tokens": tokens, "weights": [round(float(w), 6) for w in grid], "bpb": {}, "lo": {}, "hi": {}}
    for s in fit.theta:
        v, lo, hi = fit.interval(s, grid, np.full_like(grid, tokens))
        out["bpb"][s], out["lo"][s], out["hi"][s] = v.tolist(), lo.tolist(), hi.tolist()
    return out


def fit_and_write(cfg: RunConfig, config: Path | None, run_dir: Path, runs: list[dict], mixture: law.Mixture,
                  design: dict, target: float, objective: law.Objective, n_boot: int, console: Console) -> dict:
    rows = [{"weight": r["domain_weight"], "tokens": r["tokens"], "bpb": r["bpb"]} for r in runs]
    sources = list(runs[0]["bpb"])
    fit = law.fit_mix(rows, mixture, sources=sources, n_boot=n_boot)
    check = law.held_out_check(rows, mixture, design["held_out"], n_boot=n_boot)
    rec = law.recommend(fit, objective, target)
    notes = []
    if not rec["in_fitted_range"]:
        far = target / max(fit.budgets) if target > max(fit.budgets) else min(fit.budgets) / target
        notes.append(f"extrapolated: the target budget {target:,.0f} tokens lies outside the fitted budgets "
                     f"({min(fit.budgets):,.0f}–{max(fit.budgets):,.0f}), {far:.1f}× beyond them; there the law's "
                     "form, not a measurement, carries the prediction")
    if not rec["feasible"]:
        notes.append(f"no weight keeps every general source within the cost cap ({objective.describe()}); the "
                     "recommendation is general-only (w = 0)")
    missed = [r for r in check["rows"] if not r["inside"]]
    if missed:
        notes.append("held-out check: " + "; ".join(
            f"{r['source']} at {r['tokens']:,.0f} tokens measured {r['measured']:.4f}, outside the predicted "
            f"[{r['pi95'][0]:.4f}, {r['pi95'][1]:.4f}]" for r in missed) + " — trust the law less")
    params = None
    first = RunDir(runs[0]["dir"]).load(RunDir.TRAIN, TrainSummary)
    if first is not None:
        params = first.params
    out = {
        "version": MIX_VERSION,
        "config": str(config) if config else None,
        "model": cfg.model.model_dump(mode="json"),
        "params": params,
        "sources": {n: {"role": mixture.roles[n], "within_role": mixture.within[n],
                        "unique_tokens": mixture.unique[n]} for n in mixture.roles},
        "r_star_d": MUENNIGHOFF_R_D,
        "design": design,
        "runs": runs,
        "d_ref": fit.d_ref,
        "law": {s: fit.constants(s) | {"rmse": fit.rmse[s]} for s in sources},
        "held_out": check,
        "target_tokens": target,
        "recommended": rec,
        "weights": reweighted(cfg, rec["domain_weight"]),
        "curves": [_curve(fit, target)] + [_curve(fit, d) for d in fit.budgets if d != target],
        "notes": notes,
    }
    path = RunDir(run_dir) / RunDir.MIX
    out["plot"] = str(mix_chart(Mix.model_validate(out), RunDir(run_dir) / RunDir.MIX_CHART))
    out = Mix.checked(out)
    write_json(path, out)
    return out


# ------------------------------------------------------------------------------------------------ printing


def print_mix(m: dict, console: Console) -> None:
    sources = list(m["law"])
    t = Table(title="mixing law per source: bpb = c + k·exp(t·ρ)·(D′/D_ref)^−β  (95% bootstrap intervals)",
              title_justify="left")
    for col in ("source", "c", "k", "t", "β", "rmse"):
        t.add_column(col, justify="left" if col == "source" else "right")

    def ci(x, fmt="{:.3f}"):
        return f"{fmt.format(x['value'])} [{fmt.format(x['ci95'][0])}, {fmt.format(x['ci95'][1])}]"

    for s in sources:
        c = m["law"][s]
        t.add_row(f"{s} ({m['sources'][s]['role']})", ci(c["c"]), ci(c["k"]), ci(c["t"]), ci(c["beta"]),
                  f"{c['rmse']:.4f}")
    console.print(t)
    h = m["held_out"]
    t = Table(title=f"held-out check: domain weight {h['weight']:g}, fitted on the other {h['runs_fitted']} runs",
              title_justify="left")
    for col in ("source", "tokens", "measured", "predicted", "95% interval (mean of seeds)", "inside"):
        t.add_column(col, justify="left" if col == "source" else "right")
    for r in h["rows"]:
        t.add_row(r["source"], f"{r['tokens']:,.0f}", f"{r['measured']:.4f}", f"{r['predicted']:.4f}",
                  f"[{r['pi95'][0]:.4f}, {r['pi95'][1]:.4f}]", "yes" if r["inside"] else "NO")
    console.print(t)
    rec = m["recommended"]
    lo, hi = rec["ci95"]
    console.print(f"objective: {rec['objective']}", highlight=False)
    console.print(f"recommended domain weight at {rec['tokens']:,.0f} tokens: [bold]{rec['domain_weight']:.3f}[/] "
                  f"(95% CI {lo:.3f}–{hi:.3f}); weights: "
                  + ", ".join(f"{k}={v:.3f}" for k, v in m["weights"].items()), highlight=False)
    for s, p in rec["predicted"].items():
        console.print(f"  {s}: {p['bpb']:.4f} bpb [{p['ci95'][0]:.4f}, {p['ci95'][1]:.4f}] "
                      f"(general-only {p['general_only_bpb']:.4f})", highlight=False)
    for n in m["notes"]:
        console.print(f"[yellow]note:[/] {n}", highlight=False)
    if m.get("skipped"):
        console.print("[dim]done before with the same design and data: nothing retrained[/]")
    mix_json = Path(m["plot"]).parent / Path(RunDir.MIX).name
    console.print(f"wrote {mix_json} and {m['plot']}; plan with it: domainlm plan "
                  f"{m['config'] or 'CONFIG'} --weights-from {mix_json}",
                  highlight=False, markup=False)
