#!/usr/bin/env bash
# One GPU session's measurements, in one command that fits a short lease:
#   1. sequential vs cohort local training: CUDA kernels per round and samples/s for
#      simple_cnn and resnet18 in fp32 and bf16 (benchmarks/perf/cohort.py);
#   2. the Fashion-MNIST paper grid (benchmarks/fmnist_paper.yaml, 6 cells of 50 rounds)
#      packed on the one GPU: every cell in its own process, cohort training, plus the
#      FedAvg/pixel cell once more with sequential training, to time both end to end
#      under the same packing. Cells checkpoint every round: running this again resumes.
# Writes grouped_conv.md, kernels.md, cohort.md, grid.log, projection.md, metrics.tgz (the run folders without
# checkpoints) and runs.tgz (with them; in parts runs.tgz.part-* over 15 MB) to $OUT
# (default ./gpu-out). FEDBENCH_DATA must hold FashionMNIST.
#   GRID_SECONDS=330 bash benchmarks/perf/gpu_session.sh
# To go on from an earlier session's cells (of this code: cells checkpointed before the
# epoch-start draws of 2026-11-26 drew another CUDA stream; start those afresh), unpack its
# runs.tgz in the repository root and carry runs/ to the machine: every cell resumes from
# its last checkpoint (same device kind:
# GPU and CPU runs of one seed differ, see benchmarks/perf/README.md).
# PERF_SECONDS=0 skips stage 1, whose first table is benchmarks/perf/grouped_conv.py (the
# cohort's convolutions alone; PERF_CONV=0 skips it, PERF_CONV_SECONDS, default 120), then
# benchmarks/perf/kernels.py (PERF_KERNELS=0
# skips it; PERF_KERNELS_SECONDS, default 360; PERF_KERNELS_ARGS, e.g. "--variants base
# matmul"; its samples/s also go to kernels.json), then cohort.py's table (PERF_COHORT=0 skips it,
# PERF_SECONDS its limit). GRID_CONVOLUTION sets stage 2's train.cohort_convolution: grouped,
# matmul, triton, or faster (what this call's kernels.json found faster: matmul or triton
# only with a 5% lead over base, measured on Fashion-MNIST's simple_cnn, so keep GRID_CELLS
# to those; grouped without a kernels.json). Cells of matmul or triton go to a folder of
# their own (..._matmul, ..._triton): to resume them in a later call, name it in
# GRID_CONVOLUTION. A lent machine allows 600 s a command and 15 minutes a session (about
# 30 s to start one): the next lease is two calls, the second at once (the machine stays
# warm 30 s). 2026-11-27: cuDNN's grouped convolution ran one launch per client in TF32
# with layout conversions, at least 2,570 kernels a step; matmul's local training took 14%
# longer in the grid. Since then train.cohort_convolution=triton launches each convolution
# once for all clients (fedbench.client_conv; tested on CPU in Triton's interpreter, and
# compiled for sm_90 without a GPU: the first call shows what its kernels are worth, at 16
# cells a step and at 64: its launches do not grow with the clients, so a larger pack may
# fill more of the GPU, where cuDNN's per-client launches cannot). Each variant and cell
# count runs in a process of its own (about 60 s on the H100, estimated; triton first, so
# a call cut short at its limit loses base at 64 cells first); the call starts
# with the tests that need a GPU (pytest must be installed there: carry its wheels,
# pytest, pluggy and iniconfig, with the others):
#   CUDA_TESTS_SECONDS=90 PERF_CONV=0 PERF_KERNELS_ARGS="--cells 16 64 --variants triton base"
#   PERF_KERNELS_SECONDS=270 PERF_COHORT=0 PERF_SDFC=0 PERF_FISHER=0 PERF_SERVER=0 PERF_EVAL=0
#   PERF_TOGETHER=0 PERF_COMPILE= GRID_SECONDS=0 bash benchmarks/perf/gpu_session.sh
# then at once (the same command whatever the first found; GRID_SECONDS=360 fits the lease's
# 15 minutes after a first call of about 390 s) the grid as the first call's kernels.json
# calls for (GRID_PLAN=auto, kernels.py grid_plan, from the copy the first call left in runs/):
# triton if it beat base by 5% per step, else grouped (in TF32, 16 cells a process, two
# processes: 4,237 cell-rounds/h); 64 cells (both malicious fractions) in two processes of 32
# if that convolution trained at least 1.5 times its samples/s at 64 cells that it did at 16,
# else 32 cells (30% malicious) in two of 16:
#   PERF_SECONDS=0 GRID_SECONDS=360 GRID_FILE=benchmarks/paper.yaml GRID_PLAN=auto GRID_JOBS=2
#   GRID_COMPILE=reduce-overhead GRID_SEQUENTIAL=0 bash benchmarks/perf/gpu_session.sh
# On the first H200 session stage 1 did not finish in 120 s (its rows now print as
# they are measured), so give it 240. GRID_SECONDS=0 skips stage 2.
# PERF_MODELS (default "simple_cnn resnet18") picks stage 1's models; PERF_SDFC=0 skips its
# simple_cnn + sdfc row (PERF_SDFC_SECONDS, default 150); PERF_FISHER=0 skips the table of SDFC's
# Fisher hooks one by one vs together, and compiled in PERF_FISHER_COMPILE (default reduce-overhead; ""
# skips) (PERF_FISHER_SECONDS, default 180); PERF_SERVER=0 skips the table of
# FLTrust's server update alone vs as a cohort row (PERF_SERVER_SECONDS, default 90); PERF_EVAL=0 skips
# the table of the round's evaluation, torchmetrics vs compiled (PERF_EVAL_SECONDS, default 120); PERF_COMPILE (default "default
# reduce-overhead"; "" skips) adds the compiled cohort's rows (train.compile) for
# PERF_COMPILE_MODELS, PERF_COMPILE_SECONDS (default 180) per mode. GRID_COMPILE=MODE
# compiles stage 2's cohort cells (into runs/fmnist_paper_gpu_compiled_MODE). PERF_TOGETHER=0
# skips the cross-cell cohort rows (benchmarks/perf/together.py, pixel pattern, uncompiled and
# each PERF_COMPILE mode, PERF_TOGETHER_SECONDS each). Under reduce-overhead both tables end
# with the CUDA graphs skipped and recorded and the rounds trained: recordings that grow with
# the rounds mean a graph records again each round (its static tensors moved).
# GRID_PACK=K trains stage 2's cohort cells K per process (--cells-per-process K). Stage 2
# ends with the projected time of the full paper grid (benchmarks/perf/projection.py: the
# cohort cells' rounds after every cell's first, throughput and start-up, into projection.md).
# GRID_FILE (default benchmarks/fmnist_paper.yaml) and GRID_CELLS (patterns, e.g.
# 'fashion_mnist-beta0.5-*-mal0.3-*' of benchmarks/paper.yaml: every attack and defense of the
# full grid) pick stage 2's cells; GRID_JOBS (default 6) processes at once.
# GRID_SEQUENTIAL=0 leaves out the sequential FedAvg cell (it shares the GPU with the cohort
# cells, so the projection is measured beside it unless left out). GRID_FLAGS adds options to
# the cohort grid (e.g. "--set data.train_subset=3000" for a dry run).
# DEVICE=cpu: a dry run of every stage on a machine without a GPU (numbers meaningless).
# CPU_GRID="FILE..." puts the machine's spare CPU cores to work meanwhile (they share the
# cores with stage 1's launching thread: keep CPU_JOBS a few below the core count): the grids'
# cells run on CPU (CUDA hidden, so each cell's config is the one a CPU machine runs; CPU_JOBS
# at a time, only cells matching the patterns in CPU_CELLS), one file after the other until
# CPU_SECONDS have passed in all; finished cells come back in cpu_cells.tgz (metrics,
# summaries, logs; no checkpoints: on a machine still warm a second call resumes them).
# EQUAL_CELL=ID re-runs one cell of the first file that a CPU machine already finished, to
# compare the numbers across machines.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
gpu_state() { command -v nvidia-smi >/dev/null && nvidia-smi "$@"; }
gpu_state -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

