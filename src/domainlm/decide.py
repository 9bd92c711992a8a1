"""`domainlm decide CONFIG`: pretrain from scratch, or continue pretraining a general model? Measured on your data.

At equal training tokens (the run's token budget), on the run's prepared data and mixture:

- ``scratch``: the run's own model, trained from random weights with the run's domain tokenizer (``<run>/model``;
  trained here unless `domainlm train`/`run` already did);
- ``continued``: the general model (``--base``) continued on the same mixture for the same tokens (domain-adaptive
  pretraining, Gururangan et al. 2020; ``train.init_from``, docs/continued.md), with its own tokenizer;
- ``continued-vocab<N>`` (``--extend-vocab N``): the same, after adding the base tokenizer the N domain tokens that
  save the most tokens (tokenizer_extend.py);
- ``base``: the general model as it is.

Each arm is scored like `domainlm eval` (evaluate/bpb.py) on every source's val split, on ``--text NAME=PATH``
folders and on the term probes. Bits per byte does not depend on the tokenizer (bits of the whole text ÷ its
bytes), which is what makes arms with different tokenizers comparable at all; loss per token is not.

The verdict names, per text, the arm with the lowest bpb and its margin over the runner-up, with a 95% interval:
with ``--seeds K`` (``compare.seeds``) each trained arm is trained K times (seeds train.seed, +1, …; seed
train.seed in ``<run>/decide/<arm>/``, the others in ``<run>/decide/<arm>-seed<S>/``) and the interval is the
hierarchical bootstrap over seeds and documents (evaluate/bootstrap.py), so it includes training variance; with
K = 1, the paired bootstrap over documents (the same resampled documents for both arms). "No detectable
difference" when the interval contains 0. The sentence also says how fair the comparison is: the arms' training
tokens here (equal for trained arms) and their total compute ratio, the base's own pretraining included.

Compute: training FLOPs ≈ 6·N·D (Kaplan et al. 2020, eq. 2.1; N parameters, D tokens) for this run's training
of each arm and, for the arms built on the base, the base's own pretraining when it is known (a domainlm run
directory records it; for a downloaded model pass ``--base-tokens``).

Output: ``<run>/decide/decide.json`` and, per arm, ``<run>/decide/<arm>/`` (its training run and ``eval.json``
with per-document bits). A finished arm is never redone: killed between arms, a rerun continues with the next.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from domainlm import faults, stages, tokenizer_extend
from domainlm.config import RunConfig, load_config
from domainlm.data.tokenize import tokenize
from domainlm.data.tokens import load_counts
from domainlm.errors import UserError
from domainlm.evaluate import bootstrap, inputs
from domainlm.evaluate.command import _probe_file, eval_fingerprint, run_eval
from domainlm.evaluate.inputs import load_run_config
from domainlm.model.base import resolve_base
from domainlm.outputs import AnyEval, Decision, TrainSummary
from domainlm.rundir import HF_CONFIG, RunDir, load_output, write_json
from domainlm.train.loop import plan_of, planned_tokens, train
from domainlm.train.parallel import distributed
from domainlm.train.variants import train_variant

DECIDE_VERSION = 1
SCRATCH, CONTINUED, BASE = "scratch", "continued", "base"
LABELS = {SCRATCH: "from scratch (the run's model)", CONTINUED: "general model, continued",
          BASE: "general model as is"}
FLOPS_PER_PARAM_TOKEN = 6  # forward + backward ≈ 6 FLOPs per parameter per token (Kaplan et al. 2020, eq. 2.1)


def vocab_arm(n: int) -> str:
    return f"{CONTINUED}-vocab{n}"


def label(arm: str) -> str:
    if arm.startswith(f"{CONTINUED}-vocab"):
        return f"general model + up to {arm.removeprefix(CONTINUED + '-vocab')} domain tokens, continued"
    return LABELS.get(arm, arm)


def training_flops(params: float | None, tokens: float | None) -> float | None:
    """6·N·D (Kaplan et al. 2020, eq. 2.1)."""
    return FLOPS_PER_PARAM_TOKEN * params * tokens if params and tokens else None


# ------------------------------------------------------------------------------------------------ inputs


def default_base(run_dir: Path) -> Path:
    """The offline demo's general model: the run's general-only baseline (same shape, trained on news)."""
    return RunDir(RunDir(run_dir).variant(0.0)).model


def budget_tokens(cfg: RunConfig, run_dir: Path) -> float:
    budget = cfg.train.max_tokens or planned_tokens(plan_of(run_dir))
    if budget is None:
        raise UserError("train.max_tokens: no token budget; set it or run `domainlm plan CONFIG` first")
    return float(budget)


def train_record(folder: Path) -> TrainSummary:
    """What a finished training run recorded: its ``logs/train.json`` (one-line error when there is none)."""
    rec = RunDir(folder).load(RunDir.TRAIN, TrainSummary)
    if rec is None:
        raise UserError(f"{RunDir(folder) / RunDir.TRAIN}: no training summary; run `domainlm train` on this run "
                        "(a finished training writes it again without retraining)")
    return rec


def trained_tokens(folder: Path, cfg: RunConfig) -> float | None:
    """Tokens a domainlm training run trained on: its summary's steps × tokens per step."""
    rec = train_record(folder)
    if not rec.steps:
        return None
    t = cfg.train
    return float(rec.steps * (t.tokens_per_step or t.micro_batch * t.seq_len * (rec.world_size or 1)))


