#!/usr/bin/env bash
# The GPU check, for one device call of under 8 minutes that returns at most 8 files. On the device machine, from
# the repository root (set STAGE1_COMMIT: the device copy's .git may be stale):
#     STAGE1_COMMIT=<commit> bash benchmarks/gpu_check.sh            # the default steps below, ~7 min on an H200
#     STAGE1_COMMIT=<commit> bash benchmarks/gpu_check.sh tests nano05   # only the named steps (and the summary)
# Default steps, in this order, one file each in $OUT (9 files in all):
#     device.txt       install (pip --no-deps --no-build-isolation -e .: stage1._C and its CUDA part build where
#                      nvcc and a CUDA torch exist), GPU, versions, whether stage1._C has CUDA ops, each step's status
#     selfcheck        selfcheck.txt: the kernels' self-check (Triton, fused CUDA ops; bf16 and fp32): verdicts, seconds
#     tests            tests.txt: kernel, native and engine tests compiled on the GPU (TRITON_INTERPRET=0), bf16
#                      included; the CUDA-graph capture test must pass (not skip): the summary checks it
#     kernels          bench_kernels.txt + .json: attention vs SDPA/Flex, the sampler at 256 x 152,064 (race
#                      shortcut, its search path, sort-based torch)
#     nano05           nano_0.5b.txt: bench_generate.py --workload nano on random bf16 weights of the 0.5B shape:
#                      ours (CUDA graphs), ours eager, transformers generate (capped), transformers continuous batching
#     nano7            nano_7b.txt: the same workload on the 7B shape: ours and transformers continuous batching
#     host             bench_host.txt: host ms per decode step at batch 64 and 256
#     (always)         summary.txt: one line per figure with its target (benchmarks/gpu_summary.py), also printed
# Optional steps (a call of their own: they add files): generate (the mixed workload against generate, 0.5B and 7B),
# fused (the nano 0.5B workload with and without stage1._C's fused CUDA ops, eager and with CUDA graphs, in one run),
# profile (the sampler under torch.profiler), sweeps (attention and sampler launch configurations).
# The whole call keeps to $GPU_CHECK_BUDGET seconds (default 450, install included): each step runs under its own
# limit cut to what the budget has left (a step with under 20 s left is skipped, and says so), and the summary
# always runs. The device image has torch, triton, transformers and pytest-xdist but no network: our package goes
# in without its dependencies; the random-weight checkpoints are written while the tests run.
# Then commit the files (device, date and commit are inside) under benchmarks/results/<machine>-<date>-<tag>/.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
STEPS=${*:-selfcheck tests kernels nano05 nano7 host}
for s in $STEPS; do
    case $s in selfcheck|tests|kernels|nano05|nano7|host|generate|fused|profile|sweeps) ;;
    *) echo "gpu_check.sh: unknown step '$s' (use: selfcheck tests kernels nano05 nano7 host generate fused profile" \
            "sweeps)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
export STAGE1_CACHE=${STAGE1_CACHE:-/tmp/stage1-cache}  # random-weight checkpoints, outside the repo
export PYTHONUNBUFFERED=1
export STAGE1_COMMIT=${STAGE1_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
want() { [[ " $STEPS " == *" $1 "* ]]; }
# step LIMIT FILE CMD...: runs CMD under min(LIMIT, what the budget leaves less 15 s for the summary)
step() { local limit=$1 name=$2; shift 2; local t0=$SECONDS budget=$(( $(left) - 15 ))
         (( budget < limit )) && limit=$budget
         if (( limit < 20 )); then
             echo "skipped: the check's budget of $BUDGET s was spent" > "$OUT/$name"
             echo "== $name: skipped (budget spent)" | tee -a "$OUT/device.txt"; return
         fi
         timeout "$limit" "$@" > "$OUT/$name" 2>&1; local rc=$?
         echo "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)$( ((rc == 124)) && echo ', TIMED OUT')" \
             | tee -a "$OUT/device.txt"
         tail -n 3 "$OUT/$name"; }

# 0. install and versions
if [[ -z ${GPU_CHECK_SKIP_INSTALL:-} ]]; then  # set it to re-run on a machine where the package is installed
    timeout 170 $PY -m pip install --quiet --no-deps --no-build-isolation -e . > "$OUT/device.txt" 2>&1
    echo "install: rc=$? in $((SECONDS - START)) s" >> "$OUT/device.txt"
else
    echo "install: skipped (GPU_CHECK_SKIP_INSTALL)" > "$OUT/device.txt"
fi
if ! $PY -c "import stage1.kernels" 2>/dev/null; then  # no editable install: map kernels/ by hand
    ln -sfn ../kernels stage1/kernels && export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    echo "editable install failed; using a stage1/kernels link" >> "$OUT/device.txt"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; echo "commit $STAGE1_COMMIT"
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"
  $PY -c "from stage1.engine import native; print('stage1._C:', 'built' if native.native_available() else
'NOT built (' + str(native.native_error()) + ')', '| CUDA ops:', 'yes' if native.native_cuda_available() else 'no')"
  command -v nvcc > /dev/null && nvcc --version | tail -n 1 || echo "nvcc: not found"; } >> "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# the random-weight checkpoints (the 7B shape: ~15 GB to write) while the tests run; the nano steps wait for them
