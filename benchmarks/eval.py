"""Tokens scored per second by `domainlm eval`'s scorer against a minimal forward loop over the same windows.

Both score the same strided sliding windows (`bpb.windows`) of the same documents with the same model. The
minimal loop is the least a good scorer does: windows sorted by length (so padding is rare), `rows` =
batch_tokens // context at a time, right-padded, one forward pass, fp32 cross-entropy, sum of the scored
positions. domainlm's `score_sequences` (what `domainlm eval` runs) adds rows per batch that grow as windows
get shorter, the logits budget and the bookkeeping of which tokens are scored. The two
alternate round by round so machine load hits both alike; the median round of each is reported, and the NLL
sums must agree. Goal: ratio ≥ 0.8. Then the stride/cost trade-off: the same documents at three strides.

    python benchmarks/eval.py                      # CPU, fp32, the demo shape (7.4M params)
    python benchmarks/eval.py --preset 125m        # on a GPU: bf16 autocast, like `domainlm eval`
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from domainlm.evaluate import bpb
from domainlm.model import build_model
from domainlm.shape import make_shape

# (d_model, n_layers, vocab, context): "demo" is ANCHORS.md's CPU measurement shape; 125m/350m/1b as in
# benchmarks/train_step.py and benchmarks/gpu.sh.
PRESETS = {
    "demo": (256, 4, 8192, 256),
    "125m": (768, 12, 32768, 1024),
    "350m": (1024, 24, 32768, 1024),
    "1b": (2048, 16, 32768, 2048),
}


def make_windows(n_docs: int, context: int, stride: int, vocab: int, seed: int = 0):
    """Documents of random tokens, lengths log-normal around the context (some fit one window, most need
    several), cut into windows exactly as `bpb.score_texts` cuts them (one prefix token)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(context), 0.8, n_docs).astype(int), 8, 8 * context)
    seqs, starts = [], []
    for n in lengths:
        ids = [1] + rng.integers(3, vocab, n).tolist()  # 1 = EOS as the document's start context
        for s, a, b in bpb.windows(len(ids), 1, context, stride):
            seqs.append(ids[s:b])
            starts.append(a - s)
    return seqs, starts


@torch.inference_mode()
def minimal_loop(model, seqs, starts, rows: int) -> float:
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    total = 0.0
    for i in range(0, len(order), rows):
        chunk = order[i : i + rows]
        width = max(len(seqs[k]) for k in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        scored = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
        for r, k in enumerate(chunk):
            ids[r, : len(seqs[k])] = torch.tensor(seqs[k])
            scored[r, starts[k] - 1 : len(seqs[k]) - 1] = True
        ids, scored = ids.to(device), scored.to(device)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        total += (ce.view(len(chunk), -1) * scored).double().sum().item()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=PRESETS, default="demo")
    ap.add_argument("--docs", type=int, default=None, help="documents (default: 40 on CPU, 400 on CUDA)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-tokens", type=int, default=8192, help="eval.batch_tokens: tokens per forward pass")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    d, n_layers, vocab, context = PRESETS[args.preset]
    device = torch.device(args.device)
    n_docs = args.docs or (400 if device.type == "cuda" else 40)
    shape = make_shape(d, n_layers, vocab)
    model = build_model(shape, context, seed=0).to(device).eval()
    stride = context // 2  # `domainlm eval`'s default
    seqs, starts = make_windows(n_docs, context, stride, vocab)
    scored_tokens = sum(len(s) - a for s, a in zip(seqs, starts, strict=True))
    read_tokens = sum(len(s) - 1 for s in seqs)
    rows = max(1, args.batch_tokens // context)

    def run(name: str) -> float:
        if name == "domainlm":
            return float(bpb.score_sequences(model, seqs, starts, batch_tokens=args.batch_tokens).sum())
        return minimal_loop(model, seqs, starts, rows)

    times: dict[str, list[float]] = {"domainlm": [], "minimal": []}
    nll = {name: run(name) for name in times}  # warm-up (allocator, kernels) and the agreement check
    for _ in range(args.rounds):
        for name in times:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(name)  # both read their sum back (.item() / .cpu()), which synchronises CUDA
            times[name].append(time.perf_counter() - t0)

    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"model {shape.params_total / 1e6:.1f}M params (d_model {d}, {n_layers} layers, vocab {vocab}), {precision}"
          f" on {where}; {n_docs} documents → {len(seqs)} windows, context {context}, stride {stride}: "
          f"{scored_tokens:,} tokens scored, {read_tokens:,} read; {args.batch_tokens} tokens per batch; "
          f"{args.rounds} rounds each")
    print(f"NLL sums agree: domainlm {nll['domainlm']:.6f}, minimal {nll['minimal']:.6f} nats "
          f"(relative difference {abs(nll['domainlm'] - nll['minimal']) / abs(nll['minimal']):.1e})")
    print("\n| scorer | s/round (median) | tokens scored/s | tokens read/s |\n|---|---|---|---|")
    rate = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate[name] = scored_tokens / med
        print(f"| {name} | {med:.2f} | {rate[name]:,.0f} | {read_tokens / med:,.0f} |")
    print(f"\nratio domainlm / minimal: {rate['domainlm'] / rate['minimal']:.3f} (goal ≥ 0.8)")

    print("\nstride/cost trade-off (domainlm's scorer, median of the rounds): `--stride` buys left context with"
          " compute;\ntokens read per token scored is the `cost` `domainlm eval` reports (short documents' last"
          " windows re-read context too)")
    print("\n| stride | min left context | tokens read per token scored | s (median) | tokens scored/s |")
    print("|---|---|---|---|---|")
    for s in (context, context // 2, context // 4):
        w, a = make_windows(n_docs, context, s, vocab)
        scored = sum(len(q) - b for q, b in zip(w, a, strict=True))
        read = sum(len(q) - 1 for q in w)
        ts = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            bpb.score_sequences(model, w, a, batch_tokens=args.batch_tokens)
            ts.append(time.perf_counter() - t0)
        dt = statistics.median(ts)
        print(f"| {s} | {context - s} | {read / scored:.2f} | {dt:.2f} | {scored / dt:,.0f} |")


if __name__ == "__main__":
    main()
