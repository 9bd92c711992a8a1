"""``masked`` (Devlin et al. 2019, BERT, arXiv 1810.04805, sec. 3.1): a ModernBERT encoder trained on masked LM.

Of each window's text tokens a share ``model.mask_rate`` is chosen (15% in BERT, 30% in ModernBERT, Warner et al.
2024, arXiv 2412.13663); a chosen token becomes the mask token with probability 0.8, a random token with 0.1 and
stays with 0.1, and the encoder predicts every chosen token from the whole window. Whole-word masking (BERT's later
release) chooses words — a token that starts a word and the tokens that continue it — instead of tokens. Special
tokens (the EOS between packed documents) are never chosen. Validation masks 15% of the tokens, each replaced by
the mask token, whatever the model trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import AutoModelForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

from domainlm.errors import UserError
from domainlm.objectives.base import IGNORE, Batches, Loss
from domainlm.objectives.causal import INIT_STD
from domainlm.objectives.corruption import EVAL_SEED, CorruptedBatches, Corruption
from domainlm.shape import ModelShape

MASK_TOKEN = "<mask>"  # RoBERTa's spelling; absorbs the space before it, as the masked word's token would
REPLACE = (0.8, 0.1)  # of the chosen tokens: mask token, random token; the rest stay (Devlin et al. 2019)
EVAL_MASK_RATE = 0.15  # validation: BERT's rate, every chosen token masked


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


MASKED_LM = Loss(_masked_forward, shift=0)


def encoder_config(shape: ModelShape, max_positions: int, *, bos_id: int | None = None, eos_id: int | None = None,
                   pad_id: int | None = None):
    """A ModernBERT encoder of the plan's width, depth, heads and ffn (Warner et al. 2024, arXiv 2412.13663:
    pre-norm, RoPE, GeGLU, no biases, alternating global / 128-token local attention, its MLM head tied to the
    embedding). ModernBERT over BERT/RoBERTa: the same modern block as the Llama decoder (RoPE, gated MLP, no
    biases), so an encoder and a decoder of one shape differ mainly in their attention mask; on a 2-core CPU it
    trains as fast as the decoder of the same shape."""

    return ModernBertConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.ffn_dim,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads, max_position_embeddings=max_positions,
        initializer_range=INIT_STD, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        cls_token_id=bos_id, sep_token_id=eos_id, tie_word_embeddings=True)


@dataclass(frozen=True)
class Masked(Corruption):
    mask_rate: float = 0.15  # model.mask_rate
    whole_word_mask: bool = False  # model.whole_word_mask

    name: ClassVar[str] = "masked"
    loss: ClassVar[Loss] = MASKED_LM
    added_tokens: ClassVar[int] = 1  # the mask token
    model_description: ClassVar[str] = "a ModernBERT encoder (masked LM)"
    flops_note: ClassVar[str] = (" — though only the masked ones produce loss (6·N per token processed, not per "
                                 "masked token)")
    eval_what: ClassVar[str] = "masked-token loss and accuracy"
    targets_name: ClassVar[str] = "masked tokens"
    targets_title: ClassVar[str] = "masked tokens"

    def add_tokens(self, tok):
        tok.add_special_tokens({"mask_token": AddedToken(MASK_TOKEN, lstrip=True, special=True, normalized=False)})
        return tok

    def hf_model(self, shape: ModelShape, max_positions: int, **special_ids):
        return ModernBertForMaskedLM, encoder_config(shape, max_positions, **special_ids)

    def auto_model(self) -> type:
        return AutoModelForMaskedLM

    def claims(self, hf_config) -> bool:
        """A masked-LM head."""
        return any(a.endswith("ForMaskedLM") for a in (getattr(hf_config, "architectures", None) or []))

    def params(self, shape: ModelShape) -> int:
        """Embedding V·d (the MLM decoder's weight is the embedding; its bias V), per layer Wqkv + Wo 4d² and the
        GeGLU MLP 3·d·ffn, LayerNorms without bias (2 per layer, none before the first layer's attention, one
        after the embedding, one final, one in the MLM head), the head's dense d²."""
        d, L, f, v = shape.d_model, shape.n_layers, shape.ffn_dim, shape.vocab_size
        return v * d + v + L * (4 * d * d + 3 * d * f) + d * d + (2 * L + 2) * d

    def flops_per_token(self, shape: ModelShape, seq_len: int) -> float:
        """Every position is processed — forward and backward through the whole encoder and the MLM head — though
        only the masked ones produce loss, so 6·N_matmul per token (N_matmul: the layers' 4d² + 3·d·ffn, the head's
        d², the decoder's V·d) + 12·L·d·T for bidirectional attention (Devlin et al. 2019 train on every position's
        compute; PaLM App. B for the attention term)."""
        d, L, f, v = shape.d_model, shape.n_layers, shape.ffn_dim, shape.vocab_size
        return 6.0 * (L * (4 * d * d + 3 * d * f) + d * d + v * d) + 12.0 * L * d * seq_len

    def batches(self, tok, seed: int = 0) -> Batches:
        if tok.mask_token_id is None:
            raise UserError("the tokenizer has no mask token; a masked-LM model's tokenizer must set mask_token")
        special = np.array(sorted(set(tok.all_special_ids)), dtype=np.int64)
        random_ids = np.setdiff1d(np.arange(len(tok), dtype=np.int64), special)
        train = Masking(tok.mask_token_id, self.mask_rate, special, random_ids,
                        word_starts(tok) if self.whole_word_mask else None)
        return CorruptedBatches(MASKED_LM, train, Masking(tok.mask_token_id, EVAL_MASK_RATE, special, random_ids,
                                                          replace=(1.0, 0.0)), seed)

    def eval_masking(self) -> dict:
        return {"seed": EVAL_SEED, "mask_rate": EVAL_MASK_RATE, "replace": "all masked"}
