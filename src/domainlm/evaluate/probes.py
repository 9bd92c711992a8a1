"""Domain-term cloze probes: does the model prefer the right term over plausible wrong ones?

A probe file is JSONL, one object per line (blank lines are skipped)::

    {"context": "The licensee shall", "answer": "indemnify", "distractors": ["compliment", "entertain", "notify"],
     "term": "indemnify", "note": "contract usage"}

Each candidate (the answer and every distractor) is appended to the context with one space (none if the context
already ends with whitespace) and scored by the total log-probability of its tokens given the document start
and the context. An item is right when the answer scores highest. Two accuracies are reported:
- ``acc``: plain total log-probability (favours short candidates, which have fewer tokens to pay for);
- ``acc_per_byte``: log-probability ÷ the candidate's UTF-8 bytes, a tokenizer-independent length
  normalisation (lm-evaluation-harness's ``acc_norm`` normalises by characters in the same spirit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from domainlm.data.sources import jsonl_lines
from domainlm.errors import UserError
from domainlm.evaluate.bpb import doc_start_ids, score_sequences

PACKAGED = {"legal": "legal-probes.jsonl"}


@dataclass
class Probe:
    context: str
    answer: str
    distractors: list[str]
    term: str = ""
    note: str = ""
    where: str = ""  # file:line, for messages

    @property
    def candidates(self) -> list[str]:
        return [self.answer, *self.distractors]


@dataclass
class ProbeResult:
    probe: Probe
    logprobs: list[float] = field(default_factory=list)  # per candidate, answer first

    def correct(self, per_byte: bool) -> bool:
        scores = [lp / len(c.encode("utf-8")) if per_byte else lp
                  for lp, c in zip(self.logprobs, self.probe.candidates, strict=True)]
        return all(scores[0] > s for s in scores[1:])  # ties count as wrong


def packaged_probes(name: str) -> Path:
    return Path(str(resources.files("domainlm") / "recipes" / PACKAGED[name]))


def load_probes(path: Path) -> list[Probe]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: probe file not found")
    probes = [_parse(line, f"{path}:{lineno}") for lineno, line in jsonl_lines(path)]
    if not probes:
        raise UserError(f"{path}: no probes in the file")
    return probes


def _parse(line: str, where: str) -> Probe:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"context", "answer", "distractors", "term", "note"})
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (expected context, answer, distractors, term, note)")
    for key in ("context", "answer"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise UserError(f"{where}: {key!r} must be a non-empty string")
    d = obj.get("distractors")
    if not isinstance(d, list) or not d or not all(isinstance(x, str) and x.strip() for x in d):
        raise UserError(f"{where}: 'distractors' must be a non-empty list of non-empty strings")
    if obj["answer"] in d:
        raise UserError(f"{where}: the answer {obj['answer']!r} is also a distractor")
    for key in ("term", "note"):
        if not isinstance(obj.get(key, ""), str):
            raise UserError(f"{where}: {key!r} must be a string")
    return Probe(obj["context"], obj["answer"], list(d), obj.get("term", ""), obj.get("note", ""), where)


def join(context: str, candidate: str) -> str:
    return context + candidate if context[-1:].isspace() else context + " " + candidate


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def score_probes(model, tok, probes: list[Probe], *, context: int, batch_tokens: int = 8192) -> list[ProbeResult]:
    prefix = doc_start_ids(tok)
    seqs, starts = [], []
    for p in probes:
        ctx_ids = prefix + tok(p.context, add_special_tokens=False)["input_ids"]
        for c in p.candidates:
            full = prefix + tok(join(p.context, c), add_special_tokens=False)["input_ids"]
            # Score from the first token that differs from the context's own tokenization: with a merge across
            # the boundary that token carries a few context bytes too, the same bytes for every candidate.
            start = max(_common_prefix(ctx_ids, full), len(prefix), 1)
            if start >= len(full):
                raise UserError(f"{p.where}: candidate {c!r} adds no tokens to the context")
            cut = max(0, len(full) - 1 - context)  # keep the right end when the context is too long
            seqs.append(full[cut:])
            starts.append(max(1, start - cut))
    nll = score_sequences(model, seqs, starts, batch_tokens=batch_tokens)
    results, k = [], 0
    for p in probes:
        n = len(p.candidates)
        results.append(ProbeResult(p, [-float(x) for x in nll[k : k + n]]))
        k += n
    return results


def summarise(results: list[ProbeResult], path: Path) -> dict:
    n = len(results)
    return {
        "file": str(path),
        "items": n,
        "acc": sum(r.correct(False) for r in results) / n,
        "acc_per_byte": sum(r.correct(True) for r in results) / n,
        "chance": sum(1 / len(r.probe.candidates) for r in results) / n,
        "results": [
            {"term": r.probe.term or r.probe.answer, "correct": r.correct(False),
             "correct_per_byte": r.correct(True), "logprobs": [round(x, 4) for x in r.logprobs]}
            for r in results
        ],
    }
