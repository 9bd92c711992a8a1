"""``causal`` (the default): a Llama decoder trained on next-token prediction.

Llama = RMSNorm (pre-norm), RoPE, SwiGLU MLP, optional grouped-query attention and tied embeddings (Touvron et al.
2023). Measured on a 2-core CPU it is as fast as a hand-written model of the same shape (ANCHORS.md), and every
checkpoint it writes loads in transformers, vLLM and lm-eval-harness unchanged. Its loss is the probability of the
text, so validation reports bits per byte.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from domainlm.objectives.base import IGNORE, Batches, Loss, Objective
from domainlm.shape import ModelShape

RMS_NORM_EPS = 1e-5  # Llama 2
ROPE_THETA = 10_000.0  # Su et al. 2021 / Llama 1–2
INIT_STD = 0.02  # GPT-2 / Llama initializer_range
LOG2 = math.log(2.0)


def _next_token(model: torch.nn.Module, batch: torch.Tensor, labels: torch.Tensor | None):
    x, y = batch[:, :-1], (batch if labels is None else labels)[:, 1:]
    return model(input_ids=x, use_cache=False).logits, y  # [B, T, V], [B, T]


NEXT_TOKEN = Loss(_next_token, shift=1)


def llama_config(shape: ModelShape, max_positions: int, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):

    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.d_model,
        intermediate_size=shape.ffn_dim,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        initializer_range=INIT_STD,
        tie_word_embeddings=shape.tie_embeddings,
        hidden_act="silu",  # SwiGLU: down(silu(gate(x)) * up(x))
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,  # generation; training passes use_cache=False
    )


class NextTokenBatches(Batches):
    """The loader's windows as they are (each its own target, shifted by one); validation windows of the val
    stream with EOS as context, never a target (it has no bytes: train/loop.py ``evaluate``)."""

    loss = NEXT_TOKEN

    def train(self, tokens: torch.Tensor, step: int, first_row: int) -> tuple[torch.Tensor, None]:
        return tokens, None

    def val(self, arr: np.ndarray, windows: list[int], seq_len: int, micro_batch: int,
            eos: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(windows), micro_batch):
            rows = [np.asarray(arr[j * seq_len : (j + 1) * seq_len + 1], dtype=np.int64)
                    for j in windows[i : i + micro_batch]]
            batch = torch.from_numpy(np.stack(rows))
            yield batch, (batch.masked_fill(batch == eos, IGNORE) if eos is not None else batch)

    def scores(self, nll: float, scored: float, hits: float, arr: np.ndarray, eos: int | None,
               val_bytes: float) -> dict[str, float]:
        """Loss per text token and bits per byte: NLL in bits ÷ the UTF-8 bytes of the text tokens scored, the
        split's ``val_bytes`` prorated by text tokens scored / text tokens in the split (exact when the whole
        split is scored, else it assumes bytes per token is uniform over the split)."""
        text_total = len(arr) - (int(np.count_nonzero(np.asarray(arr) == eos)) if eos is not None else 0)
        bytes_scored = val_bytes * scored / max(text_total, 1)
        return {"loss": nll / max(scored, 1), "bpb": nll / LOG2 / max(bytes_scored, 1e-9)}


@dataclass(frozen=True)
class Causal(Objective):
    name: ClassVar[str] = "causal"
    loss: ClassVar[Loss] = NEXT_TOKEN
    metric: ClassVar[str] = "bpb"
    bits_per_byte: ClassVar[bool] = True
    init_from_causal: ClassVar[bool] = True

    def hf_model(self, shape: ModelShape, max_positions: int, **special_ids):
        return LlamaForCausalLM, llama_config(shape, max_positions, **special_ids)

    def auto_model(self) -> type:
        return AutoModelForCausalLM

    def params(self, shape: ModelShape) -> int:
        return shape.params_total

    def flops_per_token(self, shape: ModelShape, seq_len: int) -> float:
        return shape.flops_per_token(seq_len)  # PaLM's 6·N_matmul + 12·L·d·T

    def batches(self, tok=None, seed: int = 0) -> Batches:
        return NextTokenBatches()

    def show_metric(self, value: float) -> str:
        return f"{value:.3f} bpb"
