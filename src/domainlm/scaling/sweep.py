"""`domainlm scaling CONFIG --budgets 3e12,1e13,3e13 --sizes 4`: your own scaling law, measured.

An IsoFLOP sweep (Hoffmann et al. 2022, §3.2, "approach 2"): for each compute budget C, a few model sizes N
spread log-uniformly around the current law's optimum for C, each trained on D = C / (6·N) tokens with its
learning-rate schedule decayed to the end of exactly those steps. N is the *total* parameter count of the
shape actually trained (embeddings included, as Chinchilla counts), not the target size. The final val loss
of each point (mixture-weighted over sources) feeds `fit_law` (approaches 2 and 3), which writes law.json for
`domainlm plan --law fitted:PATH`.

Every point trains with the run's trainer on the run's token files and tokenizer, in
``<run>/scaling/C<budget>/N<params>/``; a finished point is skipped (the trainer's stage fingerprint) and an
interrupted one resumes from its last checkpoint, so a killed sweep continues where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from domainlm import faults, objectives
from domainlm.config import RunConfig, load_config
from domainlm.data.tokens import load_counts
from domainlm.errors import UserError
from domainlm.outputs import Law, ScalingPoint, TrainSummary
from domainlm.plan.laws import LAWS, get_law
from domainlm.rundir import RunDir, atomic_write, budget_label, load_jsonl, write_json
from domainlm.scaling.fit import fit_law
from domainlm.scaling.plot import plot_scaling, usable_law
from domainlm.shape import ModelShape, make_shape, shape_for_params
from domainlm.train.driver import metric_rows
from domainlm.train.variants import fixed_config, train_variant

# Sizes span optimum/4 … optimum×4: Chinchilla's IsoFLOP profiles (Fig. 3) cover about a decade in N
# around each minimum, enough for the parabola in log N to bracket it.
SPREAD = 4.0
# The smallest sensible model: d_model 32 (one 32-wide head), 1 layer.
MIN_D_MODEL, MIN_LAYERS = 32, 1
# A point shorter than this many steps is mostly warmup and measures the schedule, not the model.
MIN_STEPS = 20
# Two shapes within 10% in N are one size to the parabola (tiny models come in coarse steps of d_model).
SAME_SIZE = 1.10


def parse_budgets(text: str) -> list[float]:
    out = []
    for part in str(text).split(","):
        try:
            c = float(part.strip())
        except ValueError:
            raise UserError(f"--budgets: expected FLOPs like 3e12,1e13,3e13, got {part.strip()!r}") from None
        if not (math.isfinite(c) and c > 0):
            raise UserError(f"--budgets: {part.strip()!r} is not a positive number of FLOPs")
        out.append(c)
    out = sorted(set(out))
    if len(out) < 2:
        raise UserError("--budgets: give at least 2 budgets (3 or more for exponents worth reading)")
    return out


def tokens_per_step(cfg: RunConfig) -> int:
    # The sweep trains in one process (train_variant), so world size 1.
    return cfg.train.tokens_per_step or cfg.train.micro_batch * cfg.train.seq_len


def batch_overrides(cfg: RunConfig, step_tokens: int | None) -> dict:
    """train fields for ``--tokens-per-step``: small budgets want small batches (the critical batch size grows
    as loss falls, McCandlish et al. 2018), else the biggest models of a small budget get only a few steps."""
    if step_tokens is None:
        return {}
    seq = cfg.train.seq_len
    if step_tokens < seq or step_tokens % seq:
        raise UserError(f"--tokens-per-step: {step_tokens} is not a multiple of train.seq_len {seq}")
    rows = step_tokens // seq
    micro = max(m for m in range(1, min(rows, cfg.train.micro_batch) + 1) if rows % m == 0)
    return {"tokens_per_step": step_tokens, "micro_batch": micro}


def min_steps(cfg: RunConfig) -> int:
    return max(MIN_STEPS, 2 * cfg.train.warmup_steps)


def sweep_shapes(budget: float, center: float, *, sizes: int, vocab_size: int, tie: bool, step_tokens: int,
                 least_steps: int) -> list[ModelShape]:
    """Distinct shapes for one budget: ``sizes`` targets log-uniform in center/SPREAD … center·SPREAD, moved
    inside what the budget allows (≥ the smallest model, ≥ ``least_steps`` steps each)."""
    smallest = make_shape(MIN_D_MODEL, MIN_LAYERS, vocab_size, tie)
    n_lo = smallest.params_total
    n_hi = budget / (6.0 * least_steps * step_tokens)  # the largest N that still gets least_steps steps
    if n_hi < n_lo:
        need = 6.0 * n_lo * least_steps * step_tokens
        raise UserError(
            f"--budgets: {budget:.3g} FLOPs is too small for the smallest model ({n_lo:,} params: d_model "
            f"{MIN_D_MODEL}, {MIN_LAYERS} layer, vocab {vocab_size}), which needs ≥ {need:.3g} FLOPs for "
            f"{least_steps} steps of {step_tokens} tokens"
        )
    lo, hi = math.log(center / SPREAD), math.log(center * SPREAD)
    span = hi - lo
    if lo < math.log(n_lo):  # the law's optimum is below the smallest model: shift the sweep up
        lo, hi = math.log(n_lo), math.log(n_lo) + span
    if hi > math.log(n_hi):  # ...or the biggest would get too few steps: shift down, then clip
        hi = math.log(n_hi)
        lo = max(math.log(n_lo), hi - span)
    shapes: list[ModelShape] = []
    for target in np.exp(np.linspace(lo, hi, sizes)):
        s = shape_for_params(float(target), vocab_size, tie_embeddings=tie)
        if s.params_total > n_hi * 1.05:
            continue
        if all(abs(math.log(s.params_total / o.params_total)) > math.log(SAME_SIZE) for o in shapes):
            shapes.append(s)
    if len(shapes) < 3:
        raise UserError(
            f"--budgets: at {budget:.3g} FLOPs only {len(shapes)} distinct model sizes fit between {n_lo:,} and "
            f"{int(n_hi):,} params (≥ {least_steps} steps each); a parabola needs 3 — raise the budget"
        )
    return shapes


def plan_sweep(cfg: RunConfig, run_dir: Path, budgets: list[float], sizes: int) -> list[dict]:
    """Every point of the sweep (budget, shape, steps, tokens), checked before anything trains."""
    if sizes < 3:
        raise UserError(f"--sizes: {sizes} is too few; a parabola per budget needs ≥ 3 model sizes")
    counts = load_counts(run_dir)  # says: run `domainlm tokenize`
    vocab = int(counts["vocab_size"])
    law = get_law(cfg.budget.law, origin="budget.law:")
    step_tokens, least = tokens_per_step(cfg), min_steps(cfg)
    points = []
    for c in budgets:
        center = law.optimal_params(c)
        for shape in sweep_shapes(c, center, sizes=sizes, vocab_size=vocab, tie=cfg.model.tie_embeddings,
                                  step_tokens=step_tokens, least_steps=least):
            n = shape.params_total
            steps = max(1, round(c / (6.0 * n * step_tokens)))  # D = C / (6N), in whole steps
            points.append({"budget": c, "law_optimum": center, "shape": shape, "steps": steps,
                           "tokens": steps * step_tokens, "dir": RunDir(run_dir).scaling_point(c, n)})
    return points


def final_eval(vdir: Path, steps: int) -> dict[str, float]:
    """Val loss per source at the last step, from the trainer's metrics log (it always evaluates there)."""
    path = RunDir(vdir).metrics
    last = [r for r in metric_rows(path, steps) if r.get("kind") == "eval" and r.get("step") == steps]
    if not last:
        raise UserError(f"{path}: no eval at step {steps}; does every source have a val split?")
    return {k.removeprefix("val_loss/"): v for k, v in last[-1].items() if k.startswith("val_loss/")}


