"""Per-GPU training memory: weights, gradients, optimizer states, activations — and how to shard them.

Model states follow ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054, §3): with Ψ parameters on N_d
data-parallel GPUs, mixed-precision Adam holds 2Ψ (bf16 weights) + 2Ψ (bf16 grads) + KΨ (K = 12: fp32
master weights, momentum, variance) bytes per GPU without sharding;
  ZeRO-1 (P_os)     2Ψ + 2Ψ + KΨ/N_d
  ZeRO-2 (P_os+g)   2Ψ + (2+K)Ψ/N_d
  ZeRO-3 (P_os+g+p) (2+2+K)Ψ/N_d          (FSDP full shard = ZeRO-3; SHARD_GRAD_OP = ZeRO-2)
ZeRO Fig. 1 (Ψ = 7.5B, N_d = 64): 120, 31.4, 16.6, 1.9 GB — reproduced in tests.

Activations are not sharded by data parallelism (each GPU holds its own micro-batch):
- with ``seq_len`` and ``micro_batch``: Korthikanti et al. 2022 (arXiv 2205.05198, eq. 2), per layer
  s·b·h·(34 + 5·a·s/h) bytes in 16-bit — the 5·a·s/h term is the s×s attention scores, which a fused
  (flash/SDPA) kernel never stores, so we use s·b·h·34 — plus the fp32 logits and their gradient
  (2 · 4 · s·b·V bytes). fp32 training doubles the 16-bit terms. Activation checkpointing keeps only
  each layer's input (2·s·b·h bytes per layer) plus one layer's activations while recomputing.
- without them: the course rule of thumb, ~8 bytes of activations and temporaries per parameter in fp32
  (4 in 16-bit), which makes 1B params in fp32 with Adam ≈ 4 + 4 + 8 + 8 = 24 GB (~6× the weights).
  Checkpointing divides that term by 17 (34·s·b·h → 2·s·b·h per layer).
GB here are 1e9 bytes, as in the ZeRO paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from domainlm.errors import UserError

PRECISIONS = ("fp32", "bf16-mixed", "bf16")
OPTIMIZERS = ("adamw", "sgd", "adafactor")
SHARDINGS = ("ddp", "zero1", "zero2", "zero3")
SHARDING_NAMES = {
    "ddp": "DDP (replicated)",
    "zero1": "ZeRO-1 (optimizer states sharded)",
    "zero2": "ZeRO-2 / FSDP SHARD_GRAD_OP (optimizer states + grads)",
    "zero3": "ZeRO-3 / FSDP FULL_SHARD (optimizer states + grads + params)",
}
RULE_OF_THUMB_ACT_BYTES = 8.0  # per parameter, fp32 (course rule; see module docstring)


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
        from domainlm.plan.shape import shape_for_params

        shape = shape_for_params(params, vocab_size)
        n_layers = n_layers or shape.n_layers
        d_model = d_model or shape.d_model
    from domainlm.plan.shape import ffn_for

    frac = adafactor_fraction(n_layers, d_model, ffn_for(d_model), vocab_size)
    w, g, o = state_bytes(precision, optimizer, frac)
    nd = float(gpus)
    shard_w = nd if sharding == "zero3" else 1.0
    shard_g = nd if sharding in ("zero2", "zero3") else 1.0
    shard_o = nd if sharding != "ddp" else 1.0

    act_width = 4.0 if precision == "fp32" else 2.0  # bytes per activation value
    if seq_len is not None:
        s, b, h = seq_len, micro_batch, d_model
        per_layer = 34.0 * s * b * h * act_width / 2.0
        if activation_checkpointing:
            layers = n_layers * 2.0 * s * b * h * act_width / 2.0 + per_layer
        else:
            layers = n_layers * per_layer
        logits = 2 * 4.0 * s * b * vocab_size
        act = layers + logits
        method = "Korthikanti et al. 2022: 34·s·b·h per layer (fused attention) + fp32 logits"
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
    """The least sharding that fits in ``gpu_memory_gb`` (None when even ZeRO-3 does not), and all estimates."""
    ests = {sh: estimate(sharding=sh, **kwargs) for sh in SHARDINGS}
    for sh in SHARDINGS:
        if ests[sh].total_gb <= gpu_memory_gb:
            return sh, ests
    return None, ests
