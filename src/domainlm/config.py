"""Typed run configuration (pydantic v2), loaded from YAML.

Every section rejects unknown keys. A config that does not validate raises :class:`ConfigError` with one
line per problem, each naming the file, the key path (``sources[0].weight``) and what was expected.
"""

from __future__ import annotations

import math
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from domainlm import objectives
from domainlm.errors import ConfigError, UserError
from domainlm.rundir import RunDir, atomic_write
from domainlm.units import parse_number

LAWS = ("chinchilla-1", "chinchilla-2", "chinchilla-3", "epoch-2024", "kaplan")
DEMO_RECIPE = "legal-demo.yaml"
LICENSEDB_TEST = "licensedb:test"  # sources[].exclude_ids: the default split's test licenses (domainlm tasks)


INT64_MAX = 2**63 - 1  # numpy/torch integers: a larger count overflows them (OverflowError) instead of failing here
# Upper bounds on the numbers that multiply into tensor shapes and token counts: far above any model trained so
# far (Llama 3 405B: 126 layers, d_model 16384, 128k context, 15.6T tokens, ~16M tokens per step; Dubey et al.
# 2024, Table 3), low enough that their products stay finite integers.
MAX_SEQ = 2**20  # tokens of context
MAX_WIDTH = 2**18  # d_model, ffn_dim
MAX_BATCH = 2**16  # sequences per micro-batch
MAX_TOKENS = 1e15  # a token budget (≈ 64× Llama 3's)
MAX_FLOPS = 1e30  # a compute budget (≈ 10^4× the largest reported training runs, ~4e25)


