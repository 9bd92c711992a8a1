"""`domainlm plan`: compute budget → model size, token budget, model shape, data epochs, GPU-hours, memory."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from scipy.optimize import minimize_scalar

from domainlm.errors import UserError
from domainlm.hardware import DEFAULT_MFU, get_accelerator
from domainlm.memory import MemoryEstimate, estimate, recommend
from domainlm.model import load_base_model
from domainlm.model.base import resolve_base
from domainlm.objectives import Causal, Objective
from domainlm.plan import hardware, laws, vocab
from domainlm.plan.hardware import measure_cpu_flops
from domainlm.shape import (
    MAX_D_MODEL,
    MAX_LAYERS,
    ModelShape,
    ffn_for,
    largest_params,
    make_shape,
    shape_for_params,
)
from domainlm.units import human

TOKENS_PER_PARAM_RULE = 20.0  # Chinchilla's rule of thumb: ~20 training tokens per parameter
# The small-scale rule (below the range a law was fitted on, `_small_scale`): at least 2 layers — induction heads,
# the circuit behind in-context copying, need two attention layers composing (Olsson et al. 2022, "In-context
# Learning and Induction Heads") — and d_model 128 (4 heads of 32, head_dim_for's smallest); the vocabulary from
# Tao et al. 2024's law at that shape, as at any scale.
MIN_LAYERS = 2
MIN_D_MODEL = 128


@dataclass
class PlanRequest:
    """Everything `domainlm plan` needs; flags and the config's `budget` section both fill it."""

    flops: float | None = None
    gpu: str | None = None
    gpus: int = 1
    hours: float | None = None
    mfu: float | None = None
    law: str = laws.DEFAULT_LAW
    weights: dict[str, float] = field(default_factory=dict)
    unique_tokens: dict[str, float] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # source -> "domain" | "general"
    vocab_size: int | None = None  # None: planned with the model (Tao et al. 2024, plan/vocab.py)
    seq_len: int = 2048
    micro_batch: int = 1
    tie_embeddings: bool = False
    buffer: float = 0.3  # compute kept in reserve by the BloombergGPT alternative
    cpu_flops_per_s: float | None = None  # measured once and reused (tests inject it)
    # What the config fixes: the model section's shape fields and train.max_tokens. The plan then says what the
    # run trains instead of the law's optimum, and why ("run" in the output).
    fixed_model: dict[str, int] = field(default_factory=dict)  # d_model, n_layers, n_heads, n_kv_heads, ffn_dim
    fixed_tokens: float | None = None
    shape_probe: dict | None = None  # a throughput probe of a shape measured by an earlier plan on this machine
    # Continued pretraining (train.init_from): `BaseModel.as_dict()` plus its "flops_per_token" at seq_len. N is
    # then the base's, and the plan sizes the tokens only (`_continued`).
    base: dict | None = None
    # model.objective with its settings (objectives/): masked / span train an encoder / encoder-decoder of the
    # plan's shape; the laws stay those of causal LMs (its notes say so), the FLOPs per token are the objective's own.
    objective: Objective = field(default_factory=Causal)


def _compute(req: PlanRequest) -> dict:
    """Resolve the compute budget in FLOPs and say how it was derived."""
    if req.mfu is not None and not (0.0 < req.mfu <= 1.0):
        raise UserError(f"--mfu: expected a fraction in (0, 1], got {req.mfu:g}")
    if req.gpus < 1:
        raise UserError(f"--gpus: expected an integer ≥ 1, got {req.gpus}")
    if req.flops is not None:
        if req.flops <= 0 or not math.isfinite(req.flops):
            raise UserError(f"--flops: expected a number > 0, got {req.flops:g}")
        if req.hours is not None:
            raise UserError("--flops and --hours: give the budget one way, not both")
        out = {"method": "flops", "flops": req.flops}
        if req.gpu and req.gpu != "cpu":
            acc = get_accelerator(req.gpu)
            mfu = req.mfu or DEFAULT_MFU
            out.update(gpu=acc.name, gpus=req.gpus, mfu=mfu, peak_flops_per_gpu=acc.bf16_flops)
        return out
    if req.hours is None:
        raise UserError("no compute budget: give --flops F, or --gpu KIND --gpus N --hours H, or a CONFIG")
    if req.hours <= 0:
        raise UserError(f"--hours: expected a number > 0, got {req.hours:g}")
    if req.gpu is None:
        raise UserError("--hours: needs --gpu KIND (a100-40gb, a100-80gb, h100, h200, l4, cpu)")
    if req.gpu == "cpu":
        flops_per_s = req.cpu_flops_per_s or measure_cpu_flops()["flops_per_s"]
        return {
            "method": "cpu-probe",
            "machine": machine_id(),
            "gpu": "cpu",
            "gpus": req.gpus,
            "hours": req.hours,
            "measured_flops_per_s": flops_per_s,
            "hardware_flops_per_s": flops_per_s * req.gpus,
        }
    acc = get_accelerator(req.gpu)
    mfu = req.mfu or DEFAULT_MFU
    return {
        "method": "gpu",
        "gpu": acc.name,
        "gpus": req.gpus,
        "hours": req.hours,
        "mfu": mfu,
        "peak_flops_per_gpu": acc.bf16_flops,
        "hardware_flops_per_s": acc.bf16_flops * mfu * req.gpus,
    }


