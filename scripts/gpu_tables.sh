#!/usr/bin/env bash
# The performance tables, one part per call, on a GPU machine with the extension built
# (scripts/gpu_check.sh builds it and runs the GPU suite first). Every rank's process on its own GPU.
# Usage: scripts/gpu_tables.sh ll|ht OUT_DIR
#   ll: LL kernel / pair / host times at 1-256 tokens, bf16 and fp8, on one node and (2+ GPUs) as
#       2 virtual nodes; the HT per-kernel times at 4096 tokens (the count kernel among them).
#   ht: HT at 4096 tokens with 8, 16 and 24 SMs; 2 virtual nodes (2+ GPUs) at 4096 and 8192 tokens;
#       the DeepEP shim's host cost over the native calls.
# Each part stays under ten minutes on 4x H200; results as JSON and logs in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: scripts/gpu_tables.sh ll|ht OUT_DIR}
OUT=${2:?usage: scripts/gpu_tables.sh ll|ht OUT_DIR}
mkdir -p "$OUT"
# NVLink multicast stays off: a program that uses it can take the host's shared GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
N=$(nvidia-smi -L | wc -l)
START=$(date +%s)
step() { echo "=== $1 (+$(($(date +%s) - START)) s)"; }
status=0
run() {  # run LOG TIMEOUT LINES command...: the command's output into LOG, its last LINES on the terminal
  local log=$1 limit=$2 lines=$3
  shift 3
  timeout "$limit" "$@" >"$OUT/$log" 2>&1 || status=1
  tail -n "$lines" "$OUT/$log"
}

case "$PART" in
  ll)
    B=($PY -m ncclep.bench --mode ll --dtype all --backend cuda --nprocs "$N" --iters 50 --tokens 1,8,32,64,128,256)
    step "LL, one node ($N GPUs)"
    run ll.log 200 40 "${B[@]}" --json "$OUT/ll.json"
    if [ "$N" -ge 2 ]; then
      step "LL, 2 virtual nodes"
      NCCLEP_VIRTUAL_NODES=2 run ll_vn2.log 200 40 "${B[@]}" --json "$OUT/ll_vn2.json"
    fi
    step "HT per kernel, 4096 tokens"
    PHASE_TOKENS=4096 PHASE_DTYPES=bf16,fp8 run ht_phases.log 120 12 $PY bench/ht_phases.py
    ;;
  ht)
    H=($PY -m ncclep.bench --mode ht --dtype all --backend cuda --nprocs "$N" --iters 30 --warmup 5)
    step "HT, 4096 tokens, 8 / 16 / 24 SMs ($N GPUs)"
    run ht.log 220 30 "${H[@]}" --tokens 4096 --sms 8,16,24 --json "$OUT/ht.json"
    if [ "$N" -ge 2 ]; then
      step "HT, 2 virtual nodes, 4096 and 8192 tokens"
      NCCLEP_VIRTUAL_NODES=2 run ht_vn2.log 200 20 "${H[@]}" --tokens 4096,8192 --json "$OUT/ht_vn2.json"
    fi
    step "DeepEP shim's host cost (world $N)"
    run shim_cost.log 120 27 $PY -m ncclep.deep_ep.overhead --gpu --world "$N" --batch 10 --iters 100
    ;;
  *)
    echo "unknown part '$PART': ll or ht" >&2
    exit 2
    ;;
esac
step done
exit $status
