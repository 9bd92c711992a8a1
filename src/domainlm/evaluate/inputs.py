"""What `domainlm eval` reads: a model (a run directory's ``model/`` or any HF model folder) and the texts to
score (each source's val split, or files given with ``--text NAME=PATH``)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from domainlm.config import RunConfig, validate
from domainlm.data.tokens import load_counts
from domainlm.errors import ConfigError, UserError
from domainlm.model.base import check_loaded
from domainlm.rundir import RunDir, resolve_model_ref

# Any one of these makes a folder loadable by AutoTokenizer (fast, sentencepiece or GPT-2-style slow tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz")


@dataclass
class Target:
    """The model to score and, when known, the run directory whose val splits it is scored on."""

    model_dir: Path
    run_dir: Path | None
    cfg: RunConfig | None
    is_run: bool  # MODEL_OR_RUN was a run directory (eval.json then goes to <run>/eval/)


def resolve(model_or_run: Path, run: Path | None = None) -> Target:
    ref = resolve_model_ref(model_or_run)
    if not ref.is_run:  # an HF model folder
        check_tokenizer_files(ref.model_dir)  # before any text is read: fail fast
        cfg = load_run_config(run) if run is not None else None
        return Target(ref.model_dir, run, cfg, is_run=False)
    if run is not None and Path(run).resolve() != ref.run_dir.resolve():
        raise UserError(f"--run {run}: only with an HF model folder; {ref.path} is already a run directory")
    cfg = load_run_config(ref.run_dir)
    check_tokenizer_files(ref.model_dir)
    return Target(ref.model_dir, ref.run_dir, cfg, is_run=True)


def refuse_classifier(model_dir: Path) -> None:
    """A sequence-classification export (`domainlm finetune --head classification`) has no language-model head:
    loaded as a causal LM it would get a random one and score nonsense. One line instead."""
    try:
        arch = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # unreadable: loading the model says so
    cls = next((a for a in arch if isinstance(a, str) and a.endswith("ForSequenceClassification")), None)
    if cls:
        raise UserError(f"{model_dir}: a classifier ({cls}), not a language model; `domainlm eval` scores text "
                        "with an LM head — score the classifier on its task with `domainlm finetune --head "
                        "classification --compare`, or evaluate the model it was fine-tuned from")


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved config a run directory was made with. One that no longer validates was written by another
    (incompatible) version of domainlm: say so instead of failing later on a missing file or key."""
    run_dir = Path(run_dir)
    p = RunDir(run_dir).config
    if not p.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml); run `domainlm plan CONFIG` first")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
        cfg = validate(data, str(p))
    except (yaml.YAMLError, UnicodeDecodeError, ConfigError) as e:
        first = e.problems[0] if isinstance(e, ConfigError) else f"{p}: unreadable YAML"
        raise UserError(
            f"{run_dir}: run directory from an incompatible version of domainlm ({first}); rerun the pipeline"
        ) from None
    counts = RunDir(run_dir).counts
    if counts.is_file():  # token files carry their own format version

        try:
            load_counts(run_dir)
        except UserError as e:
            raise UserError(f"{run_dir}: run directory from an incompatible version of domainlm ({e})") from None
    return cfg


def check_tokenizer_files(model_dir: Path) -> None:
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{model_dir}: no tokenizer in the model folder (expected tokenizer.json); "
                        "save it with tokenizer.save_pretrained(folder)")


def load_model(model_dir: Path, device: str):
    """AutoModelForCausalLM + AutoTokenizer from a local folder, never the network. fp32 weights; on CUDA the
    forward pass runs under bf16 autocast (see bpb.score_sequences)."""

    hf_logging.disable_progress_bar()  # our own progress bar is over scored windows; weights load in a blink
    model_dir = Path(model_dir)
    check_tokenizer_files(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on what is broken
        raise UserError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {_first_line(e)})") from None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32,
                                                           output_loading_info=True)
    except Exception as e:
        raise UserError(f"{model_dir}: cannot load the model ({type(e).__name__}: {_first_line(e)})") from None
    check_loaded(model_dir, info)
    model.to(device).eval()
    return model, tok


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "no message"


# ------------------------------------------------------------------------------------------------ texts


def source_documents(run_dir: Path, source: str, split: str = "val") -> Iterator[str]:
    """Cleaned documents of one source written by `domainlm prepare` (sorted file order: deterministic)."""
    folder = RunDir(run_dir) / RunDir.DATA / source / split
    if not folder.is_dir():
        raise UserError(f"{folder}: no {split} documents for source {source!r}; run `domainlm prepare CONFIG`")
    for f in sorted(folder.glob("*.jsonl.gz")):
        yield from _jsonl(f)


def _jsonl(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a \"text\" string") from None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: \"text\" must be a string")
            yield text


def parse_text_args(items: list[str] | None) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--text: expected NAME=PATH, got {item!r}")
        if name.strip() in {n for n, _ in out}:
            raise UserError(f"--text: name {name.strip()!r} given twice")
        out.append((name.strip(), Path(path.strip())))
    return out


def text_files(path: Path) -> list[Path]:
    """The files behind ``--text NAME=PATH``: the file itself, or a folder's .txt/.md/.jsonl(.gz) files."""
    if not path.exists():
        raise UserError(f"--text {path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise UserError(f"--text {path}: no {'/'.join(TEXT_SUFFIXES)} files in this folder")
    return files


def text_documents(path: Path) -> Iterator[str]:
    """One document per .txt/.md file, one per line of a .jsonl file ({"text": ...})."""
    for f in text_files(path):
        if f.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _jsonl(f)
        else:
            try:
                yield f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{f}: not UTF-8 text") from None


def cap_bytes(docs: Iterable[str], max_bytes: int) -> list[str]:
    """The first documents (in order) up to ``max_bytes`` UTF-8 bytes; the last one is cut at a character
    boundary, so every model is scored on exactly the same bytes."""
    out: list[str] = []
    left = max_bytes
    for d in docs:
        if not d:
            continue
        b = d.encode("utf-8")
        if len(b) > left:
            d = b[:left].decode("utf-8", errors="ignore")  # drops a split multi-byte character
        if d:
            out.append(d)
            left -= len(d.encode("utf-8"))
        if left <= 0 or len(b) > len(d.encode("utf-8")):
            break
    return out