cpu_deadline=$(( $(date +%s) + ${CPU_SECONDS:-420} ))
cpu_grid() {  # grid file, output folder, patterns...
  local file=$1 out=$2; shift 2
  local patterns=(); for p in "$@"; do patterns+=(--cells "$p"); done
  local left=$(( cpu_deadline - $(date +%s) ))
  [ "$left" -gt 60 ] || return 0
  CUDA_VISIBLE_DEVICES= timeout -k 30 "$left" $PY -m fedbench.cli grid "$file" --out "$out" \
    --jobs "${CPU_JOBS:-12}" --set wandb.mode=disabled "${patterns[@]}"
}
if [ -n "${CPU_GRID:-}" ]; then
  first=${CPU_GRID%% *}
  [ -n "${EQUAL_CELL:-}" ] && CPU_JOBS=1 cpu_grid "$first" runs/cpu_equal "$EQUAL_CELL" >"$OUT/cpu_equal.log" 2>&1 &
  (set -f; for file in $CPU_GRID; do
     stem=$(basename "$file" .yaml)
     cpu_grid "$file" "runs/cpu_grid/$stem" ${CPU_CELLS:-*} >"$OUT/cpu_grid_$stem.log" 2>&1
   done) &
fi

# the tests that need a GPU, first: the Triton convolution's (every test of it runs on the
# GPU there: values against sums by hand, a cohort against sequential training, CUDA graph
# replays, SDFC's Fisher passes under CUDA graphs, bit-for-bit repeats) and fabric.tf32's;
# the CUDA-only ones (on_cuda in their names) before the others, so a limit cuts the others
# first; CUDA_TESTS=0 skips, CUDA_TESTS_SECONDS limits both
if [ "${CUDA_TESTS:-1}" = 1 ] && [ "$DEVICE" != cpu ]; then
  timeout "${CUDA_TESTS_SECONDS:-150}" bash -c "$PY -m pytest -q -p no:cacheprovider -k on_cuda \
    tests/test_client_conv.py; $PY -m pytest -q -p no:cacheprovider -k 'not on_cuda' tests/test_client_conv.py \
    tests/test_tf32.py" 2>&1 | tail -40 | tee "$OUT/cuda_tests.log"
