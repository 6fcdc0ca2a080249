"""Every tool that reads a file back from a work directory, run over that file damaged in each way:
it ends with exit 0 (the damage noted and worked around) or with exit 2 and exactly one `error:`
line naming the file, never a traceback. The damages are generated (tests/test_workdir_files.py's:
cut short, empty, binary garbage, a directory in its place, each other JSON type); every field of
every file, and any JSON at all, is tried on the readers themselves there (hypothesis).

The run: 3 of 6 steps of the tiny model, its checkpoints in a directory of their own (so that the
owner record exists), evaluated once (so that an evaluation result exists)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from memtx import compare as compare_lib
from memtx import evaluate as evaluate_lib
from memtx import evaluation
from memtx import generate as generate_lib
from memtx import train as train_lib
from memtx.checkpoint_integrity import INTEGRITY_FILE, write_record
from memtx.checkpoint_owner import OWNER_FILE
from memtx.cli import run_cli, run_config
from memtx.config import save_json
from tests.helpers import make_corpus, tiny_config
from tests.test_hostile_inputs import assert_one_error_line
from tests.test_workdir_files import FILE_DAMAGES, FIT, damage_file

STEP = 3


def _compare_main(args, rest) -> int:
    """What memtx.compare reads of a run it trained: config.json (is it finished?), metrics.jsonl
    (the last steps' loss) and its evaluation results (reused when they match)."""
    cfg = run_config(args.workdir)
    compare_lib.finished(cfg, args.workdir)
    compare_lib.last_steps_loss(args.workdir, STEP, 2)
    evaluation.evaluate_workdir(args.workdir, cfg, reuse=True)
    return 0


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir")
    return p


# tool name -> (module's main, its parser, arguments after --workdir RUN)
TOOLS = {
    "train": (train_lib.main, train_lib.parser, []),
    "evaluate": (evaluate_lib.main, evaluate_lib.parser, []),
    "generate": (generate_lib.main, generate_lib.parser, ["--prompt", "def", "--max-tokens", "2", "--greedy"]),
    "compare": (_compare_main, _compare_parser, []),
    "evaluate --cache-fit": (evaluate_lib.main, evaluate_lib.parser, ["--cache-sizes", "8", "--cache-fit", "@fit"]),
    "generate --cache-fit": (generate_lib.main, generate_lib.parser, ["--prompt", "def", "--max-tokens", "2",
                                                                      "--cache-fit", "@fit"]),
}

# file -> (where it is in a run, the tools that read it back)
FILES = {
    "config.json": ("run/config.json", ["train", "evaluate", "generate", "compare"]),
    "run_info.json": ("run/run_info.json", ["train"]),
    "metrics.jsonl": ("run/metrics.jsonl", ["train", "compare"]),
    "eval result": ("@eval", ["compare"]),
    "integrity record": (f"ckpt/{STEP}/{INTEGRITY_FILE}", ["train", "evaluate", "generate"]),
    "owner record": (f"ckpt/{OWNER_FILE}", ["train"]),
    "stream state": (f"ckpt/{STEP}/data/metadata", ["train"]),
    "cache fit": ("fit.json", ["evaluate --cache-fit", "generate --cache-fit"]),
}

DAMAGES = [*FILE_DAMAGES, *(f"json_{name}" for name in ("list", "int", "str", "null"))]
JSON_OF = {"json_list": [], "json_int": 7, "json_str": "text", "json_null": None}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    corpus = make_corpus(root / "corpus", num_docs=3)
    cfg = tiny_config(str(corpus), steps=6, checkpoint_every=STEP, stop_after=STEP,
                      checkpoint_dir=str(root / "base" / "ckpt"))
    cfg.data.eval_split = "train"  # the tiny corpus is all training documents
    train_lib.train(cfg, str(root / "base" / "run"))
    evaluation.evaluate_workdir(str(root / "base" / "run"), run_config(str(root / "base" / "run")))
    (root / "base" / "fit.json").write_text(json.dumps(FIT))
    return root / "base"


def copy_run(base: Path, to: Path) -> Path:
    """A copy of the base run whose config and owner record name the copy's own paths."""
    shutil.copytree(base, to)
    cfg = run_config(str(to / "run"))
    cfg.train.checkpoint_dir = str(to / "ckpt")
    save_json(cfg, str(to / "run" / "config.json"))
    (to / "ckpt" / OWNER_FILE).write_text(json.dumps({"workdir": str((to / "run").resolve())}))
    return to


def locate(case: Path, where: str) -> Path:
    if where == "@eval":
        found = sorted((case / "run").glob("eval_*.json"))
        assert len(found) == 1, found
        return found[0]
    return case / where


def damage(path: Path, how: str) -> None:
    text = path.read_text()
    valid = json.loads(text.splitlines()[0] if path.suffix == ".jsonl" else text)
    path.unlink()
    if how in JSON_OF:
        path.write_text(json.dumps(JSON_OF[how]) + "\n")
    else:
        damage_file(path, how, valid)


CASES = [pytest.param(name, tool, how, id=f"{name.replace(' ', '_')}-{tool.replace(' ', '')}-{how}")
         for name, (_, tools) in FILES.items() for tool in tools for how in DAMAGES]


@pytest.mark.parametrize("name, tool, how", CASES)
def test_a_damaged_file_is_worked_around_or_one_line(base, tmp_path, name, tool, how, capsys):
    case = copy_run(base, tmp_path / "case")
    where, _ = FILES[name]
    path = locate(case, where)
    damage(path, how)
    if name == "stream state":  # the damage recorded as if written so: it reaches the stream's own reader
        write_record(str(case / "ckpt" / str(STEP)), STEP)
    main, parser, extra = TOOLS[tool]
    argv = ["--workdir", str(case / "run"), *(str(case / "fit.json") if a == "@fit" else a for a in extra)]
    code = run_cli(main, parser(), argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code == 0:
        return
    assert_one_error_line(code, err, "")
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert path.name in line or str(path.parent) in line, line


def test_the_table_covers_every_file_the_readers_module_names():
    """memtx/workdir_files.py lists what memtx reads back; each of those files is damaged here."""
    import memtx.workdir_files as readers
    listed = readers.__doc__
    for name in ("config.json", "run_info.json", "metrics.jsonl", "eval_*.json", "cache_fit_*.json",
                 "memtx_integrity.json", "memtx_owner.json", "data"):
        assert name in listed, name
    assert len(CASES) >= 100
