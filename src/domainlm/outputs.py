"""What each stage writes into a run directory, as typed models: one class per output file.

The stage registry (pipeline.py) declares which file each model describes (``pipeline.SCHEMAS``). Writers
build their result and pass it through the model on the way out (``Model.checked(data)``, then ``rundir.write_json``), so a field added to a
writer but not here fails the writer's tests at once; readers load a file with ``RunDir(run).load(rel, Model)``
(None while the stage has not run, a one-line `UserError` naming the file when it does not match). Models
forbid unknown fields, and keep the writer's numbers as written (``Num``: an int stays an int).

To add an output: a constant in `RunDir`, a model here, an `Output` in its stage's declaration (pipeline.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

Num = int | float  # a number as the writer computed it: an int stays an int in the file


class Part(BaseModel):
    """A nested object of an output file."""

    model_config = ConfigDict(extra="forbid")


class Output(Part):
    """The content of one output file."""

    @classmethod
    def checked(cls, data: dict) -> dict:
        """``data`` validated against this model, as the dict to write: the writer's keys (none added), in the
        model's field order."""
        return cls.model_validate(data).model_dump(exclude_unset=True)


# ------------------------------------------------------------------------------------------------ plan.json


class PlanOverride(Part):
    what: str  # model | tokens
    plan: str
    run: str
    reason: str


class PlanSource(Part):
    weight: Num
    tokens: Num
    unique_tokens: Num | None
    epochs: Num | None
    effective_tokens: Num


class PlanRun(Part):
    """What `domainlm train` trains from this plan: the law's shape and tokens unless the config fixes them."""

    params: int
    tokens: Num
    model: dict[str, Any]  # ModelShape.as_dict()
    follows_plan: bool
    overrides: list[PlanOverride]
    tokens_per_s: Num | None
    tokens_per_s_from: str | None
    planned_seconds: Num | None
    budget_seconds: Num | None
    sources: dict[str, PlanSource] = {}
    effective_tokens: Num | None = None
    warning: str | None = None


class PlanModel(Part):
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    tie_embeddings: bool
    params_non_embedding: int
    params_total: int
    architecture: str | None = None  # continued pretraining: the base's


class Plan(Output):
    """``plan.json`` — `domainlm plan` (plan/planner.make_plan)."""

    run: PlanRun
    continued: dict[str, Any] | None = None  # continued pretraining (train.init_from): the base, and how D follows
    compute_flops: Num
    compute: dict[str, Any]  # how the budget was derived (method flops | gpu | cpu-probe, and its numbers)
    law: dict[str, Any]  # name, source, params_counted and the law's constants
    params: Num
    tokens: Num
    tokens_per_param: Num
    predicted_loss: Num | None
    model: PlanModel
    seq_len: int
    flops_per_token: Num
    sources: dict[str, PlanSource]
    effective_tokens: Num
    gpu_hours: Num | None
    memory: dict[str, Any]
    warnings: list[str]
    alternatives: list[dict[str, Any]]
    notes: list[str]
    data_constrained: dict[str, Any] | None = None
    vocabulary: dict[str, Any] | None = None  # the planned vocabulary, N_v and N_nv apart (plan/vocab.py)
    small_scale: dict[str, Any] | None = None  # below the law's fitted range: the law's N, D and the rule used
    config: str | None = None


# ------------------------------------------------------------------------------------------------ data/stats.json


class SourceStats(Part):
    input: str
    docs_in: int
    bytes_in: int
    docs_out: int
    bytes_out: int
    train_docs: int
    train_bytes: int
    val_docs: int
    val_bytes: int
    drops: dict[str, int]  # reason -> documents
    invalid_utf8_replaced: int
    decoded_cp1252: int
    malformed_lines: int
    malformed_at: list[str]


class Stats(Output):
    """``data/stats.json`` — `domainlm prepare` (data/pipeline.py), written last."""

    version: int
    fingerprint: str
    tasks: int
    sources: dict[str, SourceStats]


