"""Per-GPU training memory: weights, gradients, optimizer states, activations — and how to shard them.

Model states follow ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054, §3): with Ψ parameters on N_d
data-parallel GPUs, mixed-precision Adam holds 2Ψ (bf16 weights) + 2Ψ (bf16 grads) + KΨ (K = 12: fp32
master weights, momentum, variance) bytes per GPU without sharding;
  ZeRO-1 (P_os)     2Ψ + 2Ψ + KΨ/N_d
  ZeRO-2 (P_os+g)   2Ψ + (2+K)Ψ/N_d
  ZeRO-3 (P_os+g+p) (2+2+K)Ψ/N_d          (FSDP full shard = ZeRO-3; SHARD_GRAD_OP = ZeRO-2)
ZeRO Fig. 1 (Ψ = 7.5B, N_d = 64): 120, 31.4, 16.6, 1.9 GB — reproduced in tests.

Activations are not sharded by data parallelism (each GPU holds its own micro-batch):
- with ``seq_len`` and ``micro_batch``: Korthikanti et al. 2022's method (arXiv 2205.05198, §4.1: count
  every tensor a layer saves for backward) applied to the layer domainlm trains — transformers'
  LlamaDecoderLayer with SDPA — instead of their GPT layer (34·s·b·h bytes in 16-bit: GeLU MLP of 4h,
  dropout masks, LayerNorm). Per token and layer, with w bytes per activation (2 in bf16, 4 in fp32),
  h = d_model, kv = n_kv_heads·head_dim, f = ffn_dim, a = heads:
    2 RMSNorms     2·(4h + 4 + 2·w·h)  fp32 upcast input, fp32 1/rms, normalised x, its weighted output
    attention      w·(2h + 2kv) + 4a   q, k, v after RoPE, SDPA output (= o_proj's input), fp32
                                       log-sum-exp; the fused kernel never stores the s×s scores
                                       (Korthikanti's 5·a·s/h term)
    SwiGLU MLP     4·w·f               gate, up, silu(gate), their product
  = 8h + 8 + 6wh + 2w·kv + 4a + 4wf bytes — bf16 with kv = h, f ≈ 8h/3: ≈ 45h (vs their 34h); fp32 doubles
  the w terms. Checked exactly against the bytes autograd saves (tests/test_activation_checkpointing.py).
  Plus the final norm (4h + 4 + 2wh) and, at the start of backward, the fp32 log-probabilities that
  cross-entropy saves, their gradient and the logits' gradient (3 · 4 · s·b·V). Activation checkpointing
  (`train.activation_checkpointing`, per decoder layer) keeps each layer's input (w·h per token and layer);
  in backward one layer at a time is recomputed, after the logits' memory is freed: the peak is the layer
  inputs + the final norm + the larger of the logits term and one layer's activations.
- without them: the course rule of thumb, ~8 bytes of activations and temporaries per parameter in fp32
  (4 in 16-bit), which makes 1B params in fp32 with Adam ≈ 4 + 4 + 8 + 8 = 24 GB (~6× the weights).
  Checkpointing divides that term by 17 (Korthikanti's 34·s·b·h → 2·s·b·h per layer).
GB here are 1e9 bytes, as in the ZeRO paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from domainlm.errors import UserError
from domainlm.shape import ffn_for, head_dim_for, shape_for_params

PRECISIONS = ("fp32", "bf16-mixed", "bf16")
OPTIMIZERS = ("adamw", "sgd", "adafactor")
SHARDINGS = ("ddp", "zero1", "zero2", "zero3")
SHARDING_NAMES = {
    "ddp": "DDP (replicated; train.parallel: ddp)",
    "zero1": "ZeRO-1 (optimizer states sharded; estimated only, the trainer has no ZeRO-1)",
    "zero2": "ZeRO-2 / FSDP2 without resharding after forward (optimizer states + grads; train.parallel: zero2)",
    "zero3": "ZeRO-3 / FSDP2 (optimizer states + grads + params; train.parallel: fsdp)",
}
# The shardings the trainer runs, and the train.parallel value of each: what `recommend` chooses from.
TRAIN_PARALLEL = {"ddp": "ddp", "zero2": "zero2", "zero3": "fsdp"}
RULE_OF_THUMB_ACT_BYTES = 8.0  # per parameter, fp32 (course rule; see module docstring)


def layer_activation_bytes(d_model: int, kv_dim: int, ffn_dim: int, n_heads: int, act_width: float) -> float:
    """Bytes one LlamaDecoderLayer saves for backward per token (the module docstring names each term)."""
    h, kv, f, a, w = d_model, kv_dim, ffn_dim, n_heads, act_width
    norms = 2 * (4.0 * h + 4.0 + 2 * w * h)
    attention = w * (2 * h + 2 * kv) + 4.0 * a
    mlp = 4 * w * f
    return norms + attention + mlp


def final_norm_bytes(d_model: int, act_width: float) -> float:
    """The final RMSNorm's saved tensors per token (the head's input is its output)."""
    return 4.0 * d_model + 4.0 + 2 * act_width * d_model


@dataclass(frozen=True)
class MemoryEstimate:
    params: float
    precision: str
    optimizer: str
    sharding: str
    gpus: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    activations_method: str
    bytes_per_param_states: float  # weights + grads + optimizer bytes per parameter, before sharding

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.grads_gb + self.optimizer_gb + self.activations_gb


def state_bytes(precision: str, optimizer: str, adafactor_fraction: float) -> tuple[float, float, float]:
    """Bytes per parameter for (weights, gradients, optimizer states)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    w = g = 4.0 if precision == "fp32" else 2.0
    master = 4.0 if precision == "bf16-mixed" else 0.0  # fp32 master copy lives with the optimizer (ZeRO's K)
    state_dtype = 2.0 if precision == "bf16" else 4.0
    moments = {"adamw": 2.0, "sgd": 1.0, "adafactor": adafactor_fraction}[optimizer]
    return w, g, master + moments * state_dtype


