#!/usr/bin/env bash
# The engine on one GPU (an H100 or H200), from a bare machine that has this repo and a CUDA build of torch:
# build the extensions, report which kernels are in use, run the kernel tests (CUDA ones included), benchmark the
# kernels against torch's fused AdamW and clip_grad_norm_ with the bandwidth as a share of the card's measured
# device-to-device copy, measure training throughput and MFU against a compiled plain-PyTorch peer
# (bench_mfu.py: 124M, 350M, 1B; eager, --compile, --compile + chunked loss, own fused kernels + chunked loss), the
# elementwise pieces eager vs compiled vs the engine's fused kernels (bench_elementwise.py), the head + loss plain
# vs chunked (bench_loss.py), and run a short training job with --compile --loss-chunk-tokens through the command
# line. It also runs the whole test suite on the GPU host (the README's test command: single-process tests on the
# CPU or, where they ask for it, CUDA; multi-rank tests on gloo), in parallel with pytest-xdist where it is installed.
# Each stage has its own time limit; a failed stage does not stop the others; a summary closes the run, within the
# budget below (the MFU stage is the long one, and writes its JSON after each model size).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine: every stage, in one device call
#   bash benchmarks/gpu_check.sh --stages mfu,train --budget 200   # a second call: the stages the first one skipped
#   bash benchmarks/gpu_check.sh --suite         # only the suite (= --stages suite)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # anywhere: the same stages, CPU-sized, to check the script itself
#   bash benchmarks/gpu_check.sh --budget 420    # at most this many seconds in all [540]
#
# The budget: each stage runs under the smaller of its own limit and what is left of the budget (less 10 s for
# the summary); a stage with under 20 s left is skipped and counted as failed. So the run ends, summary and all,
# before a device call's time limit of budget + a margin. The default fits a lent GPU's 15 minutes of device time:
# about 1.5 minutes to start the machine, then one call with timeout_s 590, and a few minutes for a second call
# with --stages for whatever the first one skipped. The stages go in order of what matters most when time runs
# short: the kernel tests, the suite, the fused AdamW benchmark, the MFU benchmark (the 1B size first), then the
# pieces. env, deps and build always run (a second call on a warm machine skips the build when the extensions are
# newer than their sources).
#
# $OUT (default ./gpu_out) gets three files, so that a device call brings them all back (it returns at most 8):
#   gpu_check.log         every stage's command and full output
#   summary.txt           stage results and times, the kernel report, the benchmark tables, the training summary
#   results.tar.gz        the files below (written to ./gpu_results, packed again after every stage, so a call cut
#                         off by its time limit still brings back what the finished stages wrote):
#     pytest.xml            JUnit report of the kernel tests
#     bench_kernels_64M.json, bench_kernels_host.json   kernel benchmark results (see benchmarks/bench_kernels.py;
#                                                       host: 128K params in 128 tensors)
#     mfu.json, elementwise.json, loss.json              bench_mfu.py, bench_elementwise.py, bench_loss.py results
#     train_metrics.jsonl   the training job's metrics
#     train_ops.txt         its last steps' operators ranked by CUDA time, after the share of the time the GPU was
#                           busy (--profile-steps; the trace stays in runs/)
#     suite.xml, suite.txt  JUnit report and output (a line per test) of the whole suite
# The exit status is the number of failed stages.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1

ALL_STAGES=ext,tests,suite,bench,mfu,elementwise,loss,train
DRY=0 BUDGET=540 STAGES=$ALL_STAGES
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu-dry-run) DRY=1 ;;
    --suite) STAGES=suite ;;
    --stages) STAGES=${2:-}; shift
      for s in ${STAGES//,/ }; do
        [[ ,$ALL_STAGES, == *,$s,* ]] || { echo "--stages: '$s' is not one of $ALL_STAGES" >&2; exit 2; }
      done ;;
    --budget) BUDGET=${2:-}; shift
      [[ $BUDGET =~ ^[0-9]+$ ]] || { echo "--budget: a number of seconds, got '$BUDGET'" >&2; exit 2; } ;;
    *) echo "usage: $0 [--stages $ALL_STAGES] [--suite] [--cpu-dry-run] [--budget SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
export OUT="${OUT:-./gpu_out}" RES=./gpu_results
export PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
rm -rf "$RES"
mkdir -p "$OUT" "$RES"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
FAILED=0 SKIPPED=

note() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME SECONDS COMMAND...: runs COMMAND under a time limit (the smaller of SECONDS and what is left of the
# budget), output to the log; records status and time. A stage that --stages leaves out is not run or counted.
stage() {
  local name=$1 limit=$2 start=$SECONDS rc status left
  shift 2
  [[ $name == env || $name == deps || $name == build || ,$STAGES, == *,$name,* ]] || return 0
  left=$((BUDGET - SECONDS - 10))
  if [[ $left -lt 20 ]]; then
    FAILED=$((FAILED + 1))
    SKIPPED=${SKIPPED:+$SKIPPED,}$name
    printf '%-10s %-28s %5ss\n' "$name" "SKIPPED (budget spent)" 0 | tee -a "$SUMMARY"
    return
  fi
  [[ $left -lt $limit ]] && limit=$left
  echo "+ [$(date +%T)] $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  if [[ $rc -eq 0 ]]; then
    status=ok
  else
    status="FAILED rc=$rc"
    [[ $rc -eq 124 || $rc -eq 137 ]] && status="$status (time limit)"
    FAILED=$((FAILED + 1))
  fi
  printf '%-10s %-28s %5ss\n' "$name" "$status" "$((SECONDS - start))" | tee -a "$SUMMARY"
  tar czf "$OUT/results.tar.gz" -C "$RES" .
}

if [[ $DRY -eq 1 ]]; then
  DEVICE=cpu; PRECISION=fp32; BENCH_SIZES=(4194304); TEST_FILTER="cuda or compiled_kernels_in_use"
  SUITE_TESTS=(tests/test_config.py tests/test_distributed_helper.py)  # the script, not the suite, is checked
  SUITE_WORKERS=2
  TRAIN_MODEL=(--model tiny --micro-batch-size 2 --global-batch-size 4 --seq-length 64 --steps 3
               --compile --loss-chunk-tokens 64 --profile-steps 3:3 --profile-memory)
  PROFILED_FROM=3
  BENCH_ARGS=(--smoke)
  MFU_ARGS=()
else
  DEVICE=cuda; PRECISION=bf16; BENCH_SIZES=(67108864); TEST_FILTER=""; SUITE_TESTS=(tests/)
  SUITE_WORKERS=$(( $(nproc) / 2 ))  # half the cores, 1 to 8 (a world-8 test is 8 processes)
  SUITE_WORKERS=$(( SUITE_WORKERS < 1 ? 1 : SUITE_WORKERS > 8 ? 8 : SUITE_WORKERS ))
  TRAIN_MODEL=(--num-layers 8 --hidden-size 1024 --ffn-hidden-size 2816 --num-heads 16 --num-kv-heads 8
               --seq-length 1024 --micro-batch-size 8 --global-batch-size 32 --steps 14
               --compile --loss-chunk-tokens 4096 --profile-steps 13:14 --profile-memory)
  PROFILED_FROM=13  # (the traced steps run slower: the summary's speed leaves them out)
  BENCH_ARGS=(--repeats 4 --warmup 2)  # (the first call of a compiled side compiles; one more warms up)
  # the 1B size first (the goal's main figure; the JSON is written after each size); ours-compile without the
  # chunked loss is left out for time (ours-compile-fused-loss is the compiled side to beat)
  MFU_ARGS=(--sizes 1b 124m 350m --sides ours-eager ours-compile-fused-loss ours-fused peer)
fi

env_info() {
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv || true
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'
  nvcc --version | tail -1 || true
  echo "cpus $(nproc)"
}

deps() {  # pytest-benchmark only serves `pytest benchmarks/`; the script mode used below needs none of it
  "$PY" -c 'import pytest' || "$PY" -m pip install -q --retries 0 --timeout 10 pytest
  "$PY" -c 'import pytest_benchmark' || "$PY" -m pip install -q --retries 0 --timeout 10 pytest-benchmark || echo "no pytest-benchmark (script mode only)"
  if [[ ,$STAGES, == *,suite,* ]]; then  # the suite's optional references; tests that need a missing one are skipped
    for mod in safetensors transformers tokenizers matplotlib; do
      "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install -q --retries 0 --timeout 10 "$mod" || echo "no $mod"
    done
  fi
}

build() {
  local so built=1 wanted=engine/_fused_cpu.*so  # (a glob, expanded where it is used)
  [[ $DRY -eq 1 ]] || wanted+=" engine/_fused_cuda.*so"
  for so in $wanted; do  # (a second call's build)
    [[ -f $so && -z $(find csrc engine/ext.py setup.py -newer "$so" -print -quit) ]] || built=0
  done
  if [[ $built -eq 1 ]]; then
    echo "the extensions are newer than their sources; not rebuilt"; ls -l engine/_fused_*.so; return 0
  fi
  if [[ $DRY -eq 0 ]]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    export TORCH_CUDA_ARCH_LIST
  fi
  # --no-index: a machine without network fails at once instead of waiting on the index. If pip cannot build, or
  # "succeeds" without building (an H200 image's pip wanted to fetch setuptools: `setup.py develop` of setuptools
  # 80-81 calls an isolated pip; pyproject.toml now avoids that path), the loader's JIT path builds the same sources.
  if MAX_JOBS=$(nproc) "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . &&
      ls -l $wanted; then
    :
  else
    echo "pip could not build the extensions; JIT-building them instead"
    MAX_JOBS=$(nproc) "$PY" -c 'import sys, torch; from engine import ext
for backend in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
    print(backend, ext.jit_build(backend).__file__)' || return 1
    echo "build: pip failed, JIT build ok" >>"$SUMMARY"
  fi
}

ext_report() {  # the CUDA kernels must be compiled (prebuilt or JIT), not the fallback
  local out
  out=$("$PY" -m engine.ext 2>&1) || { echo "$out"; return 1; }
  echo "$out" | tee -a "$SUMMARY"
  [[ $DRY -eq 1 ]] || grep -q "adamw   cuda: CUDA" <<<"$out"
}

tests() {
  local filter=() rc
  [[ -n "$TEST_FILTER" ]] && filter=(-k "$TEST_FILTER")
  "$PY" -m pytest tests/test_kernels.py tests/test_fused_adamw.py tests/test_fused_elementwise.py -q -rs \
    -p no:cacheprovider --junitxml="$RES/pytest.xml" ${filter[@]+"${filter[@]}"} >/tmp/gpu_check_pytest.txt 2>&1
  rc=$?
  cat /tmp/gpu_check_pytest.txt
  tail -1 /tmp/gpu_check_pytest.txt >>"$SUMMARY"
  return "$rc"
}

suite() {  # the README's test command, on this host; the modules shared among pytest-xdist's workers when it is there
  local rc par=()
  # (whole modules per worker: a module's tests share its fixtures' runs; two torch threads per worker process)
  "$PY" -c 'import xdist' 2>/dev/null && par=(-n "$SUITE_WORKERS" --dist loadfile)
  # -v: a line per test, so a suite cut off by its time limit still shows what ran (the JUnit file comes at the end)
  OMP_NUM_THREADS=2 "$PY" -m pytest "${SUITE_TESTS[@]}" -v -rs -p no:cacheprovider ${par[@]+"${par[@]}"} \
    --junitxml="$RES/suite.xml" >"$RES/suite.txt" 2>&1
  rc=$?
  tail -30 "$RES/suite.txt"
  tail -1 "$RES/suite.txt" >>"$SUMMARY"
  return "$rc"
}

bench() {
  set -o pipefail
  local rc=0 n
  for n in "${BENCH_SIZES[@]}"; do
    "$PY" benchmarks/bench_kernels.py --device "$DEVICE" --params "$n" --out-json "$RES/bench_kernels_$((n / 1048576))M.json" \
      | tee -a "$SUMMARY" || rc=1
  done
  # host-bound: 128 tiny tensors, where the step's Python work (not the kernel) sets the time
  "$PY" benchmarks/bench_kernels.py --device "$DEVICE" --cases adamw-fp32 adamw-bf16-master --params 131072 \
    --tensors 128 --iters 50 --out-json "$RES/bench_kernels_host.json" | tee -a "$SUMMARY" || rc=1
  return "$rc"
}

mfu() {
  "$PY" benchmarks/bench_mfu.py --device "$DEVICE" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} \
    ${MFU_ARGS[@]+"${MFU_ARGS[@]}"} --json "$RES/mfu.json" \
    | tee -a "$SUMMARY"
}

