"""The model: transformers' `LlamaForCausalLM` built from a `ModelShape`, and its Hugging Face export.

Llama = RMSNorm (pre-norm), RoPE, SwiGLU MLP, optional grouped-query attention and tied embeddings
(Touvron et al. 2023). Measured on a 2-core CPU it is as fast as a hand-written model of the same shape
(ANCHORS.md), and every checkpoint it writes loads in transformers, vLLM and lm-eval-harness unchanged.

This module is single-device on purpose: parallelism (DDP / FSDP2), compilation and precision are applied
from outside, in `domainlm.train.parallel` and `domainlm.train.step`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from domainlm.config import RunConfig
from domainlm.errors import UserError
from domainlm.plan.shape import ModelShape, ffn_for, make_shape
from domainlm.rundir import RunDir, swap_dir

TOKENIZER_DIR = RunDir.TOKENIZER
MODEL_DIR = RunDir.MODEL
RMS_NORM_EPS = 1e-5  # Llama 2
ROPE_THETA = 10_000.0  # Su et al. 2021 / Llama 1–2
INIT_STD = 0.02  # GPT-2 / Llama initializer_range


def resolve_shape(cfg: RunConfig, run_dir: Path, vocab_size: int) -> ModelShape:
    """The shape to train: fields fixed in the config's ``model`` section win, the rest come from the plan.

    ``vocab_size`` always comes from the token files (the tokenizer that made them), not the plan."""
    m = cfg.model
    planned: dict = {}
    if m.d_model is None or m.n_layers is None:
        plan_path = RunDir(run_dir).plan
        if not plan_path.exists():
            raise UserError(
                f"{plan_path}: no plan; run `domainlm plan CONFIG` or fix model.d_model and model.n_layers "
                "in the config"
            )
        try:
            planned = json.loads(plan_path.read_text(encoding="utf-8"))["model"]
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{plan_path}: corrupted plan; rerun `domainlm plan CONFIG`") from None
    d_model = m.d_model or planned["d_model"]
    same_width = planned.get("d_model") == d_model  # heads and ffn from the plan only for the plan's width
    default = make_shape(d_model, m.n_layers or planned["n_layers"], vocab_size, m.tie_embeddings)
    n_heads = m.n_heads or (same_width and planned.get("n_heads")) or default.n_heads
    shape = ModelShape(
        n_layers=default.n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=m.n_kv_heads or (same_width and planned.get("n_kv_heads")) or n_heads,
        ffn_dim=m.ffn_dim or (same_width and planned.get("ffn_dim")) or ffn_for(d_model),
        vocab_size=vocab_size,
        tie_embeddings=m.tie_embeddings,
    )
    if shape.d_model % shape.n_heads:
        raise UserError(f"model.n_heads: {shape.n_heads} does not divide model.d_model {shape.d_model}")
    if shape.n_heads % shape.n_kv_heads:
        raise UserError(f"model.n_kv_heads: {shape.n_kv_heads} does not divide model.n_heads {shape.n_heads} (GQA)")
    return shape


def llama_config(shape: ModelShape, max_positions: int, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
    from transformers import LlamaConfig

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


def build_model(shape: ModelShape, max_positions: int, *, seed: int = 0, **special_ids) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM (fp32, CPU), the same weights for the same seed."""
    from transformers import LlamaForCausalLM

    config = llama_config(shape, max_positions, **special_ids)
    config._attn_implementation = "sdpa"  # fused attention (flash / memory-efficient kernels on CUDA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def export_hf(state_dict: dict[str, torch.Tensor], config, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Write a Hugging Face model folder (config.json, model.safetensors, generation_config.json, tokenizer)
    through ``<out>.tmp`` and a rename, so a half-written export never replaces a good one."""
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, strict=False)  # a tied head may be absent: it is the embedding
    hf_logging.disable_progress_bar()  # one shard; its bar would only break our own progress output
    try:
        model.save_pretrained(tmp, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and f.name != Path(RunDir.AUDIT).name:
            shutil.copy2(f, tmp / f.name)
    return swap_dir(tmp, out_dir)

