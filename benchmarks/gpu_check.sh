#!/usr/bin/env bash
# The GPU check of the Triton kernels and the engine, for one device call of under 8 minutes. On the device
# machine, from the repository root:
#     bash benchmarks/gpu_check.sh                 # tests kernels generate profile (~5 min on an H200)
#     bash benchmarks/gpu_check.sh tests sweeps    # only the named steps: tests kernels generate profile sweeps
# Set STAGE1_COMMIT=$(git rev-parse --short HEAD) in the call: the device copy's .git may be stale.
# The device tool returns at most 8 files: the default steps write 8, so run sweeps in a call of their own.
# Then commit the files it wrote (device, date and commit are inside) under benchmarks/results/.
# The device image has torch, triton, transformers and pytest-xdist but no network: our package goes in without
# its dependencies. Each step has its own time limit and writes its own file, so a slow step loses only itself.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
STEPS=${*:-tests kernels generate profile}
for s in $STEPS; do
    case $s in tests|kernels|generate|profile|sweeps) ;; *) echo "gpu_check.sh: unknown step '$s' (use: tests kernels generate profile sweeps)" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"
export STAGE1_CACHE=${STAGE1_CACHE:-/tmp/stage1-cache}  # random-weight checkpoints, outside the repo
export PYTHONUNBUFFERED=1
$PY -m pip install --quiet --no-deps --no-build-isolation -e . > "$OUT/device.txt" 2>&1
if ! $PY -c "import stage1.kernels" 2>/dev/null; then  # no editable install: map kernels/ by hand
    ln -sfn ../kernels stage1/kernels && export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    echo "editable install failed; using a stage1/kernels link" >> "$OUT/device.txt"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; echo "commit ${STAGE1_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}";
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"; } >> "$OUT/device.txt" 2>&1
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() { local limit=$1 name=$2; shift 2; local t0=$SECONDS
         timeout "$limit" "$@" > "$OUT/$name" 2>&1; local rc=$?
         echo "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)"; tail -n 4 "$OUT/$name"; }

# 1. correctness: the kernels compiled (not interpreted), bf16 included, and the engine with kernels='triton'; decode through CUDA graphs
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
want tests && step 120 kernel_tests.txt env TRITON_INTERPRET=0 $PY -m pytest -q $XDIST tests/kernels tests/engine/test_backends.py \
    tests/engine/test_cuda_graphs.py tests/engine/test_prefix_caching.py
# 2. each kernel against SDPA / FlexAttention / sort-based torch sampling at the target shapes
want kernels && step 120 bench_kernels.txt $PY benchmarks/bench_kernels.py --out "$OUT/bench_kernels.json"
# 3. end to end against transformers generate, random bf16 weights of the 0.5B and 7B shapes
#    (the 0.5B greedy file also holds ours with --enforce-eager: decode steps with and without CUDA graphs)
want generate && step 90 bench_generate_0.5b.txt bash -c "$PY benchmarks/bench_generate.py --config qwen2.5-0.5b \
    --batch 64 --new-tokens 128 --dtype bfloat16; $PY benchmarks/bench_generate.py --config qwen2.5-0.5b --batch 64 \
    --new-tokens 128 --dtype bfloat16 --enforce-eager --skip-reference"
want generate && step 60 bench_generate_0.5b_sampled.txt $PY benchmarks/bench_generate.py --config qwen2.5-0.5b \
    --batch 64 --new-tokens 128 --dtype bfloat16 --temperature 0.7 --top-p 0.9
want generate && step 120 bench_generate_7b.txt $PY benchmarks/bench_generate.py --config qwen2.5-7b --batch 32 \
    --new-tokens 128 --dtype bfloat16
# 4. where the sampler's time goes: GPU time per kernel, host time per call
want profile && step 60 profile_sampling.txt $PY benchmarks/kernels_sampling.py --profile --json
# 5. tuning: decode tiles and split counts, prefill tiles, then the sampler's launch configurations
want sweeps && step 90 sweep_attention.txt $PY benchmarks/kernels_attention.py --sweep --json
want sweeps && step 90 sweep_sampling.txt $PY benchmarks/kernels_sampling.py --sweep --json
