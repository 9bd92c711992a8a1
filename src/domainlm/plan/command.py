"""Glue between the CLI (strings from flags, the config's `budget`) and the planner / memory model."""

from __future__ import annotations

from pathlib import Path

from domainlm import objectives
from domainlm.config import RunConfig, load_config, write_resolved
from domainlm.errors import UserError
from domainlm.hardware import GPU_KINDS, get_accelerator
from domainlm.memory import estimate, recommend
from domainlm.model.base import resolve_base
from domainlm.outputs import Counts, Mix, Plan
from domainlm.plan.chart import plot_plan
from domainlm.plan.laws import load_fitted
from domainlm.plan.planner import PlanRequest, machine_id, make_plan
from domainlm.rundir import RunDir, load_output, write_json
from domainlm.units import parse_assignments, parse_number


def _int(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    v = parse_number(text, flag)
    if v != int(v):
        raise UserError(f"{flag}: expected a whole number, got {text!r}")
    return int(v)


def measured_unique_tokens(run_dir: Path) -> dict[str, float]:
    """Unique train tokens per source measured by `domainlm tokenize`, if it has run."""
    counts = RunDir(run_dir).load(RunDir.COUNTS, Counts)
    return {k: float(v.train_tokens) for k, v in counts.sources.items()} if counts else {}


def _earlier_compute(run_dir: Path) -> dict:
    """The compute section of an earlier plan of this run ({} if none, or one this version cannot read)."""
    try:
        plan = RunDir(run_dir).load(RunDir.PLAN, Plan)
    except UserError:
        return {}
    return plan.compute if plan else {}


def _cached_cpu_probe(run_dir: Path) -> float | None:
    """The CPU probe measured by an earlier plan of this run on this machine (re-planning with the real token
    counts must not re-size the model because the machine was busier the second time)."""

    compute = _earlier_compute(run_dir)
    if compute.get("method") == "cpu-probe" and compute.get("machine") == machine_id():
        return compute.get("measured_flops_per_s")
    return None


def request_from(cfg: RunConfig | None, **flags) -> PlanRequest:
    """Flags override the config's `budget` section; sources and their limits come from the config."""
    req = PlanRequest()
    if cfg is not None:
        b = cfg.budget
        req.flops, req.gpu, req.gpus, req.hours, req.mfu, req.law = b.flops, b.gpu, b.gpus, b.hours, b.mfu, b.law
        req.buffer = b.buffer
        req.weights = {s.name: s.weight for s in cfg.sources}
        req.roles = {s.name: s.role for s in cfg.sources}
        req.unique_tokens = {s.name: s.unique_tokens for s in cfg.sources if s.unique_tokens}
        measured = measured_unique_tokens(cfg.directory())
        for k, v in measured.items():
            req.unique_tokens.setdefault(k, v)
        req.vocab_size = cfg.tokenizer.vocab_size
        req.seq_len = cfg.train.seq_len
        req.micro_batch = cfg.train.micro_batch
        req.tie_embeddings = cfg.model.tie_embeddings
        req.cpu_flops_per_s = _cached_cpu_probe(cfg.directory())
        req.shape_probe = _earlier_compute(cfg.directory()).get("shape_probe")  # the planner checks its shape
        m = cfg.model
        req.fixed_model = {k: v for k, v in (("d_model", m.d_model), ("n_layers", m.n_layers), ("n_heads", m.n_heads),
                                             ("n_kv_heads", m.n_kv_heads), ("ffn_dim", m.ffn_dim)) if v}
        req.fixed_tokens = cfg.train.max_tokens
        req.objective = objectives.from_config(m)
        if cfg.train.init_from:  # continued pretraining: N is the base model's, the plan sizes the tokens

            base = resolve_base(cfg.train.init_from)
            req.base = {**base.as_dict(), "flops_per_token": base.flops_per_token(req.seq_len)}
            req.vocab_size = base.shape.vocab_size
            req.fixed_model = {}
            base_counts = measured_unique_tokens(RunDir(cfg.directory()).tokens_for(base.path))
            req.unique_tokens = {s.name: s.unique_tokens for s in cfg.sources if s.unique_tokens}
            for k, v in base_counts.items():  # the data limits in the base tokenizer's tokens, once tokenized
                req.unique_tokens.setdefault(k, v)
    if flags.get("flops") is not None:
        req.flops = parse_number(flags["flops"], "--flops")
        if flags.get("hours") is None:
            req.hours = None
    if flags.get("hours") is not None:
        req.hours = parse_number(flags["hours"], "--hours")
        if flags.get("flops") is None:
            req.flops = None
    if flags.get("gpu") is not None:
        if flags["gpu"] not in GPU_KINDS:
            raise UserError(f"--gpu: unknown GPU kind {flags['gpu']!r}; expected one of {', '.join(GPU_KINDS)}")
        req.gpu = flags["gpu"]
    if flags.get("gpus") is not None:
        req.gpus = _int(flags["gpus"], "--gpus")
    if flags.get("mfu") is not None:
        req.mfu = parse_number(flags["mfu"], "--mfu", positive=False)
        if not 0 < req.mfu <= 1:
            raise UserError(f"--mfu: expected a fraction in (0, 1], got {flags['mfu']!r}")
    if flags.get("law") is not None:
        req.law = flags["law"]
    elif cfg is not None and req.law.startswith("fitted:"):

        load_fitted(req.law.removeprefix("fitted:"), origin="budget.law:")  # the error names the config key
    if flags.get("weight"):
        req.weights = parse_assignments(flags["weight"], "--weight", positive=False)
        req.roles = {k: req.roles.get(k, "domain" if i == 0 else "general") for i, k in enumerate(req.weights)}
    if flags.get("unique_tokens"):
        req.unique_tokens = parse_assignments(flags["unique_tokens"], "--unique-tokens")
    if flags.get("vocab_size") is not None:
        req.vocab_size = _int(flags["vocab_size"], "--vocab-size")
    if flags.get("seq_len") is not None:
        req.seq_len = _int(flags["seq_len"], "--seq-len")
    return req


def weights_from(path: Path) -> list[str]:
    """``--weights-from <run>/mix/mix.json``: the weights `domainlm mix` recommends, as ``--weight`` flags."""
    mix = load_output(path, Mix)
    if mix is None:
        raise UserError(f"--weights-from {path}: no such file; run `domainlm mix CONFIG` (it writes "
                        f"<run>/{RunDir.MIX})")
    return [f"{k}={v!r}" for k, v in mix.weights.items()]


def run_plan(config: Path | None, plot: Path | None = None, **flags) -> tuple[dict, list[Path]]:
    cfg = load_config(config) if config is not None else None
    if flags.get("weights_from") is not None:
        if flags.get("weight"):
            raise UserError("--weights-from and --weight: give the mixture one way, not both")
        flags["weight"] = weights_from(Path(flags["weights_from"]))
    req = request_from(cfg, **flags)
    result = make_plan(req)
    written: list[Path] = []
    if cfg is not None:
        run_dir = cfg.directory()
        written.append(write_resolved(cfg, run_dir))
        result["config"] = str(config)
        written.append(write_json(RunDir(run_dir).plan, Plan.checked(result)))

        written.append(plot_plan(result, RunDir(run_dir) / RunDir.PLAN_CHART))
    if plot is not None:

        written.append(plot_plan(result, plot))
    return result, written


def run_memory(**flags) -> dict:
    shape: dict = {}
    if flags.get("model") is not None:  # a model folder: its real shape (config.json) and exact parameter count

        base = resolve_base(flags["model"], key="--model")
        s = base.shape
        shape = {"params": base.params, "n_layers": s.n_layers, "d_model": s.d_model, "vocab_size": s.vocab_size,
                 "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads, "ffn_dim": s.ffn_dim}
    elif flags.get("params") is None:
        raise UserError("--params: give the parameter count (or --model FOLDER to read a model's shape)")
    params = parse_number(flags["params"], "--params") if flags.get("params") is not None else shape["params"]
    gpus = _int(flags["gpus"], "--gpus")
    capacity = None
    if flags.get("gpu_memory_gb") is not None:
        capacity = parse_number(flags["gpu_memory_gb"], "--gpu-memory-gb")
    elif flags.get("gpu") is not None:
        capacity = get_accelerator(flags["gpu"]).memory_gb
    kwargs = dict(
        params=params,
        precision=flags["precision"],
        optimizer=flags["optimizer"],
        gpus=gpus,
        seq_len=_int(flags.get("seq_len"), "--seq-len"),
        micro_batch=_int(flags.get("micro_batch"), "--micro-batch"),
        n_layers=_int(flags.get("n_layers"), "--n-layers") or shape.get("n_layers"),
        d_model=_int(flags.get("d_model"), "--d-model") or shape.get("d_model"),
        vocab_size=_int(flags["vocab_size"], "--vocab-size") if flags.get("vocab_size") is not None else
        shape.get("vocab_size", 32768),
        activation_checkpointing=flags.get("activation_checkpointing", False),
        **{k: shape[k] for k in ("n_heads", "n_kv_heads", "ffn_dim") if k in shape},
    )
    sharding = flags.get("sharding")
    recommended = None
    if sharding is None and capacity is not None:
        recommended, ests = recommend(capacity, **kwargs)
        est = ests[recommended or "zero3"]
    else:
        est = estimate(sharding=sharding or "ddp", **kwargs)
        ests = {est.sharding: est}
        if capacity is not None:
            recommended, ests = recommend(capacity, **kwargs)
    return {
        "params": params,
        "precision": est.precision,
        "optimizer": est.optimizer,
        "sharding": est.sharding,
        "gpus": gpus,
        "weights_gb": est.weights_gb,
        "grads_gb": est.grads_gb,
        "optimizer_gb": est.optimizer_gb,
        "activations_gb": est.activations_gb,
        "activations_method": est.activations_method,
        "total_gb": est.total_gb,
        "bytes_per_param_states": est.bytes_per_param_states,
        "gpu_memory_gb": capacity,
        "fits": None if capacity is None else est.total_gb <= capacity,
        "recommended_sharding": recommended,
        "all_shardings": {k: {"total_gb": v.total_gb, "fits": None if capacity is None else v.total_gb <= capacity}
                          for k, v in ests.items()},
    }
