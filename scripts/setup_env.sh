#!/usr/bin/env bash
# Creates ./.venv with the pinned requirements (requirements-data.txt: the core ones plus seqio and
# TensorFlow for the data tasks), libtpu in .venv/libtpu off the import path (requirements-tpu.txt:
# for compiling for TPU slices ahead of time) and memtx installed in editable mode, if it is missing or the
# requirements / pyproject.toml changed since it was made. PYTHON picks the interpreter (default:
# python3). pip's output goes to .venv-setup.log (shown on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
want=$(cat requirements.txt requirements-data.txt requirements-tpu.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat .venv/.memtx-requirements 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "setting up .venv with $($PYTHON --version 2>&1) (one-time, about 2 minutes; log: .venv-setup.log)"
rm -rf .venv
log=.venv-setup.log
if ! { "$PYTHON" -m venv .venv &&
       .venv/bin/python -m pip install --disable-pip-version-check -r requirements-data.txt &&
       .venv/bin/python -m pip install --disable-pip-version-check --no-deps -e . &&
       .venv/bin/python -m pip install --disable-pip-version-check --no-deps --target .venv/libtpu \
         -r requirements-tpu.txt ; } >"$log" 2>&1; then
  tail -20 "$log" >&2
  echo "error: setting up .venv failed; full log in $log" >&2
  exit 1
fi
echo "$want" > .venv/.memtx-requirements
