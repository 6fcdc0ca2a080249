"""Train-step time of this working tree against an earlier commit, measured in one run: each
measurement is a fresh process in its own tree, old and new alternate size by size, and every
figure is the fastest of `--rounds` rounds (noise on a loaded machine only ever adds time).

    python benchmarks/compare_revisions.py REV [--config configs/knn.py:cpu] [--sizes 0,1536,8192]
        [--steps 5] [--rounds 2] [--new-only="--config.model.knn.backend=blocked"] [--config.KEY=VALUE ...]

REV is checked out into a temporary git worktree (removed afterwards). Overrides after the
options apply to both trees; `--new-only` ones (new settings the old tree may not know) to this one.
The kNN memory is off at size 0 and every store is full otherwise, as in knn_step_time.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from memtx.cli import ArgumentParser, UsageError, run_cli

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# Runs inside either tree: it uses only what both have (measure, resolve_config).
DRIVER = """
import json, sys
from benchmarks.step_time import measure
from memtx.cli import resolve_config
config, size, steps, overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
cfg = resolve_config(config, None, overrides)
cfg.model.knn.enabled = size > 0
cfg.model.knn.size = max(size, cfg.model.knn.k)
print("RESULT " + json.dumps(measure(cfg, steps, fill_knn=True)))
"""


def measure_in(tree: str, config: str, size: int, steps: int, overrides: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": tree}
    done = subprocess.run([sys.executable, "-c", DRIVER, config, str(size), str(steps), *overrides], cwd=tree,
                          env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"measuring in {tree} failed: {tail}")
    return json.loads(lines[-1][len("RESULT "):])["step_ms"]


def main(args, rest) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    old_tree = tempfile.mkdtemp(prefix="memtx-compare-")
    made = subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", old_tree, args.rev],
                          capture_output=True, text=True)
    if made.returncode:
        raise UsageError(f"cannot check out '{args.rev}': {made.stderr.strip().splitlines()[-1]}")
    try:
        head = subprocess.run(["git", "-C", old_tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        print(f"{args.config} {' '.join(rest)}; old: {args.rev} ({head}); new: this tree {args.new_only}".rstrip())
        best = {}
        for round_ in range(args.rounds):
            for size in sizes:
                for label, tree, extra in (("old", old_tree, []), ("new", ROOT, shlex.split(args.new_only))):
                    ms = measure_in(tree, args.config, size, args.steps, rest + extra)
                    best[label, size] = min(ms, best.get((label, size), float("inf")))
                    print(f"  round {round_ + 1}, size {size:,}, {label}: {ms:.1f} ms", flush=True)
        print("| kNN memory | old step (ms) | new step (ms) | speed-up |")
        print("|---:|---:|---:|---:|")
        for size in sizes:
            old, new = best["old", size], best["new", size]
            print(f"| {size:,} | {old:.1f} | {new:.1f} | {old / new:.2f}x |")
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", old_tree], capture_output=True)
    return 0


if __name__ == "__main__":
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="the earlier commit (any git revision)")
    p.add_argument("--config", default="configs/knn.py:cpu")
    p.add_argument("--sizes", default="0,1536,8192")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-only", default="", help="overrides for this tree only, one quoted string")
    sys.exit(run_cli(main, p))
