"""`domainlm plan`: compute budget → model size, token budget, model shape, data epochs, GPU-hours, memory."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from domainlm.errors import UserError
from domainlm.plan import laws as L
from domainlm.plan import memory as M
from domainlm.plan.hardware import DEFAULT_MFU, get_accelerator, measure_cpu_flops
from domainlm.plan.shape import ModelShape, shape_for_params
from domainlm.units import human

TOKENS_PER_PARAM_RULE = 20.0  # Chinchilla's rule of thumb: ~20 training tokens per parameter


@dataclass
class PlanRequest:
    """Everything `domainlm plan` needs; flags and the config's `budget` section both fill it."""

    flops: float | None = None
    gpu: str | None = None
    gpus: int = 1
    hours: float | None = None
    mfu: float | None = None
    law: str = "chinchilla-3"
    weights: dict[str, float] = field(default_factory=dict)
    unique_tokens: dict[str, float] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # source -> "domain" | "general"
    vocab_size: int = 32768
    seq_len: int = 2048
    micro_batch: int = 1
    tie_embeddings: bool = False
    buffer: float = 0.3  # compute kept in reserve by the BloombergGPT alternative
    cpu_flops_per_s: float | None = None  # measured once and reused (tests inject it)


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
            "flops": flops_per_s * req.gpus * req.hours * 3600.0,
        }
    acc = get_accelerator(req.gpu)
    mfu = req.mfu or DEFAULT_MFU
    flops = acc.bf16_flops * mfu * req.gpus * req.hours * 3600.0
    return {
        "method": "gpu",
        "gpu": acc.name,
        "gpus": req.gpus,
        "hours": req.hours,
        "mfu": mfu,
        "peak_flops_per_gpu": acc.bf16_flops,
        "flops": flops,
    }


def machine_id() -> str:
    """Where a CPU probe was measured: a later plan in the same run directory on the same machine reuses it."""
    import platform

    import torch

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
        eff = L.effective_tokens(u, t) if u else t
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


def _loss(law: L.Law, shape: ModelShape, n: float, d: float) -> float | None:
    if law.has_loss:
        return law.loss(n, d)
    if law.name == "kaplan":
        return L.kaplan_loss(shape.params_non_embedding, d)
    return None