# ------------------------------------------------------------------------------------------------ tokens/counts.json


class SourceCounts(Part):
    train_tokens: int = Field(ge=0)  # unique training tokens: the data limit the planner uses
    train_docs: int = Field(ge=0)
    train_bytes: int = Field(ge=0)
    val_tokens: int = Field(ge=0)
    val_docs: int = Field(ge=0)
    val_bytes: int = Field(ge=0)


class Counts(Output):
    """``tokens/counts.json`` — the tokenize stage (data/tokens.write_counts), written last."""

    version: int
    dtype: Literal["uint16", "uint32"]  # data/tokens.dtype_for
    vocab_size: int = Field(ge=1)
    eos_id: int | None = Field(ge=0)
    tokenizer_sha256: str
    sources: dict[str, SourceCounts]


# ------------------------------------------------------------------------------------------------ tokenizer/audit.json


class SampleSource(Part):
    weight: Num
    train_bytes: int
    sampled_bytes: int
    sampled_docs: int


class AuditBaseline(Part):
    sources: list[str]
    vocab_size_trained: int
    sample: dict[str, SampleSource]


class SourceCompression(Part):
    role: str
    val_bytes: int
    tokens: int
    baseline_tokens: int | None
    bytes_per_token: Num | None
    baseline_bytes_per_token: Num | None
    gain_pct: Num | None


class TermSplit(Part):
    term: str
    tokens: list[str]
    count: int
    baseline_tokens: list[str] | None = None
    baseline_count: int | None = None


class Audit(Output):
    """``tokenizer/audit.json`` — `domainlm tokenizer` (tokenizer.py)."""

    version: int
    kind: str
    vocab_size: int
    vocab_size_trained: int
    special_tokens: dict[str, int | None]
    sample: dict[str, SampleSource]
    baseline: AuditBaseline | None
    train_seconds: Num
    bytes_per_token: dict[str, SourceCompression]
    domain_terms: list[TermSplit]
    summary: dict[str, dict[str, Num | None]]  # per role, and "terms"
    path: str


# ------------------------------------------------------------------------------------------------ train summary


class TrainSummary(Output):
    """``logs/train.json`` — `domainlm train` (train/loop.py), after the Hugging Face export."""

    steps: int
    final_loss: float | None
    skipped_steps: int
    train_seconds: Num | None  # only when one invocation ran every step
    planned_seconds: Num | None
    tokens_per_s: Num | None
    params: int
    model_dir: str
    parallel: str
    world_size: int
    finished: float  # unix time


# ------------------------------------------------------------------------------------------------ eval.json


class SourceScore(Part):
    role: str
    bpb: float
    loss_per_token: float
    ppl: float
    tokens: int
    bytes: int
    docs: int
    bytes_per_token: float
    nll_bits: float
    forward_tokens: int
    cost: float
    doc_bits: list[float] | None = None  # per document, in order (run_eval(per_doc=True): `domainlm decide`)
    doc_bytes: list[int] | None = None


class ProbeItem(Part):
    term: str
    correct: bool
    correct_per_byte: bool
    logprobs: list[float]


class ProbeScores(Part):
    file: str
    items: int
    acc: float
    acc_per_byte: float
    chance: float
    results: list[ProbeItem]


class EvalHeader(Output):
    """What every ``eval.json`` starts with, whatever the objective: who scored which model, where."""

    version: int
    domainlm: str
    model: str
    run_dir: str | None
    device: str
    processes: int


class EvalOutput(EvalHeader):
    """``eval/eval.json`` — `domainlm eval` (evaluate/command.py); also a variant's ``eval.json``
    (``ablate/w<W>/``; ``ablate/w0/`` is `domainlm run`'s general-only baseline)."""

    context: int
    stride: int
    max_bytes_per_source: int
    doc_start_ids: list[int]
    sources: dict[str, SourceScore]
    probes: ProbeScores | None
    seconds: float