def base_pretraining(base_path: Path, base_params: int, base_tokens: float | None) -> dict:
    """What the base model cost to make: from ``--base-tokens``, else from its domainlm run directory's record."""

    source, tokens = None, None
    if base_tokens:
        source, tokens = "--base-tokens", float(base_tokens)
    else:
        run = base_path.parent
        record = RunDir(run) / RunDir.TRAIN
        if base_path.name == RunDir.MODEL and RunDir(run).config.is_file() and record.is_file():
            tokens = trained_tokens(run, load_run_config(run))
            source = str(record) if tokens else None
    return {"params": base_params, "tokens": tokens, "flops": training_flops(base_params, tokens),
            "tokens_from": source}


def continued_config(cfg: RunConfig, run_dir: Path, arm: str, init_from: Path, tokens: float,
                     lr: float | None = None, seed: int | None = None) -> RunConfig:
    """The run's config, continued from ``init_from`` for ``tokens`` tokens in ``<run>/decide/<arm>/`` (peak
    learning rate ``lr``, default the run's ``train.lr``; ``seed``, default the run's ``train.seed``)."""
    data = cfg.model_dump()
    data["train"].update(init_from=str(init_from), max_tokens=float(tokens), lr=lr or cfg.train.lr,
                         seed=cfg.train.seed if seed is None else seed)
    data["tokenizer"]["extend_vocab"] = 0  # the arm's base is already extended
    data["name"] = f"{cfg.name}-{arm}"
    data["run_dir"] = str(RunDir(run_dir).arm(arm))
    return RunConfig.model_validate(data)


def seed_arm(arm: str, seed: int, first: int) -> str:
    """The folder name of ``arm`` trained with ``seed``: the arm's own for the run's seed ``first``, else
    ``<arm>-seed<S>``."""
    return arm if seed == first else f"{arm}{RunDir.SEED_SUFFIX}{seed}"


def scratch_config(cfg: RunConfig, run_dir: Path, seed: int) -> RunConfig:
    """The run's own model with another seed, trained in ``<run>/decide/scratch-seed<S>/`` on the run's data."""
    data = cfg.model_dump()
    data["train"]["seed"] = seed
    data["name"] = f"{cfg.name}-{seed_arm(SCRATCH, seed, cfg.train.seed)}"
    data["run_dir"] = str(RunDir(run_dir).arm(SCRATCH, seed=seed))
    return RunConfig.model_validate(data)


# ------------------------------------------------------------------------------------------------ arms


def _tokenize_for(run_dir: Path, tokenizer_dir: Path, console: Console) -> None:
    """Token files of the prepared data with ``tokenizer_dir`` (a no-op when they exist)."""


    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        tokenize(run_dir, tokenizer_dir, progress)


def extended_base(cfg: RunConfig, run_dir: Path, base_path: Path, n: int, console: Console) -> tuple[Path, dict]:
    """The base model with ``n`` domain tokens added (tokenizer_extend.build_extended), built once in
    ``<run>/decide/continued-vocab<N>/base/``; returns the folder and what was added (with the audit)."""

    out = RunDir(run_dir).arm(vocab_arm(n)) / RunDir.ARM_BASE
    return out, tokenizer_extend.build_extended(cfg, run_dir, base_path, n, out, key="--base", console=console)


def _train_continued(vcfg: RunConfig, run_dir: Path, console: Console) -> Path:
    _tokenize_for(run_dir, Path(vcfg.train.init_from), console)
    return train_variant(vcfg, run_dir, console)


