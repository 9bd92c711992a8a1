"""`domainlm tokenizer`: train the run's tokenizer on the prepared train split, then audit it.

Training text is every source's cleaned train split, sampled by the mixture weights up to
``tokenizer.sample_bytes``, so the vocabulary reflects the mix the model will see. The audit trains a
*baseline* of the same kind and size on the general source(s) alone and compares both on each source's val
split (bytes per token) and on the configured domain terms (how each splits them): the evidence that the
domain tokenizer has domain vocabulary.

Output: ``<run>/tokenizer/`` in Hugging Face format (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``), ``audit.json`` and ``baseline-tokenizer.json``. The folder is built under a
temporary name and renamed into place, so a killed run never leaves a half-written ``tokenizer/``.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from domainlm import faults
from domainlm.config import SPECIAL_TOKENS, RunConfig, SourceConfig, load_config
from domainlm.data.pipeline import document_files, iter_documents
from domainlm.errors import UserError
from domainlm.outputs import Audit, Plan
from domainlm.rundir import RunDir, clear_temp, load_output, swap_dir, write_json
from domainlm.stages import Stage, file_fingerprint

STAGE = "tokenizer"
AUDIT_VERSION = 1
AUDIT_FILE = RunDir.AUDIT_FILE
BASELINE_FILE = "baseline-tokenizer.json"
BOS, EOS, PAD = SPECIAL_TOKENS  # ids 0, 1, 2: the trainers put special tokens first, in this order
ENCODE_BATCH_DOCS = 256


# ------------------------------------------------------------------------------------------ prepared data
# Read with `prepare`'s own reader (data/pipeline.py): data/<source>/{train,val}/*.jsonl.gz in sorted order.


def _check_prepared(cfg: RunConfig, run_dir: Path, config_name: str) -> None:
    if not cfg.sources:
        raise UserError(f"{config_name}: sources: no sources configured; the tokenizer needs text to train on")
    stats = RunDir(run_dir).stats  # written last by `prepare`: its existence means the data are complete
    if not stats.exists():
        raise UserError(f"{stats}: no prepared data; run `domainlm prepare {config_name}` first")
    for s in cfg.sources:
        folder = RunDir(run_dir) / RunDir.DATA / s.name / "train"
        if not folder.is_dir():
            raise UserError(f"{folder}: no prepared data for source {s.name!r}; run `domainlm prepare {config_name}` "
                            "first")


def planned_vocab_size(cfg: RunConfig, run_dir: Path, config_name: str) -> int:
    """``tokenizer.vocab_size``, or when unset the plan's vocabulary (plan.json, sized with the model by Tao et
    al. 2024's law: plan/vocab.py)."""
    if cfg.tokenizer.vocab_size is not None:
        return cfg.tokenizer.vocab_size
    plan = RunDir(run_dir).load(RunDir.PLAN, Plan)
    if plan is None:
        raise UserError(f"{RunDir(run_dir).plan}: no plan, and tokenizer.vocab_size is unset (the plan sizes the "
                        f"vocabulary); run `domainlm plan {config_name}` first or set tokenizer.vocab_size")
    return plan.model.vocab_size


def _data_fingerprint(cfg: RunConfig, run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): file_fingerprint(p)
            for s in cfg.sources for split in ("train", "val") for p in document_files(run_dir, s.name, split)}


# ------------------------------------------------------------------------------------------ sampling


def _normalised(sources: list[SourceConfig]) -> dict[str, float]:
    total = sum(s.weight for s in sources)
    if total <= 0:  # e.g. the general sources of a run that trains on domain text only: weigh them equally
        return {s.name: 1 / len(sources) for s in sources}
    return {s.name: s.weight / total for s in sources}


def train_bytes(run_dir: Path, source: str) -> int:
    """UTF-8 bytes of a source's train split (one streaming pass; sampling needs the total first)."""
    n = sum(len(t.encode("utf-8")) for t in iter_documents(run_dir, source, "train"))
    if n == 0:
        folder = RunDir(run_dir) / RunDir.DATA / source / "train"
        raise UserError(f"{folder}: source {source!r} has an empty train split; nothing to train the tokenizer on")
    return n