class ObjectiveSourceScore(Part):
    """A source's score under a masked / span model's own task (evaluate/objective.py)."""

    role: str
    loss: float  # nats per predicted token (masked tokens; span: decoder targets)
    accuracy: float  # top-1
    targets: int
    tokens: int
    windows: int
    docs: int
    bytes: int


class ObjectiveEvalOutput(EvalHeader):
    """``eval/eval.json`` of a masked-LM encoder or span-corruption encoder-decoder (``objective`` says which):
    no bits per byte, which only a causal model defines; the masks are fixed by ``masking`` (its seed)."""

    max_bytes_per_source: int
    objective: str  # masked | span
    context: int
    masking: dict[str, Num | str]
    sources: dict[str, ObjectiveSourceScore]
    comparable: str
    probes: None
    seconds: float


AnyEval = EvalOutput | ObjectiveEvalOutput  # what an eval.json holds: a causal model's, or a masked / span one's


# ------------------------------------------------------------------------------------------------ ablate/ablate.json


class AblationResult(Part):
    domain_weight: float
    weights: dict[str, float]
    bpb: dict[str, float]
    roles: dict[str, str]
    model: str
    ci95: dict[str, list[float]] | None = None  # per source: over seeds and val documents (one seed: documents)
    seeds: list[dict[str, Any]] | None = None  # --seeds K > 1: each seed's model and bpb (``bpb`` is their mean)

    def role_bpb(self, role: str, bpb: dict[str, float] | None = None) -> float | None:
        """Mean bpb over the sources of ``role`` (with one source per role, the usual case, that source's); of
        ``bpb`` (one seed's) instead of the mean over seeds when given."""
        vals = [v for k, v in (self.bpb if bpb is None else bpb).items() if self.roles.get(k) == role]
        return sum(vals) / len(vals) if vals else None


class Ablation(Output):
    """``ablate/ablate.json`` — `domainlm ablate` (ablate.py)."""

    version: int
    config: str | None
    model: dict[str, Any]  # the config's model section of the variants
    tokens: Num | None
    configured_domain_weight: float
    results: list[AblationResult]


# ------------------------------------------------------------------------------------------------ scaling


class ScalingPoint(Output):
    """One line of ``scaling/points.jsonl`` — `domainlm scaling` (scaling/sweep.py)."""

    budget: Num
    params: int
    params_non_embedding: int
    d_model: int
    n_layers: int
    steps: int
    tokens: int
    flops: Num
    flops_6nd: float
    loss: float
    val_loss: dict[str, float]
    law_optimum: float
    seconds: Num | None
    tokens_per_s: Num | None
    dir: str


class Law(Output):
    """``scaling/law.json`` — `domainlm scaling` (scaling/fit.fit_law + what the sweep or the CSV fit adds); read
    by `domainlm plan --law fitted:PATH`."""

    approach2: dict[str, Any]  # a, b, g, h, minima (per budget), *_ci95, or error
    approach3: dict[str, Any]  # E, A, B, alpha, beta, a, b, *_ci95
    points: int
    huber_delta: float
    law_name: str | None = None  # a sweep's: the law that centred it
    params_counted: str
    loss: str
    source: str | None = None  # a CSV fit's
    budgets: list[Num]
    budgets_from: str | None = None  # a CSV fit's
    sizes: int | None = None  # a sweep's, to the end
    tokens_per_step: int | None = None
    config: str | None = None
    tokenizer_sha256: str | None = None


# ------------------------------------------------------------------------------------------------ eval/finetune.json


class Interval(Part):
    value: float
    ci95: list[float]


class ModelTaskScores(Part):
    metrics: dict[str, Interval]  # the mean over fine-tuning seeds, interval over seeds and items
    predictions: list[dict[str, Any]]  # the first seed's
    seeds: list[dict[str, Any]] | None = None  # --seeds K > 1: each seed's metric values


class TaskComparison(Part):
    items: int
    domain: ModelTaskScores
    general: ModelTaskScores
    domain_minus_general: dict[str, Interval]
    chance_accuracy: float | None = None
    majority_accuracy: float | None = None
    majority_class: str | None = None
    majority_macro_f1: float | None = None  # the macro-F1 of always answering the majority class


