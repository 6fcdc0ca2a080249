"""Hostile inputs: each must end in exit code 2 with exactly one `error:` line on stderr, no
traceback, and leave an existing run's checkpoints, metrics and config untouched.

The table runs in-process (the commands' own `run_cli`), so it stays fast; the cases that need
another process (a held lock) run in a subprocess with a timeout.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memtx import evaluate as evaluate_lib
from memtx import generate as generate_lib
from memtx import train as train_lib
from memtx.cli import run_cli
from memtx.workdir_lock import WorkdirLock
from tests.helpers import make_corpus, tiny_config, tmpfs

ROOT = Path(__file__).resolve().parents[1]

CONFIG = '''
from memtx.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig

def get_config(preset=None):
    return Config(name="hostile",
                  model=ModelConfig(num_layers=2, d_model=32, num_heads=2, d_ff=64, mem_len=16),
                  data=DataConfig(corpus=CORPUS, seq_len=16, batch_size=4, eval_batch_size=4,
                                  split_fractions=(1, 0, 0)),
                  optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
                  train=TrainConfig(steps=6, log_every=1, checkpoint_every=3),
                  mesh=MeshConfig(shape=(1, 1, 1)))
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, a config file, and a trained run (3 of 6 steps) whose files must never change."""
    tmp = tmp_path_factory.mktemp("hostile")
    corpus = make_corpus(tmp / "corpus", num_docs=3)
    config = tmp / "tiny.py"
    config.write_text(f"CORPUS = {str(corpus)!r}\n" + CONFIG)
    run = tmp / "run"
    cfg = tiny_config(str(corpus), steps=6, checkpoint_every=3, stop_after=3)
    train_lib.train(cfg, str(run))
    files = {
        "syntax.py": "def get_config(:\n",
        "raises.py": "raise RuntimeError('no GPU quota')\n",
        "keyerror.py": "def get_config(preset=None):\n    return {}['missing']\n",
        "noget.py": "X = 1\n",
        "exits.py": "import sys\nsys.exit(3)\n",
        "badname.py": "from memtx.config import Config\n\ndef get_config(preset=None):\n    c = Config()\n"
                      "    c.name = 3\n    return c\n",
        "notconfig.py": "def get_config(preset=None):\n    return 42\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "empty_docs").mkdir()
    for i in range(3):
        (tmp / "empty_docs" / f"doc{i}.txt").write_text("")
    return {"tmp": tmp, "corpus": corpus, "config": config, "run": run}


def snapshot(run: Path) -> dict:
    """Hashes of every file of a run (checkpoints, metrics, config)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock" and "tensorboard" not in p.parts}


def T(*overrides, workdir="run", config="config"):
    """A training command: --config CONFIG --workdir WORKDIR + overrides (names resolved in `world`)."""
    return ("train", config, workdir, list(overrides))


# (case id, command, text the one error line must contain)
CASES = [
    # config values, caught before compiling
    ("data_seed_negative", T("--config.data.seed=-1"), "data.seed"),
    ("train_seed_negative", T("--config.train.seed=-1"), "train.seed"),
    ("train_seed_huge", T("--config.train.seed=99999999999"), "train.seed"),
    ("lr_nan", T("--config.optim.learning_rate=nan"), "finite"),
    ("lr_inf", T("--config.optim.learning_rate=inf"), "finite"),
    ("lr_zero", T("--config.optim.learning_rate=0"), "optim.learning_rate"),
    ("b1_one", T("--config.optim.b1=1.0"), "optim.b1"),
    ("b2_negative", T("--config.optim.b2=-0.1"), "optim.b2"),
    ("weight_decay_negative", T("--config.optim.weight_decay=-1"), "weight_decay"),
    ("clip_negative", T("--config.optim.clip_norm=-1"), "clip_norm"),
    ("warmup_too_long", T("--config.optim.warmup_steps=100"), "warmup_steps"),
    ("stop_after_negative", T("--config.train.stop_after=-5"), "stop_after"),
    ("steps_zero", T("--config.train.steps=0"), "train.steps"),
    ("log_every_zero", T("--config.train.log_every=0"), "log_every"),
    ("checkpoint_every_zero", T("--config.train.checkpoint_every=0"), "checkpoint_every"),
    ("eval_every_negative", T("--config.train.eval_every=-1"), "eval_every"),
    ("layers_zero", T("--config.model.num_layers=0"), "num_layers"),
    ("d_model_negative", T("--config.model.d_model=-4"), "d_model"),
    ("d_model_odd", T("--config.model.d_model=33", "--config.model.num_heads=1"), "even"),
    ("heads_do_not_divide", T("--config.model.num_heads=3"), "num_heads"),
    ("dropout_above_one", T("--config.model.dropout=1.5"), "dropout"),
    ("init_std_zero", T("--config.model.init_std=0"), "init_std"),
    ("dtype_unknown", T("--config.model.dtype=float16"), "model.dtype"),
    ("memory_unknown", T("--config.model.memory=foo"), "model.memory"),
    ("mem_len_negative", T("--config.model.mem_len=-1"), "mem_len"),
    ("clamp_negative", T("--config.model.clamp_len=-1"), "clamp_len"),
    ("knn_layer_outside", T("--config.model.knn.enabled=true", "--config.model.knn.layers=7"), "knn.layers"),
    ("knn_k_zero", T("--config.model.knn.enabled=true", "--config.model.knn.k=0"), "knn.k"),
    ("knn_k_above_size", T("--config.model.knn.enabled=true", "--config.model.knn.size=4",
                           "--config.model.knn.k=8"), "knn.k"),
    ("knn_backend_unknown", T("--config.model.knn.enabled=true", "--config.model.knn.backend=faiss"), "backend"),
    ("knn_gate_nan", T("--config.model.knn.enabled=true", "--config.model.knn.gate_bias_init=nan"), "finite"),
    ("lamemo_option_with_xl", T("--config.model.lamemo.look_ahead=false"), "lamemo"),
    ("qk_norm_with_lamemo", T("--config.model.memory=lamemo", "--config.model.qk_norm=true"), "qk_norm"),
    ("compressive_option_with_xl", T("--config.model.compressive.size=8"), "model.compressive.size"),
    ("compressive_rate_not_dividing", T("--config.model.memory=compressive", "--config.model.compressive.rate=3"),
     "data.seq_len"),
    ("compressive_function_unknown", T("--config.model.memory=compressive", "--config.model.compressive.function=max"),
     "function"),
    ("compressive_size_negative", T("--config.model.memory=compressive", "--config.model.compressive.size=-1"), "size"),
    ("compressive_loss_weight_nan", T("--config.model.memory=compressive", "--config.model.compressive.loss_weight=nan"),
     "loss_weight"),
    ("knn_with_lamemo", T("--config.model.memory=lamemo", "--config.model.knn.enabled=true"), "knn"),
    ("block_recurrent_option_with_xl", T("--config.model.block_recurrent.state_size=8"),
     "model.block_recurrent.state_size"),
    ("block_len_not_dividing", T("--config.model.memory=block_recurrent", "--config.model.block_recurrent.block_len=5",
                                 "--config.model.block_recurrent.layer=-1"), "data.seq_len"),
    ("block_recurrent_gate_unknown", T("--config.model.memory=block_recurrent", "--config.model.block_recurrent.gate=gru",
                                       "--config.model.block_recurrent.layer=-1"), "gate"),
    ("block_recurrent_layer_outside", T("--config.model.memory=block_recurrent"), "model.block_recurrent.layer"),
    ("knn_with_block_recurrent", T("--config.model.memory=block_recurrent", "--config.model.knn.enabled=true",
                                   "--config.model.block_recurrent.layer=-1"), "knn"),
    ("seq_len_zero", T("--config.data.seq_len=0"), "seq_len"),
    ("batch_not_divisible", T("--config.mesh.shape=2,2,2", "--config.data.batch_size=6"), "data-parallel"),
    ("split_no_train", T("--config.data.split_fractions=0,1,1"), "split_fractions"),
    ("eval_split_unknown", T("--config.data.eval_split=dev"), "eval_split"),
    ("eval_max_docs_negative", T("--config.data.eval_max_docs=-1"), "eval_max_docs"),
    ("vocab_unknown", T("--config.data.vocab=foo.txt"), "data.vocab"),
    ("shards_not_dividing", T("--config.data.shards=3"), "shards"),
    ("mesh_too_big", T("--config.mesh.shape=3,3,3"), "mesh.shape"),
    ("mesh_two_fills", T("--config.mesh.shape=-1,-1,1"), "mesh.shape"),
    ("mesh_wrong_rank", T("--config.mesh.shape=8"), "mesh.shape"),
    ("mesh_rule_unknown_axis", T("--config.mesh.rules=(('act_batch', ('data', 'pipeline')),)"), "mesh.rules"),
    ("eval_doc_tokens_with_task", T("--config.data.task=pg19", "--config.data.eval_doc_tokens=100"),
     "data.eval_doc_tokens"),
    ("adaptive_cutoffs_decreasing", T("--config.model.adaptive_cutoffs=100,50"), "model.adaptive_cutoffs"),
    ("adaptive_div_val_too_big", T("--config.model.adaptive_cutoffs=100", "--config.model.adaptive_div_val=64"),
     "model.adaptive_div_val"),
    ("head_dim_negative", T("--config.model.head_dim=-1"), "model.head_dim"),
    ("knn_dtype_unknown", T("--config.model.knn.enabled=true", "--config.model.knn.dtype=float8"), "model.knn.dtype"),
    ("knn_recall_target_above_one", T("--config.model.knn.enabled=true", "--config.model.knn.recall_target=1.5"),
     "model.knn.recall_target"),
    ("lamemo_encoding_unknown", T("--config.model.memory=lamemo", "--config.model.lamemo.encoding=rope"),
     "model.lamemo.encoding"),
    ("query_block_negative", T("--config.model.query_block=-1"), "model.query_block"),
    ("query_block_with_lamemo", T("--config.model.memory=lamemo", "--config.model.query_block=4"), "model.query_block"),
    ("smeared_keys_layer_outside", T("--config.model.smeared_keys=7,"), "model.smeared_keys"),
    ("smeared_keys_with_lamemo", T("--config.model.memory=lamemo", "--config.model.smeared_keys=0,"), "model.smeared_keys"),
    ("loss_mask_unknown", T("--config.data.loss_mask=answers"), "data.loss_mask"),
    ("qk_scale_init_negative", T("--config.model.qk_scale_init=-1"), "model.qk_scale_init"),
    ("qk_scale_init_unnormalised", T("--config.model.qk_scale_init=1"), "model.qk_scale_init"),
    ("knn_query_u_without_u", T("--config.model.knn.enabled=true", "--config.model.knn.query_content_bias=true",
                                "--config.model.content_bias=false"), "model.knn.query_content_bias"),
    ("remat_unknown", T("--config.model.remat=everything"), "model.remat"),
    ("grad_accum_not_dividing", T("--config.train.grad_accum_steps=3"), "train.grad_accum_steps"),
    ("profile_steps_reversed", T("--config.train.profile_steps=3,2"), "train.profile_steps"),
    ("peak_flops_negative", T("--config.train.peak_flops_per_device=-1"), "train.peak_flops_per_device"),
    # too big for this machine: the full estimate, before compiling
    ("model_too_big", T("--config.model.d_model=32768", "--config.model.d_ff=131072"), "GiB"),
    ("segment_too_long", T("--config.data.seq_len=131072", "--config.model.mem_len=131072"), "training needs about"),
    ("knn_store_too_big", T("--config.model.knn.enabled=true", "--config.model.knn.size=400000000"), "needs"),
    # overrides and flags
    ("unknown_key", T("--config.model.nope=1"), "model.nope"),
    ("unknown_section", T("--config.nope.x=1"), "nope"),
    ("bad_int", T("--config.model.num_layers=abc"), "num_layers"),
    ("bad_bool", T("--config.model.pre_norm=maybe"), "pre_norm"),
    ("bad_tuple", T("--config.mesh.shape=a,b"), "mesh.shape"),
    ("unknown_flag", T("--bogus"), "--bogus"),
    ("init_from_missing", T("--config.train.init_from=/no/such/run", workdir="fresh"), "init_from"),
    # data
    ("corpus_missing", T("--config.data.corpus=/no/such/path", workdir="fresh"), "/no/such/path"),
    ("corpus_glob_empty", T("--config.data.corpus=/tmp/*.no-such-extension", workdir="fresh"), "no documents"),
    # config files
    ("config_syntax_error", T(config="syntax.py"), "syntax error"),
    ("config_raises", T(config="raises.py"), "RuntimeError: no GPU quota"),
    ("config_keyerror_inside", T(config="keyerror.py"), "KeyError"),
    ("config_no_get_config", T(config="noget.py"), "no get_config"),
    ("config_not_a_config", T(config="notconfig.py"), "must return"),
    ("config_missing", T(config="/no/such/config.py"), "does not exist"),
    ("config_unknown_name", T(config="txll"), "no config named"),
    ("config_unknown_preset", T(config="txl:nope"), "no preset 'nope'"),
    # work directories
    ("workdir_is_a_file", T(workdir="a_file"), "a_file"),
    ("workdir_under_a_file", T(workdir="a_file/sub"), "a_file"),
    ("knn_option_while_off", T("--config.model.knn.size=64"), "model.knn.enabled=true"),
    ("data_dir_without_task", T("--config.data.data_dir=@tmp"), "data.task"),
    ("config_file_exits", T(config="exits.py"), "sys.exit(3)"),
    ("config_file_name_not_a_string", T(config="badname.py"), "config key 'name'"),
    # sizes that would take hours to trace, refused from a count first
    ("million_layers_no_memory", T("--config.model.num_layers=1000000", "--config.model.mem_len=0"), "num_layers"),
    ("compilation_cache_under_a_file", T("--config.train.compilation_cache_dir=@tmp/a_file/cache"), "a_file"),
    ("mesh_rules_not_pairs", T("--config.mesh.rules=1"), "mesh.rules"),
    ("mesh_rules_bad_target", T("--config.mesh.rules=(('act_batch', 3),)"), "mesh.rules"),
    ("checkpoint_dir_is_a_file", T("--config.train.checkpoint_dir=@tmp/a_file", workdir="fresh"), "a_file"),
    # another run's checkpoints: never written into without --adopt-checkpoints (checkpoint_owner.py)
    ("checkpoint_dir_of_another_run", T("--config.train.checkpoint_dir=@run/checkpoints", workdir="fresh"),
     "--adopt-checkpoints"),
    ("resume_with_checkpoint_dir_moved", T("--config.train.checkpoint_dir=@tmp/elsewhere"), "saved its checkpoints in"),
    ("checkpoint_dir_of_another_run_new_workdir", T("--config.train.checkpoint_dir=@run/checkpoints",
                                                    workdir="another_fresh"), "already holds checkpoints"),
    ("resume_with_another_model", T("--config.model.d_model=64"), "different config"),
    # evaluation flags
    ("eval_knn_sizes_empty", ("evaluate", ["--workdir", "@run", "--knn-sizes", ""]), "--knn-sizes"),
    ("eval_knn_sizes_negative", ("evaluate", ["--workdir", "@run", "--knn-sizes", "-4"]), "--knn-sizes"),
    ("eval_far_reach_zero", ("evaluate", ["--workdir", "@run", "--far-reach", "0"]), "--far-reach"),
    ("eval_copy_ngram_zero", ("evaluate", ["--workdir", "@run", "--copy-ngram", "0"]), "--copy-ngram"),
    ("eval_corpus_of_empty_files", ("evaluate", ["--workdir", "@run", "--corpus", "@tmp/empty_docs"]), "no text"),
    ("eval_workdir_missing", ("evaluate", ["--workdir", "@tmp/nope"]), "does not exist"),
    ("eval_no_such_step", ("evaluate", ["--workdir", "@run", "--step", "999"]), "no checkpoint at step 999"),
    ("eval_corpus_missing", ("evaluate", ["--workdir", "@run", "--corpus", "/no/such/dir"]), "/no/such/dir"),
    ("eval_knn_sizes_without_knn", ("evaluate", ["--workdir", "@run", "--knn-sizes", "0,8"]), "kNN"),
    # generation flags
    ("gen_top_p_zero", ("generate", ["--workdir", "@run", "--prompt", "x", "--top-p", "0"]), "--top-p"),
    ("gen_max_tokens_negative", ("generate", ["--workdir", "@run", "--prompt", "x", "--max-tokens", "-1"]),
     "--max-tokens"),
    ("gen_no_prompt", ("generate", ["--workdir", "@run"]), "exactly one of --prompt"),
    ("gen_prompt_file_missing", ("generate", ["--workdir", "@run", "--prompt-file", "/no/such"]), "/no/such"),
    ("gen_cache_fit_missing", ("generate", ["--workdir", "@run", "--prompt", "x", "--cache-fit", "/no/fit.json"]),
     "--cache-fit /no/fit.json: not a cache fit"),
    ("gen_cache_size_without_fit", ("generate", ["--workdir", "@run", "--prompt", "x", "--cache-size", "8"]),
     "--cache-size needs --cache-fit"),
]

# (case id, environment, text the one error line must contain): the distributed start-up's checks
ENV_CASES = [
    ("distributed_not_auto", {"MEMTX_DISTRIBUTED": "yes"}, "MEMTX_DISTRIBUTED"),
    ("num_processes_zero", {"MEMTX_NUM_PROCESSES": "0"}, "MEMTX_NUM_PROCESSES"),
    ("num_processes_negative", {"MEMTX_NUM_PROCESSES": "-3"}, "MEMTX_NUM_PROCESSES"),
    ("num_processes_text", {"MEMTX_NUM_PROCESSES": "two"}, "MEMTX_NUM_PROCESSES"),
    ("init_timeout_negative", {"MEMTX_NUM_PROCESSES": "2", "MEMTX_INIT_TIMEOUT": "-5"}, "MEMTX_INIT_TIMEOUT"),
    ("slurm_ntasks_text", {"SLURM_NTASKS": "abc"}, "SLURM_NTASKS"),
    ("no_coordinator", {"MEMTX_NUM_PROCESSES": "2", "MEMTX_PROCESS_ID": "1"}, "MEMTX_COORDINATOR"),
    ("coordinator_without_port", {"MEMTX_NUM_PROCESSES": "2", "MEMTX_PROCESS_ID": "1",
                                  "MEMTX_COORDINATOR": "localhost"}, "MEMTX_COORDINATOR"),
    ("coordinator_bad_port", {"MEMTX_NUM_PROCESSES": "2", "MEMTX_PROCESS_ID": "0",
                              "MEMTX_COORDINATOR": "localhost:99999"}, "port"),
    ("process_id_outside", {"MEMTX_NUM_PROCESSES": "2", "MEMTX_PROCESS_ID": "5",
                            "MEMTX_COORDINATOR": "localhost:12345"}, "MEMTX_PROCESS_ID"),
    ("coordinator_not_answering", {"MEMTX_NUM_PROCESSES": "2", "MEMTX_PROCESS_ID": "1", "MEMTX_INIT_TIMEOUT": "1",
                                   "MEMTX_COORDINATOR": "127.0.0.1:9"}, "did not answer"),
]

DISTRIBUTED_ENV = ("MEMTX_NUM_PROCESSES", "MEMTX_PROCESS_ID", "MEMTX_COORDINATOR", "MEMTX_INIT_TIMEOUT",
                   "MEMTX_DISTRIBUTED", "SLURM_NTASKS", "SLURM_NPROCS")


def resolve(world, text: str) -> str:
    return text.replace("@tmp", str(world["tmp"])).replace("@run", str(world["run"]))


def command_args(world, command):
    if command[0] == "train":
        _, config, workdir, overrides = command
        config = str(world["config"]) if config == "config" else \
            str(world["tmp"] / config) if config.endswith(".py") and not config.startswith("/") else config
        workdir = str(world["run"]) if workdir == "run" else str(world["tmp"] / workdir)
        return train_lib, ["--config", config, "--workdir", workdir, *(resolve(world, o) for o in overrides)]
    module = {"evaluate": evaluate_lib, "generate": generate_lib}[command[0]]
    return module, [resolve(world, a) for a in command[1]]


def assert_one_error_line(code, err, expected):
    assert code == 2, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert expected in errors[0], errors[0]


@pytest.mark.parametrize("case, command, expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line(world, case, command, expected, capsys, monkeypatch):
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    before = snapshot(world["run"])
    module, argv = command_args(world, command)
    code = run_cli(module.main, module.parser(), argv)
    assert_one_error_line(code, capsys.readouterr().err, expected)
    assert snapshot(world["run"]) == before  # the existing run is untouched
    assert not (world["tmp"] / "fresh" / "checkpoints").exists() or \
        not any((world["tmp"] / "fresh" / "checkpoints").iterdir())


@pytest.mark.parametrize("case, env, expected", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_hostile_environment_is_one_line(world, case, env, expected, capsys, monkeypatch):
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = snapshot(world["run"])
    code = run_cli(train_lib.main, train_lib.parser(), ["--config", str(world["config"]), "--workdir", str(world["run"])])
    assert_one_error_line(code, capsys.readouterr().err, expected)
    assert snapshot(world["run"]) == before


def test_every_key_the_config_checks_has_a_case():
    """Every key memtx/config.py (or a kind's options) names in a one-line error is given a bad
    value by some case of the table: a new check without a case here fails (the table's size alone
    said nothing)."""
    sources = [ROOT / "memtx" / "config.py", *(ROOT / "memtx" / "memory").glob("*/options.py")]
    checked = {key for path in sources for key in re.findall(r"config key '([a-z_.]+)'", path.read_text())}
    assert len(checked) > 15  # the pattern still finds the checks (those across fields)
    # A field's own Literal or range: tests/test_config.py gives every one its violating values.
    tried = {key for _, command, _ in CASES if command[0] == "train"
             for override in command[3] for key in re.findall(r"^--config\.([a-z_.]+)=", override)}
    tried |= {key for _, command, expected in CASES if command[0] == "train" and command[1] != "config"
              for key in re.findall(r"config key '([a-z_.]+)'", expected)}  # set by a config file
    assert sorted(checked - tried) == []


def test_a_held_work_directory_is_refused_in_one_line(world):
    """A second training on a work directory another process holds: one line naming the
    holder's pid and host; the holder's files are untouched."""
    before = snapshot(world["run"])
    with WorkdirLock(str(world["run"])):
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        env["PYTHONPATH"] = str(ROOT)
        out = subprocess.run([sys.executable, "-m", "memtx.train", "--config", str(world["config"]),
                              "--workdir", str(world["run"])], env=env, capture_output=True, text=True, timeout=300)
    assert_one_error_line(out.returncode, out.stderr, "is in use by pid")
    assert f"pid {os.getpid()}" in out.stderr
    assert snapshot(world["run"]) == before


def test_damaged_saved_configs_are_one_line(world, capsys, tmp_path):
    """config.json truncated, ill-typed or not an object: resuming (no --config) says which file."""
    import shutil

    for name, text, expected in (("truncated", '{"model": {"num_layers": 2', "damaged"),
                                 ("wrong_type", '{"model": {"num_layers": "two"}}', "model.num_layers"),
                                 ("not_object", '[1, 2]', "JSON object"),
                                 ("unknown_key", '{"model": {"layers": 2}}', "model.layers")):
        run = tmp_path / name
        shutil.copytree(world["run"], run)
        (run / "config.json").write_text(text)
        before = snapshot(run)
        code = run_cli(train_lib.main, train_lib.parser(), ["--workdir", str(run)])
        assert_one_error_line(code, capsys.readouterr().err, expected)
        assert snapshot(run) == before


def test_a_partial_metrics_line_is_repaired_on_resume(world, tmp_path, capsys):
    """A kill in the middle of writing metrics.jsonl leaves half a line: the run resumes, drops it
    with a note, and its metrics end with one line per step."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 3.1')  # cut short
    code = run_cli(train_lib.main, train_lib.parser(), ["--workdir", str(run)])
    assert code == 0
    assert "dropped 1 damaged line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_out_of_device_memory_on_the_first_step_is_one_line(world, tmp_path, capsys, monkeypatch):
    """XLA's out-of-memory error from the train step (on CPU it cannot happen for real: the step
    raises the error a GPU run gets) is one line naming the keys to shrink; the run's earlier
    checkpoints and metrics are untouched, and other runtime errors still surface as they are."""
    import shutil

    import jax

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = snapshot(run)

    def failing_step(error):
        def run_step(*args, **kwargs):
            raise error
        return lambda setup: run_step

    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.31GiB.")
    monkeypatch.setattr(train_lib, "make_train_step", failing_step(oom))
    code = run_cli(train_lib.main, train_lib.parser(), ["--workdir", str(run)])
    err = capsys.readouterr().err
    assert_one_error_line(code, err, "does not fit in the devices' memory")
    assert "lower data.batch_size" in err
    assert snapshot(run) == before

    other = jax.errors.JaxRuntimeError("INTERNAL: something else went wrong")
    monkeypatch.setattr(train_lib, "make_train_step", failing_step(other))
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        run_cli(train_lib.main, train_lib.parser(), ["--workdir", str(run)])


def test_a_read_only_file_system_is_one_line(world, tmp_path, capsys, monkeypatch):
    """A work directory or checkpoint directory on a read-only mount (root ignores permission
    bits, not a read-only file system): resuming there, starting there, or checkpointing there is
    one line naming the path; the run's files are untouched."""
    import shutil

    with tmpfs(tmp_path / "ro", "size=8M") as ro:
        shutil.copytree(world["run"], ro / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, capture_output=True)
        before = snapshot(ro / "run")
        for argv, expected in (
                (["--workdir", str(ro / "run")], str(ro / "run")),
                (["--config", str(world["config"]), "--workdir", str(ro / "new")], str(ro / "new")),
                (["--config", str(world["config"]), "--workdir", str(tmp_path / "elsewhere"),
                  f"--config.train.checkpoint_dir={ro / 'ckpt'}"], str(ro / "ckpt"))):
            code = run_cli(train_lib.main, train_lib.parser(), argv)
            assert_one_error_line(code, capsys.readouterr().err, expected)
        assert snapshot(ro / "run") == before


def test_a_disk_full_before_the_first_write_is_one_line(world, tmp_path, capsys):
    """A new run on a file system with no space left: one line naming what could not be written."""
    with tmpfs(tmp_path / "full", "size=64k") as full:
        with open(full / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        code = run_cli(train_lib.main, train_lib.parser(), ["--config", str(world["config"]),
                                                            "--workdir", str(full / "run")])
        assert_one_error_line(code, capsys.readouterr().err, "No space left")


def test_a_platform_this_machine_lacks_is_one_line(world, tmp_path):
    """JAX_PLATFORMS=tpu without libtpu (a subprocess: this one's JAX has started on CPUs)."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env.update(JAX_PLATFORMS="tpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-m", "memtx.train", "--config", str(world["config"]),
                          "--workdir", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                         cwd=str(ROOT), timeout=120)
    if "libtpu" not in out.stderr and out.returncode == 0:
        pytest.skip("this machine has a TPU backend")
    assert_one_error_line(out.returncode, out.stderr, "cannot start its devices")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_in_the_middle_of_a_generation_is_exit_130(world, capsys, monkeypatch):
    """A SIGINT (Ctrl-C) while tokens are being generated: exit 130 and "interrupted", never 0 as if
    the continuation were complete. (A job a script starts with `&` ignores SIGINT, as the shell
    sets it: there `kill -INT` does nothing and the generation finishes, exit 0.)"""
    import signal

    from memtx.data.vocab import ByteVocab

    a = int(ByteVocab().encode(b"a")[0])
    sampled = []

    def sample_then_interrupt(*args, **kwargs):
        sampled.append(a)
        if len(sampled) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # delivered to this (the main) thread, as Ctrl-C is
        return a  # never a stop token: the generation would go on to --max-tokens

    monkeypatch.setattr(generate_lib, "sample", sample_then_interrupt)
    # Python's own SIGINT handler, as a terminal's Ctrl-C meets it: a process started from a job the
    # shell put in the background (`&`) inherits SIGINT ignored, and Python then keeps it ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = run_cli(generate_lib.main, generate_lib.parser(), ["--workdir", str(world["run"]), "--prompt", "def",
                                                                  "--max-tokens", "50"])
    finally:
        signal.signal(signal.SIGINT, previous)
    out = capsys.readouterr()
    assert code == 130 and "interrupted" in out.err, out.err
    assert "tokens generated" not in out.err and len(sampled) == 3