def mixture_loss(losses: dict[str, float], weights: dict[str, float]) -> float:
    """The loss the sweep fits: val losses weighted like the training mixture."""
    w = {k: weights.get(k, 0.0) for k in losses}
    total = sum(w.values())
    if total <= 0:
        raise UserError("scaling: no val loss for any weighted source")
    return sum(losses[k] * w[k] for k in losses) / total


def run_sweep(config: Path | None, budgets: str, sizes: int, *, law_out: Path | None = None,
              step_tokens: int | None = None, console: Console) -> dict:

    cfg = load_config(config)
    if not objectives.get(cfg.model.objective).bits_per_byte:  # the sweep fits L(N, D) to bits per byte
        raise UserError(f"model.objective: {cfg.model.objective}: domainlm scaling fits laws to a causal LM's bits "
                        "per byte; run it with model.objective: causal")
    run_dir = cfg.directory()
    batch = batch_overrides(cfg, step_tokens)
    cfg.train = cfg.train.model_copy(update=batch)
    points = plan_sweep(cfg, run_dir, parse_budgets(budgets), sizes)
    smallest = min(p["shape"].params_total for p in points)
    for c in sorted({p["budget"] for p in points}):
        optimum = next(p["law_optimum"] for p in points if p["budget"] == c)
        if optimum < smallest:
            console.print(f"[yellow]note:[/] at C={c:.3g} {cfg.budget.law} puts the optimum at {optimum:.3g} params, "
                          f"below the smallest model ({smallest:,}, mostly embeddings): the sweep starts there, "
                          "and its IsoFLOP curve may have no minimum inside; larger budgets or a smaller vocab help")
    weights = {s.name: s.weight for s in cfg.sources}
    points_path = RunDir(run_dir) / RunDir.POINTS
    out_dir = points_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    # Seconds of points trained by an earlier invocation (a rerun skips them and keeps their time).
    old = {r.dir: r.model_dump() for r in load_jsonl(points_path, ScalingPoint) or []}
    t_start = time.perf_counter()
    for i, p in enumerate(points, 1):
        shape: ModelShape = p["shape"]
        n = shape.params_total
        console.rule(f"scaling {i}/{len(points)}: C={p['budget']:.3g} FLOPs, N={n:,} params "
                     f"(d_model {shape.d_model}, {shape.n_layers} layers), D={p['tokens']:,} tokens")
        # eval_every = steps: one eval, at the last step (the trainer always evaluates there); a cosine decayed
        # to exactly `steps` — a cosine cut short (or a longer run read early) would give a worse loss.
        name = f"{cfg.name}-C{budget_label(p['budget'])}-N{n}"
        vcfg = fixed_config(cfg, shape, p["tokens"], name=name, run_dir=p["dir"], eval_every=p["steps"])
        t0, wall0 = time.perf_counter(), time.time()
        train_variant(vcfg, run_dir, console)
        losses = final_eval(p["dir"], p["steps"])
        done = RunDir(p["dir"]).load(RunDir.TRAIN, TrainSummary)
        trained_now = done.finished >= wall0
        seconds = round(time.perf_counter() - t0, 1) if trained_now else old.get(str(p["dir"]), {}).get("seconds")
        rows.append(ScalingPoint.checked({
            "budget": p["budget"], "params": n, "params_non_embedding": shape.params_non_embedding,
            "d_model": shape.d_model, "n_layers": shape.n_layers, "steps": p["steps"], "tokens": p["tokens"],
            # "flops" is the budget the point belongs to (the fit groups IsoFLOP curves by it); 6·N·D rounds
            # D to whole steps, so it differs from the budget by < half a step's worth.
            "flops": p["budget"], "flops_6nd": 6.0 * n * p["tokens"],
            "loss": mixture_loss(losses, weights), "val_loss": losses,
            "law_optimum": p["law_optimum"], "seconds": seconds, "tokens_per_s": done.tokens_per_s,
            "dir": str(p["dir"]),
        }))
        atomic_write(points_path, "".join(json.dumps(r) + "\n" for r in rows))  # a killed sweep keeps them
        faults.hit("scaling.point_done")
    minutes = (time.perf_counter() - t_start) / 60
    law = fit_law(rows)
    law.update(law_name=cfg.budget.law, params_counted="total", loss="val loss (nats/token), mixture-weighted",
               budgets=sorted({r["budget"] for r in rows}), sizes=sizes, tokens_per_step=tokens_per_step(cfg),
               config=str(config) if config else None, tokenizer_sha256=load_counts(run_dir).get("tokenizer_sha256"))
    law_path = Path(law_out) if law_out else RunDir(run_dir) / RunDir.LAW
    write_json(law_path, Law.checked(law))

    plot = plot_scaling(rows, law, usable_law(law_path), RunDir(run_dir) / RunDir.SCALING_CHART)
    return {"law": law, "law_path": str(law_path), "points_path": str(points_path),
            "plot": str(plot), "points": rows, "minutes": round(minutes, 2), "config": str(config) if config else None}


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ci(v) -> str:
    return f"[{v[0]:.3f}, {v[1]:.3f}]" if v else "n/a"


