"""The contract every registered memory kind keeps (and the kNN add-on on the kinds that carry it):

- a row that starts a document reads nothing of the previous one (reset isolation), and rows
  never read each other;
- no position sees a later one (no future leakage), and padding is never written: a padded
  segment leaves the memory a short segment leaves;
- a checkpoint restores the state and memory, and training goes on as if it had not stopped.

A kind registered in memtx/memory/registry.py is tested here without being named, at its
`small_options`; the typed contract it keeps is memtx/memory/kind.py.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memtx.config import KNNConfig, ModelConfig
from memtx.memory import add_ons, model_memory, registry
from memtx.memory.kind import MemoryLayers, MemoryState
from memtx.model import init_memory, segment_nll
from tests.helpers import kind_options, random_batches, segment_batch, small_model, tiny_config

N = 6  # segment length: every segment of a test has 6 positions


def _options(kind: registry.MemoryKind) -> dict:
    return kind_options(kind.name)


VARIANTS = [(name, False) for name in registry.KINDS] + [(name, True) for name, k in registry.KINDS.items() if k.knn]
IDS = [f"{name}{'+knn' if knn else ''}" for name, knn in VARIANTS]


def _model(name: str, knn: bool, pre_norm: bool = False):
    return small_model(mem_len=4, pre_norm=pre_norm, memory=name, **_options(registry.get(name)),
                       knn=KNNConfig(enabled=True, layers=(1,), size=16, k=4) if knn else KNNConfig())


def _run(model, params, memory, segments, resets):
    out = []
    for tokens, reset in zip(segments, resets):
        nll, memory = segment_nll(model, params, memory, segment_batch(tokens, reset))
        out.append(np.asarray(nll))
    return out, memory


def test_every_kind_keeps_the_typed_contract():
    for kind in registry.KINDS.values():
        assert isinstance(kind.state, MemoryState), kind.name  # every function the package calls is there
        assert isinstance(kind.layers, MemoryLayers), kind.name
        scanned = ModelConfig(memory=kind.name, num_layers=6, scan_layers=True, **_options(kind))
        runs = kind.layers.scan_runs(scanned)  # model.scan_layers: consecutive ranges covering every layer
        assert [a for a, _ in runs] == [0] + [b for _, b in runs[:-1]] and runs[-1][1] == 6, (kind.name, runs)
        cfg = ModelConfig(memory=kind.name, **_options(kind))
        memory = jax.eval_shape(lambda: init_memory(cfg, 3))
        axes = model_memory.logical_axes(cfg)
        assert jax.tree.structure(memory) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
        for leaf, names in zip(jax.tree.leaves(memory), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
            assert len(names) == leaf.ndim
        for path, leaf in jax.tree_util.tree_leaves_with_path(memory):  # rows are the batch axis (or after layers)
            names = dict(kind.state.LOGICAL_AXES).get(path[-1].key) if path[0].key == kind.name else None
            if names is not None:
                assert leaf.shape[names.index("act_batch")] == 3, (kind.name, path)
        real = init_memory(cfg, 3)  # the bytes fit checks are those of the arrays the steps carry
        assert model_memory.state_bytes(cfg, 3) == sum(leaf.nbytes for leaf in jax.tree.leaves(real)) > 0


def test_every_add_on_keeps_its_contract_and_its_state_follows_its_layers():
    for add_on in add_ons.ADD_ONS:
        assert isinstance(add_on, add_ons.AddOn), add_on.__name__
    cfg = ModelConfig(num_layers=3, knn=KNNConfig(enabled=True, layers=(0, 2), size=8, k=2))
    memory = model_memory.init(cfg, 2)
    assert set(memory["knn"]) == {"0", "2"} and set(model_memory.logical_axes(cfg)["knn"]) == {"0", "2"}
    assert model_memory.init(ModelConfig(num_layers=3), 2)["knn"] == {}  # off: no state, the same pytree key


def test_a_kind_without_a_function_of_the_contract_fails_it():
    state, layers = registry.get("xl").load()
    partial = types.SimpleNamespace(**{k: getattr(state, k) for k in ("LOGICAL_AXES", "init_for", "reset_rows")})
    assert isinstance(state, MemoryState) and not isinstance(partial, MemoryState)
    assert not isinstance(types.SimpleNamespace(stack=layers.stack), MemoryLayers)


@pytest.mark.parametrize("name, knn", VARIANTS, ids=IDS)
@pytest.mark.slow
def test_a_reset_row_reads_nothing_of_the_previous_document(name, knn):
    cfg, model, params = _model(name, knn)
    rng = np.random.default_rng(0)
    history = [rng.integers(0, 40, (2, N)) for _ in range(4)]
    current = rng.integers(0, 40, (2, N))
    _, memory = _run(model, params, init_memory(cfg, 2), history, [[True, True]] + [[False, False]] * 3)
    (with_reset,), _ = _run(model, params, memory, [current], [[True, False]])
    (fresh,), _ = _run(model, params, init_memory(cfg, 2), [current], [[True, True]])
    np.testing.assert_allclose(with_reset[0], fresh[0], atol=1e-5)  # row 0 starts a document: no memory
    assert not np.allclose(with_reset[1], fresh[1], atol=1e-4)  # row 1 continues and uses its memory


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("name, knn", VARIANTS, ids=IDS)
def test_nothing_from_the_future_or_from_other_rows(name, knn, pre_norm):
    cfg, model, params = _model(name, knn, pre_norm)
    rng = np.random.default_rng(1)
    segments = [rng.integers(0, 40, (2, N)) for _ in range(4)]
    changed = [s.copy() for s in segments]
    changed[3][0, 4:] = (changed[3][0, 4:] + 7) % 40  # row 0, the last segment's positions 4, 5
    resets = [[True, True]] + [[False, False]] * 3
    base, _ = _run(model, params, init_memory(cfg, 2), segments, resets)
    other, _ = _run(model, params, init_memory(cfg, 2), changed, resets)
    for s in range(3):
        np.testing.assert_allclose(base[s], other[s], atol=1e-6)
    np.testing.assert_allclose(base[3][0, :4], other[3][0, :4], atol=1e-6)  # earlier positions unchanged
    np.testing.assert_allclose(base[3][1], other[3][1], atol=1e-6)  # the other row unchanged
    assert not np.allclose(base[3][0, 4:], other[3][0, 4:])


@pytest.mark.parametrize("name, knn", VARIANTS, ids=IDS)
def test_padding_is_never_written(name, knn):
    """Three full segments, then a last one with 4 valid positions and 2 of padding: the memory
    equals that of the same last segment given without the padding."""
    cfg, model, params = _model(name, knn)
    rng = np.random.default_rng(2)
    segments = [rng.integers(0, 40, (2, N)) for _ in range(4)]
    resets = [[True, True]] + [[False, False]] * 2
    _, memory = _run(model, params, init_memory(cfg, 2), segments[:3], resets)
    padded = segments[3].copy()
    padded[:, 4:] = 0
    weights = np.ones((2, N))
    weights[:, 4:] = 0
    _, from_padded = segment_nll(model, params, memory, segment_batch(padded, [False, False], weights))
    _, from_short = segment_nll(model, params, memory, segment_batch(segments[3][:, :4], [False, False]))
    for a, b in zip(jax.tree.leaves(from_padded), jax.tree.leaves(from_short)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("name, knn", VARIANTS, ids=IDS)
@pytest.mark.slow
def test_a_checkpoint_restores_the_state_and_memory_and_training_goes_on_unchanged(name, knn, tmp_path):
    """Each kind's resume, as the train loop does it on the (2, 2, 2) mesh: two steps, a checkpoint
    of the state, the memory and the data position, a restore into the abstract tree; every leaf
    comes back equal and with its sharding, and two more steps from the restored copy give the
    losses and memory of two more steps from the original. (The whole stop-and-resume path, train
    loop and data stream included, is tests/test_resume.py's, on XL with a kNN memory.)"""
    from memtx import state as state_lib
    from memtx.checkpoint import Checkpointer
    from memtx.step import make_train_step

    cfg = tiny_config(mesh_shape=(2, 2, 2))
    cfg.model = dataclasses.replace(cfg.model, memory=name, **_options(registry.get(name)))
    if knn:
        cfg.model.knn = KNNConfig(enabled=True, size=64, k=4)
    setup = state_lib.build(cfg)
    step = make_train_step(setup)  # donates the state and memory it is given
    state, memory = state_lib.init_state(setup, seed=0), state_lib.init_memory_sharded(setup, cfg.data.batch_size)
    batches = [state_lib.device_batch(setup, b) for b in random_batches(cfg, 4)]
    for batch in batches[:2]:
        state, memory, _ = step(state, memory, batch)
    assert any(np.abs(np.asarray(leaf, np.float32)).sum() > 0 for leaf in jax.tree.leaves(memory))

    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(2, state, memory, {"0": {"document": 5, "offset": 7}})
    restored_state, restored_memory, data = ckpt.restore(
        2, setup.abstract_state, state_lib.abstract_memory(setup, cfg.data.batch_size))
    ckpt.close()
    assert data == {"0": {"document": 5, "offset": 7}}
    for original, restored in ((state, restored_state), (memory, restored_memory)):
        assert jax.tree.structure(restored) == jax.tree.structure(original)
        for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(restored)):
            assert a.dtype == b.dtype and a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))

    def go_on(state, memory):
        losses = []
        for batch in batches[2:]:
            state, memory, metrics = step(state, memory, batch)
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(memory)

    copy = jax.tree.map(jnp.copy, (state, memory))
    original_losses, original_memory = go_on(*copy)
    restored_losses, restored_memory = go_on(restored_state, restored_memory)
    assert original_losses == restored_losses
    jax.tree.map(np.testing.assert_array_equal, restored_memory, original_memory)