class FinetuneComparison(Output):
    """``eval/finetune.json`` (and ``<out>/compare.json``) — `domainlm finetune --compare` (finetune/compare.py)."""

    data: str
    test: str
    args: dict[str, Any]
    models: dict[str, str]
    finetune: dict[str, dict[str, Any]]  # domain | general -> final_loss, val_loss, steps, truncated
    tasks: dict[str, TaskComparison]
    seeds: list[int] | None = None  # --seeds K > 1: the fine-tuning seeds of both models
    verdict: str


class ClassifyComparison(FinetuneComparison):
    """``eval/classify.json`` (and ``<out>/compare.json``) — `domainlm finetune --head classification --compare`
    (finetune/compare.py with finetune/classify.py): the same shape, one task, and the head."""

    head: str  # classification


# ------------------------------------------------------------------------------------------------ decide/decide.json


class DecideBase(Part):
    """The general model and what its own pretraining cost (6·N·D, when its tokens are known)."""

    path: str
    architecture: str
    params: int
    tokens: Num | None
    flops: Num | None
    tokens_from: str | None  # --base-tokens, or the base run's training record


class DecideArm(Part):
    label: str
    trained_tokens: Num | None  # this run's training tokens (0: the general model as is)
    params: int | None
    model: str
    flops_run: Num
    flops_total: Num | None  # with the base's pretraining; None when that is unknown
    bpb: dict[str, float]
    bytes_per_token: dict[str, float]
    probes: dict[str, Num] | None
    extension: dict[str, Any] | None = None  # continued-vocab<N>: the tokens added (tokenizer_extend.extend)
    seeds: list[dict[str, Any]] | None = None  # --seeds K > 1: each seed's model and bpb (``bpb`` is their mean)


class DecideText(Part):
    role: str | None
    docs: int | None
    winner: str
    runner_up: str | None
    bpb: dict[str, float]  # arm -> bpb, best first
    margin: Interval | None = None  # runner-up − winner, paired bootstrap over documents (and seeds)
    compute_ratio: float | None = None  # winner's total training FLOPs ÷ the runner-up's (None: unknown)
    verdict: str


class Decision(Output):
    """``decide/decide.json`` — `domainlm decide` (decide.py): from scratch vs the general model continued vs as is."""

    version: int
    config: str | None
    run_dir: str
    tokens: Num
    extend_vocab: int
    seeds: list[int] | None = None  # --seeds K > 1: the training seeds of every trained arm
    base: DecideBase
    arms: dict[str, DecideArm]
    skipped: dict[str, str]
    texts: dict[str, DecideText]
    verdict: str


# ------------------------------------------------------------------------------------------------ eval/tasks.json


class TaskPrediction(Part):
    id: str
    gold: str
    pred: str


class TaskScores(Output):
    """One task's scores of one model folder (evaluate/tasks.score_task)."""

    task: str
    model: str
    items: int
    chat_template: bool  # the model's own chat template (else scored zero-shot with domainlm's)
    metrics: dict[str, Interval]
    choices: list[str] | None = None  # licensedb-category: the classes it chooses among
    chance_accuracy: float | None = None
    majority_accuracy: float | None = None
    majority_class: str | None = None
    predictions: list[TaskPrediction]


class TaskResults(RootModel[dict[str, TaskScores]]):
    """``eval/tasks.json`` — `domainlm eval MODEL_OR_RUN --task NAME` (evaluate/command.run_tasks): task -> scores."""

    @classmethod
    def checked(cls, data: dict) -> dict:
        return cls.model_validate(data).model_dump(exclude_unset=True)


# ------------------------------------------------------------------------------------------------ tasks/licensedb


