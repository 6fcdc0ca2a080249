"""Every numeric flag and every output path of every command line tool, tried with what a user
might type: generated from the parsers, not listed by hand.

A numeric flag declares its range in its type (memtx.cli.Number); nan, inf, -1, 0 and a huge value
are each accepted exactly when the declaration allows them, and otherwise refused with one line
naming the flag (exit 2). An output directory under a file, or on a read-only file system, is one
line before any work, and nothing is created."""

from __future__ import annotations

import argparse

import pytest

from memtx import compare, evaluate, fit, generate, train
from memtx.cli import Number, run_cli
from memtx.data import train_sentencepiece
from memtx.studies import alpha, attention_distance, extrapolation
from tests.helpers import tmpfs

TOOLS = {"train": train, "evaluate": evaluate, "generate": generate, "compare": compare, "fit": fit,
         "extrapolation": extrapolation, "alpha": alpha, "attention_distance": attention_distance,
         "train_sentencepiece": train_sentencepiece}
# What each tool needs besides the flag under test to parse at all.
REQUIRED = {"train": ["--workdir", "w"], "evaluate": ["--workdir", "w"], "generate": ["--workdir", "w"],
            "compare": ["c.py", "--out", "o"], "fit": ["--config", "c.py"], "extrapolation": ["--workdir", "w"],
            "alpha": ["--workdir", "w"], "attention_distance": ["--workdir", "w"],
            "train_sentencepiece": ["--out", "o"]}
TRIED = ["nan", "inf", "-inf", "-1", "0", "1", str(10**30), "1e30"]


def numeric_flags():
    for name, module in TOOLS.items():
        for action in module.parser()._actions:
            if action.option_strings and action.type not in (None, str):
                yield name, module, action


def test_every_numeric_flag_declares_its_range():
    flags = list(numeric_flags())
    assert len(flags) > 15
    bare = [f"{name} {action.option_strings[0]}" for name, _, action in flags if not isinstance(action.type, Number)]
    assert bare == [], f"numeric flags without a declared range (use memtx.cli.Number): {bare}"


@pytest.mark.parametrize("tool, module, action", list(numeric_flags()),
                         ids=[f"{n}{a.option_strings[0]}" for n, _, a in numeric_flags()])
def test_each_numeric_flag_takes_what_it_declares_and_refuses_the_rest_in_one_line(tool, module, action, capsys):
    flag, number = action.option_strings[0], action.type
    for text in TRIED:
        try:
            value = number.kind(text)
            allowed = value == value and abs(value) != float("inf") and number.range.holds(value)
        except ValueError:  # "1e30" is not an integer
            allowed = False
        seen = {}
        code = run_cli(lambda args, rest: seen.setdefault("value", getattr(args, action.dest)) and 0,
                       module.parser(), [*REQUIRED[tool], f"{flag}={text}"])
        err = capsys.readouterr().err
        if allowed:
            assert code == 0 and seen["value"] == number.kind(text), (flag, text, err)
        else:
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert code == 2 and len(errors) == 1 and flag in errors[0] and "Traceback" not in err, (flag, text, err)


OUTPUTS = [("compare", compare, lambda out: ["c.py", "--out", out]),
           ("extrapolation", extrapolation, lambda out: ["--workdir", "w", "--out", out]),
           ("alpha", alpha, lambda out: ["--workdir", "w", "--out", out]),
           ("attention_distance", attention_distance, lambda out: ["--workdir", "w", "--out", out]),
           ("train_sentencepiece", train_sentencepiece, lambda out: ["--out", out + "/sp"])]


@pytest.mark.parametrize("tool, module, argv", OUTPUTS, ids=[o[0] for o in OUTPUTS])
def test_an_output_directory_under_a_file_is_one_line_before_any_work(tool, module, argv, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    code = run_cli(module.main, module.parser(), argv(str(tmp_path / "a_file" / "out")))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "a_file is a file" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_an_output_directory_on_a_read_only_file_system_is_one_line(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "size=1M,ro") as ro:
        for tool, module, argv in OUTPUTS:
            code = run_cli(module.main, module.parser(), argv(str(ro / "out")))
            errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
            assert code == 2 and len(errors) == 1 and "is not writable" in errors[0], (tool, errors)


def test_the_parsers_argument_errors_stay_one_line(capsys):
    assert isinstance(generate.parser(), argparse.ArgumentParser)
    code = run_cli(generate.main, generate.parser(), ["--workdir", "w", "--temperature", "warm"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--temperature expects a number, got 'warm'" in err


def test_comma_separated_sizes_declare_their_minimum(capsys):
    code = run_cli(extrapolation.main, extrapolation.parser(), ["--workdir", "w", "--multiples", "1,0"])
    err = capsys.readouterr().err
    assert code == 2 and "--multiples must be integers >= 1, got '1,0'" in err


def test_a_temperature_too_small_to_divide_by_samples_its_limit_the_argmax():
    import numpy as np

    logits = np.array([0.5, 3.0, -1.0, 2.9])
    rng = np.random.default_rng(0)
    assert {generate.sample(logits, rng, temperature=t) for t in (1e-320, 5e-324)} == {1}
