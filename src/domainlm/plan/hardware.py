"""A measured speed probe for CPUs (no datasheet peak): the trainer's own model and step, timed. The accelerator
table with the GPUs' datasheet peaks is `domainlm.hardware`."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from domainlm.model import build_model
from domainlm.shape import make_shape
from domainlm.train.step import make_optimizer, train_step


def measure_cpu_flops(seconds: float = 3.0, seq_len: int = 256, batch: int = 8) -> dict:
    """Sustained fp32 training FLOP/s of this machine, measured on a small Llama-shaped model.

    There is no datasheet peak for a CPU, so the probe measures what training actually achieves (the MFU
    is folded in): a d=256, 4-layer, vocab-8192 decoder (7.4M params, the shape of ANCHORS.md's CPU
    measurement), AdamW, batch 8×256, one warm-up step then timed steps for ~``seconds``."""


    shape = make_shape(256, 4, 8192)
    d, h = shape.d_model, shape.n_heads
    g = torch.Generator().manual_seed(0)

    def p(*size):
        return torch.nn.Parameter(torch.randn(*size, generator=g) * 0.02)

    emb, head = p(shape.vocab_size, d), p(shape.vocab_size, d)
    layers = [
        [p(3 * d, d), p(d, d), p(shape.ffn_dim, d), p(shape.ffn_dim, d), p(d, shape.ffn_dim)]
        for _ in range(shape.n_layers)
    ]
    params = [emb, head, *(w for layer in layers for w in layer)]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, shape.vocab_size, (batch, seq_len + 1), generator=g)

    def step():
        hid = emb[x[:, :-1]]
        for wqkv, wo, wg, wu, wd in layers:
            q, k, v = F.linear(F.rms_norm(hid, (d,)), wqkv).view(batch, seq_len, 3, h, d // h).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            hid = hid + F.linear(a.transpose(1, 2).reshape(batch, seq_len, d), wo)
            z = F.rms_norm(hid, (d,))
            hid = hid + F.linear(F.silu(F.linear(z, wg)) * F.linear(z, wu), wd)
        logits = F.linear(F.rms_norm(hid, (d,)), head)
        loss = F.cross_entropy(logits.view(-1, shape.vocab_size), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels
    steps, t0 = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - t0
    tokens_per_s = steps * batch * seq_len / elapsed
    return {
        "flops_per_s": tokens_per_s * shape.flops_per_token(seq_len),
        "tokens_per_s": tokens_per_s,
        "probe": f"d_model=256, n_layers=4, vocab=8192, batch {batch}x{seq_len}, fp32, {steps} steps",
        "threads": torch.get_num_threads(),
    }


def measure_shape_throughput(shape, seq_len: int, micro_batch: int, seconds: float = 4.0, model=None) -> dict:
    """Training tokens/s of ``shape`` itself on this machine: the trainer's model (`build_model`), optimizer and
    `train_step` on micro-batches of ``micro_batch`` × ``seq_len`` random tokens, two warm-up steps, then timed
    steps for ~``seconds``. A probe of another shape is not enough: measured here, a 1.1M-parameter plan ran
    at ~45% of the FLOP/s of the 7.4M-parameter probe model, so a budget sized with the probe took 600 s
    instead of 360 s. ``model``: measure this model instead (continued pretraining's base, whose
    architecture need not be `build_model`'s); ``shape`` then only gives the vocabulary and the FLOPs count."""


    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16-mixed" if cuda else "fp32"
    model = (model if model is not None else build_model(shape, seq_len, seed=0)).to(device)
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.0, device=device)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, shape.vocab_size, (micro_batch, seq_len + 1), generator=g).to(device)

    def step():
        train_step(model, opt, batch, lr=1e-4, micro_batch=micro_batch, grad_clip=1.0, precision=precision)
        if cuda:
            torch.cuda.synchronize()

    step()
    step()
    steps, t0 = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    tokens_per_s = steps * micro_batch * seq_len / (time.perf_counter() - t0)
    return {"tokens_per_s": tokens_per_s, "flops_per_s": tokens_per_s * shape.flops_per_token(seq_len),
            "steps": steps, "batch": f"{micro_batch}x{seq_len}", "precision": precision, "device": device.type,
            "threads": torch.get_num_threads(),
            "shape": {"d_model": shape.d_model, "n_layers": shape.n_layers, "vocab_size": shape.vocab_size}}