class TaskData(Output):
    """``balance.json`` of a task-data folder (``<run>/tasks/licensedb/``, or `domainlm tasks licensedb --out`),
    written last (evaluate/tasks.write_task_data): the splits' sizes and class balance."""

    dir: str
    licenses: dict[str, int]  # split -> licenses
    items: dict[str, int]  # split -> items (both tasks)
    excluded_files: int  # lines of exclude_ids.txt
    balance: dict[str, dict[str, int]]  # split -> category -> items
    params: dict[str, Any]  # the split's arguments (test_fraction, seed, ...)


# ------------------------------------------------------------------------------------------------ finetune.json


class FinetuneSummary(Output):
    """``finetune.json`` in a fine-tuning's ``--out`` folder — `domainlm finetune` (finetune/loop.py); its
    fingerprint makes a finished fine-tuning skip."""

    model: str
    run_dir: str | None
    data: str
    val: str | None
    out: str
    steps: int
    final_loss: float | None
    val_loss: float | None
    conversations: int
    truncated: int
    response_tokens: int
    tokens: int
    tokens_per_s: Num | None
    args: dict[str, Any]  # FinetuneArgs
    fingerprint: str
    chat_template: str  # added | model's


class ClassifierSummary(Output):
    """``finetune.json`` of `domainlm finetune --head classification` (finetune/classify.py)."""

    head: str  # classification
    model: str
    run_dir: str | None
    data: str
    val: str | None
    out: str
    architecture: str
    labels: list[str]
    steps: int
    final_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    examples: int
    truncated: int
    tokens_per_s: Num | None
    args: dict[str, Any]
    fingerprint: str


AnyFinetune = FinetuneSummary | ClassifierSummary
AnyComparison = FinetuneComparison | ClassifyComparison  # ``<out>/compare.json``: the --head's


# ------------------------------------------------------------------------------------------------ vocabulary extension


class AddedToken(Part):
    text: str
    count: int  # times the domain tokenizer emits it on the sample
    base_tokens: int  # pieces the base tokenizer splits its text into
    saved: int  # tokens saved on the sample: count × (base_tokens − 1)
    id: int


class Extension(Output):
    """``extension.json`` in an extended base model's folder (``base-extended/``, ``decide/continued-vocab<N>/base/``)
    — tokenizer_extend.build_extended: the domain tokens added to the base's tokenizer."""

    requested: int
    added: int
    base_vocab: int
    vocab: int
    untied: bool  # a tied head was untied first (new output rows can then differ from input rows)
    tokens: list[AddedToken]


class ExtensionAudit(Output):
    """``audit.json`` in an extended base model's folder: the extended tokenizer against the base's ("baseline")
    on every val split and the domain terms (tokenizer.audit)."""

    bytes_per_token: dict[str, SourceCompression]
    domain_terms: list[TermSplit]
    summary: dict[str, dict[str, Num | None]]


# ------------------------------------------------------------------------------------------------ mix/mix.json


class MixSource(Part):
    role: str
    within_role: float  # share of its role's tokens (the configured proportions, kept as the domain weight moves)
    unique_tokens: Num | None  # train tokens of its corpus (tokens/counts.json); None: never repeated


class MixRun(Part):
    """One trained variant of the design."""

    domain_weight: float
    seed: int
    tokens: Num
    bpb: dict[str, float]
    epochs: dict[str, float | None]  # over each source's unique tokens
    held_out: bool  # left out of the held-out check's fit
    dir: str


class MixConstant(Part):
    value: float
    ci95: list[float]


class MixLaw(Part):
    """One source's law: bpb = c + exp(a + t·ρ − β·ln(D′/D_ref)), k = e^a (mix/law.py)."""

    c: MixConstant
    a: MixConstant
    t: MixConstant
    beta: MixConstant
    k: MixConstant
    rmse: float  # root mean square residual over the runs (bpb)


class MixCheckRow(Part):
    source: str
    tokens: Num
    seeds: int
    measured: float  # mean over seeds
    measured_runs: list[float]
    predicted: float
    ci95: list[float]  # the mean curve's bootstrap interval
    pi95: list[float]  # for the mean of this many seeds: the curve's interval plus the runs' scatter
    inside: bool  # measured within pi95
    error: float  # predicted − measured


