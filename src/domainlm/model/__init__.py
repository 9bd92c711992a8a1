"""The model: the objective's transformers architecture built from a `ModelShape` (objectives/: a Llama decoder
`LlamaForCausalLM` for causal, ModernBERT for masked, T5 for span), a base model to continue, and the Hugging Face
export. Every checkpoint it writes loads in transformers, vLLM and lm-eval-harness unchanged.

This module is single-device on purpose: parallelism (DDP / FSDP2), compilation and precision are applied
from outside, in `domainlm.train.parallel` and `domainlm.train.step`.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from domainlm.config import RunConfig
from domainlm.errors import UserError
from domainlm.model.base import check_loaded, tokenizer_files
from domainlm.objectives import Causal, Objective
from domainlm.outputs import Plan
from domainlm.rundir import RunDir, clear_temp, swap_dir
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
                meta: bool = False, **special_ids) -> torch.nn.Module:
    """A randomly initialised model of ``objective`` (its `Objective.hf_model`: LlamaForCausalLM for causal; fp32,
    CPU), the same weights for the same seed. ``meta`` (causal only): the model on the meta device, no memory, no
    values — shard it, ``to_empty`` it and `seeded_init` it (`train/parallel.py`), and each rank holds only its
    shard, with the weights this function would have given."""
    model_class, config = objective.hf_model(shape, max_positions, **special_ids)
    # fused attention (flash / memory-efficient kernels on CUDA) where the architecture has it (T5 does not)
    config._attn_implementation = "sdpa" if model_class._supports_sdpa else "eager"
    if meta:
        if not isinstance(objective, Causal):
            raise ValueError(f"meta initialisation is for the causal LM, not {type(objective).__name__}")
        with torch.device("meta"):
            return model_class(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    if isinstance(objective, Causal):
        seeded_init(model, seed)
    return model


def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def seeded_init(model: torch.nn.Module, seed: int) -> None:
    """Initialise every weight and buffer as transformers' ``_init_weights`` does (normal(0, 0.02) linear and
    embedding weights, unit norms, RoPE frequencies), each module from a generator seeded by (``seed``, its name)
    alone: the values depend neither on the order modules are visited in nor on where the tensors live. Each
    module's tensors are drawn whole on the CPU (one module at a time: at most the embedding's memory) and copied
    in — for an FSDP2-sharded (DTensor) weight only this rank's shard — so a model materialised from the meta
    device after sharding gets the same values, bit for bit, as one built whole (torchtitan's ``init_weights``
    after ``to_empty``, with values that do not depend on the number of shards)."""
    owners: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        owner = module if isinstance(module, PreTrainedModel) else owners.get(name.rpartition(".")[0], model)
        owners[name] = owner
        slots = [(module._parameters, k) for k, v in module._parameters.items() if v is not None] + \
                [(module._buffers, k) for k, v in module._buffers.items() if v is not None]
        if not slots:
            continue
        real = [d[k] for d, k in slots]
        whole = [torch.full(tuple(t.shape), float("nan"), dtype=t.dtype) for t in real]  # NaN: "not initialised"
        for (d, k), w in zip(slots, whole, strict=True):
            d[k] = w
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_module_seed(seed, name.replace("._checkpoint_wrapped_module", "")))
                owner._init_weights(module)
        finally:
            for (d, k), t in zip(slots, real, strict=True):
                d[k] = t
        for (_, k), t, w in zip(slots, real, whole, strict=True):
            if w.is_floating_point() and torch.isnan(w).any():
                raise ValueError(f"{name}.{k}: not initialised by {type(owner).__name__}._init_weights")
            if isinstance(t, DTensor):  # this rank's shard of the whole tensor, no communication
                t.to_local().copy_(distribute_tensor(w.to(t.device), t.device_mesh, t.placements,
                                                     src_data_rank=None).to_local())
            else:
                t.copy_(w)


def load_base_model(base) -> torch.nn.Module:
    """Continued pretraining's starting point: the base model (`model.base.resolve_base`) as transformers loads
    it — its own architecture (GPT2LMHeadModel, LlamaForCausalLM, …), fp32 on the CPU, local files only, no
    remote code; SDPA attention where the architecture has it."""

    bars = hf_logging.is_progress_bar_enabled()  # off under the CLI unless --debug
    hf_logging.disable_progress_bar()
    try:
        kw = {"local_files_only": True, "trust_remote_code": False, "dtype": torch.float32,
              "output_loading_info": True}
        try:
            model, info = AutoModelForCausalLM.from_pretrained(base.path, attn_implementation="sdpa", **kw)
        except ValueError as e:  # an architecture without SDPA: its default attention
            if "sdpa" not in str(e).lower():
                raise
            model, info = AutoModelForCausalLM.from_pretrained(base.path, **kw)
    except Exception as e:  # noqa: BLE001 - truncated weights, missing shards, … : one line naming the key
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"train.init_from: {base.path}: cannot load the model ({type(e).__name__}: {why})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    check_loaded(base.path, info)
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
    tmp = clear_temp(out_dir.with_name(out_dir.name + ".tmp"))

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
    bars = hf_logging.is_progress_bar_enabled()  # off under the CLI unless --debug
    hf_logging.disable_progress_bar()  # one shard; its bar would only break our own progress output
    try:
        model.save_pretrained(tmp, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for f in tokenizer_files(Path(tokenizer_dir)):
        shutil.copy2(f, tmp / f.name)
    return swap_dir(tmp, out_dir)

