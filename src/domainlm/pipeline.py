"""The stage registry: one declaration per stage, from which everything else about a stage is looked up.

A `StageDecl` says what a stage is — its name, the command that runs it, where its code lives, the files it writes
(each with its schema, what it holds and who reads it), the inputs whose fingerprint lets `domainlm run` skip it,
and the report sections that show its outputs. From ``REGISTRY`` derive:

- ``SCHEMAS`` (output file → pydantic model) and ``PRODUCERS`` (output file → the command that writes it), which
  the report and the CLI use to load a file or say how to make it;
- the order of `domainlm run` (`run_order`): the declarations with a ``run`` in registry order, those whose
  ``when`` accepts the config, a stage listed in another's ``again_after`` run a second time after it;
- the report's sections, in registry order (`build_report`);
- the run-directory table of docs/architecture.md (`outputs_table`; tests/test_pipeline.py checks the doc).

Adding a stage = its module + one `StageDecl` here (or `register(decl)` from a plugin module: the toy stage of
tests/test_pipeline.py does so without touching any other file). Resumable work inside a stage (datatrove tasks,
token parts, checkpoints, variants, arms) skips and resumes through `stages.Stage`, the only way finished work is
recognised; a declaration with ``inputs`` is skipped by the registry itself through the same `Stage`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from domainlm import __version__, stages
from domainlm.config import RunConfig, dump_config
from domainlm.data.command import run_prepare
from domainlm.data.tokens import counts_path
from domainlm.errors import UserError
from domainlm.evaluate.command import evaluate_variant, print_eval, run_eval_cached
from domainlm.finetune.downstream import run_downstream
from domainlm.mine.command import print_mine, run_mine
from domainlm.model.base import base_of
from domainlm.outputs import (
    Ablation,
    AnyComparison,
    AnyEval,
    AnyFinetune,
    Audit,
    ClassifyComparison,
    Counts,
    Decision,
    Extension,
    ExtensionAudit,
    FinetuneComparison,
    Law,
    Mine,
    Mix,
    Plan,
    ScalingPoint,
    Stats,
    TaskData,
    TaskResults,
    TrainSummary,
)
from domainlm.plan.command import run_plan
from domainlm.plan.report import print_plan
from domainlm.report import html
from domainlm.rundir import RunDir, load_output
from domainlm.tokenize import run_tokenize
from domainlm.tokenizer import run_tokenizer
from domainlm.train.loop import train
from domainlm.train.parallel import distributed
from domainlm.train.variants import train_variant, variant_config


@dataclass(frozen=True)
class Output:
    """One file (or folder) a stage writes, by its `RunDir` name."""

    rel: str
    schema: Any = None  # the pydantic model of a JSON output (outputs.py), or a union of them
    what: str = ""  # what it holds (the architecture table's "format" column when there is no schema)
    readers: str = ""  # who reads it


@dataclass(frozen=True)
class Ctx:
    """What a stage of `domainlm run` gets: the resolved config (its file and its model), the run, the console."""

    config_path: Path
    cfg: RunConfig
    run_dir: Path
    console: Console


@dataclass(frozen=True)
class StageDecl:
    name: str
    command: str  # how a user runs it ({run} is replaced by the run directory in hints)
    code: str  # where its code lives (the architecture table)
    outputs: tuple[Output, ...] = ()
    run: Callable[[Ctx], object] | None = None  # the stage's work under `domainlm run`; None: a command of its own
    title: str = ""  # `domainlm run`'s heading (default: the name)
    inputs: Callable[[Ctx], tuple] | None = None  # fingerprint parts: `domainlm run` skips the stage when unchanged
    skipped: str = "inputs unchanged, skipped"  # printed when it is skipped by ``inputs``
    sections: tuple[Callable[[html.Report], html.Section | None], ...] = ()  # report sections, page order
    when: Callable[[RunConfig], bool] = field(default=lambda cfg: True)  # whether `domainlm run` includes it
    again_after: str | None = None  # run it a second time after this stage (plan: again with the real counts)
    again_title: str = ""

    @property
    def marker(self) -> Path | None:
        """The output written last (its completion mark): the last declared output."""
        return Path(self.outputs[-1].rel) if self.outputs else None


# ------------------------------------------------------------------------------------------------ stage adapters
# The work of each stage lives in its own module; these adapt it to `domainlm run`'s context.


def _plan_inputs(c: Ctx) -> tuple:
    """The config and the measured token counts (continued pretraining: the base tokenizer's), so a rerun with both
    unchanged keeps the plan (and the CPU probe's number in it) instead of re-sizing the model."""
    base = base_of(c.cfg)
    counts = counts_path(RunDir(c.run_dir).tokens_for(base.path) if base else c.run_dir)
    return dump_config(c.cfg), counts.read_text() if counts.exists() else None


def _plan(c: Ctx) -> dict:
    result, _ = run_plan(c.config_path)
    print_plan(result, c.console)
    return result


def _mine(c: Ctx) -> dict:
    result = run_mine(c.config_path, c.console)
    print_mine(result, c.console)
    return result


def _train(c: Ctx) -> dict:
    with distributed() as world:
        return train(c.cfg, c.run_dir, world, console=c.console)


def _eval(c: Ctx) -> dict:
    result, ran = run_eval_cached(c.run_dir, console=c.console)
    if ran:
        print_eval(result, c.console)
    else:
        c.console.print("eval: done already, skipped")
    return result


def _has_both_roles(cfg: RunConfig) -> bool:
    return any(s.role == "general" for s in cfg.sources) and any(s.role == "domain" for s in cfg.sources)


def _baseline(c: Ctx) -> dict:
    """The general-only model of the same shape and budget: the ablation's weight-0 variant (shared with
    `domainlm ablate`, so either command reuses the other's model); its eval (`RunDir.BASELINE_EVAL`) is what the
    report and the summary compare with."""
    vcfg = variant_config(c.cfg, c.run_dir, 0.0)
    train_variant(vcfg, c.run_dir, c.console)
    return evaluate_variant(vcfg.directory(), c.run_dir, c.console)


def _report_inputs(c: Ctx) -> tuple:
    """The files of every other stage that the report can read (not its own page)."""
    own = {o.rel for o in stage("report").outputs}
    found = [c.run_dir / f for f in PRODUCERS if f not in own and (c.run_dir / f).is_file()]
    return __version__, {str(f): stages.file_fingerprint(f) for f in found}


def _report(c: Ctx) -> dict:
    return build_report(c.run_dir)


# ------------------------------------------------------------------------------------------------ the registry

REGISTRY: list[StageDecl] = [
    StageDecl(
        "plan", "domainlm plan CONFIG",
        "`plan/` — `laws.py` (Chinchilla, Kaplan, Muennighoff, fitted), `planner.py`, `memory.py`, `hardware.py`, "
        "`chart.py`; the shape from `shape.py`",
        (Output(RunDir.CONFIG, what="the resolved config (`config.RunConfig`)",
                readers="eval, generate, report, finetune"),
         Output(RunDir.PLAN_CHART, what="PNG", readers="you"),
         Output(RunDir.PLAN, Plan, readers="train (token budget), model (shape), report, run summary")),
        run=_plan, inputs=_plan_inputs, skipped="unchanged, skipped", sections=(html.plan_section,),
        again_after="tokenize", again_title="plan (real counts)"),
    StageDecl(
        "prepare", "domainlm prepare CONFIG",
        "`data/` — `sources.py` (readers), `packaged.py`, `steps.py` (datatrove steps), `pipeline.py` (executors, "
        "statistics), `clean.py`",
        (Output(RunDir.DATA, what="`data/<source>/{train,val}/*.jsonl.gz`: `{id, text, metadata}` lines",
                readers="tokenizer, tokenize, eval"),
         Output(RunDir.STATS, Stats, readers="report, tokenizer (fingerprint)")),
        run=lambda c: run_prepare(c.config_path, c.console), sections=(html.data_section,),
        again_after="mine", again_title="prepare (the mined source)"),
    StageDecl(
        "mine", "domainlm mine CONFIG",
        "`mine/` — `classifier.py` (fastText; the held-out curve; the threshold by estimated precision in the pool), "
        "`index.py` (exact, MinHash and n-gram indexes), `steps.py` (datatrove steps: score a pool's shard, write the "
        "mined source), `command.py` (the rounds; docs/mine.md)",
        (Output(RunDir.MINE_DOCS, what="`mine/docs/<pool>/<rank>.jsonl.gz`: `{id, text, …, mine: {pool, round, "
                "score, id}}` lines", readers="prepare (the input of a source named `mine.source`)"),
         Output(RunDir.MINE, Mine, readers="plan (the mined tokens), report")),
        run=_mine, title="mine (domain documents from the pools)", when=lambda cfg: bool(cfg.mine.pools),
        sections=(html.mine_section,)),
    StageDecl(
        "tokenizer", "domainlm tokenizer CONFIG",
        "`tokenizer.py` (train, audit); `tokenizer_extend.py` (a base model's tokenizer + domain tokens)",
        (Output(RunDir.TOKENIZER, what="Hugging Face tokenizer folder", readers="tokenize, train (export ships it)"),
         Output(RunDir.AUDIT, Audit, readers="report")),
        run=lambda c: run_tokenizer(c.config_path, console=c.console), sections=(html.tokenizer_section,)),
    StageDecl(
        "tokenize", "domainlm tokenize CONFIG",
        "`tokenize.py` (the command: vocabulary extension first, `tokenizer_extend.py`) → `data/tokenize.py` → "
        "`data/tokens.py` (the token-file format; one folder per tokenizer, `RunDir.tokens_for`)",
        (Output(RunDir.TOKENS, what="`tokens/<source>/{train,val}.bin` (`tokens-<sha>/` for another tokenizer)",
                readers="train, plan (real counts), report"),
         Output(RunDir.COUNTS, Counts, readers="train, plan, report")),
        run=lambda c: run_tokenize(c.config_path, c.console)),
    StageDecl(
        "train", "domainlm train CONFIG",
        "`train/` — `loop.py` (pretraining setup, eval, export), `driver.py` (the one loop), `step.py` (the one "
        "step), `data.py` (mixture loader), `parallel.py`, `checkpoint.py`, `schedule.py`; `objectives/` (causal, "
        "masked, span behind one `Objective` interface); "
        "`shape.py` (the shape rule, its parameter and FLOP counts); `model/` (`__init__.py`: the single-device "
        "model and the HF export; `base.py`: continued pretraining's base model)",
        (Output(RunDir.CHECKPOINTS, what="`step-N/`: weights, optimizer, RNG, loader state, manifest (last)",
                readers="train (resume)"),
         Output(RunDir.METRICS, what="one JSON row per step / eval", readers="report, scaling"),
         Output(RunDir.MODEL, what="Hugging Face model + tokenizer", readers="eval, finetune, generate, lm-eval"),
         Output(RunDir.TRAIN, TrainSummary, readers="report, run summary, scaling, decide")),
        run=_train, sections=(html.training_section,)),
    StageDecl(
        "eval", "domainlm eval {run}",
        "`evaluate/` — `bpb.py`, `probes.py`, `tasks.py`, `harness.py`, `objective.py`, `command.py`",
        (Output(RunDir.EVAL, AnyEval, readers="report, run summary"),),
        run=_eval, sections=(html.eval_section, html.probes_section)),
    StageDecl(
        "eval-tasks", "domainlm eval {run} --task TASK", "`evaluate/tasks.py`, `evaluate/harness.py`",
        (Output(RunDir.TASKS, TaskResults, readers="you"),)),
    StageDecl(
        "baseline", "domainlm run CONFIG", "`train/variants.py` (the ablation's weight-0 variant)",
        (Output(RunDir.BASELINE_EVAL, AnyEval, readers="report, run summary"),),
        run=_baseline, title="baseline (general only: same shape and tokens, domain weight 0)", when=_has_both_roles),
    StageDecl(
        "ablate", "domainlm ablate CONFIG --domain-weights 0,0.51,1", "`ablate.py`, `train/variants.py`",
        (Output(RunDir.ABLATE, Ablation, readers="report"),), sections=(html.ablation_section,)),
    StageDecl(
        "decide", "domainlm decide CONFIG --base GENERAL_MODEL", "`decide.py`",
        (Output(RunDir.DECIDE, Decision, readers="report"),), sections=(html.decide_section,)),
    StageDecl(
        "mix", "domainlm mix CONFIG", "`mix/` — `law.py` (the mixing law, its fit and bootstrap, objectives), "
        "`stage.py` (the design of variants, the held-out check); `train/variants.py`",
        (Output(RunDir.MIX_DIR, what="`mix/D<tokens>-w<weight>-s<seed>/`: one variant's training run and `eval.json`",
                readers="mix (resume)"),
         Output(RunDir.MIX_CHART, what="PNG", readers="you"),
         Output(RunDir.MIX, Mix, readers="report, plan (`--weights-from`)")),
        sections=(html.mix_section,)),
    StageDecl(
        "scaling", "domainlm scaling CONFIG --budgets ...", "`scaling/` (sweep, fit, points)",
        (Output(RunDir.POINTS, what="one `ScalingPoint` per line", readers="scaling --points"),
         Output(RunDir.LAW, Law, readers="plan (`--law fitted:PATH`)"))),
    StageDecl(
        "finetune", "domainlm finetune {run} --compare GENERAL_MODEL --data TRAIN.jsonl",
        "`finetune/` — `loop.py`, `classify.py`, `compare.py`",
        (Output(RunDir.FINETUNE_COMPARE, FinetuneComparison, readers="report"),), sections=(html.finetune_section,)),
    StageDecl(
        "downstream",
        "domainlm finetune {run} --head classification --compare GENERAL_MODEL --data TRAIN.jsonl",
        "`finetune/downstream.py` (both models fine-tuned the same way, then compared: docs/finetune.md)",
        (Output(RunDir.TASK_DATA, what="the LicenseDB split", readers="the downstream stage"),
         Output(RunDir.DOWNSTREAM, what="the two fine-tuned classifiers", readers="the downstream stage"),
         Output(RunDir.CLASSIFY_COMPARE, ClassifyComparison, readers="report, run summary")),
        run=lambda c: run_downstream(c.cfg, c.run_dir, c.console),
        title="downstream (domain vs general-only, fine-tuned the same way)",
        when=lambda cfg: cfg.downstream.task is not None, sections=(html.classify_section,)),
    StageDecl(
        "report", "domainlm report {run}", "`report/` — `html.py` (one section per output file), `plots.py`",
        (Output(RunDir.REPORT, what="self-contained HTML page", readers="you"),),
        run=_report, inputs=_report_inputs),
]


def register(decl: StageDecl, *, before: str | None = None) -> StageDecl:
    """Add a stage (a plugin's, or a test's), before ``before`` (default: before the report, which reads every
    other stage's output). Its outputs join ``SCHEMAS`` and ``PRODUCERS`` and its sections the report."""
    if any(d.name == decl.name for d in REGISTRY):
        raise ValueError(f"a stage named {decl.name!r} is registered already")
    names = [d.name for d in REGISTRY]
    REGISTRY.insert(names.index(before or "report"), decl)
    _refresh()
    return decl


def unregister(name: str) -> None:
    REGISTRY[:] = [d for d in REGISTRY if d.name != name]
    _refresh()


def stage(name: str) -> StageDecl:
    return next(d for d in REGISTRY if d.name == name)


SCHEMAS: dict[str, Any] = {}  # output file → its model (a model, or a union of models)
PRODUCERS: dict[str, str] = {}  # output file → the command that writes it


def _refresh() -> None:
    SCHEMAS.clear()
    PRODUCERS.clear()
    for d in REGISTRY:
        for o in d.outputs:
            if o.schema is not None:
                SCHEMAS.setdefault(o.rel, o.schema)
            PRODUCERS.setdefault(o.rel, d.command)


_refresh()

# The JSON files of a run directory that no stage declares as its own output: those inside child folders (a
# variant's or an arm's eval.json, a fine-tuning's summary, an extended base's files) by their path from that
# folder; `schema_for` finds the model of any JSON file of a run (tests/outputs_check.py checks them all).
FOLDER_SCHEMAS: dict[str, Any] = {
    RunDir.POINTS: ScalingPoint,  # one per line
    RunDir.EXTENDED_AUDIT: ExtensionAudit,
    RunDir.EXTENSION: Extension,
    f"{RunDir.ARM_BASE}/{RunDir.AUDIT_FILE}": ExtensionAudit,
    f"{RunDir.ARM_BASE}/{RunDir.EXTENSION_FILE}": Extension,
    RunDir.VARIANT_EVAL: AnyEval,
    RunDir.FINETUNE: AnyFinetune,
    RunDir.COMPARISON: AnyComparison,
    RunDir.TASK_BALANCE: TaskData,
    RunDir.COUNTS_FILE: Counts,  # in another tokenizer's token folder (tokens-<sha>/)
}


def schema_for(rel: str):
    """The model of the JSON file at ``rel`` inside a run directory — child runs included (``decide/continued/
    logs/train.json`` is a training summary) — or None when it has none. The longest known tail of ``rel`` decides."""
    parts = rel.split("/")
    for i in range(len(parts)):
        tail = "/".join(parts[i:])
        for table in (SCHEMAS, FOLDER_SCHEMAS):
            if tail in table:
                return table[tail]
    return None


def catalog() -> html.Catalog:
    """What the report needs to read any output: its schema and the command that writes it."""
    return html.Catalog(schemas=SCHEMAS, producers=PRODUCERS)


def build_report(run_dir: Path | str) -> dict:
    """`domainlm report`: the sections of every registered stage, in registry order."""
    return html.build_report(run_dir, [s for d in REGISTRY for s in d.sections], catalog())


# ------------------------------------------------------------------------------------------------ domainlm run


def run_order(cfg: RunConfig) -> list[StageDecl]:
    """The stages `domainlm run` runs for ``cfg``, in order (a stage with ``again_after`` a second time)."""
    order: list[StageDecl] = []
    included = [d for d in REGISTRY if d.run is not None and d.when(cfg)]
    for d in included:
        order.append(d)
        order += [replace(a, title=a.again_title or a.title) for a in included if a.again_after == d.name]
    return order


def check_outputs(decl: StageDecl, run_dir: Path) -> None:
    """Each JSON output the stage wrote validates against its schema (a one-line `UserError` naming the file)."""
    for o in decl.outputs:
        if o.schema is not None:
            load_output(Path(run_dir) / o.rel, o.schema)


def run_stage(decl: StageDecl, c: Ctx) -> object:
    """One stage of `domainlm run`: skipped through `stages.Stage` when it declares ``inputs`` and they are
    unchanged; its outputs checked against their schemas afterwards."""
    if decl.inputs is None:
        result = decl.run(c)
    else:
        s = stages.Stage(c.run_dir, decl.name, c.run_dir / decl.marker, decl.inputs(c),
                         intact=lambda: _valid(decl, c.run_dir))
        result, ran = s.run(lambda: decl.run(c), lambda: None)
        if not ran:  # `intact` has just checked its outputs
            c.console.print(f"{decl.name}: {decl.skipped}")
            return result
    check_outputs(decl, c.run_dir)
    return result


def _valid(decl: StageDecl, run_dir: Path) -> bool:
    """Whether every JSON output of a finished stage still parses as its model (a damaged one: redo the stage)."""
    try:
        check_outputs(decl, run_dir)
    except UserError:  # load_output's one line: absent is fine, unreadable or not its model is damage
        return False
    return True


def run_stages(c: Ctx) -> dict[str, float]:
    """Every stage of `run_order` in order; seconds per stage title."""
    order = run_order(c.cfg)
    seconds: dict[str, float] = {}
    for i, decl in enumerate(order, 1):
        title = decl.title or decl.name
        c.console.rule(f"[bold]stage {i}/{len(order)}: {title}[/]", align="left")
        t = time.perf_counter()
        run_stage(decl, c)
        seconds[title] = round(time.perf_counter() - t, 1)
        c.console.print(f"[dim]{title}: {seconds[title]:.1f} s[/]")
    return seconds


# ------------------------------------------------------------------------------------------------ the docs' table


def outputs_table() -> str:
    """docs/architecture.md's run-directory table, generated from the registry."""
    rows = ["| file (under `runs/<name>/`) | stage (command) | readers | schema (`outputs.py`) or format |",
            "|---|---|---|---|"]
    for d in REGISTRY:
        for o in d.outputs:
            schema = " or ".join(f"`{m.__name__}`" for m in (getattr(o.schema, "__args__", None) or [o.schema])) \
                if o.schema is not None else o.what
            rows.append(f"| `{o.rel}` | {d.name} (`{d.command}`) | {o.readers} | {schema} |")
    return "\n".join(rows) + "\n"


def stages_table() -> str:
    """docs/architecture.md's stage table: stage, command, code."""
    rows = ["| stage | command | code |", "|---|---|---|"]
    rows += [f"| {d.name} | `{d.command}` | {d.code} |" for d in REGISTRY]
    return "\n".join(rows) + "\n"


def write_docs(path: Path) -> bool:
    """Put the two generated tables between their markers in ``path`` (docs/architecture.md); whether it changed."""
    text = path.read_text(encoding="utf-8")
    new = text
    for key, table in (("stages", stages_table()), ("outputs", outputs_table())):
        start, end = f"<!-- registry:{key}", f"<!-- /registry:{key} -->"
        i = new.index(start)
        i = new.index("-->", i) + len("-->\n")
        j = new.index(end)
        new = new[:i] + table + new[j:]
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":  # python -m domainlm.pipeline [docs/architecture.md]: regenerate the doc's tables
    import sys

    doc = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/architecture.md")
    print(f"{doc}: {'updated' if write_docs(doc) else 'up to date'}")