class MixCheck(Part):
    weight: float
    runs_fitted: int
    rows: list[MixCheckRow]


class MixPrediction(Part):
    bpb: float
    ci95: list[float]
    general_only_bpb: float  # the same law at domain weight 0


class MixRecommendation(Part):
    domain_weight: float
    ci95: list[float]  # the same choice on every bootstrap resample: percentile 95%
    feasible: bool  # False: no weight meets the cost cap; general-only (w = 0) is returned
    tokens: Num
    objective: str
    predicted: dict[str, MixPrediction]
    in_fitted_range: bool  # the target budget lies within the budgets the law was fitted on


class MixCurve(Part):
    """Each source's predicted bpb over domain weights at one budget (the chart and the report draw these)."""

    tokens: Num
    weights: list[float]
    bpb: dict[str, list[float]]
    lo: dict[str, list[float]]
    hi: dict[str, list[float]]


class Mix(Output):
    """``mix/mix.json`` — `domainlm mix` (mix/stage.py): the mixing law fitted on small runs, its held-out check,
    and the recommended weights; read by `domainlm plan --weights-from`."""

    version: int
    config: str | None
    model: dict[str, Any]  # the variants' model section
    params: int | None  # the variants' parameter count (the law's N)
    sources: dict[str, MixSource]
    r_star_d: float  # Muennighoff's R*_D used for D′
    design: dict[str, Any]  # weights, seeds, budgets, held_out
    runs: list[MixRun]
    d_ref: float  # the law's reference budget (geometric mean of the runs' tokens)
    law: dict[str, MixLaw]
    held_out: MixCheck
    target_tokens: Num
    recommended: MixRecommendation
    weights: dict[str, float]  # the recommended weight of every source: `domainlm plan --weights-from`
    curves: list[MixCurve]  # at the target budget, then at each fitted budget
    notes: list[str]
    plot: str | None = None


# ------------------------------------------------------------------------------------------------ mine/mine.json


class MineCurvePoint(Part):
    """One threshold of a round's classifier: held-out precision/recall (balanced seeds) and, in the pool, the share
    of documents at or above it and the precision estimated there."""

    threshold: Num
    heldout_precision: Num | None
    heldout_recall: Num
    fpr: Num
    pool_share: Num
    pool_precision: Num | None


class MineRound(Part):
    round: int
    positives: int  # training documents: seeds + earlier rounds' finds
    negatives: int
    heldout_positives: int
    heldout_negatives: int
    threshold: Num | None  # None: no threshold reached mine.target_precision
    heldout_precision: Num | None  # at the threshold
    heldout_recall: Num | None
    prevalence: Num  # estimated share of domain documents in the pool (Forman 2008)
    est_precision: Num | None  # estimated precision in the pool at the threshold
    scored: int  # pool documents scored (after prepare's filters)
    accepted: int  # at or above the threshold, not duplicates of the domain, not contaminated
    new_docs: int  # accepted and not accepted by an earlier round
    new_bytes: int
    total_docs: int  # mined so far
    yield_fraction: Num  # new_docs / total_docs: this round's share of everything mined so far
    drops: dict[str, int]  # reason -> candidate documents (score ≥ the floor) dropped
    histogram: list[int]  # pool documents per score bin (100 bins of width 0.01)
    curve: list[MineCurvePoint]


class MineSample(Part):
    id: str
    pool: str
    round: int
    score: Num
    text: str  # the first characters


class Mine(Output):
    """``mine/mine.json`` — `domainlm mine` (mine/command.py), written last."""

    version: int
    fingerprint: str
    source: str  # the mined source's name; its documents are in mine/docs/
    pools: list[str]
    target_precision: Num
    stopped: str  # why the rounds ended
    rounds: list[MineRound]
    docs: int
    bytes: int
    tokens: int  # estimated: bytes / bytes_per_token
    bytes_per_token: Num
    bytes_per_token_from: str
    samples: list[MineSample]
