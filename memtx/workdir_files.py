"""The readers of what memtx writes into a work directory and reads back: each checks what it reads
(type, fields) and names the file and the field in one line, whatever the damage (cut short, the
wrong JSON type, wrong field types, a directory in its place, binary garbage, empty).

  config.json        memtx.config.load_json (the config's own checks)
  run_info.json      read_run_info: the training corpus's fingerprint(s)
  metrics.jsonl      read_metrics: one JSON object per line; a damaged line is skipped, not fatal
  eval_*.json        read_result: an evaluation to reuse; a damaged one is evaluated again
  cache_fit_*.json   memtx.cache_tuning.load_fit
  checkpoints/       STEP/memtx_integrity.json: checkpoint_integrity.verify; memtx_owner.json (a
                     separate checkpoint directory's): checkpoint_owner.read_owner; STEP/data (the
                     data streams' positions): memtx.data.stream.state_problem, then the stream's restore

tests/test_workdir_files.py damages each in every way for its reader (and hypothesis tries any JSON);
tests/test_damaged_work_directory.py runs every tool that reads one over it damaged.

No JAX here.
"""

from __future__ import annotations

import json
import os
import sys

from memtx.errors import ConfigError


class DamagedFile(ConfigError):
    """A work-directory file that cannot be what memtx wrote; the message is one line."""


def read_json(path: str, expect: type = dict):
    """The JSON value of `path`, which must be a `expect`; anything else is one DamagedFile line."""
    if os.path.isdir(path):
        raise DamagedFile(f"{path} is a directory, not the file memtx wrote; move it away")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as e:
        raise DamagedFile(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:  # binary garbage, cut short, empty
        raise DamagedFile(f"{path} is damaged (not valid JSON: {' '.join(str(e).split())[:80]})") from None
    if not isinstance(value, expect):
        raise DamagedFile(f"{path} is damaged: a JSON {expect.__name__} was expected, got {type(value).__name__}")
    return value


def output_dir_problem(path: str) -> str | None:
    """Why `path`, a directory written later, could not be (its nearest existing ancestor is a
    file, or not writable), or None; checked before any work."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def _fingerprint_problem(value) -> str | None:
    if not isinstance(value, dict):
        return f"must be an object, got {type(value).__name__}"
    if not isinstance(value.get("sha256"), str):
        return "has no sha256 string"
    return None


def read_run_info(workdir: str) -> dict:
    """WORKDIR/run_info.json ({} when there is none): {"corpus": fingerprint, "previous_corpus": [...]}."""
    path = os.path.join(workdir, "run_info.json")
    if not os.path.lexists(path):
        return {}
    info = read_json(path)
    if "corpus" in info and (problem := _fingerprint_problem(info["corpus"])):
        raise DamagedFile(f"{path}: field 'corpus' {problem}; delete the file to record the corpus afresh")
    previous = info.get("previous_corpus", [])
    if not isinstance(previous, list) or any(_fingerprint_problem(p) for p in previous):
        raise DamagedFile(f"{path}: field 'previous_corpus' must be a list of fingerprints; delete the file to "
                          "record the corpus afresh")
    return info


def metrics_record(line: str) -> dict | None:
    """One metrics.jsonl line as a dict, or None: blank, cut short, not JSON, not an object, a
    step that is not a non-negative integer, or a loss, grad_norm or learning_rate that is not a
    number."""
    if not line.endswith("\n") or not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    for key in ("loss", "grad_norm", "learning_rate"):  # numbers when present (a nan loss is a measurement)
        if key in record and (isinstance(record[key], bool) or not isinstance(record[key], (int, float))):
            return None
    return record


def read_metrics(workdir: str) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl; damaged lines (metrics_record) are skipped with a
    note. A directory in its place, or a file that cannot be read, is one line."""
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.isdir(path):
        raise DamagedFile(f"{path} is a directory, not the file memtx wrote; move it away")
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except OSError as e:
        raise DamagedFile(f"cannot read {path}: {e.strerror or e}") from None
    records = [metrics_record(line) for line in lines]
    damaged = sum(1 for r, line in zip(records, lines) if r is None and line.strip())
    if damaged:
        print(f"note: skipped {damaged} damaged line(s) of {path}", file=sys.stderr)
    return [r for r in records if r is not None]


def read_result(path: str) -> dict | None:
    """An evaluation result to reuse, or None (with a note) when it is damaged: evaluated again (and
    written over). A directory in its place cannot be written over: one line."""
    if os.path.isdir(path):
        raise DamagedFile(f"{path} is a directory, not the result memtx wrote; move it away")
    try:
        result = read_json(path)
    except DamagedFile as e:
        print(f"note: {e}; evaluating again", file=sys.stderr)
        return None
    numbers = ("nll_sum", "tokens", "perplexity")
    if not all(isinstance(result.get(k), (int, float)) and not isinstance(result.get(k), bool) for k in numbers) \
            or not isinstance(result.get("documents_nll"), dict):
        print(f"note: {path} lacks the fields of an evaluation ({', '.join(numbers)}, documents_nll); "
              "evaluating again", file=sys.stderr)
        return None
    return result
