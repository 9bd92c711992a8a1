"""Host memory per rank at start-up: the model built whole on the CPU, then sharded (``--init eager``, what
`domainlm train` did before issue 24), against built on the meta device, sharded, then materialised shard by
shard (``--init meta``, what it does now). Peak resident memory (``ru_maxrss``) of each rank once the model is
sharded and initialised, and the seconds that took; FSDP2 over gloo on CPU, fp32, no optimizer.

    torchrun --standalone --nproc_per_node 2 benchmarks/startup_memory.py --init eager   # ~1B: d 2048 × 16 layers
    torchrun --standalone --nproc_per_node 2 benchmarks/startup_memory.py --init meta
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.distributed as dist

from domainlm.model import build_model, seeded_init
from domainlm.shape import make_shape
from domainlm.train.parallel import init_distributed, parallelize, shutdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", choices=("eager", "meta"), required=True)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32768)
    args = ap.parse_args()
    world = init_distributed()
    shape = make_shape(args.d_model, args.layers, args.vocab)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # torch, transformers imported
    t0 = time.perf_counter()
    if args.init == "eager":
        model = parallelize(build_model(shape, 2048, seed=0), "fsdp", world)
    else:
        model = parallelize(build_model(shape, 2048, seed=0, meta=True), "fsdp", world,
                            init=lambda m: seeded_init(m, 0))
    seconds = time.perf_counter() - t0
    local = sum(p.to_local().numel() for p in model.parameters())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = torch.tensor([peak_kb - base_kb, peak_kb, seconds, local], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(world.world_size)] if dist.is_initialized() else [row]
    if dist.is_initialized():
        dist.all_gather(rows, row)
    if world.is_main:
        print(f"{args.init}: {shape.params_total / 1e9:.2f}B params, {world.world_size} ranks")
        for r, (grown, peak, s, n) in enumerate(x.tolist() for x in rows):
            print(f"rank {r}: peak RSS {peak / 2**20:.2f} GiB ({grown / 2**20:.2f} GiB above the imports), "
                  f"shard {n * 4 / 2**30:.2f} GiB of fp32 weights, {s:.1f} s to build, shard and initialise")
    shutdown()


if __name__ == "__main__":
    main()