def _size(law: laws.Law, req: PlanRequest, compute: dict) -> tuple[float, float, ModelShape]:
    """The compute-optimal N, D and shape. A FLOPs budget is the laws' C = 6·N·D. A time budget (hours) is
    spent at the shape's own cost per token (PaLM FLOPs per token, attention included): D = seconds × FLOP/s /
    flops_per_token(shape), and C = 6·N·D must be the budget whose optimum is N — a fixed point, solved in
    closed form per shape (C = (6·g·D)^(1/(1−a))) and iterated until the shape stops changing. So the plan's
    GPU-hours give back exactly the hours asked for."""
    def shape_of(n: float) -> ModelShape:
        return shape_for(law, req, n)

    if compute["method"] == "flops":
        n, d = law.optimal(compute["flops"])
        return n, d, shape_of(n)
    seconds = req.hours * 3600.0
    rate = compute["hardware_flops_per_s"]
    n = law.optimal_params(rate * seconds)
    shape, seen = shape_of(n), []
    for _ in range(20):
        d = seconds * rate / _fpt(req, shape)
        n = law.optimal_params((6.0 * law.g * d) ** (1.0 / (1.0 - law.a)))  # N_opt of the C that gives D_opt = D
        nxt = shape_of(n)
        if nxt == shape or nxt in seen:  # converged (or alternating between two neighbours: keep this one)
            break
        seen.append(shape)
        shape = nxt
    d = seconds * rate / _fpt(req, shape)
    n = law.optimal_params((6.0 * law.g * d) ** (1.0 / (1.0 - law.a)))
    compute["flops"] = 6.0 * n * d
    return n, d, shape


def below_range(law: laws.Law, n: float) -> bool:
    """Is ``n`` (in the law's parameter count) below the smallest model the law was fitted on?"""
    return law.fitted_params is not None and n < law.fitted_params[0] * 0.999


def law_flops(law: laws.Law, n: float) -> float:
    """The budget C whose optimum is ``n``: N_opt = g·C^a solved for C."""
    return (n / law.g) ** (1.0 / law.a)


def shape_for(law: laws.Law, req: PlanRequest, n: float) -> ModelShape:
    """The shape for ``n`` parameters (in the law's count) and its vocabulary: the config's, else Tao et al. 2024's
    optimum for the shape's non-vocabulary parameters and width at the budget whose optimum is ``n`` (a fixed point:
    the vocabulary moves the split between N_nv and N_v, which moves the vocabulary). Below the law's fitted range
    the shape has at least MIN_LAYERS layers and MIN_D_MODEL width (the small-scale rule)."""
    count = "non-embedding" if law.params_counted == "non-embedding" else "total"
    mins = {"min_layers": MIN_LAYERS, "min_d_model": MIN_D_MODEL} if below_range(law, n) else {}

    def shape(v: int) -> ModelShape:
        return shape_for_params(n, v, count=count, tie_embeddings=req.tie_embeddings, **mins)

    if req.vocab_size:
        return shape(req.vocab_size)
    flops, v, seen = law_flops(law, n), 32768, []
    s = shape(v)
    for _ in range(12):
        nxt = vocab.optimal_vocab(s.params_non_embedding, s.d_model, flops)
        if nxt == v or nxt in seen:  # converged (or alternating between neighbours: keep this one)
            break
        seen.append(v)
        v, s = nxt, shape(nxt)
    return s


def vocabulary(law: laws.Law, req: PlanRequest, shape: ModelShape, flops: float) -> dict:
    """The plan's vocabulary: vocabulary and non-vocabulary parameters counted apart (Tao et al. 2024's N_v = V·d,
    the output head; the input embedding is a lookup) and the law's recommendation at this shape and budget."""
    exact = vocab.optimal_vocab_exact(shape.params_non_embedding, shape.d_model, flops)
    recommended = vocab.optimal_vocab(shape.params_non_embedding, shape.d_model, flops)
    out = {
        "vocab_size": shape.vocab_size,
        "from": "tokenizer.vocab_size (config)" if req.vocab_size else "planned (Tao et al. 2024, approach 3)",
        "recommended": recommended,
        "recommended_exact": exact,
        "approach2": vocab.derivative_vocab_params(shape.params_non_embedding) / shape.d_model,
        "params_non_vocabulary": shape.params_non_embedding,
        "params_vocabulary": shape.vocab_size * shape.d_model,  # N_v = V·d
        "params_embedding": shape.params_embedding,  # input embedding + output head (one when tied)
        "embedding_share": shape.params_embedding / shape.params_total,
        "in_fitted_range": vocab.in_fitted_range(shape.params_non_embedding, flops),
        "law": "Tao et al. 2024 (arXiv 2407.13623) approach 3: L_u = −E + A1/N_nv^α1 + A2/(V·d)^α2 + B/D^β, "
               "∂L_u/∂V = 0 at C = 6·N·D; approach 2 (N_v ∝ N_nv^0.835) shown as a check",
    }
    return out


def _small_scale(law: laws.Law, n_law: float, d_law: float, shape: ModelShape, count: str) -> dict | None:
    """Below the range the law was fitted on, its N_opt is an extrapolation (at the demo's budget ~300× below
    Chinchilla's smallest model: 1 layer × d_model 32 with 97% of the parameters in the vocabulary), and so is its
    loss. The plan says so, shows no predicted loss, and trains the small-scale rule's shape instead (`shape_for`):
    ≥ MIN_LAYERS layers, ≥ MIN_D_MODEL wide, the vocabulary from Tao et al. 2024, spending the whole budget."""
    if not below_range(law, n_law):
        return None
    lo, hi = law.fitted_params
    return {
        "law_params": n_law,
        "law_tokens": d_law,
        "fitted_params": [lo, hi],
        "params_counted": count,
        "rule": (f"below {law.name}'s fitted range ({human(lo)}–{human(hi)} {count} params) the shape has at least "
                 f"{MIN_LAYERS} layers (induction heads need two: Olsson et al. 2022) and d_model ≥ {MIN_D_MODEL}, "
                 "the vocabulary from Tao et al. 2024's law, and the budget buys the tokens of that shape"),
    }


def _fpt(req: PlanRequest, shape: ModelShape) -> float:
    """Training FLOPs per token of the window for the run's objective (`Objective.flops_per_token`)."""
    return req.objective.flops_per_token(shape, req.seq_len)


