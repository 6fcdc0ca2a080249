"""Shared command-line handling: config selection, overrides, one-line errors."""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
from typing import Callable

from memtx.config import Config, ConfigError, apply_override, load_config_file, load_json, parse_overrides
from memtx.config_schema import Range
from memtx.errors import UsageError  # noqa: F401 - re-exported: the tools raise it as memtx.cli.UsageError
from memtx.workdir_files import output_dir_problem


def resolve_config(config_spec: str | None, workdir: str | None, overrides: list[str]) -> Config:
    """The config file (or, when none is named, the one saved in the work directory) + overrides."""
    saved = os.path.join(workdir, "config.json") if workdir else None
    if config_spec:
        cfg = load_config_file(config_spec)
    elif saved and os.path.exists(saved):
        cfg = load_json(saved)
    else:
        raise ConfigError("no config: pass --config configs/NAME.py[:preset] (or a --workdir holding config.json)")
    for key, text in parse_overrides(overrides):
        apply_override(cfg, key, text)
    if PRINT_CONFIG:
        import json
        from memtx.config import to_dict
        print(json.dumps(to_dict(cfg), indent=2))
        raise SystemExit(0)
    return cfg


def run_config(workdir: str, config_spec: str | None = None, overrides: list[str] = (), split: str | None = None) -> Config:
    """A work directory's config (or `config_spec`) with overrides and the evaluation split
    (memtx.evaluate, memtx.compare)."""
    if not os.path.isdir(workdir):
        raise UsageError(f"work directory '{workdir}' does not exist")
    cfg = resolve_config(config_spec, workdir, list(overrides))
    if split:
        cfg.data.eval_split = split
    return cfg


PRINT_CONFIG = False  # set by run_cli for --print-config: resolve_config prints the config and exits


def parse_int_list(option: str, text: str, minimum: int = 0) -> list[int]:
    """'0,256,1024' -> [0, 256, 1024]; anything but integers >= `minimum` is a one-line error."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated integers, got '{text}'") from None
    if not values or min(values) < minimum:
        what = "non-negative integers" if minimum == 0 else f"integers >= {minimum}"
        raise UsageError(f"{option} must be {what}, got '{text}'")
    return values


def check_output_dir(path: str, option: str) -> None:
    """Before any work: `path` (an output directory, created later) is or can become a writable
    directory; a file in the way or a read-only parent is one line naming `option`."""
    problem = output_dir_problem(path)
    if problem:
        raise UsageError(f"{option} {path}: {problem}")


class Number:
    """An argparse `type` for a numeric flag with its allowed range declared beside it:
    `type=Number(int, ge=1)`. nan and inf are never allowed; a value outside is a one-line error
    ("--seeds must be >= 1, got 0"). Every numeric flag of every tool is one (tested)."""

    def __init__(self, kind: type, *, ge=None, gt=None, lt=None, le=None, note: str = ""):
        self.kind, self.range = kind, Range(ge, gt, lt, le, note)
        self.__name__ = kind.__name__  # argparse names the type in its messages

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {'an integer' if self.kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or not self.range.holds(value):
            raise argparse.ArgumentTypeError(f"must be {'a finite number ' if not math.isfinite(value) else ''}"
                                             f"{self.range.describe()}, got {text}")
        return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and no abbreviated options."""

    def __init__(self, print_config: bool = True, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)
        if print_config:  # every tool that resolves a config (train, evaluate, generate, compare, fit, studies, benchmarks)
            self.add_argument("--print-config", action="store_true",
                              help="print the resolved config (file or work directory, with overrides) as JSON and exit")

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): (must be|expects)", r"\1 \2", message)  # "--seeds must be >= 1, ..."
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main: Callable[[argparse.Namespace, list[str]], int], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> int:
    """Parses arguments and runs `main`, turning expected errors into one line and exit code 2."""
    from memtx.data.corpus import CorpusError

    global PRINT_CONFIG
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as e:  # --help, or a bad flag already reported in one line (ArgumentParser.error)
        return e.code if isinstance(e.code, int) else 2
    PRINT_CONFIG = bool(getattr(args, "print_config", False))
    from memtx.metrics import MetricsWriteError

    try:
        return main(args, rest)
    except (ConfigError, CorpusError, UsageError, MetricsWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        checkpoint = sys.modules.get("memtx.checkpoint")  # imported if a checkpoint was touched at all
        io_failures = (MetricsWriteError, *((checkpoint.CheckpointWriteError, checkpoint.CheckpointDamaged)
                                            if checkpoint else ()))
        if isinstance(e, io_failures) and argv is None:
            # A failed read or write leaves orbax's background threads half done: leave now, without
            # the interpreter's shutdown noise about their abandoned tasks (nothing more to save).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where}: {e.strerror}; free space or choose another directory", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "Unable to initialize backend" not in str(e):  # JAX_PLATFORMS names a platform this machine lacks
            raise
        first = " ".join(str(e).split())
        print(f"error: JAX cannot start its devices: {first[:300]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
