#!/usr/bin/env bash
# The GPU path, measured (issue 14): one script, ≤ 8 minutes on one H100/H200-class GPU.
#
#   0. the gpu-marked tests (FSDP2 bf16 params / fp32 reduce, fused AdamW, CPU offload)          ~30 s
#   1. training: MFU and peak memory vs `domainlm memory` — 350M / 125M / 1B presets, FSDP2 on one GPU in
#      bf16, torch.compile off/on × activation checkpointing off/on (benchmarks/train_memory.py)  ≤ 4 min
#   2. eval: tokens scored/s of `domainlm eval`'s scorer vs a minimal forward loop (benchmarks/eval.py) ≤ 1 min
#   3. `domainlm run --quick` end to end on CUDA, in a temporary folder                             ≤ 2 min
#
# Goals: ≥ 45% MFU at 350M in bf16 (llm-foundry reports ~46% on H100, Megatron-LM ~47%); predicted memory within
# 15% of measured (measured/predicted 0.85–1.15); eval ratio ≥ 0.8. Each part has its own time limit, so a slow
# part is cut off (and says so) rather than eating the others' time. Copy the tables into docs/benchmarks.md.
#
#   benchmarks/gpu.sh                  # from the repository root, with the project's virtualenv
#   PY=python3 benchmarks/gpu.sh       # another interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$SECONDS

$PY - <<'EOF' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: no CUDA GPU (torch.cuda.is_available() is False); it measures the GPU path only")
p = torch.cuda.get_device_properties(0)
print(f"# {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true

part() {  # part LIMIT_S TITLE CMD...: run CMD with a time limit, report its wall time and a cut-off
    local limit=$1 title=$2; shift 2
    echo; echo "## $title"; echo
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local rc=$?
    [ $rc -eq 124 ] && echo "(cut off after ${limit} s: the rows above are what finished)"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "(exit code $rc)"
    echo "[$title: $((SECONDS - t0)) s]"
}

part 90 "0. gpu-marked tests" $PY -m pytest -m gpu -q -rs tests/test_train_dist.py
part 240 "1. training: MFU, peak memory vs domainlm memory (FSDP2, bf16, one GPU)" \
    $PY benchmarks/train_memory.py --preset 350m 125m 1b --compile off on --ac off on --steps 10 --warmup 3
part 60 "2. eval: tokens scored/s vs a minimal forward loop (350M, context 1024)" \
    $PY benchmarks/eval.py --preset 350m --rounds 3
quick=$(mktemp -d)
part 120 "3. domainlm run --quick on CUDA (in $quick)" \
    bash -c "cd '$quick' && '$(realpath "$(command -v "$PY")")' -m domainlm run --quick"
[ -f "$quick/runs/legal-demo-quick/logs/metrics.jsonl" ] && tail -n 2 "$quick/runs/legal-demo-quick/logs/metrics.jsonl"

echo; echo "benchmarks/gpu.sh: $((SECONDS - start)) s in all (budget 480 s)"
