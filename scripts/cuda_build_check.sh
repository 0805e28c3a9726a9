#!/usr/bin/env bash
# Builds the CUDA extension of the committed tree (HEAD) against a CUDA build of
# torch and imports it, on a machine without a GPU: compiles ops.cpp with
# WITH_CUDA, links against libtorch_cuda and resolves every symbol at import.
# Run it before spending device time. Not part of CI: the CUDA torch
# is ~5 GB. Needs nvcc (CUDA_HOME, default /usr/local/cuda) and python3.12.
#
#   bash scripts/cuda_build_check.sh            # torch 2.11.0 (what the H200 image has)
#   TORCH_VERSION=2.13.0 bash scripts/cuda_build_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
VENV="${VENV:-/tmp/fastcells-cuda-venv-$TORCH_VERSION}"
WORK="${WORK:-/tmp/fastcells-cuda-build}"
PY="${PYTHON:-python3.12}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" numpy setuptools ninja
fi
rm -rf "$WORK" && mkdir -p "$WORK"
git archive HEAD | tar -x -C "$WORK"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# torch's CUDA headers include cuBLAS/cuSPARSE/cuSOLVER headers, which come
# with torch's nvidia-* wheels (a toolkit without those libraries lacks them).
export CPATH="$(ls -d "$SITE"/nvidia/cu*/include 2>/dev/null | head -1)${CPATH:+:$CPATH}"
(cd "$WORK" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-2}" \
  "$VENV/bin/python" setup.py build_ext --inplace >"$WORK/build.log" 2>&1) \
  || { tail -30 "$WORK/build.log"; echo "cuda_build_check: build FAILED (log: $WORK/build.log)"; exit 1; }
info=$(cd /tmp && PYTHONPATH="$WORK" "$VENV/bin/python" -c \
  "import fastcells; print(fastcells._ops.build_info())") \
  || { echo "cuda_build_check: import FAILED"; exit 1; }
case "$info" in
  *cuda=1*) echo "cuda_build_check: OK (torch $TORCH_VERSION, $info)" ;;
  *) echo "cuda_build_check: built without CUDA ($info)"; exit 1 ;;
esac