def _probe(req: PlanRequest, shape: ModelShape) -> dict:
    """Tokens/s of ``shape`` itself on this machine (hardware.measure_shape_throughput), reused from an earlier
    plan when it measured the same shape and batch on the same machine."""
    key = {"machine": machine_id(), "model": shape.as_dict(), "seq_len": req.seq_len, "micro_batch": req.micro_batch}
    old = req.shape_probe
    if old and all(old.get(k) == v for k, v in key.items()):
        return old
    req.shape_probe = {**key, **hardware.measure_shape_throughput(shape, req.seq_len, req.micro_batch)}
    return req.shape_probe


def _calibrate(law: laws.Law, req: PlanRequest, compute: dict, shape: ModelShape):
    """A CPU time budget is spent at the speed of the shape that will train, not the generic probe's: measure
    that shape (the config's fixed one, else the plan's), re-size the plan at its FLOP/s, and measure again if
    the shape moved."""
    fixed = _fixed_shape(req, shape)
    if fixed is not None:  # the config's shape trains: its speed prices the run (see _run)
        compute["shape_probe"] = _probe(req, fixed)
        return law.optimal_params(compute["flops"]), compute["flops"] / (6.0 * law.optimal_params(compute["flops"])), \
            shape
    n, d = law.optimal_params(compute["flops"]), None
    for _ in range(2):
        probe = _probe(req, shape)
        compute["shape_probe"] = probe
        compute["hardware_flops_per_s"] = probe["flops_per_s"] * req.gpus
        n, d, new = _size(law, req, compute)
        if new == shape:
            break
        shape = new
    return n, d, shape


def _fixed_shape(req: PlanRequest, planned: ModelShape) -> ModelShape | None:
    """The shape the config fixes (model.d_model / n_layers / …), completed from the plan like the trainer does
    (model.resolve_shape): heads and ffn from the plan only at the plan's width."""
    f = req.fixed_model
    if not any(f.get(k) for k in ("d_model", "n_layers")):
        return None
    d = f.get("d_model") or planned.d_model
    v = req.vocab_size or planned.vocab_size
    default = make_shape(d, f.get("n_layers") or planned.n_layers, v, req.tie_embeddings)
    same = d == planned.d_model
    heads = f.get("n_heads") or (same and planned.n_heads) or default.n_heads
    return ModelShape(default.n_layers, d, heads, f.get("n_kv_heads") or (same and planned.n_kv_heads) or heads,
                      f.get("ffn_dim") or (same and planned.ffn_dim) or ffn_for(d), v, req.tie_embeddings)


def _run(req: PlanRequest, law: laws.Law, compute: dict, shape: ModelShape, d_opt: float, weights, limits) -> dict:
    """What `domainlm train` will train from this plan — the plan's shape and tokens unless the config fixes
    them — with each override, its reason, and the training time it should take."""
    fixed = _fixed_shape(req, shape)
    run_shape = fixed or shape
    overrides = []
    if fixed is not None and fixed != shape:
        emb = shape.params_embedding / shape.params_total
        why = "the config fixes the model shape (model section)"
        if emb > 0.5:
            why += (f"; the plan's shape ({shape.params_total:,} params) is {emb:.0%} embeddings at vocab "
                    f"{shape.vocab_size}, too small a transformer to learn much")
        overrides.append({"what": "model", "plan": f"{shape.n_layers} layers × d_model {shape.d_model} "
                          f"({shape.params_total:,} params)", "run": f"{fixed.n_layers} layers × d_model "
                          f"{fixed.d_model} ({req.objective.params(fixed):,} params)", "reason": why})
    fpt = _fpt(req, run_shape)
    rate = compute.get("hardware_flops_per_s")  # FLOP/s this plan trains at: measured on CPU, MFU-assumed on GPU
    tokens_per_s = rate / fpt if rate else None
    probe = compute.get("shape_probe")
    if probe and probe["model"] == run_shape.as_dict():
        tokens_per_s = probe["tokens_per_s"] * req.gpus  # measured on this very shape
    seconds = req.hours * 3600.0 if req.hours else None
    if req.fixed_tokens:
        tokens = float(req.fixed_tokens)
        if abs(tokens / d_opt - 1) > 0.01:
            overrides.append({"what": "tokens", "plan": f"{d_opt:,.0f}", "run": f"{tokens:,.0f}",
                              "reason": "the config fixes the token budget (train.max_tokens)"})
    elif fixed is not None and fixed != shape:
        # The budget spent on the fixed shape: the hours at its own speed, else the law's C = 6·N·D.
        tokens = seconds * tokens_per_s if seconds and tokens_per_s else compute["flops"] / (6.0 * fixed.params_total)
        overrides.append({"what": "tokens", "plan": f"{d_opt:,.0f}", "run": f"{tokens:,.0f}",
                          "reason": "the budget spent on the config's model: "
                          + ("the hours at its measured speed" if compute["method"] == "cpu-probe" else
                             "the hours at the assumed MFU" if seconds else "C / (6·N)")})
    else:
        tokens = d_opt
    out = {
        "params": req.objective.params(run_shape),  # the encoder's / encoder-decoder's own count
        "tokens": tokens,
        "model": run_shape.as_dict(),
        "follows_plan": not overrides,
        "overrides": overrides,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_from": ("measured: this shape, this machine" if compute["method"] == "cpu-probe" else
                              f"assumed: MFU {compute['mfu']:.0%} of the datasheet peak" if rate else None),
        "planned_seconds": tokens / tokens_per_s if tokens_per_s else None,
        "budget_seconds": seconds,
    }
    if limits:
        out["sources"], out["effective_tokens"] = _mixture(tokens, weights, limits)
    if seconds and out["planned_seconds"] and abs(out["planned_seconds"] / seconds - 1) > 0.15:
        out["warning"] = (f"the run trains {tokens:,.0f} tokens at {tokens_per_s:,.0f} tokens/s "
                          f"({out['tokens_per_s_from']}): ~{out['planned_seconds']:,.0f} s, not the budget's "
                          f"{seconds:,.0f} s — the config's train.max_tokens decides, not budget.hours")
    return out


