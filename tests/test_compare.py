"""memtx.compare end to end: configs x seeds on the same batches, summaries, paired differences."""

import json

import pytest

from memtx import compare
from memtx.cli import run_cli
from memtx.workdir_files import read_metrics
from tests.helpers import make_corpus

CONFIG = """
from tests.helpers import tiny_config


def get_config(preset=None):
    return tiny_config({corpus!r}, steps=4, checkpoint_every=4)
"""


def _compare(argv):
    return run_cli(compare.main, compare.parser(), argv)


@pytest.mark.slow
def test_two_configs_two_seeds_on_the_same_batches(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus", num_docs=4, max_bytes=1500)
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG.format(corpus=str(corpus)))
    out = tmp_path / "out"
    argv = [str(config), f"fast={config}@optim.learning_rate=0.02", "--out", str(out), "--seeds", "2",
            "--last-steps", "2", "--eval-max-docs", "2", "--eval-split", "train", "--config.optim.warmup_steps=0"]
    assert _compare(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    assert [c["label"] for c in result["configs"]] == ["tiny", "fast"]
    assert result["eval"]["documents"] == 2 and result["eval"]["corpus"]["documents"] == 4
    for c in result["configs"]:
        assert [r["seed"] for r in c["runs"]] == [0, 1] and c["train_loss"]["n"] == 2 and len(c["perplexity"]["ci"]) == 2
        for r in c["runs"]:
            losses = [m["loss"] for m in read_metrics(r["workdir"])]
            assert r["train_loss_last"] == pytest.approx(sum(losses[-2:]) / 2)
            assert json.loads(open(r["eval_json"]).read())["perplexity"] == r["perplexity"]
    tiny, fast = ([read_metrics(r["workdir"]) for r in c["runs"]] for c in result["configs"])
    # Seed s of both configs: the same initialisation and the same first batch, so the same first loss;
    # the learning rates then part them. The two seeds start from different initialisations.
    for seed in (0, 1):
        assert tiny[seed][0]["loss"] == fast[seed][0]["loss"] and tiny[seed][-1]["loss"] != fast[seed][-1]["loss"]
    assert tiny[0][0]["loss"] != tiny[1][0]["loss"]
    paired, = result["paired"]
    assert paired["label"] == "fast" and paired["against"] == "tiny"
    ppl = {c["label"]: [r["perplexity"] for r in c["runs"]] for c in result["configs"]}
    assert paired["perplexity"]["mean"] == pytest.approx(sum(b - a for a, b in zip(ppl["tiny"], ppl["fast"])) / 2)
    assert paired["perplexity"]["verdict"] in ("within noise", "better", "worse")
    table = printed[printed.index("paired with tiny, seed by seed"):].splitlines()
    cells = [c.strip() for c in table[3].split("|")[1:-1]]
    assert cells[0] == "fast" and cells[1] == f"{paired['train_loss']['mean']:+.4f}"
    assert cells[-1] == paired["perplexity"]["verdict"]
    assert (out / "compare.png").stat().st_size > 1000
    assert json.loads((out / "tiny" / "seed1" / "run_info.json").read_text())["corpus"] == result["eval"]["corpus"]

    # Again: nothing is trained or evaluated twice, and the numbers are the same.
    assert _compare(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished (4 steps)") == 4 and printed.count("already evaluated") == 4
    assert json.loads((out / "compare.json").read_text()) == result

    # With the output cache: each checkpoint again with it (fitted on the other two documents), a
    # row per config, mixture and seed against itself without it, on the same documents; the
    # learned gate's rows paired with the fill-dependent lambda's over seeds.
    assert _compare([*argv, "--cache-size", "64", "--cache-tune-docs", "2", "--cache-mixtures", "fill,gate"]) == 0
    printed = capsys.readouterr().out
    cached = json.loads((out / "compare.json").read_text())
    assert cached["configs"] == result["configs"] and len(cached["output_cache"]) == 4
    assert [(c["label"], c["mixture"]) for c in cached["output_cache"]] == [
        ("tiny", "fill"), ("tiny", "gate"), ("fast", "fill"), ("fast", "gate")]
    for gated, fill in zip(cached["output_cache"][1::2], cached["output_cache"][0::2]):
        against = gated["against"]
        assert against["mixture"] == "fill" and all(r["fit"].get("gate") for r in gated["runs"])
        assert against["seeds"]["mean"] == pytest.approx(
            sum(g["with"] - f["with"] for g, f in zip(gated["runs"], fill["runs"])) / 2)
    for c, base in zip(cached["output_cache"][0::2], result["configs"]):
        assert c["label"] == base["label"] and c["size"] == 64 and [r["seed"] for r in c["runs"]] == [0, 1]
        for r, b in zip(c["runs"], base["runs"]):
            assert r["without"] == b["perplexity"]
            assert r["with"] == json.loads(open(r["eval_json"]).read())["perplexity"]
            assert r["rel_pct"] == pytest.approx(100 * (r["with"] / r["without"] - 1))
            assert r["diff_ci"][0] <= r["diff"] <= r["diff_ci"][1] and r["verdict"] in ("within noise", "better", "worse")
            assert "_cache64" in r["eval_json"] and 0 <= r["fit"]["lam"] < 1
        assert c["rel_pct"]["mean"] == pytest.approx(sum(r["rel_pct"] for r in c["runs"]) / 2)
    table = printed[printed.index("the output cache (64 entries"):printed.index("the cache's weight compared")].splitlines()
    assert len(table) == 3 + 4 * 3 and table[3].split("|")[1].strip() == "tiny"
    assert table[6].split("|")[1].strip() == "tiny (gate)"
    assert f"{cached['output_cache'][2]['rel_pct']['mean']:+.1f}%" in table[-4]
    weights = printed[printed.index("the cache's weight compared"):].splitlines()
    assert [line.split("|")[1].strip() for line in weights[3:5]] == ["tiny (gate)", "fast (gate)"]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--config.train.seed=3"], "sets train.seed"),
    (["{config}@data.seed=2"], "config 'tiny_seed2' sets data.seed"),
    (["{config}@model.mem_len"], "is not KEY=VALUE"),
    (["{config}"], "two configs are labelled 'tiny'"),
    (["a/b={config}"], "must be a plain directory name"),
    (["{config}@model.num_layrs=2"], "did you mean 'model.num_layers'"),
    (["--last-steps", "9"], "--last-steps 9 is more than the 4 steps"),
    (["--config.train.steps", "3"], "unrecognised argument '--config.train.steps'"),
    (["--cache-size", "-1"], "--cache-size must be >= 0"),
    (["--cache-size", "64", "--eval-max-docs", "1", "--eval-split", "train", "--cache-tune-docs", "5"],
     "1 are left to tune the cache on, fewer than --cache-tune-docs 5"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG.format(corpus=str(make_corpus(tmp_path / "corpus", num_docs=2))))
    argv = [a.format(config=config) for a in argv]
    code = _compare([str(config), *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
