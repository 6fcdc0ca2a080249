"""Switches that change speed or memory, never the result (beyond float rounding): attention in
query blocks, rematerialised layers, identical layers as one scan, gradient accumulation over
micro-batches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import kind_options, segment_batch, small_model
from memtx.config import ConfigError, KNNConfig
from memtx.model import TransformerLM, init_memory, segment_nll

KINDS = [("xl", {}), ("xl", {"mem_len": 0}), ("xl", {"knn": KNNConfig(enabled=True, layers=(1,), size=16, k=4)}),
         ("lamemo", {}), ("compressive", {}), ("block_recurrent", {})]


def _segments(seed=0, n=3):
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        weights = np.ones((2, 6), np.float32)
        weights[1, 4:] = 0  # row 1's document ends inside the segment
        out.append(segment_batch(rng.integers(0, 40, (2, 6)), [s == 0, s in (0, 2)], weights))
    return out


def _losses_and_grads(cfg, params, segments):
    """Per-segment NLL and parameter gradients, memory carried across the segments."""
    model = TransformerLM(cfg)

    def loss(p, memory, batch):
        nll, memory = segment_nll(model, p, memory, batch)
        return nll.sum(), (nll, memory)

    grad = jax.jit(jax.grad(loss, has_aux=True))
    memory, out = init_memory(cfg, 2), []
    for batch in segments:
        g, (nll, memory) = grad(params, memory, batch)
        out.append((nll, g))
    return out, memory


def _assert_close(a, b, tol=1e-4):  # float32 rounding of gradients of size ~1
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol), a, b)


# The changes each kind is checked under. Segments are 6 rows: query blocks of 4 leave an uneven
# last block. Block-Recurrent attention sees blocks of block_len = 2 rows, so only query blocks
# of 1 split them; LaMemo has no query blocks (a config error, tested below).
CHANGES = {"block_recurrent": ({"query_block": 1}, {"remat": "nothing_saveable"}),
           "lamemo": ({"remat": "nothing_saveable"},)}


@pytest.mark.parametrize("kind,extra", KINDS, ids=lambda v: v if isinstance(v, str) else "-".join(sorted(v)))
@pytest.mark.slow
def test_query_blocks_and_remat_change_nothing(kind, extra):
    cfg, _, params = small_model(**{"memory": kind, **kind_options(kind), **extra})
    reference = _losses_and_grads(cfg, params, _segments())
    for change in CHANGES.get(kind, ({"query_block": 4}, {"remat": "nothing_saveable", "query_block": 1})):
        _assert_close(_losses_and_grads(dataclasses.replace(cfg, **change), params, _segments()), reference)


@pytest.mark.slow
def test_remat_really_recomputes_and_query_blocks_skip_the_future():
    """The switches take effect, by XLA's flop count of the compiled gradient: the rematerialised
    one computes the forward pass again (more flops; XLA:CPU shows no smaller temporary memory for
    it, not even for a plain jax.checkpoint, so memory is not what is checked here), and query
    blocks compute fewer scores than the whole segment at once."""
    cfg, _, params = small_model(num_layers=2, d_model=32, d_ff=64, mem_len=0)
    tokens = jnp.zeros((2, 256), jnp.int32)  # long enough for attention to dominate
    batch = {"inputs": tokens, "targets": tokens, "weights": jnp.ones((2, 256)), "reset": jnp.ones((2,), bool)}

    def flops(c):
        model = TransformerLM(c)
        fn = jax.jit(jax.grad(lambda p: segment_nll(model, p, init_memory(c, 2), batch)[0].sum()))
        analysis = fn.lower(params).compile().cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    plain = flops(cfg)
    assert flops(dataclasses.replace(cfg, remat="nothing_saveable")) > 1.2 * plain
    assert flops(dataclasses.replace(cfg, query_block=64)) < 0.8 * plain


SCANNED = [("xl", {}), ("xl", {"mem_len": 0}), ("xl", {"knn": KNNConfig(enabled=True, layers=(2,), size=16, k=4)}),
           ("lamemo", {}), ("xl", {"pre_norm": True, "qk_norm": True, "remat": "nothing_saveable"}),
           ("compressive", kind_options("compressive")),
           ("block_recurrent", {"block_recurrent": dataclasses.replace(
               kind_options("block_recurrent")["block_recurrent"], layer=2)})]


@pytest.mark.parametrize("kind,extra", SCANNED, ids=["xl", "rpe", "knn", "lamemo", "prenorm-remat", "compressive",
                                                     "block_recurrent"])
@pytest.mark.slow
def test_scanned_layers_change_nothing(kind, extra):
    """5 layers, unrolled against `model.scan_layers` with the same parameters in the stacked
    layout: the same losses, gradients, memory and probes (a kNN layer in the middle splits the
    scan in two; LaMemo's last layer runs alone)."""
    from memtx import layers, probes
    from memtx.memory import registry
    cfg, _, params = small_model(**{"memory": kind, "num_layers": 5, **extra})
    scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
    runs = registry.of(scanned_cfg).layers.scan_runs(scanned_cfg)
    assert any(b - a > 1 for a, b in runs) and sum(b - a for a, b in runs) == 5
    scanned_params = layers.stack_params(params, runs)
    assert set(scanned_params) - set(params) == {layers.run_name(a, b) for a, b in runs if b - a > 1}
    reference, reference_memory = _losses_and_grads(cfg, params, _segments())
    outputs, memory = _losses_and_grads(scanned_cfg, scanned_params, _segments())
    _assert_close(([(nll, layers.unstack_params(g)) for nll, g in outputs], memory), (reference, reference_memory))
    runs = [segment_nll(TransformerLM(c), p, m, _segments()[1], with_intermediates=True, with_aux_loss=True)
            for c, p, m in ((cfg, params, reference_memory), (scanned_cfg, scanned_params, memory))]
    inter = [run[2] for run in runs]
    if kind == "compressive":  # its attention-reconstruction loss reads each layer's parameters
        assert runs[0][3] is not None and float(runs[0][3]) > 0
        _assert_close(runs[1][3], runs[0][3])
    name = "alpha" if kind == "lamemo" else "attn_prob"
    for layer in range(5):
        _assert_close(probes.attention(inter[1], layer, name), probes.attention(inter[0], layer, name))
        _assert_close(probes.attention_param(scanned_params, layer, "r_proj"),
                      probes.attention_param(params, layer, "r_proj"))


@pytest.mark.slow
def test_scanned_stack_compiles_to_one_layer_body_at_any_depth():
    """The lowered train gradient grows with depth unrolled and stays flat scanned (the reason for
    the switch: compile time flat in depth; benchmarks/compile_time.py measures it)."""
    def size(num_layers, scan):
        cfg, _, params = small_model(num_layers=num_layers, scan_layers=scan)
        model, batch = TransformerLM(cfg), _segments()[0]
        loss = jax.grad(lambda p: segment_nll(model, p, init_memory(cfg, 2), batch)[0].sum())
        return len(jax.jit(loss).lower(params).as_text())

    assert size(8, False) > 2.5 * size(2, False)
    assert size(8, True) < 1.1 * size(2, True)


@pytest.mark.slow
def test_train_step_on_a_mesh_with_scanned_layers():
    """Initialised scanned (parameters stacked on the unsharded "layers" axis) on a (2, 2, 2) mesh,
    the train step's first loss equals the unrolled model's with the same parameters."""
    from memtx import layers
    from memtx import state as state_lib
    from memtx.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
    from memtx.step import make_train_step
    cfg = Config(model=ModelConfig(num_layers=3, d_model=32, num_heads=2, d_ff=64, mem_len=8, scan_layers=True),
                 data=DataConfig(seq_len=8, batch_size=4), optim=OptimConfig(warmup_steps=1), train=TrainConfig(steps=2),
                 mesh=MeshConfig(shape=(2, 2, 2)))
    setup = state_lib.build(cfg, state_lib.sharding.make_mesh(cfg, jax.devices()))
    state = state_lib.init_state(setup, seed=0)
    qkv = state["params"]["layers_0_to_2"]["layer"]["attn"]["qkv"]
    assert qkv.shape[0] == 3 and qkv.sharding.spec[0] is None
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (4, 9), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((4, 8), np.float32),
             "reset": np.ones((4,), bool)}
    params = layers.unstack_params(jax.device_get(state["params"]))
    unrolled = dataclasses.replace(cfg.model, scan_layers=False)
    nll, _ = segment_nll(TransformerLM(unrolled), params, init_memory(unrolled, 4), batch)
    _, _, metrics = make_train_step(setup)(state, state_lib.init_memory_sharded(setup, 4),
                                           state_lib.device_batch(setup, batch))
    np.testing.assert_allclose(float(metrics["loss"]), float(nll.sum() / 32), rtol=1e-5)


