"""Training speed (tokens/s, MFU) and peak memory against `domainlm memory`'s prediction, with activation
checkpointing and torch.compile off/on — through the trainer's own code (`parallelize`, `make_optimizer`,
`train_step`).

On CUDA each configuration is FSDP2 on one GPU as the trainer sets it up (bf16 parameters, fp32 reduction,
fused AdamW); peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps, predicted by
`memory.py` as ZeRO-3 on 1 GPU in bf16-mixed (16 B/param of states + activations). Goals (issue 14):
MFU ≥ 45% at 350M on an H100/H200-class GPU; predicted memory within 15% of measured.

On CPU (fp32, one process) it is activation checkpointing's trade-off: step time and activation memory
(tracked storage by storage, train/memory_probe.py — the CPU has no allocator counter) against the prediction.

    python benchmarks/train_memory.py                                  # CPU: the demo shape, checkpointing off/on
    python benchmarks/train_memory.py --preset 350m 125m 1b --compile off on   # CUDA (benchmarks/gpu.sh)
    torchrun --standalone --nproc_per_node 8 benchmarks/train_memory.py --preset 1b --json out.json  # 8 GPUs

Under torchrun it is FSDP2 over all the processes' GPUs (NCCL): tokens/s and MFU are the job's (MFU against
the GPUs' summed peak), memory is rank 0's, and `benchmarks/gpu.sh` divides tokens/s by N × the one-GPU rate for
the scaling efficiency. The model is built on the meta device and materialised shard by shard, as the trainer
does.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from domainlm import memory as M
from domainlm.config import TrainConfig
from domainlm.model import build_model, seeded_init
from domainlm.shape import make_shape
from domainlm.train.loop import peak_flops
from domainlm.train.memory_probe import measure_cpu
from domainlm.train.parallel import Dist, init_distributed, parallelize, shutdown, step_precision
from domainlm.train.step import make_optimizer, train_step

# (d_model, n_layers, vocab, seq_len, micro_batch): demo = ANCHORS.md's CPU shape (7.4M); 125m/350m = GPT-3
# small/medium widths and depths (Brown et al. 2020, table 2.1) with a 32k vocabulary; 1b = d 2048 × 16 layers.
PRESETS = {
    "demo": (256, 4, 8192, 256, 8),
    "125m": (768, 12, 32768, 2048, 8),
    "350m": (1024, 24, 32768, 2048, 8),
    "1b": (2048, 16, 32768, 2048, 8),
}


def run_config(preset: str, world: Dist, *, compile: bool, ac: bool, steps: int, warmup: int) -> dict:
    d, n_layers, vocab, seq_len, micro = PRESETS[preset]
    shape = make_shape(d, n_layers, vocab)
    device = world.device
    cuda = device.type == "cuda"
    precision = "bf16-mixed" if cuda else "fp32"
    mode = "fsdp" if cuda else "none"
    model = build_model(shape, seq_len, seed=0, meta=True)
    model = parallelize(model, mode, world, compile=compile, activation_checkpointing=ac, precision=precision,
                        init=lambda m: seeded_init(m, 0))
    t = TrainConfig()
    optimizer = make_optimizer(model, lr=t.lr, weight_decay=t.weight_decay, device=device)
    amp = step_precision(mode, world, precision)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, (micro, seq_len + 1), generator=g).to(device)

    def step() -> float:
        return train_step(model, optimizer, batch, lr=1e-4, micro_batch=micro, grad_clip=1.0, precision=amp).loss

    t0 = time.perf_counter()
    for _ in range(warmup):  # compile, allocator, optimizer state
        step()
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()  # reads the loss back (.item()): synchronises CUDA
        times.append(time.perf_counter() - t0)
    est = M.estimate(shape.params_total, precision=precision, sharding="zero3" if cuda else "ddp",
                     gpus=world.world_size, seq_len=seq_len, micro_batch=micro, n_layers=n_layers, d_model=d,
                     vocab_size=vocab, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads, ffn_dim=shape.ffn_dim,
                     activation_checkpointing=ac)
    tokens_per_s = micro * seq_len * world.world_size / statistics.median(times)  # the job's: every rank's batch
    row = {"preset": preset, "params": shape.params_total, "compile": compile, "ac": ac, "warm_s": warm_s,
           "ms_per_step": statistics.median(times) * 1e3, "tokens_per_s": tokens_per_s,
           "flops_per_token": shape.flops_per_token(seq_len)}
    if cuda:
        row["peak"] = peak_flops(device, precision, Path("."), world.world_size)
        row["gpus"] = world.world_size
        row["measured_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        row["predicted_gb"] = est.total_gb
    else:  # activations only, one extra tracked step (slower: a Python hook per op, so not timed)
        row["measured_gb"] = measure_cpu(model, batch).peak / 1e9
        row["predicted_gb"] = est.activations_gb
        optimizer.zero_grad(set_to_none=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", choices=PRESETS, default=None, help="default: demo on CPU, 350m on CUDA")
    ap.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"])
    ap.add_argument("--ac", nargs="+", choices=("off", "on"), default=["off", "on"], help="activation checkpointing")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3 CUDA, 1 CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here (rank 0)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    world = init_distributed() if args.device == "cuda" else Dist(0, 1, 0, torch.device(args.device))
    device = world.device
    cuda = device.type == "cuda"
    main_rank = world.is_main
    presets = args.preset or (["350m"] if cuda else ["demo"])
    steps = args.steps or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    what = "FSDP2 on 1 GPU, bf16 params / fp32 reduce, fused AdamW" if cuda else "1 process, fp32"
    if world.world_size > 1:
        what = f"FSDP2 over {world.world_size} GPUs (NCCL), bf16 params / fp32 reduce, fused AdamW"
    say = print if main_rank else (lambda *a, **k: None)
    say(f"{where}; {what}; {steps} timed steps after {warmup} warm-up; torch {torch.__version__}")
    memory = "peak GB (max allocated)" if cuda else "activations peak MB"
    say(f"\n| preset | params | compile | act. ckpt | warm-up s | ms/step | tokens/s | MFU | {memory} | predicted |"
          " measured/predicted |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    try:
        for preset in presets:
            for comp in args.compile:
                for ac in args.ac:
                    r = run_config(preset, world, compile=comp == "on", ac=ac == "on", steps=steps, warmup=warmup)
                    rows.append(r)
                    gc.collect()  # the configuration's model and optimizer are gone with its frame
                    if cuda:
                        torch.cuda.empty_cache()
                    mfu = f"{r['flops_per_token'] * r['tokens_per_s'] / r['peak']:.1%}" if r.get("peak") else "n/a"
                    scale = 1.0 if cuda else 1e3
                    say(f"| {preset} | {r['params'] / 1e6:.0f}M | {comp} | {ac} | {r['warm_s']:.1f} | "
                          f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                          f"{r['measured_gb'] * scale:.2f} | {r['predicted_gb'] * scale:.2f} | "
                          f"{r['measured_gb'] / r['predicted_gb']:.3f} |", flush=True)
    finally:
        shutdown()
    if args.json and main_rank:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    for preset in presets if main_rank else ():  # checkpointing's trade-off per preset (eager rows)
        off = [r for r in rows if r["preset"] == preset and not r["ac"] and not r["compile"]]
        on = [r for r in rows if r["preset"] == preset and r["ac"] and not r["compile"]]
        if off and on:
            print(f"\n{preset}: activation checkpointing costs {on[0]['ms_per_step'] / off[0]['ms_per_step']:.2f}× the "
                  f"step time and needs {on[0]['measured_gb'] / off[0]['measured_gb']:.2f}× the memory measured "
                  f"({'total' if cuda else 'activations'})")


if __name__ == "__main__":
    sys.exit(main())
