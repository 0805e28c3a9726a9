#!/usr/bin/env bash
# Sets up fastcells and runs the main job: the airline-passengers forecaster
# (2-layer LSTM and GRU, hidden 6, 1000 epochs) trained with torch.nn and with
# fastcells from the same initial weights, printing the comparison table.
# Extra arguments go to benchmarks/forecast_airline.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" benchmarks/forecast_airline.py "$@"
