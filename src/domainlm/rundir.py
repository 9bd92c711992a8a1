"""Crash-safe writes for every file and folder of a run directory.

A stage's output is either absent or complete, whatever kills the process and when: each file is written to
a temporary sibling, flushed to disk, and renamed over its final name (``rename`` is atomic on POSIX); a folder
(the tokenizer, the HF export) is built under a temporary name and swapped in. Readers therefore never see a
torn file under a final name — the property the crash tests (tests/test_crash_*.py) check at every fault site.
Temporary names start with ``.`` or end in ``.tmp`` so listings and globs of outputs skip them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import typing
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from domainlm.errors import UserError


def fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a folder: so a rename in it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clear_temp(path: Path | str) -> Path:
    """Remove whatever is at a temporary name (left by a killed writer, or planted) without following a link:
    a symbolic link is removed itself, never its target; a folder with its files (rmtree does not follow links
    either). Returns ``path``, now absent."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()
    return path


@contextlib.contextmanager
def naming(path: Path | str):
    """An OSError raised without a file name inside the block (a write to an open file: disk full, quota, I/O
    error) gets ``path``'s, so its one-line error says which file could not be written."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise


def _link_refused(path: Path) -> UserError:
    return UserError(f"{path}: a symbolic link where domainlm writes a file of its own; domainlm never writes "
                     "through a link in a run directory: remove the link, then rerun")


def open_new(path: Path | str):
    """A new file at the temporary name ``path``, open for writing in binary: what was there is removed first
    (`clear_temp`), then the file is created with O_EXCL|O_NOFOLLOW — a link planted at the name, even in
    between, is refused, never followed (a run directory may be shared or downloaded)."""
    path = clear_temp(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        raise _link_refused(path) from None
    return os.fdopen(fd, "wb")


def open_append(path: Path | str, mode: str = "a"):
    """``path`` opened for appending (created if absent), refused if it is a symbolic link (logs, metrics)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_refused(path) from None
        raise
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def atomic_write(path: Path | str, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through ``.<name>.tmp`` + fsync + rename; create the parent folder. (One fixed
    temporary name: a write killed midway leaves it, and the next write of the same file removes it and starts
    afresh, never writing through a link planted there (`open_new`); two writers of one run directory are
    excluded by its lock. The rename replaces a link at ``path`` itself, never its target.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with naming(path), open_new(tmp) as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except UserError:
        raise  # a link at tmp: not ours to remove
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)
    return path


def write_json(path: Path | str, obj, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """``obj`` as JSON (UTF-8, a final newline), atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def temp_path(path: Path | str, suffix: str = "") -> Path:
    """A temporary sibling of ``path`` for writers that need a file name (savefig, np.save, save_pretrained):
    write it, then ``publish`` it. Whatever is at that name is removed first (`clear_temp`): the writer creates
    a new file, not one through a planted link."""
    path = Path(path)
    return clear_temp(path.with_name(f".{path.stem}.tmp{suffix or path.suffix}"))


def save_figure(fig, path: Path | str, **savefig) -> Path:
    """A matplotlib figure written to ``path`` through `temp_path` + `publish` (never a torn chart, never through a
    planted link; a disk-full error names ``path``), then closed whatever happened."""
    import matplotlib.pyplot as plt  # optional: only where charts are drawn

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with naming(path):
            fig.savefig(tmp, **savefig)
    finally:
        plt.close(fig)
    return publish(tmp, path)


def publish(tmp: Path, path: Path | str) -> Path:
    """Rename a finished temporary file (from ``temp_path``) over ``path``."""
    path = Path(path)
    os.replace(tmp, path)
    fsync(path.parent)
    return path


def swap_dir(tmp: Path, out: Path) -> Path:
    """Replace folder ``out`` by the finished folder ``tmp``: at every moment ``out`` is absent, the old folder
    or the new one (the old one is parked at ``<out>.old`` between the two renames, and restored on the next
    call if a crash came in between)."""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(out.name + ".old")
    if old.is_dir() and not old.is_symlink() and not out.exists():
        os.replace(old, out)  # a crash between the two renames below: the old folder is still whole
    clear_temp(old)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out


class RunDir:
    """Every path of a run directory: the one place the stages' file names are spelled (see docs/architecture.md
    for which stage writes each file and which read it)."""

    CONFIG = "config.yaml"  # the resolved config (plan, prepare)
    RUN_CONFIG = "run-config.yaml"  # domainlm run: the config every stage of the run reads (--quick: scaled down)
    PLAN = "plan.json"  # domainlm plan
    PLAN_CHART = "plan.png"
    DATA = "data"  # data/<source>/{train,val}/*.jsonl.gz — domainlm prepare
    STATS = "data/stats.json"  # written last: the data stage is complete
    TOKENIZER = "tokenizer"  # HF tokenizer folder — domainlm tokenizer
    AUDIT_FILE = "audit.json"  # a tokenizer's audit, in its folder (also in an extended base model's folder)
    AUDIT = f"{TOKENIZER}/{AUDIT_FILE}"
    TOKENS = "tokens"  # tokens/<source>/{train,val}.bin — domainlm tokenize (other tokenizers: tokens-<sha>/)
    COUNTS_FILE = "counts.json"  # in a token folder, written last: its token files are complete
    COUNTS = f"{TOKENS}/{COUNTS_FILE}"
    CHECKPOINTS = "checkpoints"  # domainlm train
    LOGS = "logs"
    METRICS = f"{LOGS}/metrics.jsonl"
    TENSORBOARD = f"{LOGS}/tensorboard"  # TensorBoard events of the training loop
    TRAIN = f"{LOGS}/train.json"  # the train summary, after the export
    MODEL = "model"  # the Hugging Face export
    EVAL_DIR = "eval"
    EVAL = f"{EVAL_DIR}/eval.json"  # domainlm eval
    TASKS = f"{EVAL_DIR}/tasks.json"  # domainlm eval --task
    FINETUNE_COMPARE = f"{EVAL_DIR}/finetune.json"  # domainlm finetune --compare
    CLASSIFY_COMPARE = f"{EVAL_DIR}/classify.json"  # domainlm finetune --head classification --compare
    TASK_DATA = "tasks/licensedb"  # domainlm run's downstream stage: the LicenseDB split (domainlm tasks licensedb)
    TASK_BALANCE = "balance.json"  # in a task-data folder, written last: its splits and class balance
    # Child runs (`child`): each is a run directory of its own (config.yaml, checkpoints/, model/, ...).
    ABLATE_DIR = "ablate"  # ablate/w<W>/: a domain-weight variant — domainlm ablate; w0: domainlm run's baseline
    SCALING_DIR = "scaling"  # scaling/C<budget>/N<params>/: a point of the IsoFLOP sweep — domainlm scaling
    DECIDE_DIR = "decide"  # decide/<arm>/: an arm's training run and its eval.json — domainlm decide
    FINETUNE_DIR = "finetune"  # finetune/<name>/: a fine-tuning of the run's model — domainlm finetune
    MIX_DIR = "mix"  # mix/D<tokens>-w<weight>-s<seed>/: one variant of the design — domainlm mix
    CHILD_KINDS = (ABLATE_DIR, SCALING_DIR, DECIDE_DIR, FINETUNE_DIR, MIX_DIR)
    SEED_SUFFIX = "-seed"  # a child run trained with another seed than the run's: <name>-seed<S>
    ABLATE = f"{ABLATE_DIR}/ablate.json"  # domainlm ablate
    ABLATE_CHART = f"{ABLATE_DIR}/ablate.png"
    VARIANT_EVAL = "eval.json"  # in a variant's or an arm's folder (ablate/w<W>/, decide/<arm>/): its bpb, probes
    BASELINE_EVAL = f"{ABLATE_DIR}/w0/{VARIANT_EVAL}"  # the weight-0 variant's: domainlm run's general-only baseline
    DECIDE = f"{DECIDE_DIR}/decide.json"  # domainlm decide: scratch vs continued vs the general model, the verdict
    ARM_BASE = "base"  # decide/continued-vocab<N>/base/: the general model with N domain tokens added
    EXTENDED_BASE = "base-extended"  # tokenizer.extend_vocab: the base model + domain tokens (tokenizer_extend.py)
    EXTENSION_FILE = "extension.json"  # in an extended base model's folder: the tokens added
    EXTENSION = f"{EXTENDED_BASE}/{EXTENSION_FILE}"
    EXTENDED_AUDIT = f"{EXTENDED_BASE}/{AUDIT_FILE}"  # the extended tokenizer's audit against the base's
    DOWNSTREAM = f"{FINETUNE_DIR}/classify"  # domainlm run's downstream stage: the two fine-tuned classifiers
    FINETUNE = "finetune.json"  # in a fine-tuning's --out folder: its summary
    COMPARISON = "compare.json"  # in a `finetune --compare` --out folder: the comparison
    MIX = f"{MIX_DIR}/mix.json"  # domainlm mix: the mixing law, its held-out check, the recommended weights
    MIX_CHART = f"{MIX_DIR}/frontier.png"
    LAW = f"{SCALING_DIR}/law.json"  # domainlm scaling
    POINTS = f"{SCALING_DIR}/points.jsonl"
    SCALING_CHART = f"{SCALING_DIR}/scaling.png"
    MINE = "mine/mine.json"  # domainlm mine: the rounds (yield, precision, threshold), written last
    MINE_DOCS = "mine/docs"  # domainlm mine: the mined source, mine/docs/<pool>/<rank>.jsonl.gz
    MINE_WORK = ".mine"  # mine's work files (indexes, classifiers, scored candidates per round)
    REPORT = "report/index.html"  # domainlm report
    LAUNCH_DIR = "launch"  # domainlm launch slurm: the sbatch script and the jobs' logs (slurm-<job>.out)
    SBATCH = f"{LAUNCH_DIR}/train.sbatch"
    STAGES = ".stages"  # bookkeeping markers (stages.py): not data for other stages
    PREPARE = ".prepare"  # prepare's work files (datatrove tasks, counters): not data for other stages

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def plan(self) -> Path:
        return self.root / self.PLAN

    @property
    def stats(self) -> Path:
        return self.root / self.STATS

    @property
    def tokenizer(self) -> Path:
        return self.root / self.TOKENIZER

    @property
    def counts(self) -> Path:
        return self.root / self.COUNTS

    def tokens_for(self, tokenizer_dir: Path | str | None = None) -> Path:
        """The token folder of a tokenizer: ``tokens/`` for the run's own (None or ``<run>/tokenizer``), else
        ``tokens-<first 12 hex digits of the sha256 of its tokenizer.json>/`` (a base model's tokenizer, for
        continued pretraining on the same prepared data): one tokenizer's files never overwrite another's."""
        if tokenizer_dir is None or Path(tokenizer_dir).resolve() == self.tokenizer.resolve():
            return self.root / self.TOKENS
        tok = Path(tokenizer_dir) / "tokenizer.json"
        try:
            digest = hashlib.sha256(tok.read_bytes()).hexdigest()
        except OSError as e:
            raise UserError(f"{tok}: cannot read the tokenizer ({e.strerror}); expected a Hugging Face tokenizer "
                            "folder with a tokenizer.json") from None
        own = self.tokenizer / "tokenizer.json"
        if own.is_file() and hashlib.sha256(own.read_bytes()).hexdigest() == digest:
            return self.root / self.TOKENS  # the run's own tokenizer in another folder (e.g. a variant's export)
        return self.root / f"{self.TOKENS}-{digest[:12]}"

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def model(self) -> Path:
        return self.root / self.MODEL

    @property
    def eval(self) -> Path:
        return self.root / self.EVAL

    @property
    def ablate(self) -> Path:
        return self.root / self.ABLATE

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    def load(self, rel: str, model):
        """The output ``rel`` as its typed model (outputs.SCHEMAS), or None when its stage has not written it."""
        return load_output(self.root / rel, model)

    # -------------------------------------------------------------------------------------------- child runs

    def child(self, kind: str, *names: str, seed: int | None = None) -> Path:
        """The folder of a child run of this run (the one place their paths are made): ``<run>/<kind>/<names>``,
        ``kind`` one of `CHILD_KINDS`. ``seed``: a child trained with another training seed, in its own folder
        (``<last name>-seed<S>``); None gives the folder a child without a seed has always had."""
        if kind not in self.CHILD_KINDS:
            raise ValueError(f"child run kind {kind!r}: expected one of {', '.join(self.CHILD_KINDS)}")
        if not names or not all(names):
            raise ValueError("a child run needs a name")
        if seed is not None:
            names = (*names[:-1], f"{names[-1]}{self.SEED_SUFFIX}{seed}")
        return self.root.joinpath(kind, *names)

    def variant(self, domain_weight: float, *, seed: int | None = None) -> Path:
        """``ablate/w<W>/``: the variant trained with domain weight W (w0: the general-only baseline)."""
        return self.child(self.ABLATE_DIR, f"w{domain_weight:g}", seed=seed)

    def scaling_point(self, budget: float, params: int, *, seed: int | None = None) -> Path:
        """``scaling/C<budget>/N<params>/``: one point of the IsoFLOP sweep."""
        return self.child(self.SCALING_DIR, f"C{budget_label(budget)}", f"N{params}", seed=seed)

    def arm(self, arm: str, *, seed: int | None = None) -> Path:
        """``decide/<arm>/``: an arm of `domainlm decide` (its training run, or only its eval.json)."""
        return self.child(self.DECIDE_DIR, arm, seed=seed)

    def mix_variant(self, tokens: float, domain_weight: float, seed: int) -> Path:
        """``mix/D<tokens>-w<W>-s<seed>/``: one run of `domainlm mix`'s design (its seed always named)."""
        return self.child(self.MIX_DIR, f"D{budget_label(tokens)}-w{domain_weight:g}-s{seed}")

    def finetuning(self, name: str, *, seed: int | None = None) -> Path:
        """``finetune/<name>/``: a fine-tuning of the run's model (the default ``--out``)."""
        return self.child(self.FINETUNE_DIR, name, seed=seed)


def budget_label(budget: float) -> str:
    """A compute budget in a folder or run name: 3e+12 → 3e12 (names allow no "+")."""
    return f"{budget:.3g}".replace("e+", "e")


# ------------------------------------------------------------------------------------------------ model references

HF_CONFIG = "config.json"  # what makes a folder a Hugging Face model folder (not a run-directory file)
RUN_MARKERS = (RunDir.CONFIG, RunDir.RUN_CONFIG, RunDir.STAGES, RunDir.MODEL)  # what makes a folder a run directory


@dataclass(frozen=True)
class ModelRef:
    """What a MODEL_OR_RUN argument names: a Hugging Face model folder, or a run directory and its ``model/``."""

    path: Path  # as given
    model_dir: Path  # the Hugging Face folder: ``path`` itself, or ``<run>/model``
    run_dir: Path | None  # the run directory; None for a bare model folder

    @property
    def is_run(self) -> bool:
        return self.run_dir is not None

    @property
    def trained(self) -> bool:
        """Whether the model folder holds a model (a run directory's may not exist yet)."""
        return (self.model_dir / HF_CONFIG).is_file()

    def finetune_out(self, name: str, *, standalone: Path | None = None) -> Path:
        """Where a fine-tuning of this model goes unless ``--out`` says: ``<run>/finetune/<name>/`` for a run
        directory; for a bare model folder ``standalone`` when given, else ``<model>-ft-<name>/`` beside it."""
        if self.run_dir is not None:
            return RunDir(self.run_dir).finetuning(name)
        return standalone if standalone is not None else self.model_dir.with_name(f"{self.model_dir.name}-ft-{name}")


def resolve_model_ref(path: Path | str, *, key: str | None = None, need_model: bool = True,
                      outputs: typing.Iterable[str] = ()) -> ModelRef:
    """Run directory or Hugging Face model folder? The one answer every command uses. A folder with a
    ``config.json`` is a model folder; one with a ``config.yaml``, ``run-config.yaml``, ``.stages/`` or ``model/``
    (or any of ``outputs``, run-relative files) is a run directory, whose model is ``model/`` — which must hold a
    trained model when ``need_model``. Anything else is a one-line `UserError` (prefixed ``<key>: `` when given)."""
    p = Path(path).expanduser()
    where = f"{key}: {p}" if key else str(p)
    if not p.exists():
        raise UserError(f"{where}: no such model folder or run directory")
    if not p.is_dir():
        raise UserError(f"{where}: a file; expected a Hugging Face model folder (config.json) or a domainlm run "
                        "directory (config.yaml)")
    if (p / HF_CONFIG).is_file():
        return ModelRef(p, p, None)
    if any((p / rel).exists() for rel in (*RUN_MARKERS, *outputs)):
        ref = ModelRef(p, RunDir(p).model, p)
        if need_model and not ref.trained:
            raise UserError(f"{where}: a run directory without a trained model ({RunDir.MODEL}/{HF_CONFIG}); run "
                            "`domainlm train` on it first")
        return ref
    raise UserError(f"{where}: neither a Hugging Face model folder (no config.json) nor a domainlm run directory "
                    "(no config.yaml)")


def load_jsonl(path: Path | str, model) -> list | None:
    """A JSON-lines output (one ``model`` per line; blank lines skipped), or None when absent; a one-line
    UserError naming the file and line when one does not match."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e}); rerun the stage that writes it") from None
    adapter, rows = TypeAdapter(model), []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(adapter.validate_json(line))
            except ValidationError as e:
                raise UserError(f"{path}:{i}: {_invalid(model, e)}") from None
    return rows


def _invalid(model, e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "the file"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    name = " or ".join(m.__name__ for m in typing.get_args(model) or [model])
    return (f"not a valid {name} ({where}: {first['msg']}{more}): damaged, or written by another domainlm version; "
            "rerun the stage that writes it")


def load_output(path: Path | str, model):
    """A JSON output file as ``model`` (a pydantic model, or a union of them): None when absent; a one-line
    UserError naming the file when it is not JSON or not what ``model`` describes."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e}); rerun the stage that writes it") from None
    try:
        return TypeAdapter(model).validate_json(text)
    except ValidationError as e:
        raise UserError(f"{path}: {_invalid(model, e)}") from None
