"""train.init_from: adding a kNN memory to a trained Transformer-XL (Memorizing Transformers §4.3)."""

import jax
import numpy as np
import pytest

from memtx import state as state_lib
from memtx.checkpoint import Checkpointer
from memtx.config import ConfigError, KNNConfig
from memtx.train import train
from tests.helpers import make_corpus, tiny_config


def _params(cfg, workdir):
    ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    params = ckpt.restore_params(ckpt.latest_step(), state_lib.build(cfg).abstract_state["params"])
    ckpt.close()
    return params


@pytest.mark.slow
def test_knn_model_starts_from_the_xl_parameters_with_a_fresh_gate(tmp_path):
    corpus = str(make_corpus(tmp_path / "corpus"))
    xl = tiny_config(corpus, steps=3, checkpoint_every=3)
    xl.model.qk_norm = True
    train(xl, str(tmp_path / "xl"))
    knn = tiny_config(corpus, steps=1, checkpoint_every=1)
    knn.model.qk_norm = True
    knn.model.knn = KNNConfig(enabled=True, layers=(1,), size=32, k=4, gate_bias_init=-3.0)
    knn.optim.learning_rate, knn.optim.warmup_steps = 1e-12, 0  # one step that leaves the parameters as loaded
    knn.train.init_from = str(tmp_path / "xl")
    train(knn, str(tmp_path / "knn"))
    before, after = _params(xl, tmp_path / "xl"), _params(knn, tmp_path / "knn")
    gate = np.asarray(after["layer_1"]["attn"].pop("gate_bias"))
    np.testing.assert_allclose(gate, -3.0, atol=1e-6)  # fresh: the new parameter's initialisation
    assert jax.tree_util.tree_structure(before) == jax.tree_util.tree_structure(after)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):  # the trained XL's, not a fresh init
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.slow
def test_bad_init_from_is_a_one_line_error(tmp_path):
    corpus = str(make_corpus(tmp_path / "corpus"))
    cfg = tiny_config(corpus, steps=3)
    cfg.train.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="train.init_from") as info:
        train(cfg, str(tmp_path / "run"))
    assert "\n" not in str(info.value)
    small = tiny_config(corpus, steps=3, checkpoint_every=3)
    train(small, str(tmp_path / "small"))
    wide = tiny_config(corpus, steps=3)
    wide.model.d_model = 64
    wide.train.init_from = str(tmp_path / "small")
    with pytest.raises(ConfigError, match="warm-start") as info:
        train(wide, str(tmp_path / "wide"))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_warm_start_says_what_is_new_and_what_is_dropped(tmp_path, capsys):
    """A kNN model without XL's content bias from an XL checkpoint: the gate (and the kNN layer's
    scale) are new, the saved u is not used; both named in the run's output."""
    corpus = str(make_corpus(tmp_path / "corpus"))
    train(tiny_config(corpus, steps=3, checkpoint_every=3), str(tmp_path / "xl"))
    knn = tiny_config(corpus, steps=3, checkpoint_every=3)
    knn.model.content_bias = False
    knn.model.knn = KNNConfig(enabled=True, layers=(1,), size=32, k=4)
    knn.train.init_from = str(tmp_path / "xl")
    capsys.readouterr()
    train(knn, str(tmp_path / "knn"))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("warm start"))
    new, _, dropped = line.partition("not used from the checkpoint:")
    assert "['layer_1']['attn']['gate_bias']" in new and "['layer_1']['attn']['log_scale']" in new
    assert "['layer_0']" not in new  # every other parameter came from the checkpoint
    assert dropped.strip() == "['u_bias']"


@pytest.mark.slow
def test_a_checkpoint_of_the_other_layer_layout_is_a_one_line_error(tmp_path):
    """Unrolled parameters ("layer_0") restored, resumed or warm-started as a scanned model
    ("layers_0_to_1"): one line naming model.scan_layers, never a fresh start."""
    corpus = str(make_corpus(tmp_path / "corpus"))
    unrolled = tiny_config(corpus, steps=3, checkpoint_every=3)
    train(unrolled, str(tmp_path / "run"))
    scanned = tiny_config(corpus, steps=6, checkpoint_every=3)
    scanned.model.scan_layers = True
    with pytest.raises(ConfigError, match="model.scan_layers") as info:
        _params(scanned, tmp_path / "run")
    assert "\n" not in str(info.value) and "unrolled" in str(info.value)
    with pytest.raises(ConfigError, match="model.scan_layers") as info:  # resuming the run with the other layout
        train(scanned, str(tmp_path / "run"))
    assert "\n" not in str(info.value)
    scanned.train.init_from = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="model.scan_layers"):
        train(scanned, str(tmp_path / "warm"))
