"""`domainlm ablate CONFIG --domain-weights 0,0.51,1`: the BloombergGPT trade-off measured on your data.

Trains the run's model shape on the run's token budget once per domain weight, on the prepared token files
and tokenizer of the run (nothing is re-prepared), evaluates each model on every source's val split in bits
per byte, and writes ``<run>/ablate/ablate.json`` and ``ablate.png`` (domain bpb vs general bpb per weight).
Each variant trains in ``<run>/ablate/w<weight>/`` with the trainer's checkpoints, so a killed ablation
resumes where it stopped and a finished one is skipped.

Each bpb carries a 95% interval: with ``--seeds K`` (``compare.seeds``) each weight is trained K times (seeds
train.seed, +1, …; the others in ``w<weight>-seed<S>/``) and the interval is the hierarchical bootstrap over
seeds and val documents (evaluate/bootstrap.py); with one seed, over documents only — a weight chosen between
two whose intervals overlap is chosen from noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from domainlm import faults
from domainlm.config import RunConfig, load_config
from domainlm.data.pipeline import document_files
from domainlm.data.tokens import load_counts
from domainlm.errors import UserError
from domainlm.evaluate import bootstrap
from domainlm.evaluate.command import evaluate_variant
from domainlm.model.base import base_of
from domainlm.outputs import Ablation, AblationResult
from domainlm.report.plots import ablation_chart
from domainlm.rundir import RunDir, write_json
from domainlm.train.variants import train_variant, variant_config

ABLATE_VERSION = 1


def parse_weights(text: str, flag: str = "--domain-weights") -> list[float]:
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            w = float(part)
        except ValueError:
            raise UserError(f"{flag}: expected numbers in [0, 1] like 0,0.51,1, got {part!r}") from None
        if not 0.0 <= w <= 1.0:
            raise UserError(f"{flag}: {w:g} is outside [0, 1]")
        out.append(w)
    if not out:
        raise UserError(f"{flag}: give at least one weight, e.g. 0,0.51,1")
    return sorted(set(out))


def domain_share(cfg: RunConfig) -> float:
    return sum(s.weight for s in cfg.sources if s.role == "domain")


def run_ablate(config: Path | None, domain_weights: str, *, console: Console, seeds: int | None = None) -> dict:
    cfg = load_config(config)
    run_dir = cfg.directory()
    weights = parse_weights(domain_weights)
    n_seeds = cfg.compare.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise UserError(f"--seeds: expected a number ≥ 1, got {n_seeds}")
    seed_list = [cfg.train.seed + i for i in range(n_seeds)]
    base = base_of(cfg)  # continued pretraining: the variants continue the base, on its tokenizer's token files
    load_counts(RunDir(run_dir).tokens_for(base.path) if base else run_dir)  # fails early: "run `domainlm tokenize`"

    for s in cfg.sources:  # each variant is scored on the val documents: check them before any training
        document_files(run_dir, s.name, "val")
    roles = {s.name: s.role for s in cfg.sources}
    results = []
    for i, w in enumerate(weights, 1):
        console.rule(f"ablate {i}/{len(weights)}: domain weight {w:g}" + (f" × {n_seeds} seeds" if n_seeds > 1
                                                                          else ""))
        evs, models = [], []
        for seed in seed_list:
            vcfg = variant_config(cfg, run_dir, w, seed=seed)
            models.append(train_variant(vcfg, run_dir, console))
            evs.append(evaluate_variant(vcfg.directory(), run_dir, console))
        results.append(AblationResult(
            domain_weight=w, weights={s.name: s.weight for s in vcfg.sources},
            bpb={k: float(np.mean([ev["sources"][k]["bpb"] for ev in evs])) for k in evs[0]["sources"]},
            roles=roles, model=str(models[0]), ci95=intervals(evs),
            seeds=[{"seed": seed, "model": str(m), "bpb": {k: v["bpb"] for k, v in ev["sources"].items()}}
                   for seed, m, ev in zip(seed_list, models, evs, strict=True)] if n_seeds > 1 else None))
        faults.hit("ablate.variant_done")
    ab = Ablation(version=ABLATE_VERSION, config=str(config) if config else None, model=vcfg.model.model_dump(),
                  tokens=vcfg.train.max_tokens, configured_domain_weight=domain_share(cfg), results=results)
    write_json(RunDir(run_dir).ablate, ab.model_dump())

    return {**ab.model_dump(), "plot": str(ablation_chart(ab, RunDir(run_dir) / RunDir.ABLATE_CHART))}


def intervals(evs: list[dict]) -> dict[str, list[float]] | None:
    """Per source, the 95% interval of the seeds' mean bpb: hierarchical bootstrap over seeds and val documents
    (evaluate/bootstrap.py; one seed: documents only). None for a model scored without per-document bits."""
    out = {}
    for name, src in evs[0]["sources"].items():
        if "doc_bits" not in src:
            return None
        bits = np.array([ev["sources"][name]["doc_bits"] for ev in evs])
        out[name] = bootstrap.hierarchical([bootstrap.ratio_per_seed(bits, np.array(src["doc_bytes"]))], [len(evs)],
                                           len(src["doc_bytes"]))["ci95"]
    return out


def print_ablation(ab: dict, console: Console) -> None:
    sources = list(ab["results"][0]["bpb"]) if ab["results"] else []
    seeds = len(ab["results"][0].get("seeds") or [1]) if ab["results"] else 1
    over = f"{seeds} seeds and val documents" if seeds > 1 else "val documents"
    t = Table(title=f"ablation: bits per byte on each val split (lower is better), 95% interval over {over}",
              title_justify="left")
    t.add_column("domain weight", justify="right")
    for s in sources:
        t.add_column(f"{s} ({ab['results'][0]['roles'].get(s, '?')})", justify="right")
    for r in ab["results"]:
        mark = " ←config" if abs(r["domain_weight"] - ab["configured_domain_weight"]) < 1e-9 else ""
        ci = r.get("ci95") or {}
        t.add_row(f"{r['domain_weight']:g}{mark}", *(f"{r['bpb'][s]:.4f}" + (
            f" [{ci[s][0]:.4f}, {ci[s][1]:.4f}]" if s in ci else "") for s in sources))
    console.print(t)
    console.print(f"plot: {ab.get('plot')}", markup=False)
