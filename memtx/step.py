"""The jitted train and eval steps. Both call `model.segment_nll`, the shared segment function.

State and memory buffers are donated: the step updates them in place on the device.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from memtx import sharding
from memtx.memory import add_ons, model_memory, output_cache
from memtx.model import segment_nll
from memtx.optimizer import learning_rate_schedule
from memtx.state import Setup, batch_shardings, init_memory_sharded, memory_shardings


def make_train_step(setup: Setup):
    """(state, memory, batch) -> (state, memory, metrics): one optimizer update. With
    `train.grad_accum_steps` A > 1 the batch runs as A micro-batches in a scan (micro-batch a: rows
    a, a+A, ...), each with its memory rows, and their summed gradient of the whole batch's mean
    loss makes the update."""
    cfg, model, tx = setup.cfg, setup.model, setup.tx
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    base_key = jax.random.key(cfg.train.seed + 1)
    A = cfg.train.grad_accum_steps
    memory_batch_axes = jax.tree.map(lambda axes: axes.index("act_batch"), model_memory.logical_axes(cfg.model),
                                     is_leaf=lambda x: isinstance(x, tuple))

    def gradients(params, memory, batch, total_scored, rngs, aux_weight):
        """Gradient of this (micro-)batch's share of the mean loss: its NLL sum over the targets
        `loss_weights` scores / the step's scored targets."""
        def loss_fn(params):
            nll_BN, new_memory, aux = segment_nll(model, params, memory, batch, deterministic=rngs is None, rngs=rngs,
                                                  with_aux_loss=True)
            lm_loss = jnp.sum(nll_BN * batch["loss_weights"]) / jnp.maximum(total_scored, 1.0)
            # A memory's own loss (the compression network's) trains parameters the LM loss does not reach.
            return lm_loss + (0.0 if aux is None else aux_weight * aux), (new_memory, lm_loss, aux)

        (_, (memory, loss, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, memory, loss, aux

    def train_step(state, memory, batch):
        dropout = cfg.model.dropout > 0 or cfg.model.attn_dropout > 0
        key = jax.random.fold_in(base_key, state["step"])
        tokens, scored = jnp.sum(batch["weights"]), jnp.sum(batch["loss_weights"])
        if A == 1:
            grads, memory, loss, aux = gradients(state["params"], memory, batch, scored,
                                                 {"dropout": key} if dropout else None, 1.0)
        else:
            def micro(grads_sum, xs):
                index, micro_batch, micro_memory = xs
                rngs = {"dropout": jax.random.fold_in(key, index)} if dropout else None
                grads, micro_memory, loss, aux = gradients(state["params"], micro_memory, micro_batch, scored, rngs,
                                                           1.0 / A)
                return jax.tree.map(jnp.add, grads_sum, grads), (micro_memory, loss, aux)

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            micro_batches = jax.tree.map(lambda x: split_rows(x, 0, A), batch)
            micro_memories = jax.tree.map(lambda x, axis: split_rows(x, axis, A), memory, memory_batch_axes)
            grads, (micro_memories, losses, auxes) = jax.lax.scan(
                micro, zeros, (jnp.arange(A), micro_batches, micro_memories))
            memory = jax.tree.map(lambda x, axis: merge_rows(x, axis), micro_memories, memory_batch_axes)
            loss, aux = jnp.sum(losses), None if auxes is None else jnp.mean(auxes)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "tokens": tokens, "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(params), "lr": schedule(state["step"])}
        if aux is not None:
            metrics["compression_loss"] = aux
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, memory, metrics

    mem_sh, batch_sh = memory_shardings(setup), batch_shardings(setup)
    jitted = jax.jit(train_step, in_shardings=(setup.state_shardings, mem_sh, batch_sh),
                     out_shardings=(setup.state_shardings, mem_sh, sharding.replicated(setup.mesh)),
                     donate_argnums=(0, 1))
    return under_mesh(setup, jitted)


def split_rows(x, axis: int, parts: int):
    """[..., B, ...] (B at `axis`) -> [parts, ..., B / parts, ...]; part a holds rows a, a + parts, ...
    (strided, so each data-parallel shard's contiguous rows feed every part)."""
    shape = x.shape
    x = x.reshape(shape[:axis] + (shape[axis] // parts, parts) + shape[axis + 1:])
    return jnp.moveaxis(x, axis + 1, 0)


def merge_rows(x, axis: int):
    """The inverse of split_rows."""
    x = jnp.moveaxis(x, 0, axis + 1)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def make_eval_step(setup: Setup):
    """(params, memory, batch) -> (memory, sums): NLL, tokens, the add-ons' sums (add_ons.eval_sums:
    the kNN memory's retrieval statistics), and `nll_BN`, the segment's per-token NLL (0 at
    padding), for per-document and per-token breakdowns."""
    model, model_cfg = setup.model, setup.cfg.model

    def eval_step(params, memory, batch):
        nll_BN, memory, inter = segment_nll(model, params, memory, batch, with_intermediates=True)
        sums = {"nll_BN": nll_BN, "nll": jnp.sum(nll_BN), "tokens": jnp.sum(batch["weights"]),
                **add_ons.eval_sums(model_cfg, inter, memory, batch["weights"] > 0)}
        return memory, sums

    return jit_segment(setup, eval_step)


def cache_shardings(setup: Setup) -> dict:
    """The output cache's shardings (its rows over the data axes)."""
    return {name: sharding.logical_sharding(setup.mesh, setup.cfg, axes) for name, axes in output_cache.LOGICAL_AXES.items()}


def init_cache_memory(setup: Setup, spec: output_cache.CacheSpec, batch_size: int) -> dict:
    """{"model": the model's memory, "cache": an empty output cache}, sharded, for make_cache_eval_step."""
    cache = jax.jit(lambda: output_cache.init(batch_size, spec.size, spec.key_dim(setup.cfg.model.d_model)),
                    out_shardings=cache_shardings(setup))()
    return {"model": init_memory_sharded(setup, batch_size), "cache": cache}


def make_cache_eval_step(setup: Setup, spec: output_cache.CacheSpec, grid: tuple | None = None, collect: bool = False):
    """The eval step with the output cache (memtx/memory/output_cache.py) beside the model's memory:
    (params, {"model": memory, "cache": cache}, batch) -> (memory, sums). Sums: the mixed NLL under
    `spec` ("nll", and "nll_BN" for the breakdowns), the model's alone ("model_nll") and "tokens";
    with `grid` = (thetas, lams, fills), "grid_nll" [thetas, lams, fills] instead (tuning); with
    `collect`, also each token's model NLL, cache log-probability, gate features and readable
    entries as "per_token_*" (stream_documents gathers them: the gate's fit)."""
    model = setup.model

    def eval_step(params, memory, batch):
        nll_BN, model_memory, inter = segment_nll(model, params, memory["model"], batch, with_intermediates=True)
        (h_BND,) = inter["output_hidden"]
        cache = output_cache.reset_rows(memory["cache"], batch["reset"])
        keys_BND, queries_BND = output_cache.keys_and_queries(h_BND, spec)
        num_valid_B = jnp.sum(batch["weights"] > 0, axis=-1).astype(jnp.int32)
        targets_BN = batch["targets"]
        scores, tokens, valid, n_BN = output_cache.candidates(cache, queries_BND, keys_BND, targets_BN, num_valid_B, spec)
        weights_BN = batch["weights"]
        sums = {"tokens": jnp.sum(weights_BN), "model_nll": jnp.sum(nll_BN),
                **add_ons.eval_sums(setup.cfg.model, inter, model_memory, weights_BN > 0)}
        if grid is not None:
            sums["grid_nll"] = output_cache.grid_nll(nll_BN, scores, tokens, valid, n_BN, targets_BN, weights_BN, *grid)
        else:
            logp_BN = output_cache.log_prob(scores, tokens, valid, targets_BN, spec.theta)
            w_BN = output_cache.mixture_weight(spec, n_BN, h_BND, scores, valid)
            if collect:  # per token, for fitting the gate (evaluation.fit_cache)
                sums.update(per_token_nll_model=nll_BN, per_token_logp_cache=logp_BN, per_token_scored=weights_BN > 0,
                            per_token_features=output_cache.gate_features(h_BND, scores, valid, n_BN),
                            per_token_n=n_BN)
            mixed_BN = jnp.where(weights_BN > 0, output_cache.mix_nll(nll_BN, logp_BN, w_BN), 0.0)
            sums.update(nll_BN=mixed_BN, nll=jnp.sum(mixed_BN))
            # A document's first 64 positions: where the cache is nearly empty and a fixed lambda hurt in the probe.
            early_BN = (cache["seen"][:, None] + jnp.arange(weights_BN.shape[1])[None, :] < 64) & (weights_BN > 0)
            sums.update(first64_nll=jnp.sum(jnp.where(early_BN, mixed_BN, 0.0)),
                        first64_model_nll=jnp.sum(jnp.where(early_BN, nll_BN, 0.0)), first64_tokens=jnp.sum(early_BN))
        cache = output_cache.write(cache, keys_BND, targets_BN, num_valid_B)
        return {"model": model_memory, "cache": cache}, sums

    return jit_segment(setup, eval_step, memory_sharding={"model": memory_shardings(setup), "cache": cache_shardings(setup)})


def jit_segment(setup: Setup, fn, out_sharding=None, memory_sharding=None):
    """`fn(params, memory, batch) -> (memory, out)` jitted with the setup's shardings (`out`
    replicated unless `out_sharding` says otherwise; the memory's are the model's unless
    `memory_sharding` says otherwise), the memory buffers donated, and called under the mesh and
    the logical axis rules: the eval steps, the studies' steps, the recall task."""
    mem_sh = memory_sharding or memory_shardings(setup)
    jitted = jax.jit(fn, in_shardings=(setup.state_shardings["params"], mem_sh, batch_shardings(setup)),
                     out_shardings=(mem_sh, out_sharding or sharding.replicated(setup.mesh)), donate_argnums=(1,))
    return under_mesh(setup, jitted)


def under_mesh(setup: Setup, fn):
    """Calls `fn` with the mesh and the logical axis rules active (they are read at trace time)."""
    rules = sharding.rules(setup.cfg)

    def call(*args):
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules):
            return fn(*args)

    call.jitted = fn
    return call