def sample_texts(run_dir: Path, weights: dict[str, float], total_bytes: dict[str, int], sample_bytes: int,
                 seed: int, stats: dict[str, dict]) -> Iterator[str]:
    """Documents sampled so that each source contributes ``weight × sample_bytes`` bytes (in expectation).

    A source smaller than its share is repeated (whole copies plus a random part), as training will repeat it;
    a larger one is subsampled. Deterministic: one seeded RNG per source, drawn once per document in file order.
    ``stats`` is filled with the sampled bytes and documents per source as the iterator is consumed.
    """
    for i, (name, w) in enumerate(weights.items()):
        ratio = w * sample_bytes / total_bytes[name]
        whole, frac = int(ratio), ratio - int(ratio)
        rng = random.Random(seed * 1_000_003 + i)
        st = stats[name] = {"weight": round(w, 6), "train_bytes": total_bytes[name], "sampled_bytes": 0,
                            "sampled_docs": 0}
        for text in iter_documents(run_dir, name, "train"):
            copies = whole + (rng.random() < frac)
            if copies:
                st["sampled_bytes"] += copies * len(text.encode("utf-8"))
                st["sampled_docs"] += copies
                for _ in range(copies):
                    yield text


# ------------------------------------------------------------------------------------------ training


def new_tokenizer(kind: str, vocab_size: int):
    """An untrained byte-level tokenizer and its trainer.

    Byte-level (GPT-2, Radford et al. 2019; BloombergGPT also treats text as bytes and keeps all 256 as
    tokens): every string encodes without <unk>. Digits are split into single digits before the byte-level
    split, as BloombergGPT does (Wu et al. 2023, arXiv 2303.17564), so numbers never become arbitrary chunks.
    """

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=alphabet, show_progress=False)
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                          initial_alphabet=alphabet, show_progress=False)
    else:
        raise UserError(f"tokenizer.kind: expected bpe or unigram, got {kind!r}")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok, trainer


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int):
    tok, trainer = new_tokenizer(kind, vocab_size)
    tok.train_from_iterator(texts, trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS))), f"special tokens must come first, got ids {ids}"
    return tok


def save_hf(tok, folder: Path) -> None:
    """Hugging Face format: ``AutoTokenizer.from_pretrained(folder)`` loads it with bos/eos/pad set.

    No BOS/EOS is added on encode: `prepare` writes EOS between documents itself (data/tokens.py).
    ``PreTrainedTokenizerFast`` (not transformers 5's own class name) keeps older transformers, vLLM and
    lm-eval-harness able to load it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------ audit


def val_texts(run_dir: Path, source: str, max_bytes: int) -> list[str]:
    """The first ``max_bytes`` UTF-8 bytes of a source's val split (the last document cut to fit)."""
    out, left = [], max_bytes
    for text in iter_documents(run_dir, source, "val"):
        b = text.encode("utf-8")
        if len(b) >= left:
            out.append(b[:left].decode("utf-8", errors="ignore"))
            break
        out.append(text)
        left -= len(b)
    return out


def count_tokens(tok, texts: list[str]) -> int:
    n = 0
    for i in range(0, len(texts), ENCODE_BATCH_DOCS):
        n += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + ENCODE_BATCH_DOCS], add_special_tokens=False))
    return n


def split_term(tok, term: str) -> list[str]:
    """How ``term`` is split mid-sentence: byte-level tokenizers see a word with its leading space."""
    ids = tok.encode(" " + term, add_special_tokens=False).ids
    return [tok.decode([i]) for i in ids]


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _gain_pct(new: float | None, old: float | None) -> float | None:
    return round((new / old - 1) * 100, 2) if new and old else None


