"""Variants of a run, trained with the run's trainer on the run's token files and tokenizer (nothing is
re-prepared): the general-only baseline of `domainlm run`, the domain weights of `domainlm ablate`, the IsoFLOP
points of `domainlm scaling`. Each trains in its own folder with its own checkpoints, so a killed variant
resumes and a finished one is skipped.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from domainlm.config import RunConfig, write_resolved
from domainlm.data.tokens import load_counts
from domainlm.errors import UserError
from domainlm.model import MODEL_DIR, resolve_shape
from domainlm.model.base import base_of
from domainlm.rundir import RunDir
from domainlm.shape import ModelShape
from domainlm.train.loop import plan_of, planned_tokens, train
from domainlm.train.parallel import distributed


def reweighted(cfg: RunConfig, domain_weight: float) -> dict[str, float]:
    """Source weights with the domain sources sharing ``domain_weight`` (in their configured proportions)
    and the general sources the rest."""
    dom = [s for s in cfg.sources if s.role == "domain"]
    gen = [s for s in cfg.sources if s.role == "general"]
    if not dom:
        raise UserError("sources: no source has role 'domain'; nothing to ablate")
    if not gen and domain_weight < 1:
        raise UserError("sources: no source has role 'general'; only --domain-weights 1 is possible")
    out = {}
    for group, share in ((dom, domain_weight), (gen, 1.0 - domain_weight)):
        total = sum(s.weight for s in group)
        for s in group:
            out[s.name] = share * (s.weight / total if total > 0 else 1.0 / len(group))
    return out


def variant_config(cfg: RunConfig, run_dir: Path, domain_weight: float, *, tokens: float | None = None,
                   seed: int | None = None, folder: Path | None = None) -> RunConfig:
    """The run's config with new weights, the run's shape and budget fixed, and its own directory. A continued
    run's variants (``train.init_from``) continue the same base: its shape, its tokenizer's token files.
    `domainlm mix` gives each variant its own ``tokens`` budget, training ``seed`` and ``folder``; without a
    ``folder``, a ``seed`` other than train.seed trains in ``w<weight>-seed<S>/`` (`domainlm ablate --seeds`)."""
    base = base_of(cfg)
    shape = base.shape if base else resolve_shape(cfg, run_dir, int(load_counts(run_dir)["vocab_size"]))
    budget = tokens or cfg.train.max_tokens or planned_tokens(plan_of(run_dir))
    if budget is None:
        raise UserError("train.max_tokens: no token budget; set it or run `domainlm plan CONFIG` first")
    other = seed is not None and seed != cfg.train.seed
    folder = Path(folder) if folder is not None else RunDir(run_dir).variant(domain_weight, seed=seed if other else None)
    train = {} if seed is None else {"seed": seed}
    return fixed_config(cfg, shape, float(budget), name=f"{cfg.name}-{folder.name}", run_dir=folder,
                        weights=reweighted(cfg, domain_weight), **train)


def fixed_config(cfg: RunConfig, shape: ModelShape, max_tokens: float, *, name: str, run_dir: Path,
                 weights: dict[str, float] | None = None, **train) -> RunConfig:
    """A copy of ``cfg`` that trains exactly ``shape`` on ``max_tokens`` tokens in ``run_dir`` (shared by
    `domainlm ablate` and `domainlm scaling`); ``weights`` and ``train`` override source weights and
    train fields."""
    data = cfg.model_dump()
    for s in data["sources"]:
        s["weight"] = (weights or {}).get(s["name"], s["weight"])
    if not data["train"].get("init_from"):  # a base model brings its own shape
        data["model"].update(n_layers=shape.n_layers, d_model=shape.d_model, n_heads=shape.n_heads,
                             n_kv_heads=shape.n_kv_heads, ffn_dim=shape.ffn_dim)
    data["train"].update(train, max_tokens=float(max_tokens))
    data["name"] = name
    data["run_dir"] = str(run_dir)
    return RunConfig.model_validate(data)


def train_variant(vcfg: RunConfig, run_dir: Path, console: Console) -> Path:
    """Train one variant in-process (one process; use the config's parallel settings on a cluster)."""
    vdir = vcfg.directory()
    write_resolved(vcfg, vdir)
    try:
        with distributed() as world:
            train(vcfg, vdir, world, console=console, data_dir=run_dir)
    except UserError as e:  # `train`'s advice names its --restart flag, which `ablate` and `decide` lack
        if "--restart" not in str(e):
            raise
        raise UserError(str(e).replace("use --restart", f"delete {vdir}").replace("--restart", f"delete {vdir}"),
                        exit_code=e.exit_code) from None
    return vdir / MODEL_DIR
