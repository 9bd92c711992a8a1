"""Glue between the CLI and the scorers: resolve inputs, score, write ``eval.json``, print the table."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from domainlm import __version__, faults
from domainlm.config import EvalConfig
from domainlm.errors import UserError
from domainlm.evaluate import bpb, inputs
from domainlm.evaluate import objective as objective_eval
from domainlm.evaluate.probes import load_probes, packaged_probes, score_probes, summarise
from domainlm.evaluate.tasks import format_metrics, load_test, score_task
from domainlm.outputs import AnyEval, EvalOutput, ObjectiveEvalOutput, TaskResults
from domainlm.rundir import RunDir, load_output, write_json
from domainlm.stages import Stage, file_fingerprint, fingerprint
from domainlm.train.parallel import init_distributed

EVAL_VERSION = 1


def _probe_file(flag: Path | None, target: inputs.Target) -> Path | None:
    """--probes, else the config's eval.probes, else the packaged legal set for the legal demo corpus."""
    if flag is not None:
        return Path(flag)
    cfg = target.cfg
    if cfg is None:
        return None
    if cfg.eval.probes:
        p = Path(cfg.eval.probes)
        if not p.is_absolute() and not p.exists() and target.run_dir is not None:
            p = target.run_dir / p
        return p
    if any(s.input == "package:licensedcode" for s in cfg.sources):
        return packaged_probes("legal")
    return None