def _no_control(v: Any, where: str = "") -> None:
    """Refuse control characters (newline, tab, NUL, ESC, …) in every string of the config: paths and names
    reach file names, terminals and generated scripts (`domainlm launch slurm`), where a newline starts a new
    line — or a new command."""
    if isinstance(v, str):
        bad = next((c for c in v if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise PydanticCustomError("control_character", f"contains the control character {bad!r}{where}; remove it")
    elif isinstance(v, list | tuple):
        for i, x in enumerate(v):
            _no_control(x, f" (item {i})")
    elif isinstance(v, dict):
        for k, x in v.items():
            _no_control(k, " (a key)")
            _no_control(x, f" (at {k})")


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` in YAML are floats, and no field means them (a budget of Infinity
    # tokens ends in OverflowError, far from the config)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _sane(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT64_MAX:
            raise ValueError(f"expected a whole number of at most {INT64_MAX}")
        _no_control(v)
        return v


def unique_names(items: list, what: str) -> list:
    """``items`` (sources, pools) when no two share a name, else the validation error naming the first repeat."""
    names = [x.name for x in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two {what} named {dupes[0]!r}; names must be unique")
    return items


class InputConfig(_Section):
    """Where a corpus's documents are read from: a source of the mixture, or a pool `domainlm mine` scores."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="folder-safe name")
    input: str = Field(min_length=1, description="path/glob, hf:<dataset>, or package:licensedcode|bbc-news")
    text_key: str = "text"  # .jsonl inputs
    text_column: str = "text"  # .parquet and hf: inputs
    split: str = "train"  # hf: inputs
    max_files: int | None = Field(default=None, ge=1, description="use at most this many input files (evenly spaced)")
    # A slice of a corpus-scale source ("50B tokens of a 15T-token corpus": max_bytes: 2e11 at ~4 bytes/token):
    # at most this many documents / UTF-8 bytes are read, spread evenly over prepare's tasks (each task reads
    # the first documents of its shard of the stream and stops); hf: sources stream, nothing else is fetched.
    max_docs: int | None = Field(default=None, ge=1, description="read at most this many documents")
    max_bytes: int | None = Field(default=None, ge=1, description="read at most about this many bytes of text")
    # A held-out experiment (docs/finetune.md): files of this source to leave out of every stage, one path
    # relative to the source's root per line (e.g. licenses/mit.LICENSE; `domainlm tasks licensedb` writes it).
    exclude_ids: str | None = None

    @field_validator("max_docs", "max_bytes", mode="before")
    @classmethod
    def _human_count(cls, v: Any) -> Any:
        """``2e11`` (YAML reads it as a string), ``200G``, ``1.5M``: the numbers people write for a slice."""
        if isinstance(v, str):

            try:
                return parse_number(v, "", positive=False)
            except UserError:
                raise ValueError("expected a whole number like 200000, 2e11 or 200G") from None
        return v


class SourceConfig(InputConfig):
    """One text source of the mixture."""

    role: Literal["domain", "general"]
    weight: float = Field(ge=0.0, le=1.0, description="share of training sequences drawn from this source")
    unique_tokens: float | None = Field(default=None, gt=0, description="known unique tokens (plan limits)")


class SlurmConfig(_Section):
    """datatrove SlurmPipelineExecutor settings (``prepare.executor: slurm``)."""

    partition: str | None = None
    time: str = "4:00:00"
    cpus_per_task: int = Field(default=1, ge=1)
    mem_per_cpu_gb: float = Field(default=2.0, gt=0)
    qos: str | None = None
    sbatch_args: dict[str, str] = Field(default_factory=dict)
    # true: `prepare` waits for each stage's job array and ends with data/stats.json, like a local run;
    # false: it submits the stages chained by --dependency and returns; a rerun writes the statistics
    wait: bool = True


class RayConfig(_Section):
    """datatrove RayPipelineExecutor settings (``prepare.executor: ray``); ``ray.init()`` is the caller's."""

    cpus_per_task: int = Field(default=1, ge=1)
    mem_per_cpu_gb: float = Field(default=2.0, gt=0)


class PrepareConfig(_Section):
    """`domainlm prepare`: cleaning, dedup, split, executor."""

    executor: Literal["local", "slurm", "ray"] = "local"
    workers: int | None = Field(default=None, ge=1, description="parallel tasks; default: CPU cores")
    tasks: int | None = Field(default=None, ge=1, description="shards per source; default: workers")
    min_chars: int = Field(default=32, ge=0)
    max_chars: int = Field(default=5_000_000, ge=1)
    max_dup_line_frac: float = Field(default=0.3, gt=0, le=1, description="Gopher repetition rule (Rae et al. 2021)")
    max_error_rate: float = Field(default=0.01, ge=0, le=1, description="malformed JSONL lines tolerated")
    near_dup: bool = True
    minhash_buckets: int = Field(default=8, ge=1)
    minhash_hashes_per_bucket: int = Field(default=8, ge=1)
    minhash_ngrams: int = Field(default=5, ge=1)
    val_fraction: float = Field(default=0.01, ge=0.01, lt=0.5)
    val_min_docs: int = Field(default=20, ge=20)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class BudgetConfig(_Section):
    """Compute budget for `domainlm plan`: either ``flops`` or ``gpu`` + ``gpus`` + ``hours``."""

    flops: float | None = Field(default=None, gt=0, le=MAX_FLOPS)
    gpu: str | None = None
    gpus: int = Field(default=1, ge=1, le=10**7)
    hours: float | None = Field(default=None, gt=0, le=10**6)
    mfu: float | None = Field(default=None, gt=0, le=1)
    law: str = "epoch-2024"  # Besiroglu et al. 2024's refit of Chinchilla approach 3 (plan/laws.py)
    buffer: float = Field(default=0.3, ge=0, lt=1, description="compute kept in reserve (BloombergGPT: ~30%)")

    @field_validator("law")
    @classmethod
    def _known_law(cls, v: str) -> str:
        if v not in LAWS and not v.startswith("fitted:"):
            raise ValueError(f"expected one of {', '.join(LAWS)} or fitted:PATH")
        return v


# Byte-level tokenizers hold all 256 byte values, so any text encodes without <unk>; plus <s> </s> <pad>.
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class TokenizerConfig(_Section):
    """`domainlm tokenizer`: byte-level BPE (default) or Unigram (BloombergGPT's choice), digits split."""

    kind: Literal["bpe", "unigram"] = "bpe"
    # None: the plan's vocabulary (plan.json model.vocab_size), sized with the model by Tao et al. 2024's law.
    vocab_size: int | None = Field(default=None, le=2**24)
    domain_terms: list[str] = Field(default_factory=list)
    sample_bytes: int = Field(default=20_000_000, ge=1, description="train text sampled by mixture weight")
    audit_bytes: int = Field(default=1_000_000, ge=1, description="val text per source for the audit")
    seed: int = 0
    # Continued pretraining (train.init_from): add the base model's tokenizer the N domain tokens of this run's
    # tokenizer that save the most tokens on the domain text, with new embedding rows (tokenizer_extend.py).
    extend_vocab: int = Field(default=0, ge=0, description="domain tokens added to the base tokenizer")

    @field_validator("vocab_size")
    @classmethod
    def _fits_bytes(cls, v: int | None) -> int | None:
        if v is not None and v < MIN_VOCAB_SIZE:
            specials = " ".join(SPECIAL_TOKENS)
            raise ValueError(f"must be at least {MIN_VOCAB_SIZE} (256 byte tokens + special tokens {specials})")
        return v


class ModelConfig(_Section):
    """Model shape. Unset fields come from the plan (`domainlm plan`'s ``model``)."""

    n_layers: int | None = Field(default=None, ge=1, le=4096)
    d_model: int | None = Field(default=None, ge=8, le=MAX_WIDTH)
    n_heads: int | None = Field(default=None, ge=1, le=MAX_WIDTH)
    n_kv_heads: int | None = Field(default=None, ge=1, le=MAX_WIDTH)
    ffn_dim: int | None = Field(default=None, ge=8, le=4 * MAX_WIDTH)
    tie_embeddings: bool = False
    max_position_embeddings: int | None = Field(default=None, ge=8, le=MAX_SEQ)
    # The pretraining objective, a name in the registry (docs/objectives.md, objectives/): causal = a Llama decoder,
    # next-token prediction; masked = a ModernBERT encoder, masked LM (Devlin et al. 2019; Warner et al. 2024); span =
    # a T5 encoder-decoder, span corruption (Raffel et al. 2020). The keys below are the objectives' settings.
    objective: str = objectives.DEFAULT
    mask_rate: float = Field(default=0.15, gt=0, lt=1, description="masked: share of tokens predicted (BERT 0.15, "
                             "ModernBERT 0.30); of them 80% become the mask token, 10% a random token, 10% stay")
    whole_word_mask: bool = Field(default=False, description="masked: mask every token of a chosen word")
    noise_density: float = Field(default=0.15, gt=0, lt=0.5, description="span: share of tokens corrupted (T5)")
    mean_span_length: float = Field(default=3.0, ge=1, description="span: mean corrupted span length (T5)")

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, v: str) -> str:
        if v not in objectives.OBJECTIVES:
            raise ValueError(f"expected one of {', '.join(objectives.OBJECTIVES)}")
        return v

    @model_validator(mode="after")
    def _objective_keys(self) -> ModelConfig:
        own = objectives.get(self.objective)
        for other in objectives.OBJECTIVES.values():
            for key in other.config_keys:
                if (key in self.model_fields_set and key not in own.config_keys  # a dumped config sets every key
                        and getattr(self, key) != type(self).model_fields[key].default):
                    raise ValueError(f"model.{key}: only for model.objective: {other.name}, not {self.objective}")
        if not own.grouped_query_attention and self.n_kv_heads and self.n_kv_heads != (self.n_heads or self.n_kv_heads):
            raise ValueError(f"model.n_kv_heads: the {self.objective} model has no grouped-query attention; leave "
                             "it unset or equal to model.n_heads")
        return self

    @model_validator(mode="after")
    def _heads_fit(self) -> ModelConfig:
        if self.d_model and self.n_heads and self.d_model % self.n_heads:
            raise ValueError(f"model.n_heads: {self.n_heads} does not divide model.d_model {self.d_model}")
        if self.n_heads and self.n_kv_heads and self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_kv_heads: {self.n_kv_heads} does not divide model.n_heads {self.n_heads} (GQA)")
        return self


class TrainConfig(_Section):
    seq_len: int = Field(default=512, ge=8, le=MAX_SEQ)
    micro_batch: int = Field(default=8, ge=1, le=MAX_BATCH)
    tokens_per_step: int | None = Field(default=None, ge=8, le=MAX_SEQ * MAX_BATCH)
    max_tokens: float | None = Field(default=None, gt=0, le=MAX_TOKENS, description="token budget; default from "
                                     "the plan")
    lr: float = Field(default=3e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=20, ge=0)
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = Field(default=0.2, gt=0, le=1, description="wsd: share of steps in the final decay")
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16-mixed"] = "auto"
    # zero2: FSDP2 that keeps the layers' weights gathered from forward to backward (ZeRO-2: states and grads
    # sharded); fsdp: resharded after each layer's forward (ZeRO-3)
    parallel: Literal["auto", "ddp", "zero2", "fsdp"] = "auto"
    activation_checkpointing: bool = Field(default=False, description="recompute each decoder layer in backward")
    cpu_offload: bool = Field(default=False, description="FSDP: keep sharded states and the optimizer step on the host")
    compile: bool = False
    eval_every: int = Field(default=50, ge=1)
    eval_tokens: int = Field(default=65536, ge=8, description="validation tokens per source per evaluation")
    max_bad_steps: int = Field(default=5, ge=1, description="stop after this many NaN/inf steps in a row")
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    seed: int = 0
    # Continued pretraining (docs/continued.md): start from this Hugging Face causal-LM folder or run directory
    # (its model/) instead of random weights; its shape and tokenizer replace the model section and the run's own.
    init_from: str | None = Field(default=None, min_length=1, description="base model folder or run directory")

    @field_validator("cpu_offload")
    @classmethod
    def _offload_needs_fsdp(cls, v: bool, info) -> bool:
        if v and info.data.get("parallel") == "ddp":
            raise ValueError("needs train.parallel: fsdp, zero2 (or auto), not ddp: only FSDP2 offloads to the host")
        return v

    @model_validator(mode="after")
    def _batch_fits(self) -> TrainConfig:
        """Whole sequences, whole micro-batches; how they split over processes is checked at training time."""
        if self.tokens_per_step is None:
            return self
        if self.tokens_per_step % self.seq_len:
            raise ValueError(f"train.tokens_per_step: {self.tokens_per_step} is not a multiple of train.seq_len "
                             f"{self.seq_len}")
        if (self.tokens_per_step // self.seq_len) % self.micro_batch:
            raise ValueError(f"train.tokens_per_step: {self.tokens_per_step // self.seq_len} sequences per step do not "
                             f"divide into train.micro_batch {self.micro_batch}; use a multiple of "
                             f"{self.micro_batch * self.seq_len} tokens")
        return self


class EvalConfig(_Section):
    probes: str | None = None  # path to a probe file; None = the packaged set for the demo
    max_bytes_per_source: int = Field(default=200_000, ge=1)
    context: int | None = Field(default=None, ge=2, le=MAX_SEQ, description="window in tokens; default: the "
                                "model's context")
    stride: int | None = Field(default=None, ge=1, description="new tokens per window; default: context // 2")
    batch_tokens: int = Field(default=8192, ge=64, description="tokens per forward pass (memory vs speed)")


class DownstreamConfig(_Section):
    """`domainlm run`'s downstream stage (docs/finetune.md): the domain model and the general-only baseline
    fine-tuned the same way on a LicenseDB task (license held out by license) and compared with paired bootstrap
    intervals. Unset ``task``: no such stage. Hold the test licenses out of pretraining with
    ``sources[].exclude_ids: licensedb:test``."""

    task: Literal["licensedb-category"] | None = None
    head: Literal["classification"] = "classification"  # a sequence-classification head (finetune/classify.py)
    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=16, ge=1, le=MAX_BATCH)
    micro_batch: int = Field(default=16, ge=1, le=MAX_BATCH)
    lr: float = Field(default=1e-3, gt=0)
    max_len: int | None = Field(default=None, ge=8, le=MAX_SEQ, description="tokens per example; default: the "
                                "model's context")
    seed: int = 0


class CompareConfig(_Section):
    """How comparisons of trained arms are made (`decide`, `ablate`, `finetune --compare`, `domainlm run`'s
    baseline and downstream stage): each arm is trained ``seeds`` times (seeds train.seed, +1, …; the finetune's
    seed, +1, …) and intervals come from the hierarchical bootstrap over seeds and documents/items
    (evaluate/bootstrap.py). 1: one model per arm, intervals over documents/items only. ``--seeds`` overrides it."""

    seeds: int = Field(default=1, ge=1, le=64)


class ClassifierConfig(_Section):
    """The fastText classifier of `domainlm mine` (Joulin et al. 2017). Defaults: DeepSeekMath's (Shao et al. 2024,
    §2.1: vector dimension 256, learning rate 0.1, word n-grams up to 3, minimum word count 3, 3 epochs), except
    ``bucket``: fastText's 2M hashed n-gram rows × 256 floats is a 2 GB model that every scoring worker loads."""

    dim: int = Field(default=256, ge=1)
    lr: float = Field(default=0.1, gt=0)
    word_ngrams: int = Field(default=3, ge=1)
    min_count: int = Field(default=3, ge=1)
    epoch: int = Field(default=3, ge=1)
    bucket: int = Field(default=200_000, ge=0, description="hashed n-gram rows (fastText's default: 2,000,000)")
    max_words: int = Field(default=1000, ge=1, description="words of a document the classifier reads (its head)")
    # one thread: fastText's Hogwild updates make multi-threaded training depend on thread timing
    threads: int = Field(default=1, ge=1)
    seed: int = 0


class MineConfig(_Section):
    """`domainlm mine` (docs/mine.md): domain documents mined from general pools with a classifier trained on the
    run's domain sources (positives) against its general sources (negatives), DeepSeekMath-style rounds."""

    source: str = Field(default="mined", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                        description="name of the mined source (mine/docs/)")
    pools: list[InputConfig] = Field(default_factory=list)
    target_precision: float = Field(default=0.9, gt=0, lt=1, description="estimated precision of what a round keeps")
    max_rounds: int = Field(default=4, ge=1, description="DeepSeekMath: four rounds")
    # DeepSeekMath stopped after round 4, when ~98% of the final data had been collected by round 3: a round that
    # adds less than 2% to what is already mined is not worth another classifier.
    min_round_yield: float = Field(default=0.02, ge=0, le=1, description="stop below this many new docs per mined")
    max_seed_docs: int = Field(default=500_000, ge=2, description="per class (DeepSeekMath: 500K each)")
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1, description="seeds held out for the PR curve")
    candidate_floor: float = Field(default=0.5, ge=0, lt=1, description="lowest score kept for the threshold choice")
    # GPT-3 (Brown et al. 2020, App. C) dropped training documents sharing a 13-gram with a test set; DeepSeekMath
    # used 10-grams against its math benchmarks.
    decontam_ngrams: int = Field(default=13, ge=1)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)

    @field_validator("pools")
    @classmethod
    def _unique_pools(cls, pools: list[InputConfig]) -> list[InputConfig]:
        return unique_names(pools, "pools")


class RunConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    run_dir: str | None = None  # default: runs/<name>
    sources: list[SourceConfig] = Field(default_factory=list)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    mine: MineConfig = Field(default_factory=MineConfig)

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        unique_names(sources, "sources")
        if sources:
            total = sum(s.weight for s in sources)
            if not math.isclose(total, 1.0, abs_tol=1e-6):
                raise ValueError(f"weights must sum to 1, got {total:g}")
        return sources

    @model_validator(mode="after")
    def _extend_needs_base(self) -> RunConfig:
        if self.tokenizer.extend_vocab and not self.train.init_from:
            raise ValueError(f"tokenizer.extend_vocab: {self.tokenizer.extend_vocab} adds tokens to a base model's "
                             "tokenizer; set train.init_from (or use 0 to train from scratch)")
        return self

    @model_validator(mode="after")
    def _context_fits(self) -> RunConfig:
        max_pos = self.model.max_position_embeddings
        if max_pos and self.train.seq_len > max_pos:
            raise ValueError(f"train.seq_len: {self.train.seq_len} is longer than model.max_position_embeddings "
                             f"{max_pos}")
        return self

    @model_validator(mode="after")
    def _objective_fits(self) -> RunConfig:
        """The objective's own check of the windows (span corruption: no more spans than sentinel tokens)."""
        objectives.from_config(self.model).check(self.train.seq_len)
        return self

    def directory(self, base: Path | None = None) -> Path:
        """The run directory: ``run_dir`` if set, else ``runs/<name>`` under ``base`` (default: cwd)."""
        if self.run_dir:
            return Path(self.run_dir)
        return (base or Path.cwd()) / "runs" / self.name


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict[str, Any]) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    got = err.get("input")
    if err["type"] not in ("model_type",) and not isinstance(got, dict | list):
        return f"{msg} (got {got!r})"
    return msg


def _across(err: dict[str, Any]) -> bool:
    """A check across a section's fields (its input is the whole mapping): its message names the keys."""
    return err["type"] == "value_error" and isinstance(err.get("input"), dict)


def validate(data: Any, origin: str = "config") -> RunConfig:
    """Validate a mapping; raise ConfigError with ``origin: key.path: problem`` lines."""
    if not isinstance(data, dict):
        raise ConfigError([f"{origin}: expected a mapping of sections at the top level, got {type(data).__name__}"])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        problems = [f"{origin}: {_describe(err)}" if _across(err) else f"{origin}: {_loc(err['loc'])}: {_describe(err)}"
                    for err in e.errors()]
        raise ConfigError(problems) from None


MAX_CONFIG_BYTES = 2**20  # a hand-written config is a few KB; a 51 MB one took minutes to validate (issue 23)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: YAML says keys are unique,
    and PyYAML silently keeps the last one (``lr: 1e-3`` … ``lr: 3e-3`` further down)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def demo_recipe_path() -> Path:
    return Path(str(resources.files("domainlm") / "recipes" / DEMO_RECIPE))


def config_path(path: str | Path) -> Path:
    """``path``; or, when it does not exist and reads ``recipes/<file>``, the packaged recipe of that name (the
    docs' commands, run outside a clone of the repository)."""
    p = Path(path)
    if not p.exists() and len(p.parts) == 2 and p.parts[0] == "recipes":
        packaged = Path(str(resources.files("domainlm") / "recipes" / p.name))
        if packaged.is_file():
            return packaged
    return p


def load_config(path: str | Path | None) -> RunConfig:
    """Load and validate a YAML run config; ``None`` loads the packaged legal demo."""
    p = config_path(path) if path is not None else demo_recipe_path()
    if not p.exists():
        raise UserError(f"{p}: config file not found")
    if p.is_dir():
        raise UserError(f"{p}: expected a YAML config file, got a directory")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"{p}: {size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,} bytes; is it the right file?")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise UserError(f"{p}: expected a UTF-8 YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    cfg = validate(data, str(p))
    # Relative paths in a config are relative to the config file, not to the caller's cwd.
    base = p.parent.resolve()
    for s in [*cfg.sources, *cfg.mine.pools]:
        if not (s.input.startswith(("hf:", "package:")) or Path(s.input).is_absolute()):
            s.input = str(base / s.input)
        if s.exclude_ids and not Path(s.exclude_ids).is_absolute() and s.exclude_ids != LICENSEDB_TEST:
            s.exclude_ids = str(base / s.exclude_ids)
    if cfg.train.init_from and not Path(cfg.train.init_from).expanduser().is_absolute():
        cfg.train.init_from = str(base / cfg.train.init_from)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_resolved(cfg: RunConfig, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = RunDir(run_dir).config
    text = dump_config(cfg)
    if out.exists() and out.read_text(encoding="utf-8") == text:
        return out  # unchanged: a rerun of a finished run rewrites nothing
    return atomic_write(out, text)
