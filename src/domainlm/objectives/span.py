"""``span`` (Raffel et al. 2020, T5, arXiv 1910.10683, sec. 3.1.4 and 3.3.4): a T5 encoder-decoder trained on span
corruption.

``round(L · noise_density)`` of a window's ``L`` tokens are corrupted in ``round(noise / mean_span_length)`` spans;
each span is replaced in the encoder's input by its own sentinel token (``<extra_id_i>``), and the decoder's target
is every sentinel followed by the tokens it replaced, then EOS. The counts depend only on ``L``, so every window of a
batch has the same input and target length: no padding. Validation corrupts with T5's defaults (15% noise in spans
of mean 3), whatever the model trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

from domainlm.errors import UserError
from domainlm.objectives.base import IGNORE, Batches, Loss
from domainlm.objectives.corruption import EVAL_SEED, CorruptedBatches, Corruption
from domainlm.shape import ModelShape

N_SENTINELS = 100  # T5's extra_ids
EVAL_NOISE, EVAL_MEAN_SPAN = 0.15, 3.0  # validation: T5's defaults


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


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


SPAN_LM = Loss(_span_forward, shift=0)


def t5_config(shape: ModelShape, max_positions: int, *, eos_id: int | None = None, pad_id: int | None = None):
    """A T5 encoder-decoder (Raffel et al. 2020) with v1.1's gated-GELU MLP, no biases, ``n_layers`` encoder and
    ``n_layers`` decoder blocks of the plan's width; the head is the embedding (transformers 5 always ties T5's)
    with the original T5's d_model^-0.5 output scaling; the decoder starts from the pad token. T5's positions are
    relative; ``max_position_embeddings`` records the window it trained on (eval's default)."""

    return T5Config(
        vocab_size=shape.vocab_size, d_model=shape.d_model, d_kv=shape.head_dim, d_ff=shape.ffn_dim,
        num_layers=shape.n_layers, num_decoder_layers=shape.n_layers, num_heads=shape.n_heads,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, initializer_factor=1.0, eos_token_id=eos_id,
        pad_token_id=pad_id, decoder_start_token_id=pad_id, max_position_embeddings=max_positions)


@dataclass(frozen=True)
class Span(Corruption):
    noise_density: float = 0.15  # model.noise_density
    mean_span_length: float = 3.0  # model.mean_span_length

    name: ClassVar[str] = "span"
    loss: ClassVar[Loss] = SPAN_LM
    added_tokens: ClassVar[int] = N_SENTINELS
    model_description: ClassVar[str] = "a T5 encoder-decoder (span corruption)"
    flops_note: ClassVar[str] = " — the encoder's input and the decoder's targets, per window token"
    eval_what: ClassVar[str] = "span-corruption target loss and accuracy"
    targets_name: ClassVar[str] = "span targets"
    targets_title: ClassVar[str] = "span-corruption targets"

    def check(self, seq_len: int) -> None:
        """Each corrupted span is marked with its own sentinel token; T5 has 100 of them."""
        spans = span_counts(seq_len, self.noise_density, self.mean_span_length)[1]
        if spans > N_SENTINELS:
            raise ValueError(f"train.seq_len: span corruption of {seq_len} tokens makes {spans} spans, more than the "
                             f"{N_SENTINELS} sentinel tokens; lower train.seq_len or raise model.mean_span_length")

    def add_tokens(self, tok):
        tok.add_special_tokens({"additional_special_tokens": [
            AddedToken(sentinel(i), lstrip=True, special=True, normalized=False) for i in range(N_SENTINELS)]})
        return tok

    def hf_model(self, shape: ModelShape, max_positions: int, *, bos_id: int | None = None, **special_ids):
        return T5ForConditionalGeneration, t5_config(shape, max_positions, **special_ids)  # no BOS

    def auto_model(self) -> type:
        return AutoModelForSeq2SeqLM

    def claims(self, hf_config) -> bool:
        """An encoder-decoder."""
        return bool(getattr(hf_config, "is_encoder_decoder", False))

    def params(self, shape: ModelShape) -> int:
        """Embedding V·d (the head is tied), encoder layers 4d² + 3·d·ffn + 2 norms, decoder layers 8d² (self and
        cross attention) + 3·d·ffn + 3 norms, a final norm and relative-position buckets (32 × heads) per stack."""
        d, L, f, v, h = shape.d_model, shape.n_layers, shape.ffn_dim, shape.vocab_size, shape.n_heads
        buckets = 32 * h + d  # relative attention bias of the first layer + the stack's final norm
        return v * d + L * (4 * d * d + 3 * d * f + 2 * d) + buckets + L * (8 * d * d + 3 * d * f + 3 * d) + buckets

    def flops_per_token(self, shape: ModelShape, seq_len: int) -> float:
        """The window of T tokens becomes T_e encoder and T_d decoder tokens (`span_lengths`); per encoder token
        6·(L·(4d² + 3·d·ffn) + L·2d²) (its layers, and the K, V of every decoder layer's cross attention)
        + 12·L·d·T_e; per decoder token 6·(L·(6d² + 3·d·ffn) + V·d) (self attention, cross attention's Q and O,
        MLP, head) + 12·L·d·(T_d + T_e) (self and cross attention); the sum divided by T (Raffel et al. 2020,
        sec. 3.2.2: an encoder-decoder of L + L layers costs about an L-layer decoder on inputs + targets)."""
        d, L, f, v = shape.d_model, shape.n_layers, shape.ffn_dim, shape.vocab_size
        t_e, t_d = span_lengths(seq_len, self.noise_density, self.mean_span_length)
        enc = 6.0 * (L * (4 * d * d + 3 * d * f) + L * 2 * d * d) + 12.0 * L * d * t_e
        dec = 6.0 * (L * (6 * d * d + 3 * d * f) + v * d) + 12.0 * L * d * (t_d + t_e)
        return (t_e * enc + t_d * dec) / seq_len

    def batches(self, tok, seed: int = 0) -> Batches:
        ids = tok.convert_tokens_to_ids([sentinel(i) for i in range(N_SENTINELS)])
        if tok.unk_token_id is not None and tok.unk_token_id in ids or None in ids or tok.eos_token_id is None:
            raise UserError("the tokenizer lacks T5's sentinel tokens <extra_id_0>… or an EOS token")
        sentinels = np.array(ids, dtype=np.int64)
        return CorruptedBatches(
            SPAN_LM, SpanCorruption(sentinels, tok.eos_token_id, self.noise_density, self.mean_span_length),
            SpanCorruption(sentinels, tok.eos_token_id, EVAL_NOISE, EVAL_MEAN_SPAN), seed)

    def eval_masking(self) -> dict:
        return {"seed": EVAL_SEED, "noise_density": EVAL_NOISE, "mean_span_length": EVAL_MEAN_SPAN}