@pytest.mark.parametrize("change,key", [({"remat": "everything"}, "model.remat"),
                                        ({"query_block": -1}, "model.query_block"),
                                        ({"memory": "lamemo", "query_block": 4}, "model.query_block")])
def test_bad_speed_options_are_one_line_errors(change, key):
    from memtx.config import Config, validate
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, **change)
    with pytest.raises(ConfigError, match=key) as info:
        validate(cfg, 8)
    assert "\n" not in str(info.value)


def _train(cfg, devices, batches):
    from memtx import state as state_lib
    from memtx.step import make_train_step
    setup = state_lib.build(cfg, state_lib.sharding.make_mesh(cfg, devices))
    state = state_lib.init_state(setup, seed=0)
    memory = state_lib.init_memory_sharded(setup, cfg.data.batch_size)
    step = make_train_step(setup)
    losses = []
    for batch in batches:
        state, memory, metrics = step(state, memory, state_lib.device_batch(setup, batch))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"]), jax.device_get(memory)


@pytest.mark.parametrize("kind,extra", [("xl", {}), ("xl", {"knn": KNNConfig(enabled=True, layers=(1,), size=12, k=3)}),
                                        ("lamemo", {})], ids=["xl", "knn", "lamemo"])
@pytest.mark.slow
def test_gradient_accumulation_gives_the_whole_batch_update(kind, extra):
    """Two micro-batches of 4 rows on a (2, 2, 2) mesh: the same losses, parameters and memory
    (every row's own, carried across steps) as the whole batch of 8 at once."""
    from memtx.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
    cfg = Config(model=ModelConfig(num_layers=2, d_model=32, num_heads=2, d_ff=64, mem_len=8, memory=kind, **extra),
                 data=DataConfig(seq_len=8, batch_size=8), optim=OptimConfig(learning_rate=1e-2, warmup_steps=1),
                 train=TrainConfig(steps=10), mesh=MeshConfig(shape=(2, 2, 2)))
    rng = np.random.default_rng(0)
    batches = []
    for i in range(3):
        weights = np.ones((8, 8), np.float32)
        weights[1, 5:] = weights[6, 2:] = 0  # documents ending mid-segment, unequal token counts per micro-batch
        batches.append({"inputs": rng.integers(0, 256, (8, 8), dtype=np.int32),
                        "targets": rng.integers(0, 256, (8, 8), dtype=np.int32), "weights": weights,
                        "reset": np.array([i == 0] * 3 + [i in (0, 2)] + [i == 0] * 4)})
    whole = _train(cfg, jax.devices(), batches)
    cfg.train.grad_accum_steps = 2
    accumulated = _train(cfg, jax.devices(), batches)
    np.testing.assert_allclose(accumulated[0], whole[0], rtol=1e-5)
    _assert_close(accumulated[1:], whole[1:], tol=1e-5)
    assert whole[0][-1] != whole[0][0]


