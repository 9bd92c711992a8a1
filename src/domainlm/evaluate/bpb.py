"""Bits per byte: total negative log-likelihood of a text in bits ÷ its UTF-8 bytes.

Per-token loss depends on the tokenizer (a bigger vocabulary packs more bytes into a token, so its per-token
loss is higher for the same model quality); bits per byte does not, which is why models with different
tokenizers are compared with it (Gao et al. 2020, The Pile, arXiv 2101.00027, sec. 3; DESIGN.md principles).

How a document is scored, identically for every model:
- the document is tokenized alone, without special tokens, and preceded by the tokenizer's own
  start-of-document context: the tokens it adds in front of text (Llama's BOS), else EOS (the separator GPT-2
  and domainlm's token files put between documents), else BOS. These prefix tokens are context, never scored;
- every text token is scored exactly once; EOS after the document is not scored (it has no bytes). The
  training-time validation (train/loop.py ``evaluate``, the ``bpb/<source>`` and ``val_loss/<source>`` of
  metrics.jsonl) uses the same definition — NLL of the text tokens ÷ the text's bytes, EOS never a target — on
  fixed windows of the joined token stream instead of one document at a time (less context at window starts);
- a document longer than the context is scored with strided sliding windows: the first window scores its
  first ``context`` tokens, each later window scores the next ``stride`` tokens with up to ``context`` tokens
  of window in total, so each token sees at least ``context - stride`` tokens of left context. A document that
  fits in one window gives exactly the full-context pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from domainlm.errors import UserError

LN2 = math.log(2.0)
# Default window cap: BloombergGPT's context (Wu et al. 2023). Long-context public models (128k positions)
# would otherwise score a 50k-token document in one pass with a logits tensor of tens of GB.
DEFAULT_MAX_CONTEXT = 2048
LOGITS_BUDGET = 2**27  # fp32 logits per forward pass (512 MiB): rows shrink as the vocabulary grows


def doc_start_ids(tok) -> list[int]:
    """The context put in front of every document (see the module docstring)."""
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    n = len(with_special)
    # The tokenizer's own prefix: with-special = prefix + plain (+ suffix, e.g. an EOS we ignore).
    for k in range(n - len(plain) + 1):
        if with_special[k : k + len(plain)] == plain:
            if k:
                return list(with_special[:k])
            break
    for tid in (tok.eos_token_id, tok.bos_token_id):
        if tid is not None:
            return [int(tid)]
    raise UserError("the tokenizer has no BOS or EOS token: cannot give the first token of a document a context")


def model_context(model) -> int:
    n = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if not n:
        raise UserError("the model config has no max_position_embeddings; pass --context")
    return int(n)


def windows(n_tokens: int, n_prefix: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a sequence of ``n_tokens`` (prefix included) as ``(start, first_scored, end)``:
    the model reads ``ids[start:end-1]`` (≤ ``context`` tokens) and ``ids[first_scored:end]`` are scored."""
    if stride > context:
        raise UserError(f"stride {stride} is larger than the context {context}: some tokens would not be scored")
    out = []
    a = n_prefix
    b = min(n_tokens, context + 1)  # first window: inputs ids[0:context] score targets up to index context
    while a < n_tokens:
        out.append((max(0, b - 1 - context), a, b))
        a, b = b, min(n_tokens, b + stride)
    return out