def machine_id() -> str:
    """Where a CPU probe was measured: a later plan in the same run directory on the same machine reuses it."""


    return f"{platform.node()}/{platform.machine()}/{os.cpu_count()} cpus/{torch.get_num_threads()} threads"


def _sources(req: PlanRequest) -> tuple[dict[str, float], dict[str, float]]:
    weights = dict(req.weights)
    limits = dict(req.unique_tokens)
    if not weights and limits:
        # No mixture given: sample each source in proportion to its data (every token once).
        total = sum(limits.values())
        weights = {k: v / total for k, v in limits.items()}
    if weights:
        for k, w in weights.items():
            if w < 0 or w > 1:
                raise UserError(f"--weight {k}: expected a weight in [0, 1], got {w:g}")
        total = sum(weights.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            shown = ", ".join(f"{k}={v:g}" for k, v in weights.items())
            raise UserError(f"--weight: weights must sum to 1, got {total:g} ({shown})")
    if limits:
        for k in limits:
            if k not in weights:
                raise UserError(f"--unique-tokens {k}: no source named {k!r} has a weight ({', '.join(weights)})")
        for k, w in weights.items():
            if w > 0 and k not in limits:
                raise UserError(
                    f"--unique-tokens: source {k!r} has a weight but no token count; give --unique-tokens {k}=N"
                )
    return weights, limits


def _mixture(tokens: float, weights: dict[str, float], limits: dict[str, float]) -> tuple[dict, float]:
    rows, effective = {}, 0.0
    for k, w in weights.items():
        t = w * tokens
        u = limits.get(k)
        eff = laws.effective_tokens(u, t) if u else t
        effective += eff
        rows[k] = {
            "weight": w,
            "tokens": t,
            "unique_tokens": u,
            "epochs": (t / u) if u else None,
            "effective_tokens": eff,
        }
    if not weights:
        effective = tokens
    return rows, effective


def _loss(law: laws.Law, shape: ModelShape, n: float, d: float) -> float | None:
    if law.has_loss:
        return law.loss(n, d)
    if law.name == "kaplan":
        return laws.kaplan_loss(shape.params_non_embedding, d)
    return None


STAND_IN_LAW = "epoch-2024"  # fitted to the same models as approaches 1 and 2, and agreeing with them (a ≈ 0.51)


def loss_law(law: laws.Law) -> tuple[laws.Law, Callable[[float, float], float], str]:
    """The L(N, D) the data-constrained numbers use, and a sentence saying which: the law's own (approach-3
    form, a fitted law, Kaplan's eq. 1.5 in non-embedding N), else Besiroglu et al. 2024's refit of approach 3 on
    the same Chinchilla models — stated, never silent (`stand_in_shift` says how much that alone moves N)."""
    if law.has_loss:
        return law, law.loss, f"{law.name}'s own L(N, D)"
    if law.name == "kaplan":
        return law, laws.kaplan_loss, "Kaplan et al. 2020 eq. 1.5 L(N, D) (non-embedding N, WebText2 nats/token)"
    e = laws.LAWS[STAND_IN_LAW]
    return e, e.loss, f"{law.name} has no loss formula: {STAND_IN_LAW}'s L(N, D) (Besiroglu et al. 2024) stands in"


def stand_in_shift(law: laws.Law, flops: float) -> str | None:
    """For a law without a loss formula: how much the stand-in alone moves the answer — its unconstrained optimum
    at this budget against the law's (the part of a data-constrained change that is the formula, not the data)."""
    ll, _, _ = loss_law(law)
    if ll is law:
        return None
    own, other = law.optimal_params(flops), ll.optimal_params(flops)
    return (f"{law.name} has no loss formula, so {ll.name}'s L(N, D) stands in for the data-constrained numbers; "
            f"that alone moves the unconstrained optimum at {flops:.3g} FLOPs from {human(own)} to {human(other)} "
            f"params ({other / own - 1:+.1%}) — compare the data-constrained optimum with {human(other)}")


def unique_tokens_seen(tokens: float, weights: dict[str, float], limits: dict[str, float]) -> float:
    """U_D of a mixture: the distinct tokens a run of ``tokens`` sees, Σ_k min(w_k·D, U_k) (a source without a
    limit is never repeated). For one source with D ≥ U it is U, Muennighoff's U_D."""
    return sum(min(w * tokens, limits[k]) if limits.get(k) else w * tokens for k, w in weights.items() if w > 0)


def data_constrained(law: laws.Law, n: float, d: float, weights: dict[str, float], limits: dict[str, float]) -> dict:
    """Muennighoff et al. 2023 (arXiv 2305.16264) eq. 5–7 for N params on D tokens: L(N', D') with
    D' the effective data (repeated tokens decay with R*_D) and N' the effective parameters (parameters beyond
    U_N, the compute-optimal size for the U_D unique tokens, decay with R*_N)."""
    ll, loss_fn, which = loss_law(law)
    rows, d_eff = _mixture(d, weights, limits)
    u_d = unique_tokens_seen(d, weights, limits)
    u_n = ll.params_for_tokens(u_d)
    n_eff = laws.effective_params(u_n, n)
    epochs = [r["epochs"] for r in rows.values() if r["epochs"] is not None]
    return {
        "loss_law": ll.name,
        "loss_law_note": which,
        "unique_tokens": u_d,  # U_D
        "unique_params": u_n,  # U_N
        "effective_params": n_eff,  # N'
        "effective_tokens": d_eff,  # D'
        "epochs": d / u_d,  # D / U_D over the mixture
        "max_source_epochs": max(epochs) if epochs else None,
        "loss": loss_fn(n_eff, d_eff),  # L(N', D')
    }


def _option(name, description, law, req, flops, n, d, weights, limits) -> dict:
    shape = shape_for(law, req, n)
    rows, eff = _mixture(d, weights, limits)
    out = {
        "name": name,
        "description": description,
        "params": n,
        "tokens": d,
        "tokens_per_param": d / n,
        "compute_flops": flops,
        "predicted_loss": _loss(law, shape, n, d),
        "effective_tokens": eff,
        "sources": rows,
        "model": {"n_layers": shape.n_layers, "d_model": shape.d_model, "params_total": shape.params_total},
    }
    if limits:
        out["data_constrained"] = data_constrained(law, n, d, weights, limits)
    return out


def _alternatives(law, req, flops, n_opt, d_opt, weights, limits, rows) -> list[dict]:
    alts = [
        _option(
            "rule-of-thumb-20",
            "~20 tokens per parameter (Chinchilla's rule of thumb): N = sqrt(C / 120)",
            law,
            req,
            flops,
            math.sqrt(flops / (6 * TOKENS_PER_PARAM_RULE)),
            math.sqrt(flops / (6 * TOKENS_PER_PARAM_RULE)) * TOKENS_PER_PARAM_RULE,
            weights,
            limits,
        )
    ]
    if not limits:
        return alts
    limited = [k for k, r in rows.items() if r["epochs"] and r["epochs"] > 1.0]
    if limited:
        # BloombergGPT (Wu et al. 2023, §3): data-limited, they took the largest model that sees all their
        # tokens about once, keeping ~30% of the compute as a buffer.
        d_once = min(limits[k] / w for k, w in weights.items() if w > 0)
        usable = flops * (1.0 - req.buffer)
        alts.append(
            _option(
                "bloomberggpt",
                f"BloombergGPT's choice: every unique token about once ({human(d_once)} tokens), the largest model "
                f"that fits {1 - req.buffer:.0%} of the compute ({req.buffer:.0%} kept as buffer)",
                law,
                req,
                usable,
                usable / (6.0 * d_once),
                d_once,
                weights,
                limits,
            )
        )
        warning = _check_bloomberggpt(alts[-1])
        alts[-1]["outside_range"] = warning is not None
        if warning:
            alts[-1]["warning"] = warning
    # A lower domain weight: cap each over-repeated domain source at 4 epochs, give the rest to general text.
    over = {
        k: r
        for k, r in rows.items()
        if req.roles.get(k, "domain") == "domain" and r["epochs"] and r["epochs"] > laws.MAX_USEFUL_EPOCHS
    }
    general = [k for k in weights if req.roles.get(k) == "general"]
    if over and general:
        new = dict(weights)
        for k in over:
            new[k] = laws.MAX_USEFUL_EPOCHS * limits[k] / d_opt
        rest = 1.0 - sum(new[k] for k in weights if k not in general)
        g_total = sum(weights[k] for k in general)
        for k in general:
            new[k] = rest * (weights[k] / g_total if g_total else 1.0 / len(general))
        shown = ", ".join(f"{k}={v:.3f}" for k, v in new.items())
        alt = _option(
            "lower-domain-weight",
            f"keep the compute-optimal model but cap domain repetition at 4 epochs: weights {shown}",
            law,
            req,
            flops,
            n_opt,
            d_opt,
            new,
            limits,
        )
        alt["weights"] = new
        alts.append(alt)
    if limited:
        alts.append(_data_constrained_optimum(law, req, flops, n_opt, weights, limits))
    return alts


def _data_constrained_optimum(law, req, flops, n_opt, weights, limits) -> dict:
    """Minimise L(N', D') over N with D = C / 6N (Muennighoff et al. 2023 §6: with repeated data, the optimum
    spends compute on more epochs rather than on parameters the unique data cannot use)."""

    def objective(log_n: float) -> float:
        n = math.exp(log_n)
        return data_constrained(law, n, flops / (6.0 * n), weights, limits)["loss"]

    x0 = math.log(n_opt)
    res = minimize_scalar(objective, bounds=(x0 - 8, x0 + 8), method="bounded", options={"xatol": 1e-7})
    n_dc = math.exp(res.x)
    alt = _option("data-constrained-optimum", "", law, req, flops, n_dc, flops / (6.0 * n_dc), weights, limits)
    dc = alt["data_constrained"]
    alt["description"] = (
        f"minimises L(N', D') (Muennighoff et al. 2023) with {dc['loss_law_note']}: repeated tokens decay with "
        f"R*_D = {laws.MUENNIGHOFF_R_D:.2f}, parameters beyond U_N = {human(dc['unique_params'])} (compute-optimal for "
        f"the {human(dc['unique_tokens'])} unique tokens) with R*_N = {laws.MUENNIGHOFF_R_N:.2f}; "
        f"N' = {human(dc['effective_params'])}, D' = {human(dc['effective_tokens'])}, {dc['epochs']:.1f} epochs"
    )
    alt["loss_law"] = dc["loss_law"]
    return alt


def _check_bloomberggpt(alt: dict) -> str | None:
    """BloombergGPT's heuristic (the largest model that sees every token once) is only meaningful while the
    model is not far beyond what the unique data can use: Muennighoff's excess parameters are each worth
    exp(−R_N/R*_N) of a useful one, under 37% once N > U_N·(1 + R*_N). The paper's own choice (50.6B params; U_N
    = 37.3B for its 708B unique tokens with epoch-2024's L(N, D), 9.85B with chinchilla-3's) sits inside."""
    dc = alt.get("data_constrained")
    if dc is None:
        return None
    limit = dc["unique_params"] * (1.0 + laws.MUENNIGHOFF_R_N)
    if alt["params"] <= limit:
        return None
    return (
        f"the bloomberggpt alternative ({human(alt['params'])} params on {human(alt['tokens'])} tokens, "
        f"{alt['tokens_per_param']:.2g} tokens/param) is outside the range where its heuristic means anything: it is "
        f"{alt['params'] / dc['unique_params']:,.0f}× U_N = {human(dc['unique_params'])}, the compute-optimal size for "
        f"its {human(dc['unique_tokens'])} unique tokens; parameters beyond U_N·(1 + R*_N) = {human(limit)} are each "
        f"worth < 37% of a useful one (Muennighoff et al. 2023), and its effective size N' is "
        f"{human(dc['effective_params'])} — not a recommendation"
    )


def make_plan(req: PlanRequest) -> dict:
    law = laws.get_law(req.law)
    if req.vocab_size is not None and req.vocab_size < 256:
        raise UserError(f"--vocab-size: expected ≥ 256 (every byte needs a token), got {req.vocab_size}")
    compute = _compute(req)
    weights, limits = _sources(req)
    if req.base is not None:
        return _continued(req, law, compute, weights, limits)
    n_opt, d_opt, shape = _size(law, req, compute)
    if compute["method"] == "cpu-probe":
        n_opt, d_opt, shape = _calibrate(law, req, compute, shape)
    count = "non-embedding" if law.params_counted == "non-embedding" else "total"
    shape_n = shape.params_total if count == "total" else shape.params_non_embedding
    small = _small_scale(law, n_opt, d_opt, shape, count)
    if small:  # the rule's shape trains, on the tokens the budget buys for it
        n_opt = float(shape_n)
        if compute["method"] == "flops":
            d_opt = compute["flops"] / (6.0 * n_opt)
        else:  # a time budget: the seconds at this shape's cost per token
            d_opt = req.hours * 3600.0 * compute["hardware_flops_per_s"] / _fpt(req, shape)
            compute["flops"] = 6.0 * n_opt * d_opt
    flops = compute["flops"]
    rows, effective = _mixture(d_opt, weights, limits)
    fpt = _fpt(req, shape)
    compute["hardware_flops"] = d_opt * fpt
    warnings: list[str] = []
    notes = [
        f"{law.name} counts {law.params_counted} parameters ({law.source}).",
        f"FLOPs per token = 6·N_matmul + 12·L·d·T = {fpt:.4g} at seq_len {req.seq_len} (PaLM appendix B): the "
        "hardware cost of a token, used for hours; the laws' budget is C = 6·N·D "
        f"({flops:.4g} here, {d_opt * fpt:.4g} hardware FLOPs).",
    ]
    notes += req.objective.plan_notes()
    if small:
        warnings.append(
            f"below the range {law.name} was fitted on ({human(small['fitted_params'][0])}–"
            f"{human(small['fitted_params'][1])} {count} params): its optimum at {flops:.3g} FLOPs, "
            f"{human(small['law_params'])} params on {human(small['law_tokens'])} tokens, is an extrapolation "
            f"{small['fitted_params'][0] / small['law_params']:,.0f}× below its smallest model, and so would be its "
            "loss (none is shown); the plan trains the small-scale rule's shape on the tokens the budget buys for it"
        )
        notes.append(f"small-scale rule: {small['rule']}.")
    if abs(shape_n / n_opt - 1) > 0.05:
        cap = largest_params(shape.vocab_size, count=count, tie_embeddings=req.tie_embeddings)
        if n_opt > cap:
            why = (f"the target is beyond the shape search's cap ({MAX_LAYERS} layers × d_model {MAX_D_MODEL}, at "
                   f"most {cap:.4g} {count} params): the plan uses the largest shape it builds")
        elif shape_n > n_opt:
            why = f"at this size the vocabulary ({shape.vocab_size}) dominates; use a smaller vocab"
        else:
            why = "no shape of the search's family comes closer"
        warnings.append(
            f"model shape has {shape_n:.4g} {count} params, {abs(shape_n / n_opt - 1):.0%} from the target "
            f"{n_opt:.4g}: {why}"
        )
    emb_share = shape.params_embedding / shape.params_total
    if emb_share > 0.5:
        warnings.append(
            f"embeddings are {emb_share:.0%} of the parameters (vocab {shape.vocab_size}, d_model {shape.d_model}); "
            "the laws were fitted on models where they are a small share"
        )
    for k, r in rows.items():
        if r["epochs"] and r["epochs"] > laws.MAX_USEFUL_EPOCHS:
            warnings.append(
                f"source {k!r} would be repeated {r['epochs']:.1f} epochs (> 4): beyond ~4 epochs repeated data "
                f"is worth much less than new data (Muennighoff et al. 2023); its {human(r['tokens'])} tokens are "
                f"worth ~{human(r['effective_tokens'])} new ones — see the alternatives"
            )
    voc = vocabulary(law, req, shape, flops)
    if req.vocab_size and abs(voc["recommended"] / req.vocab_size - 1) > 0.25:
        notes.append(f"tokenizer.vocab_size {req.vocab_size} is fixed by the config; Tao et al. 2024's law recommends "
                     f"{voc['recommended']} for this shape ({human(shape.params_non_embedding)} non-vocabulary "
                     f"params, d_model {shape.d_model}) at {flops:.3g} FLOPs.")
    if law.has_loss and not small:
        notes.append("predicted_loss is nats/token on the law's own data and tokenizer, not on your corpus.")
    elif law.name == "kaplan" and not small:
        notes.append("predicted_loss: Kaplan eq. 1.5, nats/token on WebText2 with GPT-2's tokenizer.")

    run = _run(req, law, compute, shape, d_opt, weights, limits)
    gpu_hours = None
    if compute.get("peak_flops_per_gpu"):
        gpu_hours = d_opt * fpt / (compute["peak_flops_per_gpu"] * compute["mfu"]) / 3600.0
    elif compute["method"] == "cpu-probe":
        gpu_hours = d_opt * fpt / (compute["hardware_flops_per_s"] / req.gpus) / 3600.0
        probe = compute.get("shape_probe") or {}
        notes.append(f"cpu: the generic probe measured {compute['measured_flops_per_s'] / 1e9:.1f} GFLOP/s; the "
                     f"shape that trains, {(probe.get('flops_per_s') or 0) / 1e9:.1f} GFLOP/s "
                     f"({probe.get('tokens_per_s') or 0:,.0f} tokens/s, fp32) — the plan uses the latter.")

    memory = _plan_memory(req, compute, shape, shape.params_total, warnings)

    alternatives = _alternatives(law, req, flops, n_opt, d_opt, weights, limits, rows)
    warnings += [a["warning"] for a in alternatives if a.get("warning")]
    for o in run["overrides"]:
        warnings.append(f"this run does not follow the plan's {o['what']}: {o['run']} instead of {o['plan']} "
                        f"— {o['reason']}")
    if run.get("warning"):
        warnings.append(run["warning"])
    if limits:
        ll, _, which = loss_law(law)
        notes.append(f"data-constrained numbers (U_N, N', D', L(N', D')) use {which}.")
        shift = stand_in_shift(law, flops)
        if shift:
            notes.append(shift + ".")
    out = {
        "run": run,
        "compute_flops": flops,
        "compute": compute,
        "law": {"name": law.name, "source": law.source, "params_counted": law.params_counted, **law.constants()},
        "params": n_opt,
        "tokens": d_opt,
        "tokens_per_param": d_opt / n_opt,
        "predicted_loss": None if small else _loss(law, shape, n_opt, d_opt),
        "model": {
            "n_layers": shape.n_layers,
            "d_model": shape.d_model,
            "n_heads": shape.n_heads,
            "n_kv_heads": shape.n_kv_heads,
            "head_dim": shape.head_dim,
            "ffn_dim": shape.ffn_dim,
            "vocab_size": shape.vocab_size,
            "tie_embeddings": shape.tie_embeddings,
            "params_non_embedding": shape.params_non_embedding,
            "params_total": shape.params_total,
        },
        "seq_len": req.seq_len,
        "flops_per_token": fpt,
        "sources": rows,
        "effective_tokens": effective,
        "gpu_hours": gpu_hours,
        "memory": memory,
        "warnings": warnings,
        "alternatives": alternatives,
        "notes": notes,
        "vocabulary": voc,
    }
    if small:
        out["small_scale"] = small
    if limits:
        out["data_constrained"] = data_constrained(law, n_opt, d_opt, weights, limits)
    if small:  # no loss below the fitted range, in the plan or its alternatives
        for part in [out, *alternatives]:
            part["predicted_loss"] = None
            if part.get("data_constrained"):
                part["data_constrained"]["loss"] = None
    return out


def _continued(req: PlanRequest, law: laws.Law, compute: dict, weights: dict, limits: dict) -> dict:
    """The plan of continued pretraining (``train.init_from``): the model is the base, so N is its parameter count
    and the budget buys tokens only — D = C / (6·N) (the laws' C = 6·N·D), with nothing subtracted for the base's
    own pretraining (paid before this run; the law's compute-optimal split does not apply to a model whose size is
    given). A time budget buys D = seconds × FLOP/s ÷ the base's FLOPs per token (PaLM's count, attention
    included), and C = 6·N·D. On a CPU the rate is the base's own training speed measured on this machine."""
    b = req.base
    n = float(b["params"])
    fpt = float(b["flops_per_token"])
    m = b["model"]
    shape = ModelShape(m["n_layers"], m["d_model"], m["n_heads"], m["n_kv_heads"], m["ffn_dim"], m["vocab_size"],
                       m["tie_embeddings"])
    seconds = req.hours * 3600.0 if req.hours else None
    if b.get("max_positions") and req.seq_len > b["max_positions"]:
        raise UserError(f"train.seq_len: {req.seq_len} is longer than the base model's context {b['max_positions']} "
                        f"(train.init_from {b['path']})")
    if compute["method"] == "cpu-probe":  # the base itself on this machine: a generic probe is not its speed
        probe = _base_probe(req, shape)
        compute["shape_probe"] = probe
        compute["hardware_flops_per_s"] = probe["tokens_per_s"] * req.gpus * fpt
    rate = compute.get("hardware_flops_per_s")  # measured on CPU, MFU-assumed on GPU; None for a FLOPs budget
    if compute["method"] == "flops":
        d = compute["flops"] / (6.0 * n)
    else:
        d = seconds * rate / fpt
        compute["flops"] = 6.0 * n * d
    compute["hardware_flops"] = d * fpt
    warnings: list[str] = []
    overrides = []
    tokens = d
    if req.fixed_tokens:
        tokens = float(req.fixed_tokens)
        if abs(tokens / d - 1) > 0.01:
            overrides.append({"what": "tokens", "plan": f"{d:,.0f}", "run": f"{tokens:,.0f}",
                              "reason": "the config fixes the token budget (train.max_tokens)"})
            warnings.append(f"this run does not follow the plan's tokens: {tokens:,.0f} instead of {d:,.0f} — the "
                            "config fixes the token budget (train.max_tokens)")
    rows, effective = _mixture(tokens, weights, limits)
    for k, r in rows.items():
        if r["epochs"] and r["epochs"] > laws.MAX_USEFUL_EPOCHS:
            warnings.append(f"source {k!r} would be repeated {r['epochs']:.1f} epochs (> 4): beyond ~4 epochs "
                            "repeated data is worth much less than new data (Muennighoff et al. 2023)")
    tokens_per_s = rate / fpt if rate else None
    gpu_hours = None
    if compute.get("peak_flops_per_gpu"):
        gpu_hours = d * fpt / (compute["peak_flops_per_gpu"] * compute["mfu"]) / 3600.0
    elif compute["method"] == "cpu-probe":
        gpu_hours = d * fpt / (rate / req.gpus) / 3600.0
    emb = shape.vocab_size * shape.d_model * (1 if shape.tie_embeddings else 2)
    model = {**{k: m[k] for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                                   "tie_embeddings")},
             "params_non_embedding": int(n) - emb, "params_total": int(n), "architecture": b["architecture"]}
    continued = {
        "init_from": b["path"], "architecture": b["architecture"], "params": int(n), "fingerprint": b["fingerprint"],
        "tokens": d, "compute_flops": compute["flops"],
        "how": (f"N fixed to the base model ({b['architecture']}, {human(n)} params); tokens = C / (6·N) = "
                f"{compute['flops']:.3g} / (6 × {human(n)}) = {human(d)} — minus nothing: the base's own "
                "pretraining is not charged to this budget"),
    }
    run = {"params": int(n), "tokens": tokens, "model": model, "follows_plan": not overrides, "overrides": overrides,
           "tokens_per_s": tokens_per_s,
           "tokens_per_s_from": ("measured: the base model, this machine" if compute["method"] == "cpu-probe"
                                 else f"assumed: MFU {compute['mfu']:.0%} of the datasheet peak" if rate else None),
           "planned_seconds": tokens / tokens_per_s if tokens_per_s else None, "budget_seconds": seconds}
    if limits:
        run["sources"], run["effective_tokens"] = rows, effective
    return {
        "run": run,
        "continued": continued,
        "compute_flops": compute["flops"],
        "compute": compute,
        "law": {"name": law.name, "source": law.source, "params_counted": law.params_counted, **law.constants()},
        "params": n,
        "tokens": d,
        "tokens_per_param": d / n,
        "predicted_loss": None,  # the laws predict a model trained from scratch, not one continued
        "model": model,
        "seq_len": req.seq_len,
        "flops_per_token": fpt,
        "sources": rows,
        "effective_tokens": effective,
        "gpu_hours": gpu_hours,
        "memory": _plan_memory(req, compute, shape, n, warnings),
        "warnings": warnings,
        "alternatives": [],
        "notes": [f"continued pretraining from {b['path']}: {continued['how']}.",
                  f"FLOPs per token = 6·N_matmul + 12·L·d·T = {fpt:.4g} at seq_len {req.seq_len} (PaLM appendix B), "
                  "N_matmul from the base's exact parameter count.",
                  f"the scaling law ({law.name}) does not size the model here; its compute-optimal split is for "
                  "training from scratch."],
    }