def _mean(xs: list) -> float | None:
    return None if any(x is None for x in xs) else float(np.mean(xs))


def _train_scratch(cfg: RunConfig, run_dir: Path, console: Console) -> Path:
    with distributed() as world:
        train(cfg, run_dir, world, console=console)
    return RunDir(run_dir).model


def evaluate_arm(model_dir: Path, run_dir: Path, out: Path, texts: list[str] | None, console: Console) -> dict:
    """bpb (with per-document bits), probes; skipped when ``out`` is from the same model, texts and settings."""
    target = inputs.resolve(model_dir, run_dir)
    stage = f"decide-eval-{out.parent.name}"
    text_files = [(n, {str(f): stages.file_fingerprint(f) for f in inputs.text_files(p)})
                  for n, p in inputs.parse_text_args(texts)]
    s = stages.Stage(run_dir, stage, out, (DECIDE_VERSION, eval_fingerprint(target.model_dir, target.cfg.eval,
                                                                          _probe_file(None, target), texts),
                                           text_files))
    if s.done():
        with contextlib.suppress(UserError):  # one this version cannot read is scored again
            return load_output(out, AnyEval).model_dump(exclude_unset=True)
    s.start()
    result, _ = run_eval(model_dir, run=run_dir, texts=texts, out=out, per_doc=True, console=console)
    s.finish()
    return result


# ------------------------------------------------------------------------------------------------ statistics


def paired_margin(bits_loser, bits_winner, doc_bytes: list[int]) -> dict:
    """bpb(loser) − bpb(winner) over the same documents, with a 95% interval. One list of per-document bits per
    arm: the paired bootstrap over documents (the same resamples for both arms; Σ(bits_l − bits_w) / Σ bytes on
    each, percentile interval). A list per seed ([K, N]): the seed means, hierarchical bootstrap over seeds and
    documents (evaluate/bootstrap.py; one seed reduces to the paired bootstrap exactly)."""
    return bootstrap.ratio_diff(np.atleast_2d(np.asarray(bits_loser, dtype=float)),
                                np.atleast_2d(np.asarray(bits_winner, dtype=float)), np.asarray(doc_bytes))


def fairness(arms: dict[str, dict], win: str, second: str) -> tuple[str, float | None]:
    """How the winner and runner-up compare in training: (a clause for the verdict, total compute ratio)."""
    a, b = arms.get(win, {}), arms.get(second, {})
    ta, tb = a.get("trained_tokens"), b.get("trained_tokens")
    tokens = (f"at equal training tokens ({ta:,.0f} each)" if ta and ta == tb else
              f"training tokens here {ta or 0:,.0f} vs {tb or 0:,.0f}")
    fa, fb = a.get("flops_total"), b.get("flops_total")
    if fa and fb:
        ratio = fa / fb
        return f"{tokens}; total compute {win} {ratio:.2f}× {second}'s (6·N·D, the base's pretraining included)", ratio
    return f"{tokens}; total compute ratio unknown (pass --base-tokens for the base's pretraining)", None


def verdicts(evals: dict[str, list[dict]], arms: dict[str, dict] | None = None) -> dict[str, dict]:
    """Per text: the winner (lowest bpb, the mean over its seeds), the runner-up and the margin with its interval,
    and one sentence. ``evals``: each arm's eval.json per seed."""
    arms = arms or {}
    names = list(next(iter(evals.values()))[0]["sources"])
    out = {}
    for name in names:
        bpb = {a: float(np.mean([e["sources"][name]["bpb"] for e in evs])) for a, evs in evals.items()}
        ranked = sorted(evals, key=lambda a: bpb[a])
        win, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
        w = evals[win][0]["sources"][name]
        row = {"role": w.get("role"), "docs": w.get("docs"), "winner": win, "runner_up": second,
               "bpb": {a: bpb[a] for a in ranked}}
        if second is not None:
            if any(e["sources"][name]["doc_bytes"] != w["doc_bytes"] for a in (win, second) for e in evals[a]):
                raise UserError(f"{name}: the arms were scored on different documents; delete "
                                f"{RunDir.DECIDE_DIR}/*/{RunDir.VARIANT_EVAL} and rerun")
            m = paired_margin([e["sources"][name]["doc_bits"] for e in evals[second]],
                              [e["sources"][name]["doc_bits"] for e in evals[win]], w["doc_bytes"])
            row["margin"] = m
            lo, hi = m["ci95"]
            k = {len(evals[win]), len(evals[second])}
            over = "documents" if k == {1} else f"seeds ({'/'.join(str(len(evals[a])) for a in (win, second))}) " \
                "and documents"
            sure = "" if lo > 0 else " — no detectable difference (the interval contains 0)"
            fair, ratio = fairness(arms, win, second)
            row["compute_ratio"] = ratio
            row["verdict"] = (f"{name}: {win} wins by {m['value']:.4f} bpb [95% CI {lo:.4f}, {hi:.4f} over {over}] "
                              f"over {second} ({bpb[win]:.4f} vs {bpb[second]:.4f}){sure}; {fair}")
        else:
            row["verdict"] = f"{name}: {win} ({bpb[win]:.4f} bpb; no other arm)"
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------------ the command


