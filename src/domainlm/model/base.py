"""The base model of continued pretraining (``train.init_from``): a Hugging Face causal-LM folder — anything
transformers loads with ``AutoModelForCausalLM`` without remote code (Llama, Mistral, Qwen, GPT-2, …, and
domainlm's own exports) — or a domainlm run directory (its ``model/``).

`resolve_base` reads and checks it once, without loading its weights: the folder, its config (through
``AutoConfig``, local files only, no remote code), its weights files and its tokenizer. Every problem is one
line naming ``train.init_from`` and the path. What it returns gives the rest of domainlm what it needs of the
base: the folder (model and tokenizer), its real shape (plan, memory, MFU), its exact parameter count (the plan
fixes N to it), its context length, and a fingerprint of its files (a changed base retrains).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from domainlm.errors import UserError
from domainlm.rundir import HF_CONFIG, RunDir, resolve_model_ref
from domainlm.shape import ModelShape
from domainlm.stages import file_fingerprint, fingerprint

KEY = "train.init_from"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Files of a model folder that are not its tokenizer (the export copies the rest of a base folder's files).
NOT_TOKENIZER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf", ".index.json")
NOT_TOKENIZER_NAMES = (HF_CONFIG, "generation_config.json", RunDir.AUDIT_FILE, RunDir.EXTENSION_FILE)


@dataclass(frozen=True)
class BaseModel:
    path: Path  # the HF model folder (for a run directory: its model/); also the tokenizer's folder
    architecture: str  # the class transformers builds, e.g. GPT2LMHeadModel, LlamaForCausalLM
    model_type: str  # config.json's model_type: gpt2, llama, qwen2, …
    params: int  # unique parameters (a tied head counted once)
    shape: ModelShape  # hidden size, layers, heads, kv heads, ffn, vocab, tied — as its config says
    max_positions: int | None  # the context it was trained for (None: the config does not say)
    fingerprint: str  # config, weights and tokenizer files: another base (or the same path rewritten) retrains
    config: dict = field(repr=False, compare=False, default_factory=dict)  # config.json as read

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N_matmul + 12·L·d·T (PaLM, Chowdhery et al. 2022, App. B), with N_matmul
        the exact parameter count minus the input embedding lookup (plus the head, which a tied embedding
        shares) — position-embedding tables (GPT-2) are counted as matmul weights, a <1% overestimate."""
        s = self.shape
        lookup = 0 if s.tie_embeddings else s.vocab_size * s.d_model
        return 6.0 * (self.params - lookup) + 12.0 * s.n_layers * s.d_model * seq_len

    def as_dict(self) -> dict:
        return {"path": str(self.path), "architecture": self.architecture, "model_type": self.model_type,
                "params": self.params, "max_positions": self.max_positions, "fingerprint": self.fingerprint,
                "model": self.shape.as_dict()}


def _fail(path: Path, what: str, key: str = KEY) -> UserError:
    return UserError(f"{key}: {path}: {what}")


def model_folder(init_from: str | Path, key: str = KEY) -> Path:
    """The HF model folder ``init_from`` names: itself, or a run directory's ``model/``."""
    return resolve_model_ref(init_from, key=key).model_dir


def _shape(cfg) -> ModelShape:
    """The base's shape from its config; the names differ between families (transformers maps GPT-2's n_embd,
    n_layer, n_head onto hidden_size, num_hidden_layers, num_attention_heads); a model with a text config inside
    (multimodal families) is read from that."""
    c = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d = int(c.hidden_size)
    heads = int(c.num_attention_heads)
    kv = getattr(c, "num_key_value_heads", None) or heads
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or getattr(c, "ffn_dim", None)
    tied = bool(getattr(c, "tie_word_embeddings", getattr(cfg, "tie_word_embeddings", False)))
    return ModelShape(n_layers=int(c.num_hidden_layers), d_model=d, n_heads=heads, n_kv_heads=int(kv),
                      ffn_dim=int(ffn or 4 * d), vocab_size=int(c.vocab_size), tie_embeddings=tied)


