#!/usr/bin/env bash
# Sets up fastcells (scripts/setup.sh) and runs the test suite.
# FASTCELLS_SLOW=1 enables the long variants; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@" tests