def run_decide(config: Path | None, *, base: Path | None = None, extend_vocab: int = 0,
               texts: list[str] | None = None, base_tokens: float | None = None, lr: float | None = None,
               seeds: int | None = None, console: Console | None = None) -> dict:

    console = console or Console(stderr=True)
    cfg = load_config(config)
    run_dir = cfg.directory()
    if cfg.train.init_from:
        raise UserError("train.init_from: `domainlm decide` compares training from scratch with continuing a "
                        "general model; give a from-scratch config and the general model as --base")
    if extend_vocab < 0:
        raise UserError(f"--extend-vocab: expected a number ≥ 0, got {extend_vocab}")
    n_seeds = cfg.compare.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise UserError(f"--seeds: expected a number ≥ 1, got {n_seeds}")
    load_counts(run_dir)  # fails early with "run `domainlm prepare`/`tokenize`"
    for _, p in inputs.parse_text_args(texts):  # bad --text fails before any training
        inputs.text_files(p)
    base_path = Path(base) if base is not None else default_base(run_dir)
    if base is None and not (base_path / HF_CONFIG).is_file():
        raise UserError(f"--base: no general model given and no general-only baseline in {base_path}; run "
                        "`domainlm run CONFIG` (it trains one) or pass --base MODEL_DIR (any Hugging Face causal LM)")
    b = resolve_base(base_path, "--base")
    tokens = budget_tokens(cfg, run_dir)
    pre = base_pretraining(b.path, b.params, base_tokens)
    first = cfg.train.seed
    seed_list = [first + i for i in range(n_seeds)]

    arms = [SCRATCH, CONTINUED] + ([vocab_arm(extend_vocab)] if extend_vocab else []) + [BASE]
    results: dict[str, dict] = {}
    evals: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    for i, arm in enumerate(arms, 1):
        console.rule(f"decide {i}/{len(arms)}: {label(arm)}" + (f" × {n_seeds} seeds" if n_seeds > 1 and
                                                                 arm != BASE else ""))
        row: dict = {"label": label(arm)}
        trained: list[tuple[int, Path, Path]] = []  # (seed, model, folder for eval.json)
        if arm == SCRATCH:
            trained.append((first, _train_scratch(cfg, run_dir, console), RunDir(run_dir).arm(arm)))
            for s in seed_list[1:]:
                scfg = scratch_config(cfg, run_dir, s)
                trained.append((s, train_variant(scfg, run_dir, console), scfg.directory()))
            n_params = train_record(run_dir).params
            row.update(trained_tokens=trained_tokens(run_dir, cfg), params=n_params, base_flops=None)
        elif arm == BASE:
            trained.append((first, b.path, RunDir(run_dir).arm(arm)))  # not trained: one model whatever the seeds
            row.update(trained_tokens=0.0, params=b.params, base_flops=pre["flops"])
        else:
            init_from = b.path
            if arm != CONTINUED:
                init_from, ext = extended_base(cfg, run_dir, b.path, extend_vocab, console)
                row["extension"] = {k: ext[k] for k in ("requested", "added", "base_vocab", "vocab")}
                row["extension"]["top"] = ext["tokens"][:20]
                row["extension"]["bytes_per_token"] = {  # measured on each val split: the base's, then extended
                    k: {"before": v["baseline_bytes_per_token"], "after": v["bytes_per_token"]}
                    for k, v in ext["audit"]["bytes_per_token"].items()}
                row["extension"]["terms"] = ext["audit"]["summary"].get("terms")
                asked = "" if ext["added"] == ext["requested"] else f" of {ext['requested']:,} requested"
                row["label"] = f"general model + {ext['added']:,} domain tokens{asked}, continued"  # what was added
                if not ext["added"]:
                    skipped[arm] = ("the base tokenizer already has every domain token the run's tokenizer uses "
                                    "(no candidate to add)")
                    console.print(f"{arm}: skipped — {skipped[arm]}", highlight=False, markup=False)
                    continue
            for s in seed_list:
                vcfg = continued_config(cfg, run_dir, seed_arm(arm, s, first), init_from, tokens, lr, seed=s)
                trained.append((s, _train_continued(vcfg, run_dir, console), vcfg.directory()))
            row.update(trained_tokens=trained_tokens(vcfg.directory(), vcfg),
                       params=resolve_base(init_from, "--base").params, base_flops=pre["flops"])
        evs = [evaluate_arm(model, run_dir, folder / RunDir.VARIANT_EVAL, texts, console)
               for _, model, folder in trained]
        evals[arm] = evs
        run_flops = training_flops(row["params"], row["trained_tokens"])
        base_flops = row.pop("base_flops")
        total = run_flops or 0.0 if arm == SCRATCH else (run_flops or 0.0) + base_flops if base_flops else None
        mean = {k: float(np.mean([ev["sources"][k]["bpb"] for ev in evs])) for k in evs[0]["sources"]}
        probes = [ev["probes"] for ev in evs if ev.get("probes")]
        row.update(model=str(trained[0][1]), flops_run=run_flops or 0.0, flops_total=total, bpb=mean,
                   bytes_per_token={k: v["bytes_per_token"] for k, v in evs[0]["sources"].items()},
                   probes=({k: _mean([p[k] for p in probes]) if k != "items" else probes[0][k]
                            for k in ("items", "acc", "acc_per_byte", "chance")} if probes else None))
        if len(trained) > 1:  # the per-seed points behind the mean
            row["seeds"] = [{"seed": s, "model": str(model), "bpb": {k: v["bpb"] for k, v in ev["sources"].items()},
                             "probe_acc": ev["probes"]["acc"] if ev.get("probes") else None}
                            for (s, model, _), ev in zip(trained, evs, strict=True)]
        results[arm] = row
        faults.hit("decide.arm_done")

    per_text = verdicts(evals, results)
    out = {
        "version": DECIDE_VERSION,
        "config": str(config) if config else None,
        "run_dir": str(run_dir),
        "tokens": tokens,
        "extend_vocab": extend_vocab,
        **({"seeds": seed_list} if n_seeds > 1 else {}),
        "base": {"path": str(b.path), "architecture": b.architecture, **pre},
        "arms": results,
        "skipped": skipped,
        "texts": per_text,
        "verdict": "; ".join(r["verdict"] for r in per_text.values()),
    }

    out = Decision.checked(out)
    write_json(RunDir(run_dir) / RunDir.DECIDE, out)
    return out