fi

if [ "${PERF_SECONDS:-240}" != 0 ]; then  # 0: skip (a second call that only resumes the grid)
  # where a packed compiled round's GPU time goes, per kernel and kind, and what TF32, cuDNN's
  # float32 kernels or autotuner, bf16 and convolutions as matrix products change
  # (benchmarks/perf/kernels.py: 16 cells x 10 clients, reduce-overhead, ms per step)
  # GRID_CONVOLUTION=faster and GRID_PLAN=auto read this call's measurement, else the copy in
  # runs/ that an earlier call of this lease left on the machine (ignored files stay between calls)
  rm -f "$OUT/kernels.json"; [ "${PERF_KERNELS:-1}" = 1 ] && rm -f runs/gpu_kernels.json
  # the cohort's two convolutions alone, forward and backward, uncompiled, in each way torch
  # can run them (benchmarks/perf/grouped_conv.py: 160 clients x 64 images): a minute
  [ "${PERF_CONV:-1}" = 1 ] && timeout "${PERF_CONV_SECONDS:-120}" $PY benchmarks/perf/grouped_conv.py \
    --device "$DEVICE" 2>&1 | tee "$OUT/grouped_conv.md"
  [ "${PERF_KERNELS:-1}" = 1 ] && timeout "${PERF_KERNELS_SECONDS:-360}" $PY benchmarks/perf/kernels.py \
    --device "$DEVICE" --json "$OUT/kernels.json" ${PERF_KERNELS_ARGS:-} 2>&1 | tee "$OUT/kernels.md"
  [ -f "$OUT/kernels.json" ] && mkdir -p runs && cp "$OUT/kernels.json" runs/gpu_kernels.json
  [ "${PERF_COHORT:-1}" = 1 ] && timeout "${PERF_SECONDS:-240}" $PY benchmarks/perf/cohort.py --device "$DEVICE" \
    --steps 10 --repeat 2 --models ${PERF_MODELS:-simple_cnn resnet18} --precisions 32-true bf16-mixed 2>&1 \
    | tee "$OUT/cohort.md"
  # SDFC's calibration term in every step (stacked in the cohort); its Fisher hooks on a 6000-image pool
  [ "${PERF_SDFC:-1}" = 1 ] && timeout "${PERF_SDFC_SECONDS:-150}" $PY benchmarks/perf/cohort.py --device "$DEVICE" \
    --steps 10 --repeat 2 --models simple_cnn --defense sdfc --train-subset 6000 2>&1 | tee -a "$OUT/cohort.md"
  # SDFC's Fisher hooks after a round, client by client vs the cohort's together (benchmarks/perf/fisher.py)
  fisher_compile=${PERF_FISHER_COMPILE-reduce-overhead}
  [ "${PERF_FISHER:-1}" = 1 ] && timeout "${PERF_FISHER_SECONDS:-180}" $PY benchmarks/perf/fisher.py --device "$DEVICE" \
    --estimators published ${fisher_compile:+--compile "$fisher_compile"} 2>&1 | tee -a "$OUT/cohort.md"
  # FLTrust's server update trained alone at aggregation vs as one more cohort row (benchmarks/perf/server_update.py)
  [ "${PERF_SERVER:-1}" = 1 ] && timeout "${PERF_SERVER_SECONDS:-90}" $PY benchmarks/perf/server_update.py --device "$DEVICE" \
    --steps 10 2>&1 | tee -a "$OUT/cohort.md"
  # the round's evaluation, torchmetrics batch by batch vs compiled in each mode (benchmarks/perf/evaluation.py)
  [ "${PERF_EVAL:-1}" = 1 ] && timeout "${PERF_EVAL_SECONDS:-120}" $PY benchmarks/perf/evaluation.py --device "$DEVICE" \
    --compile default reduce-overhead 2>&1 | tee -a "$OUT/cohort.md"
  # cross-cell cohorts: 1, 2, 4 and 7 cells' clients in one cohort (fedbench.together), the
  # paper's pixel pattern (3 attackers per cell), uncompiled and in each mode of PERF_COMPILE
  if [ "${PERF_TOGETHER:-1}" = 1 ]; then
    for mode in "" ${PERF_COMPILE-default reduce-overhead}; do
      timeout "${PERF_TOGETHER_SECONDS:-150}" $PY benchmarks/perf/together.py --device "$DEVICE" --steps 10 \
        --cells 1 2 4 7 --attack pixel_pattern ${mode:+--compile "$mode"} 2>&1 | tee -a "$OUT/cohort.md"
    done
  fi
  # the cohort compiled (train.compile), each mode of PERF_COMPILE on PERF_COMPILE_MODELS, fp32
  for mode in ${PERF_COMPILE-default reduce-overhead}; do
    timeout "${PERF_COMPILE_SECONDS:-180}" $PY benchmarks/perf/cohort.py --device "$DEVICE" --steps 10 --repeat 2 \
      --models ${PERF_COMPILE_MODELS:-simple_cnn resnet18} --compile "$mode" 2>&1 | tee -a "$OUT/cohort.md"
  done