def test_micro_batches_must_divide_the_batch_and_the_data_parallel_size():
    from memtx.config import Config, validate
    cfg = Config()  # batch 8
    cfg.train.grad_accum_steps = 3
    with pytest.raises(ConfigError, match="must divide data.batch_size"):
        validate(cfg, 8)
    cfg.train.grad_accum_steps = 4  # micro-batches of 2 rows over 8 data-parallel devices
    with pytest.raises(ConfigError, match="data-parallel size 8"):
        validate(cfg, 8)


@pytest.mark.slow
def test_train_writes_a_profile_fills_the_compilation_cache_and_reports_mfu(tmp_path, capsys):
    """... and evaluating the run compiles into the same cache (its config names it)."""
    import json

    from jax.experimental.compilation_cache import compilation_cache

    from helpers import make_corpus, tiny_config
    from memtx.train import train
    cfg = tiny_config(str(make_corpus(tmp_path / "corpus")), steps=4, log_every=2, checkpoint_every=4,
                      profile_steps=(2, 3), compilation_cache_dir=str(tmp_path / "cache"),
                      peak_flops_per_device=1e12)
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even quick compilations
    try:
        train(cfg, str(tmp_path / "run"))
        cached = set((tmp_path / "cache").iterdir())
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()  # a fresh process: evaluation finds the cache in the run's config
        from memtx import evaluate
        assert evaluate.main(*evaluate.parser().parse_known_args(
            ["--workdir", str(tmp_path / "run"), "--split", "train", "--config.data.eval_max_docs=2"])) == 0
        assert set((tmp_path / "cache").iterdir()) > cached  # the evaluation's steps joined it
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert any((tmp_path / "cache").iterdir())
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mfus = [entry["mfu"] for entry in logged if "mfu" in entry]
    assert mfus and all(0 < value < 1 for value in mfus)
    assert "MFU " in capsys.readouterr().out


@pytest.mark.slow
def test_model_flops_agree_with_xla_count_of_the_train_step():
    """memtx/flops.py's matmul count against XLA's cost analysis of the compiled train step (which
    also counts elementwise work): within 15% for the XL and kNN CPU presets."""
    import flax.linen as nn

    from memtx import sharding
    from memtx import state as state_lib
    from memtx.cli import resolve_config
    from memtx.flops import mfu, train_flops_per_token
    from memtx.step import make_train_step
    for spec in ("configs/txl.py:cpu", "configs/knn.py:cpu"):
        cfg = resolve_config(spec, None, [])
        setup = state_lib.build(cfg, sharding.make_mesh(cfg, jax.devices()[:1]))
        B, N = cfg.data.batch_size, cfg.data.seq_len
        zeros = np.zeros((B, N), np.int32)
        batch = state_lib.device_batch(setup, {"inputs": zeros, "targets": zeros, "weights": np.ones((B, N), np.float32),
                                               "reset": np.zeros((B,), bool)})
        step = make_train_step(setup)
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(sharding.rules(cfg)):
            lowered = step.jitted.lower(setup.abstract_state, state_lib.abstract_memory(setup, B), batch)
        analysis = lowered.compile().cost_analysis()
        xla = (analysis[0] if isinstance(analysis, list) else analysis)["flops"] / (B * N)
        assert 0.85 < xla / train_flops_per_token(cfg) < 1.15, (spec, xla, train_flops_per_token(cfg))
        assert mfu(cfg, 1000.0, 1, "cpu") is None  # no peak known for a CPU
        assert mfu(cfg, 1000.0, 2, "TPU v4") == 1000.0 * train_flops_per_token(cfg) / (2 * 275e12)
