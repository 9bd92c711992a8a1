"""Tokens/s and MFU of domainlm's training step against a minimal reference step, measured in one run.

Both steps train the same model (transformers LlamaForCausalLM, same init), on the same batch, with
AdamW. The reference is the least a training step can do — forward, cross-entropy, backward, AdamW step,
zero_grad — while domainlm's `train_step` (the one the loop uses) adds micro-batching, gradient clipping,
the NaN/inf check and the loss read-back. Timings alternate between the two step by step so that machine load
affects both alike; the median step time of each is reported. Goal: ratio ≥ 0.95 (no framework tax).

    python benchmarks/train_step.py                      # the demo shape on CPU (fp32)
    python benchmarks/train_step.py --preset 125m        # on a GPU: bf16 autocast, fused AdamW
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from domainlm.model import build_model
from domainlm.shape import ModelShape, make_shape
from domainlm.train.loop import peak_flops
from domainlm.train.step import autocast_for, train_step

# (d_model, n_layers, vocab, seq_len, batch): "demo" is ANCHORS.md's CPU measurement shape (7.4M params);
# 125m/350m are GPT-2/GPT-3 small and medium widths with a 32k vocabulary.
PRESETS = {
    "demo": (256, 4, 8192, 256, 8),
    "125m": (768, 12, 32768, 1024, 16),
    "350m": (1024, 24, 32768, 1024, 8),
}


def reference_step(model, optimizer, batch, precision: str) -> float:
    x, y = batch[:, :-1], batch[:, 1:]
    with autocast_for(batch.device, precision):
        logits = model(input_ids=x, use_cache=False).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=PRESETS, default="demo")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round and variant")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the whole batch (no accumulation)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    d, n_layers, vocab, seq_len, batch_size = PRESETS[args.preset]
    device = torch.device(args.device)
    precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    shape: ModelShape = make_shape(d, n_layers, vocab)
    micro = args.micro_batch or batch_size
    fused = device.type == "cuda"

    models = {name: build_model(shape, seq_len, seed=0).to(device) for name in ("domainlm", "reference")}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=fused)
            for name, m in models.items()}
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g).to(device)

    def run(name: str) -> float:
        if name == "domainlm":
            return train_step(models[name], opts[name], batch, lr=1e-4, micro_batch=micro, grad_clip=1.0,
                              precision=precision).loss
        return reference_step(models[name], opts[name], batch, precision)

    times: dict[str, list[float]] = {"domainlm": [], "reference": []}
    for name in times:  # warm-up: allocator, kernels, optimizer state
        run(name), run(name)
    for _ in range(args.rounds * args.steps):
        for name in times:  # alternate step by step: a load spike on the machine hits both alike
            t0 = time.perf_counter()
            run(name)  # both read the loss back (.item()), which synchronises CUDA
            times[name].append(time.perf_counter() - t0)

    tokens = batch_size * seq_len
    flops_per_token = shape.flops_per_token(seq_len)
    if device.type == "cuda":
        peak, peak_note = peak_flops(device, precision, Path("."), 1), torch.cuda.get_device_name(device)
    else:
        from domainlm.plan.hardware import measure_cpu_flops

        peak, peak_note = measure_cpu_flops()["flops_per_s"], "CPU probe (measured training FLOP/s, not a datasheet)"
    print(f"model {shape.params_total / 1e6:.1f}M params (d_model {d}, {n_layers} layers, vocab {vocab}), "
          f"batch {batch_size}×{seq_len} (micro-batch {micro}), {precision} on {device.type}, "
          f"{torch.get_num_threads()} threads; {args.rounds}×{args.steps} timed steps each")
    print(f"MFU peak: {peak / 1e12:.3f} TFLOP/s ({peak_note})" if peak else "MFU peak: unknown device")
    print("\n| step | ms/step (median) | tokens/s | MFU |\n|---|---|---|---|")
    rate = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate[name] = tokens / med
        mfu = f"{flops_per_token * rate[name] / peak:.1%}" if peak else "n/a"
        print(f"| {name} | {med * 1e3:.1f} | {rate[name]:,.0f} | {mfu} |")
    print(f"\nratio domainlm / reference: {rate['domainlm'] / rate['reference']:.3f} (goal ≥ 0.95)")


if __name__ == "__main__":
    main()
