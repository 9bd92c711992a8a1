"""The `domainlm` command: one thin typer command per pipeline stage.

Errors from bad input print one line (``error: ...``) and exit with code 2; ``--debug`` anywhere on the
command line shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape

from domainlm import __version__, stages
from domainlm.errors import ConfigError, Preempted, UserError
from domainlm.lazy import lazy
from domainlm.rundir import RunDir, resolve_model_ref
from domainlm.stages import describe_environment_error, environment_error

# The commands' implementations, executed on first use (lazy.py): `domainlm --help` loads none of them.
ablate_ = lazy("domainlm.ablate")
config_ = lazy("domainlm.config")
data_command = lazy("domainlm.data.command")
decide_ = lazy("domainlm.decide")
evaluate_command = lazy("domainlm.evaluate.command")
evaluate_tasks = lazy("domainlm.evaluate.tasks")
finetune_classify = lazy("domainlm.finetune.classify")
finetune_compare = lazy("domainlm.finetune.compare")
finetune_loop = lazy("domainlm.finetune.loop")
generate_ = lazy("domainlm.generate")
mix_stage = lazy("domainlm.mix.stage")
mine_command = lazy("domainlm.mine.command")
slurm_launcher = lazy("domainlm.launch.slurm")
pipeline_ = lazy("domainlm.pipeline")
plan_command = lazy("domainlm.plan.command")
plan_report = lazy("domainlm.plan.report")
report_ = lazy("domainlm.report")
run_ = lazy("domainlm.run")
scaling_points = lazy("domainlm.scaling.points")
scaling_sweep = lazy("domainlm.scaling.sweep")
tokenize_ = lazy("domainlm.tokenize")
tokenizer_ = lazy("domainlm.tokenizer")
train_loop = lazy("domainlm.train.loop")

app = typer.Typer(
    name="domainlm",
    help="Pretrain your own domain-specific language model from scratch (the BloombergGPT recipe).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


class SafeConsole(Console):
    """A console for text that mixes our markup with user strings (paths, names, prompts): emoji codes are
    never replaced (``--prompt 'a:thumbs_up:b'``, an ``H:M:S`` in a message), and a line whose markup does not
    parse — a user string with a stray ``[/x]`` that no call site escaped — is printed as plain text instead of
    ending the command in a MarkupError after its work is done."""

    def __init__(self, **kw):
        super().__init__(emoji=False, **kw)

    def render_str(self, text: str, **kw):
        try:
            return super().render_str(text, **kw)
        except MarkupError:
            return super().render_str(text, **{**kw, "markup": False})


console = SafeConsole()
err_console = SafeConsole(stderr=True)
# The exception classes of the click that typer runs on (typer ≥ 0.2x vendors its own copy, typer._click).
CLICK = sys.modules[typer.BadParameter.__module__]
DEBUG = False

ConfigArg = Annotated[Path | None, typer.Argument(help="run config YAML (see recipes/legal-demo.yaml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
SeedsOpt = Annotated[int | None, typer.Option("--seeds", min=1, help="train each arm K times (seeds +0…+K−1); "
                                              "intervals over seeds and documents [compare.seeds, 1]")]


def _finite(lo: float, *, above: bool = False, hi=None):
    """A callback for a float flag: a finite number ≥ ``lo`` (> ``lo`` when ``above``) and ≤ ``hi``. click's
    FloatRange lets ``nan`` through (every comparison with it is false), and ``inf`` passes a lower bound.
    ``hi`` may be a function (a bound from a lazily loaded module)."""
    def check(value: float | None) -> float | None:
        if value is None:
            return value
        top = hi() if callable(hi) else hi
        ok = math.isfinite(value) and (value > lo if above else value >= lo) and (top is None or value <= top)
        if not ok:
            bound = f"{'>' if above else '≥'} {lo:g}" + (f" and ≤ {top:g}" if top is not None else "")
            raise typer.BadParameter(f"expected a finite number {bound}, got {value:g}")
        return value
    return check


def _version(value: bool) -> None:
    if value:
        console.print(f"domainlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks on errors")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="show the version")] = False,
) -> None:
    global DEBUG
    DEBUG = DEBUG or debug


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _wrote(path) -> None:
    console.print(f"wrote [bold]{escape(str(path))}[/]")


def _config_dir(config: Path | None, quick: bool = False) -> Path:
    """The run directory a config writes into (checked before any work: see `stages.locked`)."""

    cfg = config_.load_config(config)
    if quick:

        cfg = run_.quick_config(cfg)
    return cfg.directory()


def _locked(run_dir: Path, command: str):
    return stages.locked(run_dir, command)


def _is_run(folder: Path) -> bool:
    """A folder some stage of domainlm wrote into (its resolved config, stage markers or a stage's output)."""
    try:
        return resolve_model_ref(folder, need_model=False, outputs=pipeline_.PRODUCERS).is_run
    except UserError:
        return False


def _run_of(model_or_run: Path) -> Path | None:
    """The run directory a MODEL_OR_RUN argument names (its outputs go there: lock it), else None."""
    try:
        return resolve_model_ref(model_or_run, need_model=False).run_dir
    except UserError:
        return None  # the command itself says what is wrong with it


def _writable_file(path: Path, flag: str) -> Path:
    """Fail before any expensive work when ``flag``'s output file cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    _writable_folder(path.parent, flag, path)
    return path


def _writable_folder(folder: Path, flag: str, shown: Path | None = None) -> Path:
    shown = shown or folder
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {shown}: {folder} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{flag} {shown}: cannot write to {folder} ({e.strerror}); choose a writable path") from None
    return folder


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _plot_path(plot: Path) -> Path:
    """--plot: a file name with an image suffix, or an existing folder (the chart goes to FOLDER/plan.png)."""
    if plot.is_dir():
        plot = plot / RunDir.PLAN_CHART
    elif plot.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"--plot {plot}: expected an image file name ending in {', '.join(PLOT_SUFFIXES)} "
                        "(or an existing folder)")
    return _writable_file(plot, "--plot")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------------- plan


@app.command()
def plan(
    config: ConfigArg = None,
    flops: Annotated[str | None, typer.Option(help="compute budget in FLOPs, e.g. 1e21")] = None,
    gpu: Annotated[str | None, typer.Option(help="a100-40gb, a100-80gb, h100, h200, l4 or cpu (measured)")] = None,
    gpus: Annotated[str | None, typer.Option(help="number of GPUs [1]")] = None,
    hours: Annotated[str | None, typer.Option(help="wall-clock hours on --gpus GPUs")] = None,
    mfu: Annotated[str | None, typer.Option(help="model FLOPs utilisation in (0, 1] [0.40]")] = None,
    unique_tokens: Annotated[
        list[str] | None, typer.Option("--unique-tokens", help="data limit per source, NAME=TOKENS (repeatable)")
    ] = None,
    weight: Annotated[list[str] | None, typer.Option("--weight", help="mixture weight, NAME=W (repeatable)")] = None,
    weights_from: Annotated[Path | None, typer.Option("--weights-from", help="the weights `domainlm mix` "
                                                      "recommends: <run>/mix/mix.json")] = None,
    law: Annotated[
        str | None, typer.Option(help="chinchilla-1|chinchilla-2|chinchilla-3|epoch-2024|kaplan|fitted:PATH "
                                      "[epoch-2024]")
    ] = None,
    vocab_size: Annotated[
        str | None, typer.Option(help="vocabulary size for the model shape [planned: Tao et al. 2024]")
    ] = None,
    seq_len: Annotated[str | None, typer.Option(help="sequence length for FLOPs and memory [2048]")] = None,
    plot: Annotated[Path | None, typer.Option(help="write the params-vs-tokens chart here (.png/.svg/.pdf; a folder: "
                                                   "FOLDER/plan.png)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Size the model and its token budget with scaling laws (compute-optimal and data-constrained)."""


    plot = _plot_path(plot) if plot is not None else None
    with _locked(_config_dir(config), "plan") if config is not None else contextlib.nullcontext():
        result, written = plan_command.run_plan(config, flops=flops, gpu=gpu, gpus=gpus, hours=hours, mfu=mfu,
                                                unique_tokens=unique_tokens, weight=weight, weights_from=weights_from,
                                                law=law, vocab_size=vocab_size, seq_len=seq_len, plot=plot)
    if as_json:
        print_json(result)
        return

    plan_report.print_plan(result, console)
    for p in written:
        _wrote(p)


# ---------------------------------------------------------------------------------------------------- memory


@app.command()
def memory(
    params: Annotated[str | None, typer.Option(help="parameter count, e.g. 7.5e9 or 7.5B")] = None,
    model: Annotated[Path | None, typer.Option(help="a Hugging Face model folder or run directory: its real shape "
                                                    "and parameter count (config.json)")] = None,
    precision: Annotated[str, typer.Option(help="fp32 | bf16-mixed | bf16")] = "bf16-mixed",
    optimizer: Annotated[str, typer.Option(help="adamw | sgd | adafactor")] = "adamw",
    sharding: Annotated[str | None, typer.Option(help="ddp | zero1 | zero2 | zero3")] = None,
    gpus: Annotated[str, typer.Option(help="data-parallel GPUs")] = "1",
    gpu: Annotated[str | None, typer.Option(help="GPU kind, for its memory (a100-40gb, h100, ...)")] = None,
    gpu_memory_gb: Annotated[str | None, typer.Option(help="memory per GPU in GB")] = None,
    seq_len: Annotated[str | None, typer.Option(help="sequence length (activations)")] = None,
    micro_batch: Annotated[str | None, typer.Option(help="sequences per GPU per micro-step (activations)")] = None,
    n_layers: Annotated[str | None, typer.Option(help="layers (default: the plan's shape rule)")] = None,
    d_model: Annotated[str | None, typer.Option(help="hidden size (default: the plan's shape rule)")] = None,
    vocab_size: Annotated[str | None, typer.Option(help="vocabulary size (logits) [32768, or --model's]")] = None,
    activation_checkpointing: Annotated[bool, typer.Option(help="recompute activations in backward")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Per-GPU memory for weights, gradients, optimizer states and activations; the least sharding that fits."""

    result = plan_command.run_memory(
        params=params,
        model=model,
        precision=precision,
        optimizer=optimizer,
        sharding=sharding,
        gpus=gpus,
        gpu=gpu,
        gpu_memory_gb=gpu_memory_gb,
        seq_len=seq_len,
        micro_batch=micro_batch,
        n_layers=n_layers,
        d_model=d_model,
        vocab_size=vocab_size,
        activation_checkpointing=activation_checkpointing,
    )
    if as_json:
        print_json(result)
        return

    plan_report.print_memory(result, console)


# ---------------------------------------------------------------------------------------------------- prepare


@app.command()
def prepare(config: ConfigArg = None, as_json: JsonOpt = False) -> None:
    """Clean, deduplicate and split the sources (datatrove)."""

    result = data_command.run_prepare(config, console=err_console if as_json else console)
    print_json(result) if as_json else data_command.print_prepare(result, console)


# ---------------------------------------------------------------------------------------------------- mine


@app.command()
def mine(config: ConfigArg = None, as_json: JsonOpt = False) -> None:
    """Mine domain documents from general pools with a fastText classifier (after prepare; docs/mine.md)."""
    result = mine_command.run_mine(config, console=err_console if as_json else console)
    print_json(result) if as_json else mine_command.print_mine(result, console)


# ---------------------------------------------------------------------------------------------------- tokenizer


@app.command()
def tokenizer(config: ConfigArg = None, as_json: JsonOpt = False) -> None:
    """Train the tokenizer on the prepared data (mixture-weighted) and audit it against a general-only baseline."""

    with _locked(_config_dir(config), "tokenizer"):
        result = tokenizer_.run_tokenizer(config, console=None if as_json else console)
    if as_json:
        print_json(result)
        return
    tokenizer_.print_audit(result, console)


@app.command()
def tokenize(
    config: ConfigArg = None,
    tokenizer_dir: Annotated[Path | None, typer.Option("--tokenizer", help="another Hugging Face tokenizer folder "
                             "(e.g. a base model's): its token files go to their own tokens-<sha>/ folder")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Tokenize the prepared data into token files (tokens/<source>/{train,val}.bin, tokens/counts.json)."""

    result = tokenize_.run_tokenize(config, err_console if as_json else console, tokenizer_dir)
    print_json(result) if as_json else tokenize_.print_tokenize(result, console)


# ---------------------------------------------------------------------------------------------------- train, generate


@app.command()
def train(
    config: ConfigArg = None,
    restart: Annotated[bool, typer.Option("--restart", help="delete checkpoints and logs; start over")] = False,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="train N steps in all (the schedule fits N)")] = None,
) -> None:
    """Pretrain the model from scratch (resumes from the latest checkpoint); also `torchrun -m domainlm train`."""

    with _locked(_config_dir(config), "train"):
        train_loop.run_training(config, restart=restart, max_steps=max_steps, console=err_console)


@app.command()
def generate(
    model_dir: Annotated[Path, typer.Argument(help="a model folder, e.g. runs/<name>/model")],
    prompt: Annotated[str, typer.Option(help="text to continue")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to sample")] = 50,
    temperature: Annotated[float, typer.Option(callback=_finite(0, hi=100), help="0 = greedy")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="sample from the k most likely tokens (0 = all)")] = 50,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
) -> None:
    """Sample a continuation of --prompt from a trained model folder."""

    text = generate_.generate(model_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k or None, seed=seed)
    console.print(text, highlight=False, markup=False)


# ---------------------------------------------------------------------------------------------------- finetune


@app.command()
def finetune(
    model_or_run: Annotated[Path, typer.Argument(help="a run directory (its model/) or an HF model folder")],
    data: Annotated[Path, typer.Option(help="instruction JSONL: prompt/response or messages per line")],
    val: Annotated[Path | None, typer.Option(help="validation JSONL (loss on response tokens)")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder [<run>/finetune/<data name>]")] = None,
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps")] = 300,
    batch_size: Annotated[int, typer.Option(min=1, help="conversations per step")] = 16,
    micro_batch: Annotated[int, typer.Option(min=1, help="conversations per forward pass")] = 16,
    lr: Annotated[float, typer.Option(callback=_finite(0, above=True, hi=10),
                                      help="peak learning rate (cosine, 5% warmup)")] = 3e-4,
    seed: Annotated[int, typer.Option(help="example order seed")] = 0,
    lora: Annotated[bool, typer.Option("--lora", help="LoRA adapters (needs peft: domainlm[lora]), merged")] = False,
    too_long: Annotated[str, typer.Option(help="longer than the context: truncate (left) | reject")] = "truncate",
    max_len: Annotated[int | None, typer.Option(min=8, help="tokens per example [the model's context]")] = None,
    compare: Annotated[Path | None, typer.Option(help="also fine-tune this general model; score both")] = None,
    test: Annotated[Path | None, typer.Option(help="--compare: test JSONL [the built LicenseDB test split]")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="--compare: tasks [both licensedb ones]")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="delete the output folder; start over")] = False,
    head: Annotated[str, typer.Option(help="lm: instruction-tune the LM | classification: a sequence "
                                      "classification head ({text, label} lines or licensedb-category items)")] = "lm",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="--compare: fine-tune each model K times (--seed "
                                       "+0…+K−1); intervals over seeds and test items")] = 1,
) -> None:
    """Instruction-tune a model (loss on responses only), or --head classification; --compare GENERAL: domain vs
    general downstream."""

    args = finetune_loop.FinetuneArgs(steps=steps, batch_size=batch_size, micro_batch=min(micro_batch, batch_size),
                                      lr=lr, seed=seed, lora=lora, too_long=too_long, max_len=max_len)
    if out is not None:
        _writable_folder(Path(out), "--out")
    run_dir = _run_of(model_or_run)
    if run_dir is not None:
        with _locked(run_dir, "finetune"):  # a run directory: the output goes to <run>/finetune/
            _finetune(model_or_run, data, val, out, args, compare, test, task, restart, head, seeds)
    else:
        _finetune(model_or_run, data, val, out, args, compare, test, task, restart, head, seeds)