def run_eval(
    model_or_run: Path,
    *,
    texts: list[str] | None = None,
    probes: Path | None = None,
    run: Path | None = None,
    out: Path | None = None,
    context: int | None = None,
    stride: int | None = None,
    max_bytes: int | None = None,
    batch_tokens: int | None = None,
    console: Console | None = None,
    per_doc: bool = False,
) -> tuple[dict, Path | None]:
    """Score a model; returns the eval.json content and where it was written (None: nowhere). ``per_doc``
    adds each document's bits and bytes to every source (``doc_bits``, ``doc_bytes``: `domainlm decide`'s paired
    bootstrap)."""
    t0 = time.perf_counter()
    target = inputs.resolve(model_or_run, run)
    inputs.refuse_classifier(target.model_dir)
    ecfg = target.cfg.eval if target.cfg is not None else EvalConfig()
    max_bytes = max_bytes or ecfg.max_bytes_per_source
    batch_tokens = batch_tokens or ecfg.batch_tokens

    # Gather every text before loading the model, so bad input fails fast.
    named: list[tuple[str, str, list[str]]] = []  # (name, role, documents)
    if target.cfg is not None:
        for s in target.cfg.sources:
            named.append((s.name, s.role, inputs.cap_bytes(inputs.source_documents(target.run_dir, s.name), max_bytes)))
    for name, path in inputs.parse_text_args(texts):
        if name in {n for n, _, _ in named}:
            raise UserError(f"--text {name}=...: a source of the run is already called {name!r}")
        named.append((name, "text", inputs.cap_bytes(inputs.text_documents(path), max_bytes)))
    for name, _, docs in named:
        if not docs:
            raise UserError(f"{name}: no text to score (all documents are empty)")
    probe_path = _probe_file(probes, target)
    probe_items = load_probes(probe_path) if probe_path is not None else []
    if not named and not probe_items:
        raise UserError(f"{model_or_run}: nothing to score; give --text NAME=PATH, --run RUN_DIR or --probes FILE")


    world = init_distributed()  # under torchrun every rank scores its share of the windows (bpb.score_texts)
    device = world.device.type
    if not world.is_main:
        console = None
    objective = objective_eval.model_objective(target.model_dir)
    if not objective.bits_per_byte:  # an encoder (masked LM) or encoder-decoder (span): its own loss, no probes
        seq_len = target.cfg.train.seq_len if target.cfg is not None else None  # the windows it trained on
        result = {"version": EVAL_VERSION, "domainlm": __version__, "model": str(target.model_dir),
                  "run_dir": str(target.run_dir) if target.run_dir else None, "device": device,
                  "processes": world.world_size, "max_bytes_per_source": max_bytes,
                  **objective_eval.evaluate(target.model_dir, objective, named, batch_tokens=batch_tokens,
                                            context=context or ecfg.context or seq_len,
                                            device=str(world.device), progress=lambda label: _progress(console, label)),
                  "probes": None, "seconds": round(time.perf_counter() - t0, 2)}
        if probe_items and console is not None:
            console.print(f"[dim]probes skipped: they compare a causal model's log-likelihoods, not a {objective.name} "
                          "model's[/]", highlight=False)
        return result, _write(result, ObjectiveEvalOutput, out, target, world,
                              lambda: eval_fingerprint(target.model_dir, ecfg, probe_path, texts))
    model, tok = inputs.load_model(target.model_dir, str(world.device))
    ctx = context or ecfg.context or min(bpb.model_context(model), bpb.DEFAULT_MAX_CONTEXT)
    ctx = min(ctx, bpb.model_context(model))  # positions past the trained context are meaningless
    step = stride or ecfg.stride or max(1, ctx // 2)

    result: dict = {
        "version": EVAL_VERSION,
        "domainlm": __version__,
        "model": str(target.model_dir),
        "run_dir": str(target.run_dir) if target.run_dir else None,
        "device": device,
        "processes": world.world_size,
        "context": ctx,
        "stride": step,
        "max_bytes_per_source": max_bytes,
        "doc_start_ids": bpb.doc_start_ids(tok),
        "sources": {},
        "probes": None,
    }
    for name, role, docs in named:
        with _progress(console, f"{name}: {len(docs)} docs, {sum(len(d.encode()) for d in docs):,} bytes") as tick:
            score = bpb.score_texts(model, tok, docs, context=ctx, stride=step, batch_tokens=batch_tokens,
                                    progress=tick)
        result["sources"][name] = {"role": role, **score.as_dict()}
        if per_doc:
            result["sources"][name].update(doc_bits=[x / bpb.LN2 for x in score.doc_nll], doc_bytes=score.doc_bytes)
        faults.hit("eval.source_done")
    if probe_items:
        scored = score_probes(model, tok, probe_items, context=ctx, batch_tokens=batch_tokens)
        result["probes"] = summarise(scored, probe_path)
    result["seconds"] = round(time.perf_counter() - t0, 2)

    return result, _write(result, EvalOutput, out, target, world,
                          lambda: eval_fingerprint(target.model_dir, ecfg, probe_path, texts))


def _write(result: dict, schema, out: Path | None, target, world, fingerprint) -> Path | None:
    """Write ``result`` (checked against ``schema``) to ``out``, else to the run's eval.json with the eval stage's
    marker; rank 0 writes. Returns where it went (None: a bare model folder and no ``out``)."""
    dest = out if out is not None else (RunDir(target.run_dir).eval if target.is_run else None)
    if dest is not None and world.is_main:
        write_json(Path(dest), schema.checked(result))
        if target.is_run and out is None:  # --out elsewhere: the run's eval stage is not done, nor written into
            Stage(target.run_dir, "eval", dest, (fingerprint(),)).finish()
    return dest


def run_eval_cached(model_or_run: Path, *, stage: str = "eval", run: Path | None = None, out: Path | None = None,
                    console: Console | None = None, per_doc: bool = False) -> tuple[dict, bool]:
    """`run_eval` with the default probes, skipped when its output exists and the run's ``stage`` marker
    matches (model files, eval config, probe file). Returns (result, whether it ran). For `domainlm run` and
    `domainlm ablate`; a plain `domainlm eval` always scores."""
    target = inputs.resolve(model_or_run, run)
    ecfg = target.cfg.eval if target.cfg is not None else EvalConfig()
    dest = Path(out) if out is not None else RunDir(target.run_dir).eval
    # per_doc: with each document's bits (the hierarchical bootstrap's input); a marker of its own
    s = Stage(target.run_dir, stage, dest, (eval_fingerprint(target.model_dir, ecfg, _probe_file(None, target), None),
                                            *(["per_doc"] if per_doc else [])))
    if s.done():
        with contextlib.suppress(UserError):  # one this version cannot read is scored again
            done = load_output(dest, AnyEval)
            if done is not None:
                return done.model_dump(exclude_unset=True), False
    result, _ = run_eval(model_or_run, run=run, out=out, console=console, per_doc=per_doc)
    s.finish()
    return result, True


def evaluate_variant(variant_dir: Path, run_dir: Path, console: Console | None) -> dict:
    """bpb of a variant's model (train/variants.py) on the run's val splits (with each document's bits, for
    intervals over seeds and documents) and probes, into the variant's folder; skipped when already done."""
    v = RunDir(variant_dir)
    result, _ = run_eval_cached(v.model, stage=f"eval-{v.root.name}", run=run_dir, out=v / RunDir.VARIANT_EVAL,
                                console=console, per_doc=True)
    return result


@contextlib.contextmanager
def _progress(console: Console | None, label: str):
    """A transient progress bar over scored windows (nothing without a console, e.g. with --json)."""
    if console is None:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(f"scoring {label}", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, advance=done, total=total)

        yield tick
    console.print(f"[dim]scored {escape(str(label))}[/]", highlight=False)


def eval_fingerprint(model_dir: Path, ecfg: EvalConfig, probe_path: Path | None, texts: list[str] | None) -> str:
    """What an eval result depends on, for `domainlm run` to skip an eval that is already done."""
    files = sorted(f for f in Path(model_dir).iterdir() if f.is_file())
    return fingerprint(
        EVAL_VERSION, ecfg.model_dump(mode="json"), texts or [],
        {f.name: file_fingerprint(f) for f in files},
        file_fingerprint(probe_path) if probe_path is not None and probe_path.is_file() else None,
    )


def print_eval(result: dict, console: Console) -> None:
    if result.get("objective"):  # a masked / span model (evaluate/objective.py)
        objective_eval.print_result(result, console)
        return
    table = Table(title=f"eval of {escape(str(result['model']))} (context {result['context']}, stride {result['stride']})")
    # Short headers so the table fits 80 columns; loss is in nats per token.
    for col in ("text", "role", "bits/byte", "nats/tok", "ppl", "tokens", "bytes", "bytes/tok"):
        table.add_column(col, justify="left" if col in ("text", "role") else "right", no_wrap=True)
    for name, s in result["sources"].items():
        table.add_row(escape(name), s["role"], f"{s['bpb']:.4f}", f"{s['loss_per_token']:.4f}", f"{s['ppl']:.2f}",
                      f"{s['tokens']:,}", f"{s['bytes']:,}", f"{s['bytes_per_token']:.2f}")
    if result["sources"]:
        console.print(table)
        read = sum(s.get("forward_tokens", 0) for s in result["sources"].values())
        scored = sum(s["tokens"] for s in result["sources"].values())
        if read and scored:  # what --stride costs: tokens the model read per token scored
            console.print(f"[dim]compute: the model read {read / scored:.2f}× the scored tokens (stride "
                          f"{result['stride']} of context {result['context']}; --stride {result['context']} reads "
                          "each token once with less left context, a smaller stride costs ≈ context/stride×)[/]",
                          highlight=False)
    p = result.get("probes")
    if p:
        console.print(
            f"term probes ({p['file']}): {p['items']} items, accuracy [bold]{p['acc']:.1%}[/] "
            f"(per-byte normalised {p['acc_per_byte']:.1%}; chance {p['chance']:.1%})", highlight=False)
    console.print("[dim]bits/byte is comparable across tokenizers; nats/tok and ppl only within one tokenizer.[/]")


# ------------------------------------------------------------------------------------------------ downstream tasks


def run_tasks(model_or_run: Path, task_names: list[str], *, test: Path | None = None, out: Path | None = None,
              console: Console | None = None) -> tuple[dict, Path | None]:
    """`domainlm eval MODEL --task licensedb-category`: score any model folder on the LicenseDB tasks
    (evaluate/tasks.py); written to ``<run>/eval/tasks.json`` for a run directory, or ``--out``."""

    target = inputs.resolve(model_or_run)
    items = {t: load_test(t, test) for t in task_names}  # bad names / files fail before the model loads
    results = {}
    for t, its in items.items():
        with _progress(console, f"{t}: {len(its)} test items") as tick:
            results[t] = score_task(target.model_dir, t, items=its, progress=tick)
    dest = out if out is not None else (RunDir(target.run_dir) / RunDir.TASKS if target.is_run else None)
    if dest is not None:
        write_json(Path(dest), TaskResults.checked(results))
    return results, dest


def print_tasks(results: dict, written: Path | None, console: Console) -> None:
    for t, r in results.items():
        base = f" (majority class {r['majority_accuracy']:.1%})" if "majority_accuracy" in r else ""
        console.print(f"{t} on {r['items']} test items: {format_metrics(r)}{base}", highlight=False)
    if written is not None:
        console.print(f"wrote [bold]{escape(str(written))}[/]")