def _base_probe(req: PlanRequest, shape: ModelShape) -> dict:
    """Training tokens/s of the base model itself on this machine (`hardware.measure_shape_throughput` with the
    loaded base), reused from an earlier plan of the same base, batch and machine."""
    b = req.base
    key = {"machine": machine_id(), "base": b["fingerprint"], "seq_len": req.seq_len, "micro_batch": req.micro_batch}
    old = req.shape_probe
    if old and all(old.get(k) == v for k, v in key.items()):
        return old

    model = load_base_model(resolve_base(b["path"]))
    req.shape_probe = {**key, **hardware.measure_shape_throughput(shape, req.seq_len, req.micro_batch, model=model)}
    return req.shape_probe


def _plan_memory(req: PlanRequest, compute: dict, shape: ModelShape, params: float, warnings: list[str]) -> dict:
    """Memory per GPU of training ``shape`` (``params`` parameters): on a GPU budget the least sharding that
    fits (with activation checkpointing if nothing fits without), appending to ``warnings`` when nothing does."""
    mem_kwargs = dict(
        params=params,
        optimizer="adamw",
        gpus=req.gpus,
        seq_len=req.seq_len,
        micro_batch=req.micro_batch,
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        vocab_size=shape.vocab_size,
        n_heads=shape.n_heads,
        n_kv_heads=shape.n_kv_heads,
        ffn_dim=shape.ffn_dim,
    )
    checkpointing = False
    if compute.get("gpu") and compute["gpu"] != "cpu":
        acc = get_accelerator(compute["gpu"])
        rec, ests = recommend(acc.memory_gb, precision="bf16-mixed", **mem_kwargs)
        est = ests[rec or "zero3"]
        if rec is None:  # the trainer recomputes activations per layer (train.activation_checkpointing)
            rec, ests = recommend(acc.memory_gb, precision="bf16-mixed", activation_checkpointing=True, **mem_kwargs)
            if rec is not None:
                warnings.append(
                    f"even ZeRO-3 over {req.gpus} GPU(s) needs {est.total_gb:.1f} GB of {acc.memory_gb:g} GB; with "
                    f"activation checkpointing {rec} needs {ests[rec].total_gb:.1f} GB: set "
                    "train.activation_checkpointing: true (~1/3 more compute: one more forward pass)"
                )
                est, checkpointing = ests[rec], True
            else:
                est = ests["zero3"]
                fix = "use more GPUs or a smaller micro-batch"
                if est.activations_gb <= acc.memory_gb:  # the states are what does not fit: offload them
                    states_gb = est.total_gb - est.activations_gb
                    fix = (f"use more GPUs, or train.cpu_offload: true (FSDP keeps the {states_gb:.1f} GB of sharded "
                           "states in host memory; the GPU keeps the activations)")
                warnings.append(f"even ZeRO-3 over {req.gpus} GPU(s) with activation checkpointing needs "
                                f"{est.total_gb:.1f} GB of {acc.memory_gb:g} GB: {fix}")
        memory = _mem_dict(est, acc.memory_gb, rec)
    else:
        est = estimate(precision="fp32", sharding="ddp", **mem_kwargs)
        memory = _mem_dict(est, None, None)
    memory["activation_checkpointing"] = checkpointing
    return memory


def _mem_dict(est: MemoryEstimate, capacity_gb: float | None, rec: str | None) -> dict:
    return {
        "precision": est.precision,
        "sharding": est.sharding,
        "gpus": est.gpus,
        "weights_gb": est.weights_gb,
        "grads_gb": est.grads_gb,
        "optimizer_gb": est.optimizer_gb,
        "activations_gb": est.activations_gb,
        "total_gb": est.total_gb,
        "capacity_gb": capacity_gb,
        "fits": None if capacity_gb is None else est.total_gb <= capacity_gb,
        "recommended_sharding": rec,
    }