fi

if [ "${GRID_SECONDS:-330}" != 0 ]; then
start=$(date +%s)
kernels_json=$OUT/kernels.json; [ -f "$kernels_json" ] || kernels_json=runs/gpu_kernels.json
if [ "${GRID_PLAN:-}" = auto ]; then  # convolution and pack from the kernels table (kernels.py grid_plan)
  read -r GRID_CONVOLUTION GRID_PACK < <( [ -f "$kernels_json" ] && $PY benchmarks/perf/kernels.py \
    --grid-plan "$kernels_json" || echo grouped 16)
  # paper.yaml's Fashion-MNIST cells at beta 0.5: every attack x defense at 30% malicious (32
  # cells, two processes of 16), or at both malicious fractions (64, two of 32)
  GRID_CELLS='fashion_mnist-beta0.5-*-mal0.3-*'; [ "$GRID_PACK" = 32 ] && GRID_CELLS='fashion_mnist-beta0.5-*-mal0.*-*'
  echo "grid plan: $GRID_CONVOLUTION, $GRID_PACK cells a process, cells $GRID_CELLS (kernels.json: $(cat "$kernels_json" 2>/dev/null))"
fi
# shellcheck disable=SC2206  # GRID_FLAGS: options split on spaces
grid_options=(${GRID_FLAGS:-}); [ -n "${GRID_COMPILE:-}" ] && grid_options+=(--set "train.compile=$GRID_COMPILE")
[ -n "${GRID_PACK:-}" ] && grid_options+=(--cells-per-process "$GRID_PACK")
convolution=${GRID_CONVOLUTION:-}
if [ "$convolution" = faster ]; then  # what stage 1's kernels table measured faster, grouped if it has no answer
  convolution=$( [ -f "$kernels_json" ] && $PY benchmarks/perf/kernels.py --faster-convolution "$kernels_json" \
                 || echo grouped)
  echo "grid convolutions: $convolution (kernels.json: $(cat "$kernels_json" 2>/dev/null))"