def audit(tok, baseline, cfg: RunConfig, run_dir: Path) -> dict:
    """Bytes per token per source (val split) for both tokenizers, domain-term splits, and a summary."""
    per_source, totals = {}, {}
    for s in cfg.sources:
        texts = val_texts(run_dir, s.name, cfg.tokenizer.audit_bytes)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tok = count_tokens(tok, texts)
        n_base = count_tokens(baseline, texts) if baseline is not None else None
        row = {"role": s.role, "val_bytes": n_bytes, "tokens": n_tok, "baseline_tokens": n_base,
               "bytes_per_token": _ratio(n_bytes, n_tok),
               "baseline_bytes_per_token": _ratio(n_bytes, n_base) if n_base is not None else None}
        row["gain_pct"] = _gain_pct(row["bytes_per_token"], row["baseline_bytes_per_token"])
        per_source[s.name] = row
        t = totals.setdefault(s.role, [0, 0, 0])
        t[0] += n_bytes
        t[1] += n_tok
        t[2] += n_base or 0

    summary = {}
    for role, (n_bytes, n_tok, n_base) in totals.items():
        bpt, base = _ratio(n_bytes, n_tok), (_ratio(n_bytes, n_base) if baseline is not None else None)
        summary[role] = {"bytes_per_token": bpt, "baseline_bytes_per_token": base, "gain_pct": _gain_pct(bpt, base)}

    terms = []
    for term in cfg.tokenizer.domain_terms:
        mine = split_term(tok, term)
        row = {"term": term, "tokens": mine, "count": len(mine)}
        if baseline is not None:
            theirs = split_term(baseline, term)
            row.update(baseline_tokens=theirs, baseline_count=len(theirs))
        terms.append(row)
    if terms:
        summary["terms"] = {
            "n": len(terms),
            "single_token": sum(t["count"] == 1 for t in terms),
            "mean_tokens": round(sum(t["count"] for t in terms) / len(terms), 3),
            "baseline_single_token": sum(t["baseline_count"] == 1 for t in terms) if baseline is not None else None,
            "baseline_mean_tokens": (round(sum(t["baseline_count"] for t in terms) / len(terms), 3)
                                     if baseline is not None else None),
        }
    return {"bytes_per_token": per_source, "domain_terms": terms, "summary": summary}


# ------------------------------------------------------------------------------------------ the stage


def _say(console: Console | None, msg: str) -> None:
    if console is not None:
        console.print(msg, highlight=False)


def run_tokenizer(config: Path | str | None, *, console: Console | None = None) -> dict:
    """Train (unless done with the same config and data), audit, save; returns the audit."""

    cfg = load_config(config)
    config_name = str(config) if config is not None else "CONFIG"
    run_dir = cfg.directory()
    out = RunDir(run_dir).tokenizer
    _check_prepared(cfg, run_dir, config_name)
    tc = cfg.tokenizer.model_copy(update={"vocab_size": planned_vocab_size(cfg, run_dir, config_name)})
    stage = Stage(run_dir, STAGE, out / AUDIT_FILE,
                  ({"stage": STAGE, "version": AUDIT_VERSION, "tokenizers": tokenizers.__version__},
                   tc.model_dump(mode="json"), [(s.name, s.role, s.weight) for s in cfg.sources],
                   _data_fingerprint(cfg, run_dir)), intact=(out / "tokenizer.json").exists)
    if stage.done():
        _say(console, f"[dim]tokenizer: up to date ({escape(str(out))}); nothing to do[/]")
        return {**load_output(out / AUDIT_FILE, Audit).model_dump(exclude_unset=True), "skipped": True}
    stage.start()

    for stale in run_dir.glob(".tokenizer.tmp-*"):  # left by a killed run
        clear_temp(stale)
    totals = {s.name: train_bytes(run_dir, s.name) for s in cfg.sources}

    t0 = time.perf_counter()
    sample: dict[str, dict] = {}
    _say(console, f"training {tc.kind} tokenizer, vocab {tc.vocab_size}, on {tc.sample_bytes / 1e6:g} MB sampled "
         f"from {', '.join(totals)} ...")
    weights = _normalised(cfg.sources)
    tok = train_tokenizer(sample_texts(run_dir, weights, totals, tc.sample_bytes, tc.seed, sample),
                          tc.kind, tc.vocab_size)
    train_s = time.perf_counter() - t0

    general = [s for s in cfg.sources if s.role == "general"]
    baseline, baseline_sample = None, {}
    if general:
        _say(console, f"training the baseline on the general source(s) alone: {', '.join(s.name for s in general)}")
        baseline = train_tokenizer(sample_texts(run_dir, _normalised(general), totals, tc.sample_bytes, tc.seed,
                                                baseline_sample), tc.kind, tc.vocab_size)

    _say(console, f"auditing on up to {tc.audit_bytes / 1e6:g} MB of each source's val split ...")
    result = {
        "version": AUDIT_VERSION,
        "kind": tc.kind,
        "vocab_size": tc.vocab_size,
        "vocab_size_trained": tok.get_vocab_size(),
        "special_tokens": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
        "sample": sample,
        "baseline": ({"sources": [s.name for s in general], "vocab_size_trained": baseline.get_vocab_size(),
                      "sample": baseline_sample} if baseline is not None else None),
        "train_seconds": round(train_s, 2),
        **audit(tok, baseline, cfg, run_dir),
        "path": str(out),
    }

    faults.hit("tokenizer.before_save")
    tmp = clear_temp(run_dir / f".tokenizer.tmp-{os.getpid()}")
    save_hf(tok, tmp)
    if baseline is not None:
        baseline.save(str(tmp / BASELINE_FILE))
    write_json(tmp / AUDIT_FILE, Audit.checked(result))
    swap_dir(tmp, out)
    stage.finish({"vocab_size": tok.get_vocab_size()})
    return result


