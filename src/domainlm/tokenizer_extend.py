"""Vocabulary extension: add a general model's tokenizer the domain tokens it lacks, and grow the model to match.

``tokenizer.extend_vocab: N`` with ``train.init_from`` (continued pretraining, docs/continued.md) takes the N
tokens of the run's own domain tokenizer (``<run>/tokenizer/``) that save the most tokens on the domain train
text, adds them to the base model's tokenizer, resizes the base model's embeddings and output head, and
initialises each new row from the rows of the base tokens it replaces.

**Which tokens** (``choose``), a one-pass estimate, exact under its assumptions:

    saved(t) = count(t) × (len(base(t)) − 1)

- ``count(t)``: how often the domain tokenizer emits ``t`` when it encodes the domain train sample (documents
  sampled like the tokenizer's own training text, up to ``tokenizer.sample_bytes``);
- ``len(base(t))``: how many tokens the base tokenizer needs for ``t``'s text alone; a candidate must need at
  least 2 (one means the base vocabulary has it already) and decode to whole characters.

The occurrences of different domain tokens are disjoint spans of the text (they are one segmentation of it),
so the savings of several chosen tokens add up and a greedy re-count after each pick would change nothing:
the N largest ``saved(t)`` are the N chosen. What the estimate cannot see: a new token is matched wherever its
text occurs (Hugging Face "added tokens" are split out of the text before the base tokenizer runs), also
inside a longer word the base had in fewer pieces, and the base splits a word differently in context than
alone. The audit therefore *measures* bytes per token before and after on every source's val split.
Fewer tokens for the same bytes is what "saves bytes" means here: more bytes per token, so more text in a
context window and in a token budget.

**The new rows** (``extend_model``): the input embedding of a new token is the mean of the input rows of the
base tokens its text was split into (Gee et al. 2022, "Fast Vocabulary Transfer for Language Model Compression",
sec. 3), so the model reads it roughly as it read the pieces. Its output row is the mean of all the base's output
rows (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models"): its logit is then the
mean of the old logits, so by Jensen's inequality each new token gets at most 1/V of the old softmax mass and N
of them at most N/V — the extended model predicts what the base predicted. (The mean of the pieces' output rows
gives a new token the logit of a likely piece at every position instead: the issue that changed this measured
15–17% of the softmax mass on the new rows and news at 2.810 bpb against the base's 2.462 before any training;
tests/test_vocab_extend.py shows that init breaking the N/V bound and this one within 1% of the base's bpb.)
What no fixed row can do: where a new token is itself the next token, its probability is that of an average
token, not the product of its pieces' — continued pretraining learns it, and text full of the new tokens scores
worse than the base's until then. A tied head is untied first, the only way an input row and an output row can
differ. Old rows are not touched: on a sequence of old tokens the extended model's logits over the old
vocabulary are exactly the base model's.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer

from domainlm import stages
from domainlm.errors import UserError
from domainlm.model.base import model_folder, resolve_base
from domainlm.outputs import Extension, ExtensionAudit
from domainlm.rundir import HF_CONFIG, RunDir, clear_temp, load_output, swap_dir, write_json
from domainlm.tokenizer import _normalised, audit, sample_texts, train_bytes

ENCODE_BATCH_DOCS = 256


@dataclass(frozen=True)
class NewToken:
    text: str  # what the token stands for (decoded text, e.g. " licensee")
    count: int  # times the domain tokenizer emits it on the sample
    base_ids: tuple[int, ...]  # how the base tokenizer splits the text alone

    @property
    def saved(self) -> int:
        """Tokens saved on the sample by this token (the module docstring's estimate)."""
        return self.count * (len(self.base_ids) - 1)

    def as_dict(self) -> dict:
        return {"text": self.text, "count": self.count, "base_tokens": len(self.base_ids), "saved": self.saved}


def _backend(tok):
    """The ``tokenizers.Tokenizer`` under an HF fast tokenizer (or the object itself)."""
    return getattr(tok, "backend_tokenizer", tok)


def domain_token_counts(domain_tok, texts: Iterable[str]) -> Counter:
    """How often each domain token id occurs when the domain tokenizer encodes ``texts``."""
    tok = _backend(domain_tok)
    counts: Counter = Counter()
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == ENCODE_BATCH_DOCS:
            for e in tok.encode_batch(batch, add_special_tokens=False):
                counts.update(e.ids)
            batch = []
    if batch:
        for e in tok.encode_batch(batch, add_special_tokens=False):
            counts.update(e.ids)
    return counts


def choose(domain_tok, base_tok, texts: Iterable[str], n: int) -> list[NewToken]:
    """The ``n`` domain tokens with the largest estimated saving (see the module docstring), largest first
    (ties by text, so the choice is deterministic). Fewer when fewer candidates exist."""
    if n < 0:
        raise UserError(f"tokenizer.extend_vocab: expected a number ≥ 0, got {n}")
    dom = _backend(domain_tok)
    specials = dom.get_added_tokens_decoder()  # <s>, </s>, <pad>: never candidates
    counts = domain_token_counts(dom, texts)
    texts_of = {tid: dom.decode([tid], skip_special_tokens=False) for tid in counts if tid not in specials}
    cands = [(tid, text) for tid, text in texts_of.items() if len(text) >= 2 and "\ufffd" not in text]
    enc = base_tok([t for _, t in cands], add_special_tokens=False)["input_ids"] if cands else []
    out = [NewToken(text, counts[tid], tuple(ids))
           for (tid, text), ids in zip(cands, enc, strict=True) if len(ids) >= 2]
    out.sort(key=lambda t: (-t.saved, t.text))
    return out[:n]


def extend_tokenizer(base_tok, tokens: list[NewToken]):
    """A copy of the HF tokenizer ``base_tok`` with ``tokens`` added (matched on the raw text, before the base
    tokenizer's own normalisation); returns (tokenizer, the new ids in the order of ``tokens``)."""


    tok = copy.deepcopy(base_tok)
    before = len(tok)
    tok.add_tokens([AddedToken(t.text, normalized=False, single_word=False, lstrip=False, rstrip=False)
                    for t in tokens])
    ids = tok.convert_tokens_to_ids([t.text for t in tokens])
    if len(tok) - before != len(tokens) or any(i is None or i < before for i in ids):
        raise UserError("tokenizer.extend_vocab: the base tokenizer already has some of the new tokens")
    return tok, list(ids)


def extend_model(model, tokens: list[NewToken], new_ids: list[int]) -> dict:
    """Resize ``model``'s embeddings and output head to hold ``new_ids``: each new input row is the mean of the
    input rows of the token's base pieces, each new output row the mean of all old output rows (the module
    docstring cites why). A tied head is untied first (an input row and an output row can then differ).
    Returns {"untied": whether the head was untied}."""

    if not tokens:
        return {"untied": False}
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    old_rows = emb.shape[0]
    untied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    if untied:  # a copy of the shared matrix becomes the head's own
        head.weight = torch.nn.Parameter(emb.detach().clone())
        model.config.tie_word_embeddings = False
        getattr(model.config, "get_text_config", lambda **_: model.config)(decoder=True).tie_word_embeddings = False
    need = max(old_rows, max(new_ids) + 1)  # a padded embedding (rows > tokenizer) may hold the new ids already
    if need > old_rows:
        model.resize_token_embeddings(need, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    old = sorted(set(range(old_rows)) - set(new_ids))  # the base's own rows
    with torch.no_grad():
        for t, i in zip(tokens, new_ids, strict=True):
            emb[i] = emb[list(t.base_ids)].mean(dim=0)
        if head is not None:
            head.weight[new_ids] = head.weight[old].mean(dim=0)  # Hewitt 2021: the mean of the old output rows
            if getattr(head, "bias", None) is not None:
                head.bias[new_ids] = head.bias[old].mean()
    model.config.vocab_size = need
    return {"untied": untied}


def extend(base_dir: Path, domain_tokenizer: Path, texts: Iterable[str], n: int, out_dir: Path) -> dict:
    """Load the base model folder, choose ``n`` tokens from the domain tokenizer folder on ``texts``, and write
    the extended model + tokenizer (HF format) to ``out_dir`` (built under a temporary name, swapped in).
    Returns what was added."""


    base_dir, out_dir = Path(base_dir), Path(out_dir)
    base_tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    dom_tok = AutoTokenizer.from_pretrained(domain_tokenizer, local_files_only=True)
    tokens = choose(dom_tok, base_tok, texts, n)
    tok, ids = extend_tokenizer(base_tok, tokens)
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    resized = extend_model(model, tokens, ids)
    tmp = clear_temp(out_dir.with_name(f".{out_dir.name}.tmp"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    swap_dir(tmp, out_dir)
    return {"requested": n, "added": len(tokens), "base_vocab": len(base_tok), "vocab": len(tok), **resized,
            "tokens": [{**t.as_dict(), "id": i} for t, i in zip(tokens, ids, strict=True)]}


# ------------------------------------------------------------------------------------------------ in a run


def domain_sample(cfg, run_dir: Path) -> list[str]:
    """The domain train text the choice counts on: the domain sources sampled the way `domainlm tokenizer` samples
    its training text (tokenizer.py), up to ``tokenizer.sample_bytes``."""

    dom = [s for s in cfg.sources if s.role == "domain"]
    if not dom:
        raise UserError("tokenizer.extend_vocab: no source has role 'domain'; nothing to take domain tokens from")
    totals = {s.name: train_bytes(run_dir, s.name) for s in dom}
    return list(sample_texts(run_dir, _normalised(dom), totals, cfg.tokenizer.sample_bytes, cfg.tokenizer.seed, {}))


def build_extended(cfg, run_dir: Path, base_path: Path, n: int, out: Path, *, key: str = "train.init_from",
                   console=None) -> dict:
    """``extend`` inside a run: candidates from the run's tokenizer, counted on its domain sample; the audit of
    the extended tokenizer against the base's (bytes per token on every val split, domain-term splits: before
    and after) goes into the result and ``<out>/audit.json``. Done once per base, run tokenizer, N and sample
    (a stage marker ``extend-<folder>``); returns what was added and the audit."""

    run_tok = RunDir(run_dir).tokenizer / "tokenizer.json"
    if not run_tok.is_file():
        raise UserError(f"{run_tok}: no domain tokenizer to take tokens from; run `domainlm tokenizer CONFIG` first")
    stage = f"extend-{out.parent.name}-{out.name}" if out.parent != Path(run_dir) else f"extend-{out.name}"
    audit_file = out / RunDir.AUDIT_FILE  # the extended tokenizer's audit, beside it as the run's is (written last)
    info_file = out / RunDir.EXTENSION_FILE  # what was added
    s = stages.Stage(run_dir, stage, audit_file, (
        "extend-v2", n, resolve_base(base_path, key).fingerprint, stages.file_fingerprint(run_tok),
        cfg.tokenizer.sample_bytes, cfg.tokenizer.seed, cfg.tokenizer.audit_bytes, cfg.tokenizer.domain_terms),
        intact=lambda: (out / HF_CONFIG).is_file() and info_file.is_file())
    if s.done():
        with contextlib.suppress(UserError):  # files this version cannot read: extend again
            added, checked = load_output(info_file, Extension), load_output(audit_file, ExtensionAudit)
            if added is not None and checked is not None:
                return {**added.model_dump(), "audit": checked.model_dump(exclude_unset=True)}
    if console is not None:
        console.print(f"extending {base_path}'s tokenizer with up to {n} domain tokens ...", highlight=False,
                      markup=False)
    info = extend(base_path, RunDir(run_dir).tokenizer, domain_sample(cfg, run_dir), n, out)

    before = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    after = AutoTokenizer.from_pretrained(out, local_files_only=True)
    info["audit"] = audit(_backend(after), _backend(before), cfg, run_dir)  # "baseline" = the base, before
    write_json(info_file, Extension.checked({k: v for k, v in info.items() if k != "audit"}))
    write_json(audit_file, ExtensionAudit.checked(info["audit"]))
    s.finish()
    return info


def ensure_extended(cfg, console=None) -> Path | None:
    """With ``train.init_from`` and ``tokenizer.extend_vocab: N``: the base model extended with N domain tokens,
    built once in ``<run>/base-extended/`` (`domainlm tokenize` calls this before it tokenizes with the base's
    tokenizer; `model.base.base_of` then names this folder). None when the config asks for no extension."""

    n = cfg.tokenizer.extend_vocab
    if not n or not cfg.train.init_from:
        return None

    run_dir = cfg.directory()
    out = RunDir(run_dir) / RunDir.EXTENDED_BASE
    info = build_extended(cfg, run_dir, model_folder(cfg.train.init_from), n, out, console=console)
    if not info["added"]:
        raise UserError(f"tokenizer.extend_vocab: {cfg.train.init_from}'s tokenizer already has every domain token "
                        f"of {RunDir(run_dir).tokenizer}; nothing to add (set it to 0)")
    return out