def print_scaling(res: dict, console: Console) -> None:
    law = res["law"]
    a2, a3 = law["approach2"], law["approach3"]
    ref = LAWS["chinchilla-3"]
    t = Table(title=f"your scaling law, approaches 2 and 3 ({law['points']} points, {len(law['budgets'])} budgets)",
              title_justify="left")
    for col in ("", "fitted", "95% bootstrap", "Chinchilla"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("2: a, N_opt ∝ C^a", _num(a2["a"]), _ci(a2["a_ci95"]), "0.49")
    t.add_row("2: b, D_opt ∝ C^b", _num(a2["b"]), _ci(a2["b_ci95"]), "0.51")
    t.add_row("3: α in A/N^α", f"{a3['alpha']:.3f}", _ci(a3["alpha_ci95"]), f"{ref.alpha}")
    t.add_row("3: β in B/D^β", f"{a3['beta']:.3f}", _ci(a3["beta_ci95"]), f"{ref.beta}")
    t.add_row("3: a = β/(α+β)", f"{a3['a']:.3f}", _ci(a3["a_ci95"]), f"{ref.a:.2f}")
    t.add_row("3: E", f"{a3['E']:.3g}", "", f"{ref.E}")
    t.add_row("3: A, B", f"{a3['A']:.3g}, {a3['B']:.3g}", "", f"{ref.A}, {ref.B}")
    console.print(t)
    if not (0.05 < a3["alpha"] < 2 and 0.05 < a3["beta"] < 2):
        # Published fits: α, β ≈ 0.28–0.37 (Hoffmann et al. 2022; Besiroglu et al. 2024).
        console.print(f"[yellow]warning:[/] α={a3['alpha']:.3g}, β={a3['beta']:.3g} are far from published values "
                      "(0.3–0.4): the points do not constrain L(N, D); use larger or wider budgets")
    if a2.get("error"):
        console.print(f"[yellow]warning:[/] approach 2 failed — {a2['error']}; law.json carries approach 3 only")
    for m in a2["minima"]:
        where = (f"N_opt {m['params']:.3g}, D_opt {m['tokens']:.3g}, loss {m['loss']:.3f}"
                 + ("" if m["bracketed"] else " (outside the sizes tried: extrapolated)")) if m["params"] else \
            "no minimum (loss does not curve up on both sides: widen the sizes)"
        console.print(f"C={m['flops']:.3g}: {where}")
    took = "" if res["minutes"] is None else f"sweep time: {res['minutes']:.1f} min; "
    console.print(f"{took}points: {escape(str(res['points_path']))}; plot: {escape(str(res['plot']))}")
    law = escape(str(res["law_path"]))
    console.print(f"wrote [bold]{law}[/]; plan with it: "
                  f"[bold]domainlm plan {escape(str(res['config'] or 'CONFIG'))} --law fitted:{law}[/]")