def _finetune(model_or_run, data, val, out, args, compare, test, task, restart, head="lm", seeds=1) -> None:
    if head not in ("lm", "classification"):
        raise UserError(f"--head: expected lm or classification, got {head!r}")
    if seeds > 1 and compare is None:
        raise UserError("--seeds: compares fine-tuned models; give --compare GENERAL_MODEL")
    if compare is None:

        fit = finetune_loop.finetune if head == "lm" else finetune_classify.finetune_classifier
        fit(model_or_run, data, val=val, out=out, args=args, restart=restart, console=err_console)
        return

    result, written = finetune_compare.compare(model_or_run, compare, data, val=val, test=test, out=out, args=args,
                                               tasks=task, head=head, seeds=seeds, restart=restart,
                                               console=err_console)
    finetune_compare.print_compare(result, console)
    for p in written:
        _wrote(p)


@app.command()
def tasks(
    name: Annotated[str, typer.Argument(help="licensedb (the packaged ScanCode LicenseDB)")],
    out: Annotated[Path, typer.Option(help="folder for the JSONL splits, exclude_ids.txt")] = Path(RunDir.TASK_DATA),
    test_fraction: Annotated[float, typer.Option(callback=_finite(0.01, hi=0.9), help="licenses held out for "
                                                 "test")] = 0.2,
    seed: Annotated[int, typer.Option(help="split seed")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Build downstream task data (split by license) and the pretraining exclusion list; print class balance."""

    if name != "licensedb":
        raise UserError(f"tasks: unknown task set {name!r}; expected licensedb")
    _writable_folder(out, "--out")
    result = evaluate_tasks.write_task_data(out, test_fraction=test_fraction, seed=seed)
    print_json(result) if as_json else evaluate_tasks.print_balance(result, console)


# ---------------------------------------------------------------------------------------------------- eval


@app.command("eval")
def eval_(
    model_or_run: Annotated[Path, typer.Argument(help="a run directory (scores <run>/model/) or any HF model folder")],
    text: Annotated[
        list[str] | None, typer.Option("--text", help="extra text to score, NAME=PATH (file or folder; repeatable)")
    ] = None,
    probes: Annotated[Path | None, typer.Option(help="term probe JSONL (default: the config's eval.probes)")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run", help="with an HF folder: score the val splits of RUN")] = None,
    out: Annotated[Path | None, typer.Option(help="write eval.json here (default: <run>/eval/eval.json)")] = None,
    context: Annotated[int | None, typer.Option(help="window in tokens (default: the model's context)")] = None,
    stride: Annotated[int | None, typer.Option(
        help="new tokens per sliding window (default: context/2); costs ≈ context/stride× the compute of "
             "--stride = context, for at least context − stride tokens of left context")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="bytes scored per source (default: eval config)")] = None,
    task: Annotated[
        list[str] | None, typer.Option("--task", help="downstream task: licensedb-category | licensedb-name")
    ] = None,
    task_data: Annotated[Path | None, typer.Option(help="--task test JSONL [the built LicenseDB test split]")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Bits per byte per source and on your text, loss/token, perplexity, and domain-term probe accuracy."""

    if out is not None:
        _writable_file(out, "--out")  # before the evaluation, not after it
    target = _run_of(model_or_run) if out is None else None  # a run directory: eval.json goes to <run>/eval/
    with _locked(target, "eval") if target is not None else contextlib.nullcontext():
        _eval(model_or_run, text, probes, run_dir, out, context, stride, max_bytes, task, task_data, as_json)


def _eval(model_or_run, text, probes, run_dir, out, context, stride, max_bytes, task, task_data, as_json) -> None:
    if task:

        results, written = evaluate_command.run_tasks(model_or_run, task, test=task_data, out=out,
                                     console=None if as_json else err_console)
        print_json(results) if as_json else evaluate_command.print_tasks(results, written, console)
        return

    for flag, v in (("--context", context), ("--stride", stride), ("--max-bytes", max_bytes)):
        if v is not None and v < 1:
            raise UserError(f"{flag}: expected a whole number >= 1, got {v}")
    result, written = evaluate_command.run_eval(model_or_run, texts=text, probes=probes, run=run_dir, out=out,
                                                context=context, stride=stride, max_bytes=max_bytes,
                                                console=None if as_json else err_console)
    if os.environ.get("RANK", "0") != "0":
        return  # torchrun: the other ranks scored their share; rank 0 prints
    if as_json:
        print_json(result)
        return
    evaluate_command.print_eval(result, console)
    if written is not None:
        _wrote(written)


# ---------------------------------------------------------------------------------------------------- report


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory, e.g. runs/<name>")],
    as_json: JsonOpt = False,
) -> None:
    """One self-contained HTML page (plus PNGs) in RUN_DIR/report/: plan, data, tokenizer, loss curves, eval."""

    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: a file, not a run directory; give the folder of a run, e.g. runs/<name>")
    if run_dir.is_dir() and not _is_run(run_dir):
        raise UserError(f"{run_dir}: not a run directory (no config.yaml, plan.json or other stage output); "
                        "give the folder of a run, e.g. runs/<name>")
    if not run_dir.is_dir():
        pipeline_.build_report(run_dir)  # its own error: no such run directory
    with _locked(run_dir, "report"):
        result = pipeline_.build_report(run_dir)
    print_json(result) if as_json else report_.print_report(result, console)


# ---------------------------------------------------------------------------------------------------- scaling


@app.command()
def scaling(
    config: ConfigArg = None,
    budgets: Annotated[str, typer.Option(help="comma-separated compute budgets, FLOPs (C = 6·N·D)")] = "1e13,3e13,1e14",
    sizes: Annotated[int, typer.Option(help="model sizes per budget, spread ×1/4…×4 around the law's optimum")] = 5,
    law_out: Annotated[Path | None, typer.Option(help="law.json path (default <run>/scaling/law.json)")] = None,
    tokens_per_step: Annotated[int | None, typer.Option(help="batch for the sweep (default: the config's)")] = None,
    points: Annotated[Path | None, typer.Option(
        help="fit a CSV of points measured elsewhere (params,tokens,loss[,flops]); no training")] = None,
    as_json: JsonOpt = False,
) -> None:
    """IsoFLOP sweep on the prepared data, Chinchilla fits → law.json for `domainlm plan --law fitted:PATH`."""

    if law_out is not None:
        _writable_file(law_out, "--law-out")
    if points is not None:

        if config is not None:
            raise UserError("--points: fits the CSV alone; give no CONFIG with it")
        result = scaling_points.fit_points(points, law_out=law_out)
        print_json({k: result[k] for k in ("law_path", "plot")} | result["law"]) if as_json \
            else scaling_sweep.print_scaling(result, console)
        return
    with _locked(_config_dir(config), "scaling"):
        result = scaling_sweep.run_sweep(config, budgets, sizes, law_out=law_out, step_tokens=tokens_per_step,
                           console=err_console if as_json else console)
    print_json(result) if as_json else scaling_sweep.print_scaling(result, console)


# ---------------------------------------------------------------------------------------------------- run


@app.command()
def run(
    config: ConfigArg = None,
    quick: Annotated[bool, typer.Option("--quick", help="a scaled-down copy (runs/<name>-quick), ~1-2 minutes")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The whole pipeline (plan → prepare → tokenizer → train → eval → baseline → report), skipping done stages."""

    with _locked(_config_dir(config, quick), "run"):
        summary = run_.run_all(config, console=err_console if as_json else console, quick=quick)
    print_json(summary) if as_json else run_.print_summary(summary, console)


# ---------------------------------------------------------------------------------------------------- ablate


@app.command()
def ablate(
    config: ConfigArg = None,
    domain_weights: Annotated[str, typer.Option(help="comma-separated domain weights to train")] = "0,0.51,1",
    seeds: SeedsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the same model shape on the same token budget per domain weight; bpb of each on every source."""

    with _locked(_config_dir(config), "ablate"):
        result = ablate_.run_ablate(config, domain_weights, console=err_console if as_json else console,
                                    seeds=seeds)
    print_json(result) if as_json else ablate_.print_ablation(result, console)


# ---------------------------------------------------------------------------------------------------- mix


@app.command()
def mix(
    config: ConfigArg = None,
    weights: Annotated[str | None, typer.Option(help="domain weights to train, ≥ 5 with both ends "
                                                "[0,0.25,0.5,0.75,1]")] = None,
    seeds: Annotated[int, typer.Option(help="training seeds per weight and budget (≥ 2)")] = 2,
    budgets: Annotated[str | None, typer.Option(help="token budgets of the small runs, ≥ 2, e.g. 3e4,6e4 "
                                                "[¼ and ½ of the run's]")] = None,
    target_tokens: Annotated[str | None, typer.Option("--target-tokens", help="the budget to recommend a weight "
                                                      "for [the run's: train.max_tokens or the plan's]")] = None,
    held_out: Annotated[float | None, typer.Option("--held-out", help="interior weight left out of the check's "
                                                   "fit [the one nearest the configured weight]")] = None,
    max_general_cost: Annotated[str | None, typer.Option("--max-general-cost", help="objective: lowest domain bpb "
                                                         "with general bpb at most X worse than general-only "
                                                         "[2%]")] = None,
    objective_weights: Annotated[str | None, typer.Option("--objective-weights", help="objective: lowest weighted "
                                                          "sum of bpb, e.g. legal=1,news=1")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The domain weight chosen by a mixing law fitted on small runs (Ye et al. 2024 + Muennighoff's repetition)."""
    with _locked(_config_dir(config), "mix"):
        result = mix_stage.run_mix(config, weights=weights, seeds=seeds, budgets=budgets, target_tokens=target_tokens,
                         held_out=held_out, max_general_cost=max_general_cost, objective_weights=objective_weights,
                         console=err_console if as_json else console)
    print_json(result) if as_json else mix_stage.print_mix(result, console)


# ---------------------------------------------------------------------------------------------------- decide


@app.command()
def decide(
    config: ConfigArg = None,
    base: Annotated[Path | None, typer.Option(help="the general model: any HF causal-LM folder or run directory "
                                              "[the run's general-only baseline, ablate/w0]")] = None,
    extend_vocab: Annotated[int, typer.Option("--extend-vocab", min=0, help="also continue the base with N domain "
                                              "tokens added to its tokenizer (0: no such arm)")] = 0,
    text: Annotated[
        list[str] | None, typer.Option("--text", help="extra text to score, NAME=PATH (file or folder; repeatable)")
    ] = None,
    base_tokens: Annotated[float | None, typer.Option(
        "--base-tokens", callback=_finite(0, above=True, hi=lambda: config_.MAX_TOKENS),
        help="tokens the base was pretrained on (for its compute; a domainlm run records its own)")] = None,
    lr: Annotated[float | None, typer.Option("--lr", callback=_finite(0, above=True, hi=10),
                                             help="peak learning rate of the continued arms, re-warmed "
                                             "[train.lr]")] = None,
    seeds: SeedsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """From scratch or continued? Train both at equal tokens; bpb per source, probes, compute, and a verdict."""

    with _locked(_config_dir(config), "decide"):
        result = decide_.run_decide(config, base=base, extend_vocab=extend_vocab, texts=text, base_tokens=base_tokens,
                            lr=lr, seeds=seeds, console=err_console if as_json else console)
    print_json(result) if as_json else decide_.print_decide(result, console)


# ---------------------------------------------------------------------------------------------------- launch

launch_app = typer.Typer(help="Run training on a cluster (Slurm).", no_args_is_help=True)
app.add_typer(launch_app, name="launch")


@launch_app.command("slurm")
def launch_slurm(
    config: ConfigArg = None,
    nodes: Annotated[int, typer.Option(min=1, help="nodes")] = 1,
    gpus_per_node: Annotated[int, typer.Option(min=0, help="GPUs per node (0: CPU-only, gloo)")] = ...,
    procs_per_node: Annotated[int | None, typer.Option(min=1, help="processes per node [GPUs per node, else 1]")] = None,
    cpus_per_task: Annotated[int | None, typer.Option(min=1, help="CPUs per node's torchrun [processes per node]")] = None,
    partition: Annotated[str | None, typer.Option(help="Slurm partition [the cluster's default]")] = None,
    time: Annotated[str | None, typer.Option(help="time limit, e.g. 2-00:00:00 [the partition's]")] = None,
    account: Annotated[str | None, typer.Option(help="Slurm account to charge [your default]")] = None,
    qos: Annotated[str | None, typer.Option(help="quality of service [the account's default]")] = None,
    mem: Annotated[str | None, typer.Option(help="memory per node, e.g. 512G; 0: all of it [the cluster's]")] = None,
    exclusive: Annotated[bool, typer.Option("--exclusive", help="whole nodes, shared with no other job")] = False,
    constraint: Annotated[str | None, typer.Option(help="node features, e.g. h100&ib")] = None,
    gres: Annotated[str | None, typer.Option(help="GPUs as generic resources, e.g. gpu:8 (no cons_tres)")] = None,
    signal_seconds: Annotated[int, typer.Option(help="USR1 this long before the time limit: checkpoint, requeue "
                                                     "(0: none)")] = 300,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="write the sbatch script, do not submit it")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write <run>/launch/train.sbatch (srun + torchrun -m domainlm train, requeue-safe) and submit it."""

    res = slurm_launcher.launch_train(
        config, nodes=nodes, gpus_per_node=gpus_per_node, procs_per_node=procs_per_node, cpus_per_task=cpus_per_task,
        partition=partition, time_limit=time, account=account, qos=qos, mem=mem, exclusive=exclusive,
        constraint=constraint, gres=gres, signal_s=signal_seconds, dry_run=dry_run)
    if as_json:
        print_json(res)
        return
    console.print(f"wrote {res['script']} ({res['nodes']} node(s) × {res['procs_per_node']} process(es))",
                  markup=False, highlight=False)
    if not res["data_ready"]:
        console.print("note: no token files yet: run `domainlm prepare`, `domainlm tokenizer` and `domainlm "
                      "tokenize` before submitting it", markup=False, highlight=False)
    if res["job_id"]:
        console.print(f"submitted job {res['job_id']}: `squeue -j {res['job_id']}`, log {res['log']}",
                      markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------------- entry


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the command (a BaseException: neither click nor an ``except Exception`` on the
    way up catches it, and every ``with`` — the run lock, a temp file — is unwound)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_MAIN_PID: list[int] = []  # the process whose `main` installed the handlers


def _on_signal(signum, frame) -> None:
    if not _MAIN_PID or os.getpid() != _MAIN_PID[-1]:  # a worker forked by the command: what it did before
        if signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(signum)


def _interrupted(signum: int, args: list[str]) -> None:
    command = next((a for a in args if not a.startswith("-")), None)
    what = f"`domainlm {command}`" if command else "domainlm"
    err_console.print(f"interrupted ({signal.Signals(signum).name}): {what} stopped; finished work is kept: rerun "
                      "the same command to resume", markup=False, highlight=False, soft_wrap=True)
    sys.exit(128 + signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def _error(msg: str) -> None:
    """``error: <msg>`` on one line; the message is user text (paths, keys), never rich markup."""
    err_console.print(f"[red]error:[/] {escape(_one_line(msg))}", highlight=False, soft_wrap=True)


def _cause(e: BaseException, kinds) -> BaseException | None:
    """``e`` or the exception it was raised from / while handling, when of one of ``kinds``."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kinds):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _quiet_third_party() -> None:
    """transformers' load reports and warnings (27 lines with ANSI codes before our one-line error) and the
    progress bars of transformers / huggingface_hub (tqdm on stderr) stay off unless --debug: the commands
    print their own progress and their own errors."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:  # transformers is imported already (a test, an embedding program)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    global DEBUG
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        DEBUG = True
        args = [a for a in args if a != "--debug"]
    DEBUG = DEBUG or os.environ.get("DOMAINLM_DEBUG") == "1"
    if not DEBUG:
        _quiet_third_party()
    command = typer.main.get_command(app)
    previous = {}
    try:  # SIGINT/SIGTERM end the command with one line and 130/143, not a traceback or a silent death
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, _on_signal)
        _MAIN_PID.append(os.getpid())
    except ValueError:  # not the main thread (an embedding program): leave its handlers alone
        pass
    try:
        rc = command.main(args=args, prog_name="domainlm", standalone_mode=False)
    except Interrupted as e:
        _interrupted(e.signum, args)
    except ConfigError as e:
        if DEBUG:
            raise
        for p in e.problems:
            _error(p)
        sys.exit(e.exit_code)
    except UserError as e:
        if DEBUG:
            raise
        _error(str(e))
        sys.exit(e.exit_code)
    except Preempted as e:  # a checkpoint is written; the requeued job (or a rerun) resumes from it
        err_console.print(_one_line(str(e)), markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted(signal.SIGINT, args)
    except CLICK.UsageError as e:  # bad flags or arguments (BadParameter, NoSuchOption, MissingParameter, …)
        if isinstance(e, getattr(CLICK, "NoArgsIsHelpError", ())):  # click ≥ 8.2: the command without arguments
            command.main(args=["--help"], prog_name="domainlm", standalone_mode=False)
            sys.exit(0)
        if DEBUG:
            raise
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _error(f"{e.format_message()}{where}")
        sys.exit(2)
    except Exception as e:
        if DEBUG:
            raise

        env = environment_error(e)
        if env is not None:
            _error(describe_environment_error(env))
            sys.exit(2)
        if isinstance(e, typer.Abort):  # click turns EOFError (stdin closed at a prompt) into an Abort
            if _cause(e, KeyboardInterrupt) is not None:  # … and KeyboardInterrupt
                _interrupted(signal.SIGINT, args)
            eof = _cause(e, EOFError)
            _error(f"unexpected end of input ({eof})" if eof is not None and str(eof) else "aborted")
            sys.exit(1)
        # A bug, not bad input: still one line (the traceback is one --debug away).
        _error(f"internal error: {type(e).__name__}: "
               f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}; "
               "rerun with --debug for the traceback and report it")
        sys.exit(1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if previous:
            _MAIN_PID.pop()
    sys.exit(rc if isinstance(rc, int) else 0)