def adafactor_fraction(n_layers: int, d_model: int, ffn_dim: int, vocab: int) -> float:
    """Adafactor's factored second moment: rows + cols per matrix instead of rows × cols (no momentum)."""
    mats = [(d_model, d_model)] * 4 + [(d_model, ffn_dim)] * 3
    full = sum(r * c for r, c in mats) * n_layers + 2 * vocab * d_model
    factored = sum(r + c for r, c in mats) * n_layers + 2 * (vocab + d_model)
    return factored / full


def estimate(
    params: float,
    *,
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    sharding: str = "ddp",
    gpus: int = 1,
    seq_len: int | None = None,
    micro_batch: int | None = None,
    n_layers: int | None = None,
    d_model: int | None = None,
    vocab_size: int = 32768,
    activation_checkpointing: bool = False,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    ffn_dim: int | None = None,
) -> MemoryEstimate:
    if params <= 0:
        raise UserError(f"--params: expected a number > 0, got {params:g}")
    if sharding not in SHARDINGS:
        raise UserError(f"--sharding: expected one of {', '.join(SHARDINGS)}, got {sharding!r}")
    if gpus < 1:
        raise UserError(f"--gpus: expected an integer ≥ 1, got {gpus}")
    if (seq_len is None) != (micro_batch is None):
        raise UserError("--seq-len and --micro-batch: give both (activations need both) or neither")
    if n_layers is None or d_model is None:

        shape = shape_for_params(params, vocab_size)
        n_layers = n_layers or shape.n_layers
        d_model = d_model or shape.d_model

    ffn_dim = ffn_dim or ffn_for(d_model)
    n_heads = n_heads or d_model // head_dim_for(d_model)  # the shape rule's heads (shape.py)
    kv_dim = d_model // n_heads * (n_kv_heads or n_heads)
    frac = adafactor_fraction(n_layers, d_model, ffn_dim, vocab_size)
    w, g, o = state_bytes(precision, optimizer, frac)
    nd = float(gpus)
    shard_w = nd if sharding == "zero3" else 1.0
    shard_g = nd if sharding in ("zero2", "zero3") else 1.0
    shard_o = nd if sharding != "ddp" else 1.0

    act_width = 4.0 if precision == "fp32" else 2.0  # bytes per activation value
    if seq_len is not None:
        tokens = seq_len * micro_batch
        per_layer = layer_activation_bytes(d_model, kv_dim, ffn_dim, n_heads, act_width) * tokens
        logits = 3 * 4.0 * tokens * vocab_size
        if activation_checkpointing:  # every layer's input; one layer recomputed at a time, after the logits
            act = n_layers * act_width * d_model * tokens + max(per_layer, logits)
        else:
            act = n_layers * per_layer + logits
        act += final_norm_bytes(d_model, act_width) * tokens
        method = ("Korthikanti et al. 2022's count for the Llama layer (fused attention)"
                  + (", checkpointed per layer" if activation_checkpointing else "") + " + fp32 logits")
    else:
        act = params * RULE_OF_THUMB_ACT_BYTES * act_width / 4.0
        if activation_checkpointing:
            act /= 17.0
        method = f"rule of thumb: {RULE_OF_THUMB_ACT_BYTES * act_width / 4.0:g} B/param (give --seq-len/--micro-batch)"
    gb = 1e9
    return MemoryEstimate(
        params=params,
        precision=precision,
        optimizer=optimizer,
        sharding=sharding,
        gpus=gpus,
        weights_gb=w * params / shard_w / gb,
        grads_gb=g * params / shard_g / gb,
        optimizer_gb=o * params / shard_o / gb,
        activations_gb=act / gb,
        activations_method=method,
        bytes_per_param_states=w + g + o,
    )


def recommend(gpu_memory_gb: float, **kwargs) -> tuple[str | None, dict[str, MemoryEstimate]]:
    """The least sharding the trainer runs (`TRAIN_PARALLEL`: not ZeRO-1) that fits in ``gpu_memory_gb`` (None when
    even ZeRO-3 does not), and the estimates of all of them."""
    ests = {sh: estimate(sharding=sh, **kwargs) for sh in SHARDINGS}
    for sh in TRAIN_PARALLEL:
        if ests[sh].total_gb <= gpu_memory_gb:
            return sh, ests
    return None, ests
