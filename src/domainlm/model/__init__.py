"""The model: the objective's transformers architecture built from a `ModelShape` (objectives/: a Llama decoder
`LlamaForCausalLM` for causal, ModernBERT for masked, T5 for span), a base model to continue, and the Hugging Face
export. Every checkpoint it writes loads in transformers, vLLM and lm-eval-harness unchanged.

This module is single-device on purpose: parallelism (DDP / FSDP2), compilation and precision are applied
from outside, in `domainlm.train.parallel` and `domainlm.train.step`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging

from domainlm.config import RunConfig
from domainlm.errors import UserError
from domainlm.model.base import tokenizer_files
from domainlm.objectives import Causal, Objective
from domainlm.outputs import Plan
from domainlm.rundir import RunDir, swap_dir
from domainlm.shape import ModelShape, ffn_for, make_shape

TOKENIZER_DIR = RunDir.TOKENIZER
MODEL_DIR = RunDir.MODEL


def resolve_shape(cfg: RunConfig, run_dir: Path, vocab_size: int) -> ModelShape:
    """The shape to train: fields fixed in the config's ``model`` section win, the rest come from the plan.

    ``vocab_size`` always comes from the token files (the tokenizer that made them), not the plan."""
    m = cfg.model
    planned: dict = {}
    if m.d_model is None or m.n_layers is None:
        plan = RunDir(run_dir).load(RunDir.PLAN, Plan)  # a damaged one: a one-line error naming it
        if plan is None:
            raise UserError(
                f"{RunDir(run_dir).plan}: no plan; run `domainlm plan CONFIG` or fix model.d_model and model.n_layers "
                "in the config"
            )
        planned = plan.model.model_dump()
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


def build_model(shape: ModelShape, max_positions: int, *, seed: int = 0, objective: Objective = Causal(),
                **special_ids) -> torch.nn.Module:
    """A randomly initialised model of ``objective`` (its `Objective.hf_model`: LlamaForCausalLM for causal; fp32,
    CPU), the same weights for the same seed."""
    model_class, config = objective.hf_model(shape, max_positions, **special_ids)
    # fused attention (flash / memory-efficient kernels on CUDA) where the architecture has it (T5 does not)
    config._attn_implementation = "sdpa" if model_class._supports_sdpa else "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model


def load_base_model(base) -> torch.nn.Module:
    """Continued pretraining's starting point: the base model (`model.base.resolve_base`) as transformers loads
    it — its own architecture (GPT2LMHeadModel, LlamaForCausalLM, …), fp32 on the CPU, local files only, no
    remote code; SDPA attention where the architecture has it."""

    hf_logging.disable_progress_bar()
    try:
        kw = {"local_files_only": True, "trust_remote_code": False, "dtype": torch.float32}
        try:
            model = AutoModelForCausalLM.from_pretrained(base.path, attn_implementation="sdpa", **kw)
        except ValueError as e:  # an architecture without SDPA: its default attention
            if "sdpa" not in str(e).lower():
                raise
            model = AutoModelForCausalLM.from_pretrained(base.path, **kw)
    except Exception as e:  # noqa: BLE001 - truncated weights, missing shards, … : one line naming the key
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"train.init_from: {base.path}: cannot load the model ({type(e).__name__}: {why})") from None
    finally:
        hf_logging.enable_progress_bar()
    model.train()  # from_pretrained returns eval mode; training uses the base's own dropout settings
    return model


def export_hf(state_dict: dict[str, torch.Tensor], config, tokenizer_dir: Path, out_dir: Path, *,
              model_class=None, generation_config=None) -> Path:
    """Write a Hugging Face model folder (config.json, model.safetensors, generation_config.json, tokenizer)
    through ``<out>.tmp`` and a rename, so a half-written export never replaces a good one.

    ``model_class``: the architecture to save (default LlamaForCausalLM, what `build_model` trains; a continued
    base keeps its own, e.g. GPT2LMHeadModel). ``tokenizer_dir``: the run's tokenizer folder or a base model's
    folder — only its tokenizer files are copied (`model.base.tokenizer_files`)."""


    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    model = (model_class or LlamaForCausalLM)(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)  # a tied head may be absent
    head = model.get_output_embeddings()
    tied = {k for k in missing if head is not None and head.weight is model.get_input_embeddings().weight
            and k.endswith("head.weight")}  # it is the embedding
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"export: weights do not match {type(model).__name__} (missing "
                           f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if generation_config is not None:
        model.generation_config = generation_config
    hf_logging.disable_progress_bar()  # one shard; its bar would only break our own progress output
    try:
        model.save_pretrained(tmp, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    for f in tokenizer_files(Path(tokenizer_dir)):
        shutil.copy2(f, tmp / f.name)
    return swap_dir(tmp, out_dir)

