#!/usr/bin/env bash
# One whole round on a GPU machine: build the extension, run the GPU tests, run a benchmark.
# Usage: scripts/gpu_check.sh OUT_DIR [bench args...]   (logs and results go to OUT_DIR)
# Writes at most 9 files: env.log build.log gpu_tests.log mpi.log moe.log bench.log results.json plot.png
# Env: GPU_TESTS (extra pytest args), SKIP_TESTS, SKIP_MPI, SKIP_MOE, SKIP_BENCH;
#   NCCL_HOME (build the extension and the C examples against that NCCL), FORCE_BUILD=1 (rebuild
#   everything, e.g. after switching NCCL), LD_PRELOAD (e.g. that NCCL's libnccl.so.2; passed to mpirun)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [bench args...]}
shift
mkdir -p "$OUT"
# NVLink multicast stays off: a program that uses it can take the host's shared GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
NGPU=$(nvidia-smi -L | wc -l)
status=0
step() { echo "=== $1 ($(date +%T))"; }

{
  step env
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  nvidia-smi topo -m
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
  $PY -c "import nvidia.nccl, os; print('nccl wheel', nvidia.nccl.__path__[0])"
  echo "NCCL_HOME=${NCCL_HOME:-} LD_PRELOAD=${LD_PRELOAD:-}"
} >"$OUT/env.log" 2>&1

step build
if ! $PY setup.py build_ext --inplace ${FORCE_BUILD:+--force} >"$OUT/build.log" 2>&1; then
  echo "build FAILED (see build.log)"; tail -30 "$OUT/build.log"; exit 1
fi
$PY -c "import ncclep, ncclep._C as c; print('extension', c.version(), 'nccl', c.nccl_version(), 'headers', c.NCCL_HEADER_VERSION)" | tee -a "$OUT/build.log"

step "bring-up"
$PY bench/bringup_report.py 2>&1 | grep -v "^\[" | tee -a "$OUT/build.log"

step "gpu tests"
if [ -z "${SKIP_TESTS:-}" ]; then
  $PY -m pytest tests -m gpu -v -p no:cacheprovider --timeout=300 ${GPU_TESTS:-} >"$OUT/gpu_tests.log" 2>&1 || status=1
  grep -E "FAILED|ERROR|^E |passed|failed" "$OUT/gpu_tests.log" | tail -30
fi

step "mpirun bootstrap"
if [ -z "${SKIP_MPI:-}" ] && command -v mpirun >/dev/null; then
  preload=${LD_PRELOAD:+-x LD_PRELOAD}
  mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE $preload -x PYTHONUNBUFFERED -x PYTHONPATH=$(pwd) \
    $PY -m ncclep.bench --mode ll --tokens 8 --dtype bf16 --iters 5 --warmup 2 --validate \
    --json "$OUT/mpi_results.json" >"$OUT/mpi.log" 2>&1 || status=1
  rm -f "$OUT/mpi_results.json"
  [ -z "${FORCE_BUILD:-}" ] || make -s -C examples/c_api clean
  { echo "--- C API example"; make -s -C examples/c_api -j16 ${NCCL_HOME:+NCCL_HOME=$NCCL_HOME} && \
    mpirun --allow-run-as-root -np "$NGPU" -x NCCL_NVLS_ENABLE $preload examples/c_api/build/bringup /tmp/ncclep_id.$$ && \
    mpirun --allow-run-as-root -np "$NGPU" -x NCCL_NVLS_ENABLE $preload examples/c_api/build/ll_example /tmp/ncclep_ll.$$ && \
    mpirun --allow-run-as-root -np "$NGPU" -x NCCL_NVLS_ENABLE $preload examples/c_api/build/ht_example /tmp/ncclep_ht.$$; } \
    >>"$OUT/mpi.log" 2>&1 || status=1
  tail -12 "$OUT/mpi.log"
fi

step "MoE layer examples"
if [ -z "${SKIP_MOE:-}" ]; then
  for n in 2 "$NGPU"; do
    $PY examples/moe_layer.py --mode decode --nprocs "$n" --check --bench --graph --fp8
    $PY examples/moe_layer.py --mode decode --nprocs "$n" --check --compile
    $PY examples/moe_layer.py --mode train --nprocs "$n" --check --bench --steps 3
  done >"$OUT/moe.log" 2>&1 || status=1
  grep -iE "check|ncclep|reference|error|fail" "$OUT/moe.log" | tail -30
fi

step benchmark
[ -n "${SKIP_BENCH:-}" ] || $PY -m ncclep.bench --validate --json "$OUT/results.json" --plot "$OUT/plot.png" "$@" >"$OUT/bench.log" 2>&1 || status=1
grep -v '^\[\|^    ' "$OUT/bench.log" | tail -60
step "done (status $status)"
exit $status
