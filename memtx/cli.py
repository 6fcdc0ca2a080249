"""Shared command-line handling: config selection, overrides, one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from memtx.config import Config, ConfigError, apply_override, load_config_file, load_json, parse_overrides
from memtx.errors import UsageError  # noqa: F401 - re-exported: the tools raise it as memtx.cli.UsageError


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


def parse_int_list(option: str, text: str) -> list[int]:
    """'0,256,1024' -> [0, 256, 1024]; anything but non-negative integers is a one-line error."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated integers, got '{text}'") from None
    if not values or min(values) < 0:
        raise UsageError(f"{option} must be non-negative integers, got '{text}'")
    return values


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and no abbreviated options."""

    def __init__(self, print_config: bool = True, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)
        if print_config:  # every tool that resolves a config (train, evaluate, generate, compare, fit, studies, benchmarks)
            self.add_argument("--print-config", action="store_true",
                              help="print the resolved config (file or work directory, with overrides) as JSON and exit")

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main: Callable[[argparse.Namespace, list[str]], int], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> int:
    """Parses arguments and runs `main`, turning expected errors into one line and exit code 2."""
    from memtx.data.corpus import CorpusError

    global PRINT_CONFIG
    args, rest = parser.parse_known_args(argv)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