def _option(name, description, law, req, flops, n, d, weights, limits) -> dict:
    count = "non-embedding" if law.params_counted == "non-embedding" else "total"
    shape = shape_for_params(n, req.vocab_size, count=count, tie_embeddings=req.tie_embeddings)
    rows, eff = _mixture(d, weights, limits)
    return {
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
    # A lower domain weight: cap each over-repeated domain source at 4 epochs, give the rest to general text.
    over = {
        k: r
        for k, r in rows.items()
        if req.roles.get(k, "domain") == "domain" and r["epochs"] and r["epochs"] > L.MAX_USEFUL_EPOCHS
    }
    general = [k for k in weights if req.roles.get(k) == "general"]
    if over and general:
        new = dict(weights)
        for k in over:
            new[k] = L.MAX_USEFUL_EPOCHS * limits[k] / d_opt
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
    # Data-constrained optimum: minimise L(N, D') where D' is Muennighoff's effective data for D = C/6N.
    loss_law = law if law.has_loss else L.LAWS["chinchilla-3"]
    if limited:
        from scipy.optimize import minimize_scalar

        def objective(log_n: float) -> float:
            n = math.exp(log_n)
            _, eff = _mixture(flops / (6.0 * n), weights, limits)
            return loss_law.loss(n, eff)

        res = minimize_scalar(objective, bounds=(math.log(n_opt) - 5, math.log(n_opt) + 5), method="bounded")
        n_dc = math.exp(res.x)
        alt = _option(
            "data-constrained-optimum",
            f"minimises {loss_law.name}'s L(N, D') with D' = Muennighoff et al. 2023 effective data "
            "(repeated tokens decay with R*_D = 15.4)",
            loss_law,
            req,
            flops,
            n_dc,
            flops / (6.0 * n_dc),
            weights,
            limits,
        )
        alts.append(alt)
    return alts


def make_plan(req: PlanRequest) -> dict:
    law = L.get_law(req.law)
    if req.vocab_size < 256:
        raise UserError(f"--vocab-size: expected ≥ 256 (every byte needs a token), got {req.vocab_size}")
    compute = _compute(req)
    flops = compute["flops"]
    weights, limits = _sources(req)
    n_opt, d_opt = law.optimal(flops)
    count = "non-embedding" if law.params_counted == "non-embedding" else "total"
    shape = shape_for_params(n_opt, req.vocab_size, count=count, tie_embeddings=req.tie_embeddings)
    shape_n = shape.params_total if count == "total" else shape.params_non_embedding
    rows, effective = _mixture(d_opt, weights, limits)
    fpt = shape.flops_per_token(req.seq_len)
    warnings: list[str] = []
    notes = [
        f"{law.name} counts {law.params_counted} parameters ({law.source}).",
        f"FLOPs per token = 6·N_matmul + 12·L·d·T = {fpt:.4g} at seq_len {req.seq_len} (PaLM appendix B); "
        "the laws' budgets use C = 6·N·D.",
    ]
    if abs(shape_n / n_opt - 1) > 0.05:
        warnings.append(
            f"model shape has {shape_n:.4g} {count} params, {abs(shape_n / n_opt - 1):.0%} from the target "
            f"{n_opt:.4g}: at this size the vocabulary ({req.vocab_size}) dominates; use a smaller vocab"
        )
    emb_share = shape.params_embedding / shape.params_total
    if emb_share > 0.5:
        warnings.append(
            f"embeddings are {emb_share:.0%} of the parameters (vocab {req.vocab_size}, d_model {shape.d_model}); "
            "the laws were fitted on models where they are a small share"
        )
    for k, r in rows.items():
        if r["epochs"] and r["epochs"] > L.MAX_USEFUL_EPOCHS:
            warnings.append(
                f"source {k!r} would be repeated {r['epochs']:.1f} epochs (> 4): beyond ~4 epochs repeated data "
                f"is worth much less than new data (Muennighoff et al. 2023); its {human(r['tokens'])} tokens are "
                f"worth ~{human(r['effective_tokens'])} new ones — see the alternatives"
            )
    if law.has_loss:
        notes.append("predicted_loss is nats/token on the law's own data and tokenizer, not on your corpus.")
    elif law.name == "kaplan":
        notes.append("predicted_loss: Kaplan eq. 1.5, nats/token on WebText2 with GPT-2's tokenizer.")

    gpu_hours = None
    if compute.get("peak_flops_per_gpu"):
        gpu_hours = d_opt * fpt / (compute["peak_flops_per_gpu"] * compute["mfu"]) / 3600.0
    elif compute["method"] == "cpu-probe":
        gpu_hours = d_opt * fpt / compute["measured_flops_per_s"] / 3600.0
        notes.append(f"cpu: measured {compute['measured_flops_per_s'] / 1e9:.1f} GFLOP/s sustained fp32 training.")

    mem_kwargs = dict(
        params=shape.params_total,
        optimizer="adamw",
        gpus=req.gpus,
        seq_len=req.seq_len,
        micro_batch=req.micro_batch,
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        vocab_size=req.vocab_size,
    )
    if compute.get("gpu") and compute["gpu"] != "cpu":
        acc = get_accelerator(compute["gpu"])
        rec, ests = M.recommend(acc.memory_gb, precision="bf16-mixed", **mem_kwargs)
        est = ests[rec or "zero3"]
        if rec is None:
            warnings.append(
                f"even ZeRO-3 over {req.gpus} GPU(s) needs {est.total_gb:.1f} GB of {acc.memory_gb:g} GB: "
                "use more GPUs, activation checkpointing or a smaller micro-batch"
            )
        memory = _mem_dict(est, acc.memory_gb, rec)
    else:
        est = M.estimate(precision="fp32", sharding="ddp", **mem_kwargs)
        memory = _mem_dict(est, None, None)

    return {
        "compute_flops": flops,
        "compute": compute,
        "law": {"name": law.name, "source": law.source, "params_counted": law.params_counted, **law.constants()},
        "params": n_opt,
        "tokens": d_opt,
        "tokens_per_param": d_opt / n_opt,
        "predicted_loss": _loss(law, shape, n_opt, d_opt),
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
        "alternatives": _alternatives(law, req, flops, n_opt, d_opt, weights, limits, rows),
        "notes": notes,
    }


def _mem_dict(est: M.MemoryEstimate, capacity_gb: float | None, rec: str | None) -> dict:
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