# ------------------------------------------------------------------------------------------------ printing


def _flops(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.3g}"


def print_decide(d: dict, console: Console) -> None:
    texts = list(d["texts"])
    t = Table(title=f"from scratch or continued? bits per byte at {d['tokens']:,.0f} training tokens (lower is "
              "better)", title_justify="left")
    t.add_column("arm")
    for n in texts:
        t.add_column(f"{n} ({d['texts'][n]['role']})", justify="right")
    for col in ("probes", "FLOPs this run", "FLOPs total"):
        t.add_column(col, justify="right")
    for arm, r in d["arms"].items():
        p = r.get("probes")
        t.add_row(arm, *(f"{r['bpb'][n]:.4f}" for n in texts), f"{p['acc']:.1%}" if p else "-",
                  _flops(r["flops_run"]), _flops(r["flops_total"]))
    console.print(t)
    for arm, r in d["arms"].items():  # the per-seed points behind each mean
        for p in r.get("seeds") or []:
            console.print(f"  {arm} seed {p['seed']}: " + ", ".join(f"{n} {v:.4f}" for n, v in p["bpb"].items()),
                          highlight=False, markup=False)
    for arm, why in d["skipped"].items():
        console.print(f"{arm}: skipped — {why}", highlight=False, markup=False)
    pre = d["base"]
    if pre["flops"] is None:
        console.print("[dim]the base model's own pretraining is unknown: pass --base-tokens D for its total[/]")
    for r in d["texts"].values():
        console.print(r["verdict"], highlight=False, markup=False)
    console.print(f"wrote {Path(d['run_dir']) / RunDir.DECIDE}", highlight=False, markup=False)