# ------------------------------------------------------------------------------------------ printing


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pieces(tokens: list[str]) -> str:
    # Show spaces so " res" and "res" differ on screen; '|' separates tokens.
    return "|".join(t.replace(" ", "␣") for t in tokens)


def print_audit(a: dict, console: Console) -> None:
    base = a.get("baseline")
    vs = f"baseline: same kind and size on {', '.join(base['sources'])} alone" if base else "no general source"
    t = Table(title=f"tokenizer audit — {a['kind']}, vocab {a['vocab_size_trained']} ({vs})", title_justify="left")
    for col in ("source", "role", "val bytes", "bytes/token", "baseline", "gain"):
        t.add_column(col, justify="left" if col in ("source", "role") else "right")
    for name, r in a["bytes_per_token"].items():
        t.add_row(name, r["role"], f"{r['val_bytes']:,}", _num(r["bytes_per_token"]),
                  _num(r["baseline_bytes_per_token"]), _num(r["gain_pct"], "{:+.1f}%"))
    console.print(t)

    if a["domain_terms"]:
        t = Table(title="domain terms (as split mid-sentence, with the leading space)", title_justify="left")
        t.add_column("term")
        t.add_column("tokenizer", overflow="fold")
        t.add_column("n", justify="right")
        if base:
            t.add_column("baseline", overflow="fold")
            t.add_column("n", justify="right")
        for r in a["domain_terms"]:
            row = [r["term"], _pieces(r["tokens"]), str(r["count"])]
            if base:
                row += [_pieces(r["baseline_tokens"]), str(r["baseline_count"])]
            t.add_row(*row)
        console.print(t)

    s = a["summary"]
    if "domain" in s and s["domain"]["gain_pct"] is not None:
        console.print(f"domain text: {s['domain']['bytes_per_token']:.3f} bytes/token vs "
                      f"{s['domain']['baseline_bytes_per_token']:.3f} for the baseline "
                      f"([bold]{s['domain']['gain_pct']:+.1f}%[/])", highlight=False)
    if "general" in s and s["general"]["gain_pct"] is not None:
        console.print(f"general text: {s['general']['bytes_per_token']:.3f} vs "
                      f"{s['general']['baseline_bytes_per_token']:.3f} ({s['general']['gain_pct']:+.1f}%)",
                      highlight=False)
    if "terms" in s and s["terms"]["baseline_mean_tokens"] is not None:
        tm = s["terms"]
        console.print(f"domain terms: {tm['mean_tokens']:.2f} tokens on average ({tm['single_token']}/{tm['n']} "
                      f"single-token) vs {tm['baseline_mean_tokens']:.2f} ({tm['baseline_single_token']}/{tm['n']})",
                      highlight=False)
    if a.get("skipped"):
        console.print("[dim](up to date; audit from the last run)[/]")
    console.print(f"wrote [bold]{escape(str(a['path']))}[/]")
