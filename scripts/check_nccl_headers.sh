#!/usr/bin/env bash
# Compiles the C library (csrc/core, csrc/kernels) against the headers of every NCCL release
# ncclep supports, for sm_90, and fails on the first error: `make check-nccl` in examples/c_api.
# Each release's headers come from its nvidia-nccl-cu13 wheel, kept (headers only) under
# ${XDG_CACHE_HOME:-~/.cache}/ncclep/nccl-headers/<version>/include and reused from there.
#
#   bash scripts/check_nccl_headers.sh            # every release below
#   bash scripts/check_nccl_headers.sh 2.30.7     # only these
set -euo pipefail
cd "$(dirname "$0")/.."

# torch 2.11: 2.28.9, torch 2.12 and 2.13: 2.29.7, torch 2.14: 2.30.7, the newest wheel: 2.32.3.
VERSIONS=(2.28.9 2.29.7 2.30.7 2.32.3)
if [ $# -gt 0 ]; then VERSIONS=("$@"); fi
PY=${PYTHON:-python3}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/ncclep/nccl-headers
JOBS=2  # CI has 2 cores
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# Leaves the wheel's nvidia/nccl/include at $CACHE/$1/include; the wheel itself is not kept.
fetch_headers() {
  local version=$1 dest=$CACHE/$1 tmp=$TMP/$1
  [ -f "$dest/include/nccl_device.h" ] && return 0
  echo "check_nccl_headers: fetching the NCCL $version headers (nvidia-nccl-cu13==$version)" >&2
  "$PY" -m pip download -q --no-deps -d "$tmp/wheel" "nvidia-nccl-cu13==$version"
  "$PY" - "$tmp"/wheel/*.whl "$tmp/unpacked" <<'PYTHON'
import sys
import zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    z.extractall(out, [n for n in z.namelist() if n.startswith("nvidia/nccl/include/")])
PYTHON
  # Moved into place whole, so that an interrupted run leaves no half set behind.
  mkdir -p "$dest"
  rm -rf "$dest/include"
  mv "$tmp/unpacked/nvidia/nccl/include" "$dest/include"
  rm -rf "$tmp"
}

start=$SECONDS
for version in "${VERSIONS[@]}"; do
  fetch_headers "$version"
  IFS=. read -r major minor patch <<<"$version"
  code=$(sed -n 's/^#define NCCL_VERSION_CODE \([0-9]*\)$/\1/p' "$CACHE/$version/include/nccl.h")
  if [ "$code" != $((major * 10000 + minor * 100 + patch)) ]; then
    echo "check_nccl_headers: $CACHE/$version/include/nccl.h has NCCL_VERSION_CODE '$code', not $version" >&2
    exit 1
  fi
  t0=$SECONDS
  if ! make -s -C examples/c_api -j"$JOBS" check-nccl NCCL_HOME="$CACHE/$version"; then
    echo "check_nccl_headers: FAILED to compile against the NCCL $version headers" >&2
    exit 1
  fi
  echo "check_nccl_headers: NCCL $version ok ($((SECONDS - t0)) s)" >&2
done
echo "check_nccl_headers: the C library compiles against NCCL ${VERSIONS[*]} ($((SECONDS - start)) s)" >&2
