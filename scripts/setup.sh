#!/usr/bin/env bash
# Installs what fastcells needs into the current Python and builds the
# extension against the torch that is installed (no isolated build env).
# A torch that is already installed (>= 2.4, CPU or CUDA) is kept; otherwise
# the CPU build of torch 2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) >= (2, 4) else 1)" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q pybind11 ninja numpy pandas pytest hypothesis matplotlib tqdm setuptools wheel
# ONNX export tests (tests/test_onnx.py). The constraint keeps pip from
# replacing the installed torch with a CUDA build several GB in size.
"$PY" -m pip install -q -c constraints.txt onnx onnxruntime onnxscript
# Keras 3 interchange tests (tests/test_keras.py, skipped without keras):
# best effort, the library itself does not need it.
"$PY" -m pip install -q -c constraints.txt keras ||
  echo "keras could not be installed: tests/test_keras.py will skip"
# MAX_JOBS / TORCH_CUDA_ARCH_LIST / FORCE_CUDA are honoured by setup.py.
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import fastcells; print('fastcells', fastcells.__version__, fastcells.build_info())"
