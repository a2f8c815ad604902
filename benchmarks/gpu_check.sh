#!/usr/bin/env bash
# The GPU check of the Triton kernels and the engine, prepared for one device call of under 8 minutes
# (written without a GPU at hand: first run it on one). On the device machine, from the repository root:
#     bash benchmarks/gpu_check.sh           # results go to $OUT (the device tool's folder) or benchmarks/results/gpu
# Then commit the files it wrote (device, date and commit are inside) under benchmarks/results/.
# The device image has torch, triton and transformers but no network: install our package without dependencies.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export STAGE1_CACHE=${STAGE1_CACHE:-/tmp/stage1-cache}  # random-weight checkpoints, outside the repo
python -m pip install --quiet --no-deps --no-build-isolation -e . || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; git rev-parse HEAD 2>/dev/null;
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/device.txt"

# 1. correctness: the kernels compiled (not interpreted), bf16 included, and the engine with kernels='triton'
TRITON_INTERPRET=0 timeout 150 python -m pytest -q tests/kernels tests/engine/test_backends.py \
    > "$OUT/kernel_tests.txt" 2>&1
# 2. each kernel against SDPA / FlexAttention / sort-based torch sampling at the target shapes
timeout 120 python benchmarks/bench_kernels.py --out "$OUT/bench_kernels.json" > "$OUT/bench_kernels.txt" 2>&1
# 3. end to end against transformers generate, random bf16 weights of the 0.5B and 7B shapes
timeout 90 python benchmarks/bench_generate.py --config qwen2.5-0.5b --batch 64 --new-tokens 128 \
    --dtype bfloat16 > "$OUT/bench_generate_0.5b.txt" 2>&1
timeout 180 python benchmarks/bench_generate.py --config qwen2.5-7b --batch 32 --new-tokens 128 \
    --dtype bfloat16 > "$OUT/bench_generate_7b.txt" 2>&1
tail -n 3 "$OUT"/*.txt