CKPT_PID=
if want nano05 || want nano7 || want generate; then
    SHAPES=qwen2.5-0.5b; { want nano7 || want generate; } && SHAPES="$SHAPES qwen2.5-7b"
    timeout 200 $PY benchmarks/common.py checkpoint $SHAPES > /tmp/gpu_check_ckpt.log 2>&1 &
    CKPT_PID=$!
fi
ckpt_ready() { [[ -n $CKPT_PID ]] || return 0; wait "$CKPT_PID"; local rc=$?; CKPT_PID=
               echo "checkpoints: rc=$rc at $((SECONDS - START)) s: $(tr '\n' ' ' < /tmp/gpu_check_ckpt.log | tail -c 300)" \
                   >> "$OUT/device.txt"; }

# 0. the kernels' self-check on this GPU (stage1/engine/kernel_check.py): each kernel's verdict and the wall time
want selfcheck && step 60 selfcheck.txt $PY benchmarks/kernel_selfcheck.py --device cuda
# 1. correctness: the kernels compiled (not interpreted), bf16 included; the native ops (their CUDA build compiles
#    for sm_80/sm_90); the engine with kernels='triton', decode through CUDA graphs (capture asserted in
#    tests/kernels/test_engine_triton.py). -rfEsp lists every passed test: the summary looks for the capture test.
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
want tests && step 100 tests.txt env TRITON_INTERPRET=0 $PY -m pytest -q -rfEsp $XDIST tests/kernels tests/native \
    tests/engine/test_backends.py tests/engine/test_cuda_graphs.py tests/engine/test_prefix_caching.py \
    tests/engine/test_async_scheduling.py tests/engine/test_kernel_check.py \
    tests/engine/test_startup_errors.py::test_the_kv_cache_is_sized_after_the_largest_step_ran
# 2. each kernel against SDPA / FlexAttention / sort-based torch sampling at the shapes
want kernels && step 60 bench_kernels.txt $PY benchmarks/bench_kernels.py --out "$OUT/bench_kernels.json"
# 3. nano-vllm's offline benchmark (256 requests, lengths 100-1024, EOS ignored, greedy), random bf16 weights.
#    The peers are capped (generate 15 s: it is there for scale; CB 60 / 40 s): a capped peer is marked truncated
#    in the file and the summary. Ours runs first and its figures are printed (and a partial JSON line) before them.
want nano05 && ckpt_ready && step 180 nano_0.5b.txt $PY benchmarks/bench_generate.py --workload nano \
    --config qwen2.5-0.5b --dtype bfloat16 --eager-too --sync-too --peers generate,cb --generate-max-time 15 --cb-max-time 60
want nano7 && ckpt_ready && step 150 nano_7b.txt $PY benchmarks/bench_generate.py --workload nano \
    --config qwen2.5-7b --dtype bfloat16 --peers cb --cb-max-time 40
# 4. the host's share of a decode step (a one-layer model with the real vocabulary), on the GPU
want host && step 40 bench_host.txt $PY benchmarks/bench_host.py --batch 64,256
# optional: the mixed workload against generate; the sampler's profile; tuning sweeps
want generate && ckpt_ready && step 90 bench_generate_0.5b.txt $PY benchmarks/bench_generate.py \
    --config qwen2.5-0.5b --batch 64 --new-tokens 128 --dtype bfloat16 --eager-too
want generate && step 120 bench_generate_7b.txt $PY benchmarks/bench_generate.py --config qwen2.5-7b --batch 32 \
    --new-tokens 128 --dtype bfloat16
want fused && ckpt_ready && step 240 fused_ops.txt $PY benchmarks/bench_generate.py --workload nano \
    --config qwen2.5-0.5b --dtype bfloat16 --peers none --eager-too --unfused-too
want profile && step 60 profile_sampling.txt $PY benchmarks/kernels_sampling.py --profile --json
want sweeps && step 90 sweep_attention.txt $PY benchmarks/kernels_attention.py --sweep --json
want sweeps && step 90 sweep_sampling.txt $PY benchmarks/kernels_sampling.py --sweep --json
[[ -n $CKPT_PID ]] && kill "$CKPT_PID" 2>/dev/null

echo "total: $((SECONDS - START)) s (budget $BUDGET s)" >> "$OUT/device.txt"
timeout 20 $PY benchmarks/gpu_summary.py "$OUT" > "$OUT/summary.txt" 2>&1
echo; echo "== summary ($((SECONDS - START)) s)"; cat "$OUT/summary.txt"
