"""Instruction data: JSONL → conversations → token ids with a loss mask → padded batches.

Input lines are ``{"prompt": ..., "response": ...}`` (optionally ``"system"``) or ``{"messages": [{"role":
"user", "content": ...}, {"role": "assistant", ...}]}`` (the OpenAI / HF chat format). Other keys are ignored.

Only assistant text is trained on: every token of the template scaffolding, system and user turns gets the
label -100. The assistant's share of a conversation is found by rendering the chat template twice — up to the
turn with ``add_generation_prompt`` and with the turn — and taking the difference, so any template whose
renderings are prefixes of each other works (ours, and the usual HF ones).

Batches are padded on the right, not packed. With causal attention a real token only attends to earlier
positions, and pads come after every real token, so no attention mask is needed and positions start at 0 for
each example, exactly as at inference; pads carry label -100. Packing would need a block-diagonal mask (or
let examples attend to each other); at fine-tuning scale the padding waste is small, sorted or not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from domainlm.chat import segments
from domainlm.data.sources import jsonl_lines
from domainlm.errors import UserError
from domainlm.train.step import IGNORE

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE where no loss
    where: str  # file:line, for errors


# ------------------------------------------------------------------------------------------------ reading


def _bad(where: str, what: str) -> UserError:
    return UserError(f"{where}: {what}")


def to_messages(rec: object, where: str) -> list[dict]:
    """One JSONL record as a list of chat messages, or a one-line error naming file:line."""
    if not isinstance(rec, dict):
        raise _bad(where, f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _bad(where, '"messages" must be a non-empty list of {"role", "content"} objects')
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise _bad(where, f"messages[{i}]: expected {{\"role\": {'|'.join(ROLES)}, \"content\": string}}")
            if m["role"] == "assistant" and not m["content"].strip():
                raise _bad(where, f"messages[{i}]: empty assistant response")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise _bad(where, "the last message must be the assistant's (the text to train on)")
        return out
    missing = [k for k in ("prompt", "response") if not isinstance(rec.get(k), str)]
    if missing:
        found = ", ".join(sorted(rec)[:8]) or "none"
        raise _bad(where, f'missing string field(s) {", ".join(missing)}; expected "prompt" and "response", '
                          f'or "messages" (found keys: {found})')
    if not rec["response"].strip():
        raise _bad(where, "empty response")
    out = [{"role": "system", "content": rec["system"]}] if isinstance(rec.get("system"), str) else []
    return out + [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]


def read_jsonl(path: Path) -> list[tuple[str, list[dict]]]:
    """(file:line, messages) for every non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    out = []
    for lineno, line in jsonl_lines(path):
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise _bad(where, f"not JSON ({e.msg})") from None
        out.append((where, to_messages(rec, where)))
    if not out:
        raise UserError(f"{path}: no examples (the file is empty)")
    return out


# ------------------------------------------------------------------------------------------------ encoding


def encode(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels (the id where trained, else IGNORE). Pieces are tokenized separately, so a token
    never straddles the prompt/response boundary (our template ends the prompt with a newline, where the
    byte-level pre-tokenizer splits anyway)."""
    ids, labels = [], []
    for text, trained in segments(tok, messages):
        piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


@dataclass
class Encoded:
    examples: list[Example]
    truncated: int  # conversations cut from the left to fit the context
    trained_tokens: int
    tokens: int


def encode_all(tok, convs: list[tuple[str, list[dict]]], max_tokens: int, too_long: str) -> Encoded:
    """Encode every conversation; one longer than ``max_tokens`` is left-truncated (keeping the response and the
    end of the prompt) and counted, or rejected with its file:line when ``too_long == "reject"``."""
    examples, truncated = [], 0
    for where, msgs in convs:
        ids, labels = encode(tok, msgs)
        if len(ids) > max_tokens:
            if too_long == "reject":
                raise _bad(where, f"{len(ids)} tokens, longer than the model's context of {max_tokens - 1} (+1 "
                                  "target); shorten it or use --too-long truncate")
            ids, labels = ids[-max_tokens:], labels[-max_tokens:]
            truncated += 1
        if not any(x != IGNORE for x in labels[1:]):  # the first token is never a target
            raise _bad(where, "no response token left to train on after truncation")
        examples.append(Example(ids, labels, where))
    return Encoded(examples, truncated, sum(sum(x != IGNORE for x in e.labels[1:]) for e in examples),
                   sum(len(e.ids) for e in examples))


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] ids and labels, padded on the right to the longest example (see the module docstring)."""
    n = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return ids, labels
