"""Activation checkpointing (`train.activation_checkpointing`): the same gradients as without it, the memory it
saves measured tensor by tensor and compared with `domainlm memory`'s model (memory.py), and training with
it follows the same loss curve and resumes from its checkpoints."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from domainlm import memory as M
from domainlm.model import build_model
from domainlm.shape import ModelShape
from domainlm.train.memory_probe import measure_cpu
from domainlm.train.parallel import checkpoint_layers
from domainlm.train.step import next_token_loss

sys.path.insert(0, str(Path(__file__).parent))
from test_train_fixtures import (  # noqa: E402, F401 (one_thread: autouse fixture)
    clone_run,
    losses,
    make_run,
    one_thread,
    run_dir,
    set_train,
    train_in_process,
    weights,
)

# GQA (2 kv heads of 4) and an ffn that is not a multiple of d_model, so every term of the count is exercised.
D, HEADS, KV_HEADS, FFN, VOCAB = 64, 4, 2, 160, 300
B, T = 4, 32  # micro-batch × sequence: 128 tokens


def tiny(n_layers: int, dtype=torch.float32) -> torch.nn.Module:
    shape = ModelShape(n_layers=n_layers, d_model=D, n_heads=HEADS, n_kv_heads=KV_HEADS, ffn_dim=FFN,
                       vocab_size=VOCAB, tie_embeddings=False)
    return build_model(shape, 64, seed=0).to(dtype)


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(0))


def test_same_gradients_as_without():
    plain = tiny(3)
    ckpt = copy.deepcopy(plain)
    checkpoint_layers(ckpt)
    assert type(ckpt.model.layers[0]).__name__ == "CheckpointWrapper"
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # checkpoints and the HF export keep their names
    x = batch()
    loss_plain, loss_ckpt = next_token_loss(plain, x), next_token_loss(ckpt, x)
    loss_plain.backward()
    loss_ckpt.backward()
    assert loss_ckpt.item() == loss_plain.item()
    grads = {n.replace("._checkpoint_wrapped_module", ""): q for n, q in ckpt.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)


def measure(n_layers: int, dtype, checkpointing: bool) -> tuple[int, int]:
    """(bytes held for backward after the forward pass, peak bytes during backward) of one micro-step,
    parameters and their gradients left out (train/memory_probe.py)."""
    model = tiny(n_layers, dtype)
    if checkpointing:
        checkpoint_layers(model)
    m = measure_cpu(model, batch())
    return m.held, m.peak


# fp32: the CPU path. bf16 parameters: what FSDP2's MixedPrecisionPolicy(param_dtype=bf16) computes with on CUDA.
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_memory_saved_matches_memory_model(dtype, precision):
    width = 4 if dtype == torch.float32 else 2
    tokens = B * T
    held = {(n, ac): measure(n, dtype, ac) for n in (2, 3) for ac in (False, True)}
    # What one more layer adds, byte for byte: the Llama layer count of memory.py ...
    per_layer = held[3, False][0] - held[2, False][0]
    assert per_layer == M.layer_activation_bytes(D, D // HEADS * KV_HEADS, FFN, HEADS, width) * tokens
    # ... and with checkpointing only the layer's input, w·h bytes per token.
    assert held[3, True][0] - held[2, True][0] == width * D * tokens
    print(f"\n{precision}: bytes held for backward per layer {per_layer:,} → {width * D * tokens:,} with checkpointing")
    for (n, ac), (_, peak) in held.items():
        est = M.estimate(1e6, precision=precision, seq_len=T, micro_batch=B, n_layers=n, d_model=D, vocab_size=VOCAB,
                         n_heads=HEADS, n_kv_heads=KV_HEADS, ffn_dim=FFN, activation_checkpointing=ac)
        predicted = est.activations_gb * 1e9
        print(f"  {n} layers, checkpointing {ac!s:5}: peak {peak:>9,} B, predicted {predicted:>11,.0f} B, "
              f"measured/predicted {peak / predicted:.3f}")
        # Without checkpointing the peak is at the start of backward and the model counts every tensor of it;
        # with it, backward's own temporaries (gradients in flight while a layer is recomputed) come on top.
        assert 0.97 <= peak / predicted <= (1.03 if not ac else 1.10), (n, ac, peak, predicted)
        if ac:
            assert peak < held[n, False][1]


def test_training_follows_the_same_curve_and_resumes(tmp_path):
    ref = set_train(make_run(tmp_path / "ref"), checkpoint_every=2, eval_every=2, warmup_steps=0, min_lr_ratio=1.0)
    train_in_process(ref, max_steps=4)
    ac = clone_run(ref, tmp_path / "ac", fresh=True, activation_checkpointing=True)
    train_in_process(ac, max_steps=2)  # checkpoint at step 2, then resume from it with checkpointed layers
    train_in_process(ac, max_steps=4)
    want, got = losses(ref), losses(ac)
    assert len(got) == len(want) == 4
    assert all(abs(g - w) <= 1e-6 * abs(w) for g, w in zip(got, want, strict=True)), (got, want)
    a, b = weights(run_dir(ref) / "model"), weights(run_dir(ac) / "model")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    # FSDP2 over checkpointed layers (the torchtitan order: checkpoint → compile → shard), one process.
    fsdp = clone_run(ref, tmp_path / "fsdp", fresh=True, activation_checkpointing=True, parallel="fsdp")
    assert train_in_process(fsdp, max_steps=4)["parallel"] == "fsdp"
    assert all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(losses(fsdp), want, strict=True)), (losses(fsdp), want)


def test_cpu_offload_needs_fsdp(tmp_path):
    from domainlm.config import validate
    from domainlm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.cpu_offload: needs train\.parallel: fsdp"):
        validate({"name": "x", "train": {"parallel": "ddp", "cpu_offload": True}})
    assert validate({"name": "x", "train": {"activation_checkpointing": True}}).train.activation_checkpointing


def test_plan_turns_checkpointing_on_only_when_nothing_fits_without_it():
    from domainlm.plan.planner import PlanRequest, make_plan

    def plan(micro_batch: int) -> dict:
        return make_plan(PlanRequest(gpu="a100-40gb", gpus=64, hours=200, mfu=0.4, micro_batch=micro_batch))

    small, big = plan(2), plan(4)
    assert small["memory"]["activation_checkpointing"] is False and small["memory"]["fits"]
    assert not any("activation_checkpointing" in w for w in small["warnings"])
    mem, m = big["memory"], big["model"]
    assert mem["activation_checkpointing"] is True and mem["fits"]
    assert any("train.activation_checkpointing: true" in w for w in big["warnings"])
    est = M.estimate(m["params_total"], precision="bf16-mixed", sharding=mem["sharding"], gpus=64, seq_len=2048,
                     micro_batch=4, n_layers=m["n_layers"], d_model=m["d_model"], vocab_size=m["vocab_size"],
                     n_heads=m["n_heads"], n_kv_heads=m["n_kv_heads"], ffn_dim=m["ffn_dim"],
                     activation_checkpointing=True)
    assert mem["total_gb"] == pytest.approx(est.total_gb)
    without = M.estimate(m["params_total"], precision="bf16-mixed", sharding="zero3", gpus=64, seq_len=2048,
                         micro_batch=4, n_layers=m["n_layers"], d_model=m["d_model"], vocab_size=m["vocab_size"],
                         n_heads=m["n_heads"], n_kv_heads=m["n_kv_heads"], ffn_dim=m["ffn_dim"])
    assert without.total_gb > 40 >= mem["total_gb"]


def test_plan_suggests_cpu_offload_only_when_the_activations_fit():
    from domainlm.plan.planner import PlanRequest, make_plan

    # ~4.9B params on one A100-40GB: 16 B/param of states cannot fit, checkpointed activations can.
    one = make_plan(PlanRequest(gpu="a100-40gb", gpus=1, hours=20000, mfu=0.4, micro_batch=1))
    assert any("train.cpu_offload: true" in w for w in one["warnings"]), one["warnings"]
    # 64 sequences of 2048 tokens per GPU: even checkpointed activations exceed 40 GB; offload would not help.
    big = make_plan(PlanRequest(gpu="a100-40gb", gpus=8, hours=2000, mfu=0.4, micro_batch=64))
    assert big["memory"]["activations_gb"] > 40
    assert not any("cpu_offload" in w for w in big["warnings"]) and any("smaller micro-batch" in w
                                                                        for w in big["warnings"])