def _count_params(cfg) -> tuple[int, str]:
    """Unique parameters of the model the config describes (built on the meta device: no memory, no weights
    read) and the class transformers builds for it."""

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    seen: dict[int, int] = {}
    for p in model.parameters():  # parameters() yields a shared (tied) tensor once
        seen[id(p)] = p.numel()
    return sum(seen.values()), type(model).__name__


def _files_fingerprint(folder: Path) -> list:
    return [(f.name, file_fingerprint(f)) for f in sorted(folder.iterdir()) if f.is_file()]


@lru_cache(maxsize=8)
def _resolve(folder: Path, stamp: tuple, key: str) -> BaseModel:
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(folder / "config.json", f"unreadable config ({type(e).__name__}: {e})", key) from None
    if not isinstance(raw, dict):
        raise _fail(folder / "config.json", "expected a JSON object", key)
    try:
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/OSError by case
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise _fail(folder, f"transformers cannot read its config.json ({why}); a model that needs remote code "
                    "is not supported", key) from None
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise _fail(folder, f"model_type {cfg.model_type!r} is not a causal language model AutoModelForCausalLM "
                    "builds (without remote code)", key)
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise _fail(folder, f"no weights ({' or '.join(WEIGHT_FILES[::2])}); save the model with save_pretrained", key)
    if not (folder / "tokenizer.json").is_file():
        raise _fail(folder, "no tokenizer.json (a fast tokenizer); save one with AutoTokenizer.from_pretrained(FOLDER)"
                    ".save_pretrained(FOLDER)", key)
    try:
        shape = _shape(cfg)
    except (AttributeError, TypeError, ValueError) as e:
        raise _fail(folder, f"config.json lacks the shape fields domainlm reads ({e})", key) from None
    params, arch = _count_params(cfg)
    max_pos = getattr(cfg, "max_position_embeddings", None)
    return BaseModel(path=folder, architecture=arch, model_type=cfg.model_type, params=params, shape=shape,
                     max_positions=int(max_pos) if max_pos else None,
                     fingerprint=fingerprint("base-v1", _files_fingerprint(folder)), config=raw)


def resolve_base(init_from: str | Path, key: str = KEY) -> BaseModel:
    """Check ``init_from`` and describe the base model; one-line UserError naming ``key`` (``train.init_from``, or
    a flag) and the path if it is not usable. Cached per folder and file stamps (cheap to call from every stage)."""
    folder = model_folder(init_from, key)
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file())
    return _resolve(folder.resolve(), stamp, key)


def base_of(cfg) -> BaseModel | None:
    """The base model of a run config (``train.init_from``), or None when it trains from scratch."""
    init_from = cfg.train.init_from
    if init_from and cfg.tokenizer.extend_vocab:  # the base with domain tokens added, once `domainlm tokenize` built it
        extended = RunDir(cfg.directory()) / RunDir.EXTENDED_BASE
        if (extended / "config.json").is_file():
            return resolve_base(extended)
    return resolve_base(init_from) if init_from else None


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer's files of a model folder or tokenizer folder: everything but the model's config, its
    generation config, weights, and the tokenizer audit."""
    return [f for f in sorted(Path(folder).iterdir())
            if f.is_file() and f.name not in NOT_TOKENIZER_NAMES and not f.name.endswith(NOT_TOKENIZER_SUFFIXES)]


def check_loaded(model_dir: Path | str, info: dict) -> None:
    """``from_pretrained(..., output_loading_info=True)``'s report as one line: weights that config.json
    describes but the files lack (transformers would initialise them at random — with its report, 27 lines
    with ANSI codes, kept off the terminal) or of another shape. Unexpected extra weights are ignored, as
    transformers does (a head the task does not use)."""
    missing, mismatched = sorted(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = (f"{len(missing)} weights of its config.json are missing (e.g. {missing[0]})" if missing
                else f"{len(mismatched)} weights have another shape than its config.json says "
                     f"(e.g. {mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]})")
        raise UserError(f"{model_dir}: the weights do not match the model's config.json: {what}; the folder is "
                        "damaged or its config.json was edited — restore it")