def score_sequences(
    model, seqs: Sequence[Sequence[int]], starts: Sequence[int], *, batch_tokens: int = 8192,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Sum of −log p(ids[j] | ids[:j]) in nats over ``j ≥ starts[i]`` for each sequence (float64 array).

    Sequences are sorted by length and right-padded into batches of about ``batch_tokens`` tokens. No
    attention mask: in a causal model a position never attends to the padding after it, so the real
    positions' logits are unchanged, and SDPA keeps its causal kernel (flash attention on CUDA) instead of
    a masked one."""

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
    batch_tokens = max(1, min(batch_tokens, LOGITS_BUDGET // max(1, vocab)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    nll = np.zeros(len(seqs), dtype=np.float64)
    i = 0
    while i < len(order):
        width = len(seqs[order[i]])
        group = order[i : i + max(1, batch_tokens // max(1, width - 1))]
        i += len(group)
        ids = np.zeros((len(group), width), dtype=np.int64)
        scored = np.zeros((len(group), width - 1), dtype=bool)  # per label position (ids[1:])
        for r, k in enumerate(group):
            s = seqs[k]
            ids[r, : len(s)] = s
            scored[r, max(starts[k], 1) - 1 : len(s) - 1] = True
        ids, scored = torch.from_numpy(ids).to(device), torch.from_numpy(scored).to(device)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        # fp32 softmax even under autocast: small per-token errors add up over 10^5 tokens.
        ce = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        sums = (ce.view(len(group), width - 1) * scored).double().sum(dim=1).cpu().numpy()
        nll[group] = sums
        if progress is not None:
            progress(len(group), len(seqs))
    return nll


@dataclass
class TextScore:
    nll_nats: float
    tokens: int  # scored tokens (the text's tokens, prefix excluded)
    bytes: int
    docs: int
    forward_tokens: int = 0  # tokens the model read: the compute, ≥ tokens (windows overlap by context − stride)
    doc_nll: list[float] | None = None  # nats per document, in order (paired comparisons: `domainlm decide`)
    doc_bytes: list[int] | None = None

    def as_dict(self) -> dict:
        loss = self.nll_nats / self.tokens if self.tokens else float("nan")
        return {
            "bpb": self.nll_nats / LN2 / self.bytes if self.bytes else float("nan"),
            "loss_per_token": loss,  # nats
            "ppl": math.exp(loss) if self.tokens else float("nan"),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "docs": self.docs,
            "bytes_per_token": self.bytes / self.tokens if self.tokens else float("nan"),
            "nll_bits": self.nll_nats / LN2,
            "forward_tokens": self.forward_tokens,
            # forward tokens per scored token: what the stride costs (1 + overlap; ≈ context/stride on long docs)
            "cost": self.forward_tokens / self.tokens if self.tokens else float("nan"),
        }


def score_texts(
    model, tok, docs: Sequence[str], *, context: int, stride: int, batch_tokens: int = 8192,
    progress: Callable[[int, int], None] | None = None,
) -> TextScore:
    """Bits-per-byte ingredients of a list of documents (see the module docstring for the rules)."""
    prefix = doc_start_ids(tok)
    if len(prefix) >= context:
        raise UserError(f"context {context} leaves no room after the {len(prefix)} start-of-document tokens")
    docs = [d for d in docs if d]
    encoded = tok(list(docs), add_special_tokens=False, verbose=False)["input_ids"] if docs else []
    seqs, starts, owner = [], [], []
    n_tokens = 0
    for d, ids in enumerate(encoded):
        full = prefix + list(ids)
        n_tokens += len(ids)
        for s, a, b in windows(len(full), len(prefix), context, stride):
            seqs.append(full[s:b])
            starts.append(a - s)
            owner.append(d)
    forward_tokens = sum(len(q) - 1 for q in seqs)
    # Data-parallel under torchrun: each rank scores every world-th window of the length-sorted list (balanced
    # work), and the per-document sums meet in one all-reduce. float64 sums are order-independent to ~1e-16.
    rank, world = _rank_world()
    if world > 1:
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))[rank::world]
        seqs, starts, owner = [seqs[i] for i in order], [starts[i] for i in order], [owner[i] for i in order]
    per_doc = np.zeros(len(encoded), dtype=np.float64)
    np.add.at(per_doc, np.asarray(owner, dtype=np.int64),
              score_sequences(model, seqs, starts, batch_tokens=batch_tokens, progress=progress))
    if world > 1:

        t = torch.from_numpy(per_doc).to(next(model.parameters()).device)
        dist.all_reduce(t)
        per_doc = t.cpu().numpy()
    doc_bytes = [len(d.encode("utf-8")) for d in docs]
    return TextScore(float(per_doc.sum()), n_tokens, sum(doc_bytes), len(docs), forward_tokens,
                     per_doc.tolist(), doc_bytes)


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
