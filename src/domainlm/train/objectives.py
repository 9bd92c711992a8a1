"""Pretraining objectives besides next-token prediction, on the same packed token windows of the mixture loader.

- ``masked`` (Devlin et al. 2019, BERT, arXiv 1810.04805, sec. 3.1): of each window's text tokens a share
  ``model.mask_rate`` is chosen (15% in BERT, 30% in ModernBERT, Warner et al. 2024, arXiv 2412.13663); a chosen
  token becomes the mask token with probability 0.8, a random token with 0.1 and stays with 0.1, and the
  encoder predicts every chosen token from the whole window. Whole-word masking (BERT's later release) chooses
  words — a token that starts a word and the tokens that continue it — instead of tokens. Special tokens (the
  EOS between packed documents) are never chosen.
- ``span`` (Raffel et al. 2020, T5, arXiv 1910.10683, sec. 3.1.4 and 3.3.4): ``round(L · noise_density)`` of a
  window's ``L`` tokens are corrupted in ``round(noise / mean_span_length)`` spans; each span is replaced in the
  encoder's input by its own sentinel token (``<extra_id_i>``), and the decoder's target is every sentinel
  followed by the tokens it replaced, then EOS. The counts depend only on ``L``, so every window of a batch has
  the same input and target length: no padding.

Masks are a pure function of (seed, step, row of the global batch) — not of the process count or of what ran
before — so a resumed run masks exactly as an uninterrupted one, and validation (train/loop.py ``evaluate``,
`domainlm eval`) masks with a fixed seed so that models are compared on identical masks. Validation masks the
same way for every model, whatever it was trained with: 15% of the tokens, each replaced by the mask token
(masked), or T5's 15% noise in spans of mean 3 (span).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer

from domainlm.errors import UserError
from domainlm.train.step import IGNORE, Loss

CAUSAL, MASKED, SPAN = "causal", "masked", "span"
MASK_TOKEN = "<mask>"  # RoBERTa's spelling; absorbs the space before it, as the masked word's token would
N_SENTINELS = 100  # T5's extra_ids
REPLACE = (0.8, 0.1)  # of the chosen tokens: mask token, random token; the rest stay (Devlin et al. 2019)
EVAL_MASK_RATE = 0.15  # validation: BERT's rate, every chosen token masked
EVAL_NOISE, EVAL_MEAN_SPAN = 0.15, 3.0  # validation: T5's defaults
EVAL_SEED = 0
_TRAIN, _EVAL = 1, 2  # tags of the RNG streams (the mixture loader draws from (seed, step) alone)


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def added_tokens(objective: str) -> int:
    """How many tokens the objective adds after the run tokenizer's vocabulary."""
    return {CAUSAL: 0, MASKED: 1, SPAN: N_SENTINELS}[objective]


def add_objective_tokens(tok, objective: str):
    """The run tokenizer with the objective's special tokens appended (ids ``len(tok)``, …): the mask token, or
    T5's sentinels. The token files never hold these ids, so every objective trains on the same prepared data."""

    if objective == MASKED:
        tok.add_special_tokens({"mask_token": AddedToken(MASK_TOKEN, lstrip=True, special=True, normalized=False)})
    elif objective == SPAN:
        tok.add_special_tokens({"additional_special_tokens": [
            AddedToken(sentinel(i), lstrip=True, special=True, normalized=False) for i in range(N_SENTINELS)]})
    return tok


def objective_tokenizer(tokenizer_dir, objective: str):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return add_objective_tokens(tok, objective)


def objective_of_config(config) -> str:
    """The objective an HF model config was trained with: encoder-decoder → span, a masked-LM head → masked."""
    if getattr(config, "is_encoder_decoder", False):
        return SPAN
    if any(a.endswith("ForMaskedLM") for a in (getattr(config, "architectures", None) or [])):
        return MASKED
    return CAUSAL


# ---------------------------------------------------------------------------------------------------- masked LM


