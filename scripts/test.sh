#!/usr/bin/env bash
# Sets up the environment if needed and runs the test suite (8 forced CPU devices; 35-40 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q tests "$@"
