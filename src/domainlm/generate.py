"""`domainlm generate`: sample text from an exported model folder with plain transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from domainlm.errors import UserError
from domainlm.evaluate.inputs import load_model


def generate(model_dir: Path, prompt: str, *, max_new_tokens: int = 50, temperature: float = 0.8,
             top_k: int | None = 50, seed: int = 0) -> str:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir}: not a model folder (no config.json); `domainlm train CONFIG` writes <run>/model")
    if temperature < 0:
        raise UserError(f"--temperature: expected ≥ 0, got {temperature:g}")

    # Local files only; a folder without tokenizer files or with a truncated weights file is one line.
    model, tok = load_model(model_dir, "cpu")
    # A fine-tuned model (`domainlm finetune`) carries a chat template: wrap the prompt as a user turn, as in
    # fine-tuning, and return only the reply.
    chat = bool(getattr(tok, "chat_template", None)) and bool(prompt)
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        ids = torch.tensor([[tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]])
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=top_k if sample else None,
        top_p=None,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    return tok.decode(out[0, ids.shape[1]:] if chat else out[0], skip_special_tokens=True)