elementwise() {
  "$PY" benchmarks/bench_elementwise.py --device "$DEVICE" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} --json "$RES/elementwise.json" \
    | tee -a "$SUMMARY"
}

loss() {
  "$PY" benchmarks/bench_loss.py --device "$DEVICE" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} --json "$RES/loss.json" \
    | tee -a "$SUMMARY"
}

train() {
  rm -rf runs/gpu-check/profile  # (a trace of an earlier run, e.g. a --cpu-dry-run, would be taken for this one's)
  "$PY" examples/pretrain_llama.py --device "$DEVICE" --precision "$PRECISION" "${TRAIN_MODEL[@]}" --log-interval 1 \
    --run-name gpu-check --metrics-file "$RES/train_metrics.jsonl" --plot /tmp/gpu-check-loss.png \
    --save /tmp/gpu-check-ckpt || return 1
  set -o pipefail
  cp runs/gpu-check/profile/ops_rank0_*.txt "$RES/train_ops.txt" || return 1
  grep "GPU busy" "$RES/train_ops.txt" | sed 's/^/train profile: /' | tee -a "$SUMMARY" || true  # (CUDA only)
  "$PY" - "$RES/train_metrics.jsonl" "$PROFILED_FROM" runs/gpu-check/profile <<'EOF' | tee -a "$SUMMARY"
import glob, json, os, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
steps = [r for r in rows if "event" not in r]
if not steps:
    sys.exit("train: no step lines in the metrics")
unprofiled = [r for r in steps if r["step"] < int(sys.argv[2])]
late = unprofiled[len(unprofiled) // 2:]
(trace,) = glob.glob(os.path.join(sys.argv[3], "trace_rank0_*.json"))
kinds = {}
for e in json.load(open(trace))["traceEvents"]:
    kinds[e.get("cat")] = kinds.get(e.get("cat"), 0) + 1
print(f"train profile: {os.path.basename(trace)} {os.path.getsize(trace) / 2**20:.1f} MiB, events by kind {kinds}; "
      f"memory snapshots {[os.path.basename(p) for p in glob.glob(os.path.join(sys.argv[3], 'memory_*.pickle'))]}")
print(f"train: {len(steps)} steps, loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}, "
      f"median tokens/s {statistics.median(r['tokens_per_s'] for r in late):,.0f}, "
      f"TFLOP/s/device {statistics.median(r['tflops_per_device'] for r in late):.1f}, mfu {late[-1]['mfu']}, "
      f"peak mem {max(r['peak_mem_bytes'] for r in steps) / 2**30:.2f} GiB, first step {steps[0]['step_time_s']:.1f} s, "
      f"phases (median s) {({k: round(statistics.median(r[k] for r in late), 4) for k in ('data_s', 'forward_backward_s', 'grad_sync_s', 'optimizer_s')})}, "
      f"compiled frames per step {[r.get('compiled_frames') for r in steps]}, "
      f"graph breaks {sum(r.get('graph_breaks') or 0 for r in steps)}")
EOF
}

export DRY STAGES DEVICE PRECISION SUITE_WORKERS TEST_FILTER SUMMARY PROFILED_FROM BENCH_ARGS_STR="${BENCH_ARGS[*]}" MFU_ARGS_STR="${MFU_ARGS[*]}"
export -f env_info deps build ext_report tests suite bench mfu elementwise loss train
note "gpu_check $(date -u +%FT%TZ) dry_run=$DRY stages=$STAGES budget=${BUDGET}s out=$OUT"
stage env 60 bash -c env_info
stage deps 120 bash -c deps
stage build 420 bash -c build
stage ext 300 bash -c ext_report
stage tests 120 bash -c tests
# arrays do not cross `bash -c`: pass the sizes, the test paths and the model flags as words
export BENCH_SIZES_STR="${BENCH_SIZES[*]}" TRAIN_MODEL_STR="${TRAIN_MODEL[*]}" SUITE_TESTS_STR="${SUITE_TESTS[*]}"
stage suite 240 bash -c 'SUITE_TESTS=($SUITE_TESTS_STR); suite'
stage bench 90 bash -c 'BENCH_SIZES=($BENCH_SIZES_STR); bench'
stage mfu 360 bash -c 'BENCH_ARGS=($BENCH_ARGS_STR); MFU_ARGS=($MFU_ARGS_STR); mfu'
stage elementwise 150 bash -c 'BENCH_ARGS=($BENCH_ARGS_STR); elementwise'
stage loss 60 bash -c 'BENCH_ARGS=($BENCH_ARGS_STR); loss'
stage train 150 bash -c 'TRAIN_MODEL=($TRAIN_MODEL_STR); train'
note "failed stages: $FAILED"
[[ -z $SKIPPED ]] ||
  note "skipped for time; in a second call: bash benchmarks/gpu_check.sh --stages $SKIPPED --budget SECONDS"
echo "==== summary ($SUMMARY)"
cat "$SUMMARY"
exit "$FAILED"
