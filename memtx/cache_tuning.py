"""Fitting the output cache (memtx/memory/output_cache.py) honestly: its inverse temperature theta,
its weight lambda and the fill constant are chosen on *tuning* documents that are never the
reported ones, the documents of the evaluation split right after the reported ones
(`data.eval_max_docs` of them), in one pass that scores a whole grid of settings.

A fit is a JSON file in the work directory (`cache_fit_*.json`): what was fitted, on which
documents, the tuning set's NLL with and without the cache, and the best fixed lambda beside the
best overall, and (with the `gate` mixture) the learned gate's weights, fitted on the same
documents in a second pass (`train_gate`); `memtx.evaluate --cache-fit FILE` reuses one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memtx.config_schema import type_problem
from memtx.errors import UsageError
from memtx.config import Config, stable_hash
from memtx.data import FileSource, load_vocab
from memtx.data.sources import file_documents
from memtx.memory import output_cache
from memtx.memory.output_cache import CacheSpec

# Inverse temperatures for unit-length h (cosines); raw h's are divided by d_model (|h|^2 ~ d_model
# after a layer norm). Fill 0: a fixed lambda.
THETAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
LAMS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FILLS = (0.0, 4.0, 16.0, 64.0, 256.0)


def tuning_documents(cfg: Config, count: int):
    """The evaluation split's documents after the reported `data.eval_max_docs`: (docs, first index)."""
    if cfg.data.task:
        raise UsageError("the output cache is tuned on a file corpus's documents (data.corpus); "
                         f"data.task '{cfg.data.task}' is not supported yet: pass --cache-fit FILE")
    if not cfg.data.eval_max_docs:
        raise UsageError("the output cache is tuned on the documents after the reported ones: "
                         "set --config.data.eval_max_docs=N (e.g. 64), or pass --cache-fit FILE")
    docs = file_documents(cfg.data, cfg.data.eval_split)
    first = cfg.data.eval_max_docs
    if len(docs) < first + count:
        raise UsageError(f"the {cfg.data.eval_split} split has {len(docs)} documents: after the {first} reported "
                         f"ones, {max(0, len(docs) - first)} are left to tune the cache on, fewer than "
                         f"--cache-tune-docs {count}")
    return docs[first:first + count], first


def tuning_source(cfg: Config, count: int):
    """(source_fn, first document index, documents) of the tuning documents."""
    docs, first = tuning_documents(cfg, count)
    vocab = load_vocab(cfg.data.vocab)
    source_fn = lambda shard_index, num_shards: FileSource(  # noqa: E731
        docs, vocab=vocab, shuffle=False, repeat=False, shard_index=shard_index, num_shards=num_shards,
        max_tokens=cfg.data.eval_doc_tokens)
    return source_fn, first, len(docs)


def grid(spec: CacheSpec, d_model: int) -> tuple:
    """(thetas, lams, fills) scored in the tuning pass (make_cache_eval_step's `grid`)."""
    scale = 1.0 if spec.normalize else 1.0 / d_model
    return tuple(t * scale for t in THETAS), LAMS, FILLS


def record(sums: dict, the_grid: tuple, cfg: Config, first: int, count: int) -> dict:
    """The fit's record from the tuning pass's sums: the best setting, the best fixed lambda, the
    tuning set's NLL with and without the cache, and what it was fitted on."""
    thetas, lams, fills = the_grid
    tokens = float(sums["tokens"])
    nll = np.asarray(sums["grid_nll"]) / max(tokens, 1.0)  # [thetas, lams, fills] mean NLL
    i, j, f = np.unravel_index(np.argmin(nll), nll.shape)
    fi, fj = np.unravel_index(np.argmin(nll[:, :, 0]), nll[:, :, 0].shape)
    model_nll = float(sums["model_nll"]) / max(tokens, 1.0)
    edges = [name for name, index, size in (("theta", i, len(thetas)), ("lambda", j, len(lams))) if index in (0, size - 1)]
    return {"theta": thetas[i], "lam": lams[j], "fill": fills[f],
            "fixed_lambda": {"theta": thetas[fi], "lam": lams[fj], "nll": float(nll[fi, fj, 0])},
            "nll": float(nll[i, j, f]), "model_nll": model_nll,
            "perplexity": math.exp(float(nll[i, j, f])), "model_perplexity": math.exp(model_nll),
            "at_grid_edge": edges, "grid": {"thetas": list(thetas), "lams": list(lams), "fills": list(fills)},
            "tuned_on": {"split": cfg.data.eval_split, "documents": [first, first + count],
                         "read": int(sums["documents"]), "tokens": int(tokens), "doc_tokens": cfg.data.eval_doc_tokens}}