fi
[ -n "$convolution" ] && grid_options+=(--set "train.cohort_convolution=$convolution")
grid_file=${GRID_FILE:-benchmarks/fmnist_paper.yaml}
set -f; for p in ${GRID_CELLS:-}; do grid_options+=(--cells "$p"); done; set +f  # patterns, not file names
cohort_runs="runs/$(basename "$grid_file" .yaml)_gpu${GRID_COMPILE:+_compiled_$GRID_COMPILE}${GRID_PACK:+_packed_$GRID_PACK}"
case "$convolution" in matmul|triton) cohort_runs+=_$convolution ;; esac
# other settings, other cells: a resumed grid must not continue cells trained under other flags
[ -n "${GRID_FLAGS:-}" ] && cohort_runs+=_$(printf '%s' "$GRID_FLAGS" | tr -c 'A-Za-z0-9._=-' '_')
timeout -k 45 "${GRID_SECONDS:-330}" $PY -m fedbench.cli grid "$grid_file" \
  --out "$cohort_runs" --jobs "${GRID_JOBS:-6}" --set train.cohort=true \
  "${grid_options[@]}" --set wandb.mode=disabled >"$OUT/grid.log" 2>&1 &
cohort_grid=$!
sequential_grid=$cohort_grid
if [ "${GRID_SEQUENTIAL:-1}" = 1 ]; then
  timeout -k 45 "${GRID_SECONDS:-330}" $PY -m fedbench.cli grid benchmarks/fmnist_paper.yaml \
    --out runs/fmnist_paper_gpu_sequential --jobs 1 --set train.cohort=false --set wandb.mode=disabled \
    --cells 'pixel_pattern-fedavg' >"$OUT/grid_sequential.log" 2>&1 &
  sequential_grid=$!
fi
while sleep 30; do  # the GPU grids only: a CPU grid (CPU_GRID) may still be running
  kill -0 $cohort_grid 2>/dev/null || kill -0 $sequential_grid 2>/dev/null || break
  echo "$(( $(date +%s) - start )) s: $(ls "$cohort_runs"/cells/*/summary.json 2>/dev/null | wc -l) cells done;" \
    "$(gpu_state --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
done
wait $cohort_grid $sequential_grid
echo "grid stage: $(( $(date +%s) - start )) s"
tail -n 3 "$OUT"/grid*.log
$PY benchmarks/perf/projection.py "$cohort_runs" --grid benchmarks/paper.yaml --since "$start" 2>&1 \
  | tee "$OUT/projection.md"
grid_runs=("$cohort_runs")
[ "${GRID_SEQUENTIAL:-1}" = 1 ] && [ -d runs/fmnist_paper_gpu_sequential ] && grid_runs+=(runs/fmnist_paper_gpu_sequential)
# metrics.tgz: metrics, summaries, configs and logs, small; runs.tgz adds the checkpoints (to
# resume), cut into parts of 15 MB (files over 16 MB do not come back from a lent machine):
# cat runs.tgz.part-* > runs.tgz
tar czf "$OUT/metrics.tgz" --exclude=checkpoints --exclude=wandb "${grid_runs[@]}"
tar czf "$OUT/runs.tgz" "${grid_runs[@]}"
if [ "$(stat -c %s "$OUT/runs.tgz")" -gt 15000000 ]; then
  split -b 15000000 "$OUT/runs.tgz" "$OUT/runs.tgz.part-" && rm "$OUT/runs.tgz"
fi
fi

if [ -n "${CPU_GRID:-}" ]; then
  wait
  finished=$(grep -l '"status": "finished"' runs/cpu_equal/cells/*/summary.json runs/cpu_grid/*/cells/*/summary.json 2>/dev/null | xargs -r -n1 dirname)
  echo "CPU cells finished: $(echo "$finished" | grep -c .)"
  [ -n "$finished" ] && tar czf "$OUT/cpu_cells.tgz" --exclude=checkpoints --exclude=wandb $finished
  tail -n 2 "$OUT"/cpu_*.log
fi
ls -la "$OUT"
