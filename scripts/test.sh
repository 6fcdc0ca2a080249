#!/usr/bin/env bash
# Sets up the environment if needed and runs the test suite (8 forced CPU devices; about 20 min on 2 cores;
# -m "not slow": the fast tier, under 5 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q tests "$@"