def fitted_spec(spec: CacheSpec, record: dict) -> CacheSpec:
    return dataclasses.replace(spec, theta=float(record["theta"]), lam=float(record["lam"]), fill=float(record["fill"]))


def fit_path(workdir: str, spec: CacheSpec, step: int, identity: dict) -> str:
    return os.path.join(workdir, f"cache_fit_{spec.scorer}_size{spec.size}_k{spec.k}_step{step}_"
                                 f"{stable_hash(identity)}.json")


def save_fit(path: str, spec: CacheSpec, record: dict, identity: dict) -> None:
    with open(path, "w") as f:
        json.dump({"spec": dataclasses.asdict(fitted_spec(spec, record)), "fit": record, "identity": identity}, f,
                  indent=2)


def _read_fit(path: str) -> tuple[dict, CacheSpec]:
    """(record, fitted spec) of a saved fit; anything else is one line."""
    try:
        with open(path) as f:
            saved = json.load(f)
        record = saved["fit"]
        for key in ("theta", "lam", "fill"):
            if not math.isfinite(float(record[key])):
                raise ValueError(f"fit field '{key}' is {record[key]}")
        fixed, gate = record.get("fixed_lambda", {"theta": 1.0, "lam": 0.0}), record.get("gate", {"weights": []})
        for key, value in (("fixed_lambda.theta", fixed["theta"]), ("fixed_lambda.lam", fixed["lam"]),
                           *((f"gate.weights[{i}]", w) for i, w in enumerate(gate["weights"]))):
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError(f"fit field '{key}' is {value!r:.40}")
        spec = saved["spec"]
        types = typing.get_type_hints(CacheSpec)
        for name, value in spec.items():  # the JSON types of the fields given, as a config file's are checked
            wanted = type_problem(value, types[name]) if name in types else "not a field"
            if name == "gate" and not isinstance(value, list):
                wanted = "a list"
            if wanted:
                raise TypeError(f"spec field '{name}' must be {wanted}, got {value!r:.40}")
        return record, CacheSpec(**{**spec, **({"gate": tuple(spec["gate"])} if "gate" in spec else {})})
    except (OSError, ValueError, KeyError, TypeError, OverflowError, AttributeError) as e:
        raise UsageError(f"--cache-fit {path}: not a cache fit written by memtx.evaluate "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None


def load_fit(path: str, spec: CacheSpec) -> dict:
    """A saved fit's record, for `spec`'s scorer and normalisation (one-line errors otherwise)."""
    record, theirs = _read_fit(path)
    for key in ("scorer", "normalize"):
        if getattr(theirs, key) != getattr(spec, key):
            raise UsageError(f"--cache-fit {path} was fitted with cache {key} {getattr(theirs, key)!r}, "
                             f"not {getattr(spec, key)!r}")
    return {**record, "loaded_from": path}


def load_spec(path: str) -> CacheSpec:
    """The fitted cache a saved fit describes (memtx.generate --cache-fit): one-line errors."""
    return _read_fit(path)[1]


MIXTURES = ("fill", "fixed", "gate")  # the cache's weight: the grid's best lambda and fill, its best fixed lambda, a learned gate
GATE_STEPS, GATE_LEARNING_RATE, GATE_L2 = 400, 0.05, 1e-3


def parse_mixtures(text: str) -> tuple[str, ...]:
    """--cache-mixtures 'fill,gate' -> ("fill", "gate"); an unknown name is one line."""
    mixtures = tuple(dict.fromkeys(m.strip() for m in text.split(",")))
    if not all(m in MIXTURES for m in mixtures):
        raise UsageError(f"--cache-mixtures '{text}': each one of {', '.join(MIXTURES)}")
    return mixtures


def mixture_spec(spec: CacheSpec, record: dict, mixture: str) -> CacheSpec:
    """The fitted cache of one mixture: `fill` the grid's best setting (fitted_spec), `fixed` its
    best fixed lambda, `gate` the grid's theta with the learned gate (record["gate"])."""
    if mixture in ("fixed", "gate") and {"fixed": "fixed_lambda", "gate": "gate"}[mixture] not in record:
        raise UsageError(f"the cache fit {record.get('loaded_from', '')} has no '{mixture}' mixture: fit it again "
                         "(without --cache-fit)")
    if mixture == "fixed":
        fixed = record["fixed_lambda"]
        return dataclasses.replace(spec, theta=float(fixed["theta"]), lam=float(fixed["lam"]), fill=0.0)
    best = fitted_spec(spec, record)
    if mixture == "gate":
        return dataclasses.replace(best, gate=tuple(float(g) for g in record["gate"]["weights"]))
    return best


def train_gate(per_token: dict, lam: float) -> dict:
    """The learned gate fitted to the tuning documents' tokens (evaluation.fit_cache's collecting
    pass, the model frozen): logistic weights over output_cache.gate_features minimising the mean
    mixed NLL (plus GATE_L2 times their squared norm), GATE_STEPS full-batch Adam steps from a gate
    that gives every position the weight `lam` (the grid's). Returns its weights and the tuning
    tokens' NLL with it."""
    keep = per_token["per_token_scored"] & (per_token["per_token_n"] > 0)
    f = jnp.asarray(per_token["per_token_features"][keep])
    nll, logp = jnp.asarray(per_token["per_token_nll_model"][keep]), jnp.asarray(per_token["per_token_logp_cache"][keep])
    n = jnp.asarray(per_token["per_token_n"][keep])
    share = min(max(lam / output_cache.GATE_MAX, 1e-3), 1 - 1e-3)
    gate = jnp.zeros(f.shape[-1] + 1, jnp.float32).at[-1].set(math.log(share / (1 - share)))
    tx = optax.adam(GATE_LEARNING_RATE)

    def mean_nll(gate):
        return jnp.mean(output_cache.mix_nll(nll, logp, output_cache.gate_weight(f, gate, n)))

    def loss(gate):
        return mean_nll(gate) + GATE_L2 * jnp.sum(gate[:-1] ** 2)

    @jax.jit
    def fit(gate):
        def step(carry, _):
            gate, opt = carry
            updates, opt = tx.update(jax.grad(loss)(gate), opt, gate)
            return (optax.apply_updates(gate, updates), opt), None
        (gate, _), _ = jax.lax.scan(step, (gate, tx.init(gate)), None, length=GATE_STEPS)
        return gate, mean_nll(gate)

    start = float(mean_nll(gate))
    gate, fitted = fit(gate)
    total = float(per_token["per_token_scored"].sum())
    # over every scored token (those with an empty cache keep the model's NLL)
    rest = float(np.sum(per_token["per_token_nll_model"][per_token["per_token_scored"] & ~keep]))
    return {"weights": [float(g) for g in np.asarray(gate)], "steps": GATE_STEPS, "l2": GATE_L2,
            "learning_rate": GATE_LEARNING_RATE, "tokens": int(keep.sum()),
            "nll": (float(fitted) * float(keep.sum()) + rest) / max(total, 1.0),
            "nll_at_start": (start * float(keep.sum()) + rest) / max(total, 1.0)}