def word_starts(tok) -> np.ndarray:
    """True for the ids that start a word: a token continues the word before it when its text begins with a
    letter or digit (a byte-level token that starts a word carries the space before it)."""
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids)
    texts = [tok.convert_tokens_to_string([p]) if i not in special else "" for i, p in enumerate(pieces)]
    return np.array([i in special or not (t and t[0].isalnum()) for i, t in enumerate(texts)], dtype=bool)


@dataclass(frozen=True)
class Masking:
    mask_id: int
    rate: float
    special: np.ndarray  # ids never chosen
    random_ids: np.ndarray  # what a "random token" is drawn from (the vocabulary without special tokens)
    word_start: np.ndarray | None = None  # whole-word masking
    replace: tuple[float, float] = REPLACE

    def __call__(self, row: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of one window: labels hold the chosen tokens, -100 elsewhere."""
        inputs, labels = row.copy(), np.full(len(row), IGNORE, dtype=np.int64)
        cand = np.flatnonzero(~np.isin(row, self.special))
        if len(cand) == 0:
            return inputs, labels
        k = max(1, int(round(self.rate * len(cand))))
        if self.word_start is None:
            chosen = rng.permutation(cand)[:k]
        else:  # whole words in random order, each only if it still fits in k (BERT's create_pretraining_data)
            new = self.word_start[row[cand]] | np.r_[True, np.diff(cand) != 1]
            words = np.split(cand, np.flatnonzero(new)[1:])
            picked: list[np.ndarray] = [np.array([], dtype=np.int64)]
            n = 0
            for w in rng.permutation(len(words)):
                if n + len(words[w]) > k:
                    continue
                picked.append(words[w])
                n += len(words[w])
                if n == k:
                    break
            chosen = np.concatenate(picked)
        chosen = np.sort(chosen)
        labels[chosen] = row[chosen]
        u = rng.random(len(chosen))
        inputs[chosen[u < self.replace[0]]] = self.mask_id
        rand = chosen[(u >= self.replace[0]) & (u < self.replace[0] + self.replace[1])]
        inputs[rand] = self.random_ids[rng.integers(0, len(self.random_ids), size=len(rand))]
        return inputs, labels


def _masked_forward(model, batch: torch.Tensor, labels: torch.Tensor | None):
    return model(input_ids=batch).logits, labels  # every position is read; labels ≠ -100 are scored


MASKED_LM = Loss(_masked_forward, shift=0, name=MASKED)


# ---------------------------------------------------------------------------------------------------- span corruption


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(corrupted tokens, spans) of a window of ``length`` tokens, as T5's ``random_spans_noise_mask``:
    round(L · density) tokens clamped to [1, L − 1], in round(noise / mean) spans (at least one)."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(1, int(round(noise / mean_span_length)))
    return noise, min(spans, length - noise)  # every span is preceded by at least one kept token


def span_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(encoder input, decoder target) lengths of a corrupted window: kept tokens + one sentinel per span + EOS,
    and one sentinel per span + the corrupted tokens + EOS."""
    noise, spans = span_counts(length, noise_density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def _segments(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random split of n items into k non-empty runs (T5's _random_segmentation)."""
    cuts = np.sort(rng.choice(n - 1, size=k - 1, replace=False) + 1) if k > 1 else np.array([], dtype=np.int64)
    return np.diff(np.r_[0, cuts, n])


@dataclass(frozen=True)
class SpanCorruption:
    sentinels: np.ndarray  # ids of <extra_id_0> …
    eos_id: int
    noise_density: float
    mean_span_length: float

    def __call__(self, row: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        noise, spans = span_counts(len(row), self.noise_density, self.mean_span_length)
        noise_len, keep_len = _segments(noise, spans, rng), _segments(len(row) - noise, spans, rng)
        inputs, targets, pos = [], [], 0
        for i in range(spans):  # kept run, then a corrupted run (T5 interleaves starting with a kept one)
            inputs.append(row[pos : pos + keep_len[i]])
            pos += keep_len[i]
            inputs.append(self.sentinels[i : i + 1])
            targets.append(self.sentinels[i : i + 1])
            targets.append(row[pos : pos + noise_len[i]])
            pos += noise_len[i]
        eos = np.array([self.eos_id], dtype=np.int64)
        return np.concatenate([*inputs, eos]).astype(np.int64), np.concatenate([*targets, eos]).astype(np.int64)


def _span_forward(model, batch: torch.Tensor, labels: torch.Tensor | None):
    """Teacher forcing: the decoder reads the targets shifted right behind its start token."""
    config = getattr(model, "module", model).config  # DDP keeps the model in .module
    start = torch.full_like(labels[:, :1], config.decoder_start_token_id)
    prev = torch.cat([start, labels[:, :-1]], dim=1)
    decoder_ids = prev.masked_fill(prev == IGNORE, config.pad_token_id)
    return model(input_ids=batch, decoder_input_ids=decoder_ids, use_cache=False).logits, labels


SPAN_LM = Loss(_span_forward, shift=0, name=SPAN)


# ---------------------------------------------------------------------------------------------------- the objective


@dataclass(frozen=True)
class Objective:
    """A non-causal objective's batches: training windows corrupted by (seed, step, row), validation windows by
    (fixed seed, window index); ``loss`` goes to `train_step` / `validation_nll`."""

    name: str
    loss: Loss
    train_fn: Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    eval_fn: Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    seed: int = 0

    def train_batch(self, tokens: torch.Tensor, step: int, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of a loader batch [B, T+1]: each window's first T tokens (the loader's windows
        overlap by one token, so these cover the stream once); ``first_row``: this rank's first row of the
        global batch."""
        rows = tokens[:, :-1].cpu().numpy()
        return _stack([self.train_fn(r, np.random.default_rng([self.seed, step, first_row + j, _TRAIN]))
                       for j, r in enumerate(rows)])

    def eval_batch(self, rows: list[np.ndarray], indices: list[int],
                   seed: int = EVAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation windows, corrupted by (seed, window index) alone: identical for every model."""
        return _stack([self.eval_fn(np.asarray(r, dtype=np.int64), np.random.default_rng([seed, i, _EVAL]))
                       for r, i in zip(rows, indices, strict=True)])


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs])))


def make_objective(objective: str, tok, *, seed: int = 0, mask_rate: float = 0.15, whole_word_mask: bool = False,
                   noise_density: float = 0.15, mean_span_length: float = 3.0) -> Objective | None:
    """The objective's batches for a tokenizer that has its tokens (`add_objective_tokens`); None for causal."""
    if objective == CAUSAL:
        return None
    special = np.array(sorted(set(tok.all_special_ids)), dtype=np.int64)
    if objective == MASKED:
        if tok.mask_token_id is None:
            raise UserError("the tokenizer has no mask token; a masked-LM model's tokenizer must set mask_token")
        random_ids = np.setdiff1d(np.arange(len(tok), dtype=np.int64), special)
        train = Masking(tok.mask_token_id, mask_rate, special, random_ids,
                        word_starts(tok) if whole_word_mask else None)
        return Objective(MASKED, MASKED_LM, train, Masking(tok.mask_token_id, EVAL_MASK_RATE, special, random_ids,
                                                           replace=(1.0, 0.0)), seed)
    ids = tok.convert_tokens_to_ids([sentinel(i) for i in range(N_SENTINELS)])
    if tok.unk_token_id is not None and tok.unk_token_id in ids or None in ids or tok.eos_token_id is None:
        raise UserError("the tokenizer lacks T5's sentinel tokens <extra_id_0>… or an EOS token")
    sentinels = np.array(ids, dtype=np.int64)
    return Objective(SPAN, SPAN_LM, SpanCorruption(sentinels, tok.eos_token_id, noise_density, mean_span_length),
                     SpanCorruption(sentinels, tok.eos_token_id, EVAL_NOISE, EVAL_MEAN_SPAN), seed)


def objective_from_config(model_cfg, tok, seed: int) -> Objective | None:
    return make_objective(model_cfg.objective, tok, seed=seed, mask_rate=model_cfg.mask_rate,
                          whole_word_mask=model_cfg.whole_word_mask, noise_density=model_cfg.noise_density,
                          mean_span_length=model_cfg.mean_span_length)
