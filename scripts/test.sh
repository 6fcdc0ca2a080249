#!/usr/bin/env bash
# Sets up the environment if needed and runs the test suite (8 forced CPU devices per process), its
# test files spread over the cores by pytest-xdist (at most 4 workers; MEMTX_TEST_WORKERS=0 runs it in
# this one process). About 9 min on 2 cores; -m "not slow": the fast tier, under 3 min.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
cores=$(nproc)
workers=${MEMTX_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
[ "$workers" = 1 ] && workers=0
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile tests "$@"
