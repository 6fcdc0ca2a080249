"""Experiment configuration: plain dataclasses, Python config files, command-line overrides.

A config file is a Python module `configs/NAME.py` with `get_config(preset=None) -> Config`.
It is named on the command line as `configs/txl.py` or `configs/txl.py:preset`, and any field
can be overridden with `--config.SECTION.FIELD=VALUE`. Every problem with a config (unknown
key, wrong type, inconsistent values) raises `ConfigError` whose message is one line naming
the key; entry points print it and exit without a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from memtx.config_schema import bounded, check_fields, choices
from memtx.errors import ConfigError
from memtx.memory import knn_choices as knn_memory, registry


@dataclass
class KNNConfig:
    """The Memorizing Transformer's kNN memory (spec §3); off unless `enabled`."""

    enabled: bool = False
    layers: tuple[int, ...] = ()  # memory layer indices; empty: the 4th layer from the top (L-4), as meliad
    size: int = bounded(8192, ge=0, note="0: no entries")  # slots per row and head (not a parameter: any size at evaluation; 0: none)
    k: int = bounded(32, gt=0)  # retrieved entries per query
    # auto (approx on TPU; elsewhere exact up to 8K slots, blocked above) | exact (lax.top_k) |
    # approx (lax.approx_max_k; approximate on TPU only) | blocked (exact, tiled) |
    # bucketed (approximate, tiled) | chunked (exact, tiled): memtx/memory/knn.py
    backend: Literal[knn_memory.BACKENDS] = "auto"
    recall_target: float = bounded(0.95, gt=0, le=1)  # approx and bucketed backends
    chunk_size: int = bounded(4096, gt=0)  # slots per tile of the tiled backends
    bucket_size: int = bounded(16, gt=0)  # blocked backend: consecutive slots per bucket
    dtype: Literal[knn_memory.STORE_DTYPES] = "float32"  # storage: bfloat16 half the bytes; int8 keys, bfloat16 values
    gate_bias_init: float = 0.0  # initial b_h of the gate g = sigmoid(b_h) (0: g = 0.5)
    # The memory layer's local attention keeps Transformer-XL's relative-position term; false drops
    # it (and r_proj) as meliad's disable_position_encoding_for_memory_layers does.
    position_terms: bool = True
    # Query the store with q̂ + u (Transformer-XL's content bias), as this layer did before the
    # meliad fixes; false: with q̂ alone, as meliad (stored keys carry no position).
    query_content_bias: bool = False

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        if not self.enabled:
            return ()
        return self.layers or (default_knn_layer(num_layers),)


def default_knn_layer(num_layers: int) -> int:
    """The official implementation's (google-research/meliad) placement: the 4th layer from the
    top, index L-4 (layer 8 of 0..11), never the top layer; layer 0 for models of 4 or fewer."""
    return max(num_layers - 4, 0)


# data.loss_mask's values: the masks memtx/data/loss_masks.py defines (it checks that the names agree).
LOSS_MASKS = ("", "kv_recall_answers")

# jax.checkpoint_policies by name (model.remat): what a rematerialised layer keeps from its forward pass.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


@dataclass
@registry.sections
class ModelConfig:
    vocab_size: int = bounded(259, gt=0)  # byte vocabulary: 256 bytes + PAD, BOS, EOS
    vocab_pad_multiple: int = bounded(128, gt=0)  # embedding rows padded to this multiple (shardable); pad ids masked
    num_layers: int = bounded(4, gt=0)
    d_model: int = bounded(256, gt=0)
    num_heads: int = bounded(4, gt=0)
    head_dim: int = bounded(0, ge=0)  # 0: d_model // num_heads (must then divide)
    d_ff: int = bounded(1024, gt=0)
    mem_len: int = bounded(128, ge=0)  # memory length M: the kind's slots per layer (0 with xl: Transformer+RPE)
    # Relative distances beyond this are encoded as this (0: never); for evaluating with a longer
    # memory than in training, as Transformer-XL's clamp_len. Not a parameter: any value at evaluation.
    clamp_len: int = bounded(0, ge=0, note="0: no clamping")
    # The memory kind: one of memtx/memory/registry.py's (each a package memtx/memory/<kind>/)
    memory: str = "xl"
    pre_norm: bool = False  # False: post-LN as the reference; True: pre-LN (+ final LN)
    # L2-normalised queries and keys with a learned per-head scale in every layer (meliad does this
    # in every layer of its kNN models); the kNN layer always normalises. With it on in both, a
    # Transformer-XL baseline differs from its kNN model in the memory alone.
    qk_norm: bool = False
    # Transformer-XL's global content bias u (the query-independent score term u.k, shared by all
    # layers). False drops it: meliad's attention has no key-only term, so a kNN layer's local
    # content logits then equal the logits it gives stored entries (its query is q alone).
    content_bias: bool = True
    # Layers whose attention keys are smeared (Olsson et al. 2022): each head's key is
    # sigmoid(a) k_t + (1 - sigmoid(a)) k_{t-1}, a learned per head, so that one layer can form an
    # induction head (memtx/attention.py). XL stack only (memory "xl"; mem_len 0 included).
    smeared_keys: tuple[int, ...] = ()
    # Initial value of the learned per-head attention scale of layers whose q and k are normalised
    # (kNN layers, model.qk_norm); 0: sqrt(head_dim). meliad starts it at 1.
    qk_scale_init: float = bounded(0.0, ge=0, note="0: sqrt(head_dim)")
    dropout: float = bounded(0.0, ge=0, lt=1)  # embeddings, residual branches, FFN
    attn_dropout: float = bounded(0.0, ge=0, lt=1)  # attention probabilities (the papers use none)
    layer_norm_eps: float = bounded(1e-5, gt=0)
    init_std: float = bounded(0.02, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (parameters stay float32)
    # Whole-segment attention in blocks of this many queries, each scoring only the keys before
    # its last row (memtx/attention.py): less work under the causal mask; 0: the segment at once.
    query_block: int = bounded(0, ge=0, note="0: the whole segment")
    # Rematerialise every layer in the backward pass, keeping what this jax.checkpoint_policies
    # policy saves (memtx/layers.py REMAT_POLICIES: nothing_saveable, dots_saveable,
    # dots_with_no_batch_dims_saveable, everything_saveable); "": keep all activations.
    remat: Literal[("",) + REMAT_POLICIES] = ""
    # Run each run of identical consecutive layers as one jax.lax.scan over parameters stacked on a
    # leading "layers" axis (memtx/layers.py): compile time stays flat in depth. Layers that differ
    # (a kNN layer; each kind's scan_runs says) stay unrolled. Changes the parameter tree ("layers_0_to_10"), so a
    # checkpoint is read with the value it was written with (layers.stack_params converts).
    scan_layers: bool = False
    # Adaptive input/softmax (memtx/adaptive.py): cluster boundaries; empty: one tied embedding.
    # With cutoffs the vocabulary is not padded (vocab_pad_multiple is ignored).
    adaptive_cutoffs: tuple[int, ...] = ()
    adaptive_div_val: int = bounded(1, gt=0)  # cluster i has embedding width d_model // adaptive_div_val**i
    knn: KNNConfig = field(default_factory=KNNConfig)
    # ...then one section per memory kind with options, `model.<kind>`, added by registry.sections
    # (memtx/memory/<kind>/options.py), each valid with its kind only.

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m


@dataclass
class DataConfig:
    corpus: str = "stdlib"  # "stdlib", a directory, a glob of text files, or one file
    # A seqio task (memtx/data/tasks.py: pg19, wikitext103, enwik8, text8, files, stdlib or
    # tfds:NAME) instead of reading data.corpus directly; needs TensorFlow (requirements-data.txt).
    task: str = ""
    data_dir: str = ""  # the task's data: a TFDS data dir (local or gs://) or a directory of files
    text_key: str = "text"  # the text feature of a tfds:NAME task
    shuffle_buffer: int = bounded(256, gt=0)  # documents held to shuffle a seqio task in training (files: exact)
    vocab: str = "byte"  # "byte" or a SentencePiece .model file (python -m memtx.data.train_sentencepiece)
    # Document shards of a training batch (0: one per process). A fixed count makes the batches
    # independent of how many processes read them, so a run resumes on another process count.
    shards: int = 0
    split_fractions: tuple[int, ...] = (98, 1, 1)  # train / validation / test hash buckets
    seq_len: int = bounded(128, gt=0)  # segment length N
    batch_size: int = bounded(8, gt=0)  # global number of rows, each streaming one document
    seed: int = bounded(0, ge=0, lt=2**32, text="in 0..2**32-1")  # document shuffling seed
    eval_split: Literal["train", "validation", "test"] = "validation"
    eval_batch_size: int = bounded(8, gt=0)
    eval_max_docs: int = bounded(0, ge=0, note="0: no limit")  # 0: every document of the split
    # Evaluation reads each document's first this many tokens (0: all of it): more documents for the
    # same time, a tighter interval. Files only (data.task: whole documents).
    eval_doc_tokens: int = bounded(0, ge=0, note="0: no limit")
    # Training loss on some tokens only (memtx/data/loss_masks.py): "" every token; kv_recall_answers
    # the recall task's answers. Every token is still read and written to memory; evaluation
    # scores every token.
    loss_mask: Literal[LOSS_MASKS] = ""


@dataclass
class OptimConfig:
    learning_rate: float = bounded(1e-3, gt=0)
    warmup_steps: int = bounded(100, ge=0)
    final_lr_ratio: float = bounded(0.0, ge=0)  # cosine decays to learning_rate * final_lr_ratio
    b1: float = bounded(0.9, ge=0, lt=1, note="Adam's moment decay")
    b2: float = bounded(0.999, ge=0, lt=1, note="Adam's moment decay")
    weight_decay: float = bounded(0.0, ge=0)
    clip_norm: float = bounded(0.25, ge=0)  # global-norm clipping as in the papers; 0 disables


@dataclass
class TrainConfig:
    steps: int = bounded(1000, gt=0)
    seed: int = bounded(0, ge=0, lt=2**32, text="in 0..2**32-1")  # parameter init and dropout
    log_every: int = bounded(20, gt=0)
    checkpoint_every: int = bounded(200, gt=0)
    keep_checkpoints: int = bounded(2, gt=0)
    stop_after: int = bounded(0, ge=0, note="0: run to train.steps")  # stop this run after this many steps (resumable); 0: run to `steps`
    checkpoint_dir: str = ""  # default WORKDIR/checkpoints; with several hosts a shared path or gs://
    # Warm start: a fresh run takes the parameters this model shares with another run's latest
    # checkpoint (its work directory or checkpoint directory); the rest (e.g. a new kNN layer's
    # gate) start from their initialisation, the optimizer and the data stream from scratch.
    init_from: str = ""
    # Validation while training: every `eval_every` steps (0: never) and at the last step, the
    # first `eval_max_docs` documents (0: all) of data.eval_split, scored as memtx.evaluate does;
    # into metrics.jsonl (eval_* keys) and TensorBoard (eval/).
    eval_every: int = bounded(0, ge=0, note="0: never")
    eval_max_docs: int = bounded(16, ge=0, note="0: every document")
    # Before compiling, compare memtx.fit's per-device estimate (parameters, optimizer, memories,
    # activations) with the devices' memory and stop in one line if it cannot fit.
    check_memory: bool = True
    # Gradient accumulation: each step's batch runs as this many micro-batches of
    # data.batch_size / grad_accum_steps rows (row r in micro-batch r mod grad_accum_steps, so every
    # data-parallel shard takes part in each), each with its own rows of the memory, and the
    # summed gradient makes one update: the same update as the whole batch, in less activation memory.
    grad_accum_steps: int = bounded(1, gt=0)
    # The persistent compilation cache (a directory, local or gs://): a rerun or resumed run
    # with the same config and JAX skips compiling. "": off.
    compilation_cache_dir: str = ""
    # Steps (first, last) whose execution is traced with jax.profiler into WORKDIR/profile (for
    # TensorBoard's profile plugin or Perfetto); (): none.
    profile_steps: tuple[int, ...] = ()
    # Peak FLOP/s of one device for model FLOPs utilisation (MFU) in the progress line and the
    # metrics; 0: the table in memtx/flops.py by device kind (no MFU for a kind it lacks, e.g. CPUs).
    peak_flops_per_device: float = bounded(0.0, ge=0)


@dataclass
class MeshConfig:
    shape: tuple[int, ...] = (-1, 1, 1)  # one entry may be -1: fill with the remaining devices
    axes: tuple[str, ...] = ("data", "fsdp", "model")
    # Logical axis name -> mesh axes. Layers name logical axes only; this is the one place
    # that decides how they are laid out on the mesh.
    rules: tuple[tuple[str, Any], ...] = (
        # parameters
        ("vocab", "model"),
        ("embed", "fsdp"),
        ("mlp", "model"),
        ("heads", "model"),
        ("kv", None),
        ("qkv", None),
        # activations and memory state
        ("act_batch", ("data", "fsdp")),
        ("act_seq", None),
        ("act_embed", None),
        ("act_heads", "model"),
        ("act_kv", None),
        ("act_mlp", "model"),
        ("act_vocab", "model"),
        ("act_mem", None),
        ("layers", None),
    )


@dataclass
class Config:
    name: str = "txl"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)


# ---------------------------------------------------------------------------------------------
# Loading and overriding


def config_dirs() -> list[str]:
    """Where a config named without a path is looked for: ./configs, then the package's own
    configs (memtx/configs: in a clone a link to the top-level configs/, in an installed wheel a
    copy of them), from any working directory."""
    package = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.abspath("configs"), os.path.join(package, "configs"),
                  os.path.join(os.path.dirname(package), "configs")]
    dirs = {}
    for d in candidates:
        if os.path.isdir(d):
            dirs.setdefault(os.path.realpath(d), d)
    return list(dirs.values())


def find_config_file(path: str) -> str:
    """`path` itself, or for a bare name (`txl`, `txl.py`) the file of that name in config_dirs()."""
    if os.path.isfile(path):
        return path
    if os.sep not in path and "/" not in path:
        name = path if path.endswith(".py") else path + ".py"
        for directory in config_dirs():
            if os.path.isfile(os.path.join(directory, name)):
                return os.path.join(directory, name)
        known = sorted({f[:-3] for d in config_dirs() for f in os.listdir(d)
                        if f.endswith(".py") and not f.startswith("_")})
        raise ConfigError(f"no config named '{path}'" + (f" (known: {', '.join(known)})" if known else "")
                          + "; or give a file path")
    raise ConfigError(f"config file '{path}' does not exist")


def load_config_file(spec: str) -> Config:
    """Loads `path/to/file.py[:preset]` (or `NAME[:preset]`, e.g. `txl:cpu`, from config_dirs())
    by calling its `get_config(preset)`."""
    path, _, preset = spec.partition(":")
    path = find_config_file(path)
    module_spec = importlib.util.spec_from_file_location(f"memtx_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SystemExit as e:  # sys.exit() in the file: it would end the run without a word
        raise ConfigError(f"config file '{path}' called sys.exit({e.code!r}) while loading") from None
    except SyntaxError as e:
        raise ConfigError(f"config file '{path}' has a syntax error at line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - the user's file: report it in one line
        raise ConfigError(f"config file '{path}' failed to load: {_one_line(e)}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file '{path}' has no get_config()")
    presets = getattr(module, "PRESETS", None)
    try:
        cfg = module.get_config(preset) if preset else module.get_config()
    except SystemExit as e:
        raise ConfigError(f"get_config({preset!r}) of '{path}' called sys.exit({e.code!r})") from None
    except KeyError as e:
        missing = e.args[0] if e.args else None
        if preset and isinstance(missing, str) and missing in preset:  # the preset (or its base) is unknown
            known = f" (presets: {', '.join(presets)})" if isinstance(presets, dict) else ""
            raise ConfigError(f"config file '{path}' has no preset '{preset}'{known}") from None
        raise ConfigError(f"get_config({preset!r}) of '{path}' failed: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"get_config({preset!r}) of '{path}' failed: {_one_line(e)}") from None
    if not isinstance(cfg, Config):
        raise ConfigError(f"get_config() of '{path}' must return memtx.config.Config")
    return cfg


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _field_types(obj) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _parse_value(key: str, text: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key '{key}' expects true/false, got {text!r}")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects an integer, got {text!r}") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects a number, got {text!r}") from None
    if typ is str or choices(typ):  # a Literal's names are checked with the rest (check_fields)
        return text
    if origin is tuple:
        args = typing.get_args(typ)
        try:
            body = text.strip()  # 9, or 9 or 8,9 or (8, 9); an empty text is the empty tuple
            value = ast.literal_eval(body if body.startswith("(") else f"({body.rstrip(',')},)" if body.rstrip(",") else "()")
        except (ValueError, SyntaxError):
            if args and args[0] is str:  # unquoted names: data,fsdp,model
                value = tuple(part.strip() for part in text.strip().strip("()").split(",") if part.strip())
            else:
                raise ConfigError(f"config key '{key}' expects a tuple like 2,2,2; got {text!r}") from None
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (int, str):
            if not all(isinstance(v, args[0]) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"config key '{key}' expects a tuple of {args[0].__name__}, got {text!r}")
        return value
    raise ConfigError(f"config key '{key}' cannot be set from the command line")


def apply_override(cfg: Config, key: str, text: str) -> None:
    """Sets `cfg.<key>` (dotted, e.g. 'model.num_layers') from its command-line text."""
    node = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            prefix = ".".join(parts[:depth])
            where = f" under '{prefix}'" if prefix else ""
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean '{'.'.join(parts[:depth] + close)}'?)" if close else f"; known keys{where}: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        if depth == len(parts) - 1:
            typ = _field_types(node)[part]
            if dataclasses.is_dataclass(getattr(node, part)):
                raise ConfigError(f"config key '{key}' is a section; set one of its fields")
            setattr(node, part, _parse_value(key, text, typ))
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"unknown config key '{key}' ('{'.'.join(parts[:depth + 1])}' is not a section)")


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--config.a.b=1', '--config.c', '2'] -> [('a.b', '1'), ('c', '2')]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognised argument '{arg}' (overrides look like --config.model.num_layers=4)")
        body = arg[len("--config."):]
        if "=" in body:
            key, text = body.split("=", 1)
        elif i + 1 < len(args):
            key, text = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"config key '{body}' has no value")
        out.append((key, text))
        i += 1
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _as_tuple(value):
    """JSON lists (at any depth) back to the tuples they were saved from."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def from_dict(data: dict, where: str = "saved config") -> Config:
    """Inverse of `to_dict` (for the resolved config saved in a work directory). A key of the
    wrong type or an unknown one is a one-line ConfigError naming it (`where`: the file)."""

    def check(key: str, typ, value):
        if typ is bool:
            ok = isinstance(value, bool)
        elif typ is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif typ is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif typ is str or choices(typ):
            ok = isinstance(value, str)
        else:
            return value
        if not ok:
            raise ConfigError(f"{where}: key '{key}' must be {'str' if choices(typ) else typ.__name__}, got {value!r}")
        return value

    def build(cls, values, prefix=""):
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'the config'}' must be a JSON object, got {values!r:.60}")
        hints = typing.get_type_hints(cls)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {sorted(prefix + k for k in unknown)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            typ, value = hints[f.name], values[f.name]
            if dataclasses.is_dataclass(typ):
                value = build(typ, value, prefix + f.name + ".")
            elif typing.get_origin(typ) is tuple:
                if not isinstance(value, (list, tuple)):
                    raise ConfigError(f"{where}: key '{prefix}{f.name}' must be a list, got {value!r:.60}")
                value = _as_tuple(value)
            else:
                value = check(prefix + f.name, typ, value)
            kwargs[f.name] = value
        return cls(**kwargs)

    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and "memory_type" in model and "memory" not in model:  # saved before the rename
        data = {**data, "model": {("memory" if k == "memory_type" else k): v for k, v in model.items()}}
    return build(Config, data)


def stable_hash(obj, length: int = 8) -> str:
    """A short hex digest of a JSON-able object (keys sorted): names files after what they hold."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def config_hash(cfg: Config) -> str:
    """12 hex digits identifying a resolved config (recorded beside results)."""
    return stable_hash(to_dict(cfg), 12)


def save_json(cfg: Config, path: str) -> None:
    """Written to a temporary file and renamed: a kill never leaves a half-written config."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(to_dict(cfg), f, indent=2)
    os.replace(tmp, path)


def load_json(path: str) -> Config:
    """A saved config; unreadable, damaged or ill-typed, a one-line ConfigError naming the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is damaged (not valid JSON: {str(e).splitlines()[0]}); restore it or use "
                          "--config") from None
    return from_dict(data, where=path)


# ---------------------------------------------------------------------------------------------
# Validation (before anything is compiled)


def resolve_mesh_shape(shape: tuple[int, ...], num_devices: int) -> tuple[int, ...]:
    if sum(1 for s in shape if s == -1) > 1:
        raise ConfigError(f"mesh.shape {shape} may have at most one -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh.shape {shape} must have positive sizes (or one -1)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"mesh.shape {shape} does not fit {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) > num_devices:
        raise ConfigError(f"mesh.shape {shape} needs {math.prod(shape)} devices but {num_devices} are available")
    return shape  # fewer than num_devices: the first ones (one process only; see sharding.make_mesh)


def data_parallel_size(rules, mesh_sizes: dict) -> int:
    """How many ways the batch rows are split: the product of the mesh axes `act_batch` maps to."""
    axes = dict(rules).get("act_batch")
    axes = axes if isinstance(axes, (tuple, list)) else (axes,)
    return math.prod(mesh_sizes[a] for a in axes if a is not None)


def check_declared(cfg: Config) -> None:
    """Every field against what is declared beside it (config_schema: Literal names, ranges, finite
    floats), section by section, the memory kinds' option sections included."""

    def walk(section, prefix: str) -> None:
        check_fields(section, prefix)  # a section replaced by something else included
        for f in dataclasses.fields(section):
            if dataclasses.is_dataclass(getattr(section, f.name)):
                walk(getattr(section, f.name), f"{prefix}{f.name}.")

    if not isinstance(cfg, Config):
        raise ConfigError(f"the config must be a memtx.config.Config, got {type(cfg).__name__}")
    walk(cfg, "")


def validate(cfg: Config, num_devices: int) -> tuple[int, ...]:
    """Checks consistency; returns the resolved mesh shape. Raises ConfigError naming the key:
    first each field against its declaration, then what depends on several fields."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    check_declared(cfg)
    if m.head_dim == 0 and m.d_model % m.num_heads:
        raise ConfigError(
            f"config key 'model.num_heads' ({m.num_heads}) does not divide model.d_model ({m.d_model}); "
            "change one or set model.head_dim")
    if m.d_model % 2:
        raise ConfigError(f"config key 'model.d_model' must be even (sinusoid positions), got {m.d_model}")
    cuts = tuple(m.adaptive_cutoffs)
    if cuts and (cuts[0] <= 0 or any(b <= a for a, b in zip(cuts, cuts[1:])) or cuts[-1] >= m.vocab_size):
        raise ConfigError(f"config key 'model.adaptive_cutoffs' must be strictly increasing in (0, "
                          f"model.vocab_size={m.vocab_size}), got {cuts}")
    if m.d_model // m.adaptive_div_val ** len(cuts) < 1:
        raise ConfigError(f"config key 'model.adaptive_div_val' ({m.adaptive_div_val}) leaves the last cluster "
                          f"no embedding width (d_model {m.d_model}, {len(cuts)} cutoffs)")
    knn = m.knn
    kind = registry.KINDS.get(m.memory)
    if kind is None:
        raise ConfigError(f"config key 'model.memory' must be one of {', '.join(registry.KINDS)}, got '{m.memory}'")
    for other in registry.KINDS.values():  # options of another kind than the one chosen are a mistake
        if other.options and other is not kind:
            section, default = other.section(m), other.options()
            for f in dataclasses.fields(section):
                if getattr(section, f.name) != getattr(default, f.name):
                    raise ConfigError(f"config key 'model.{other.name}.{f.name}' applies only with "
                                      f"model.memory '{other.name}' (this model's is '{kind.name}')")
    if not kind.knn:
        for f in dataclasses.fields(KNNConfig):
            if getattr(knn, f.name) != getattr(KNNConfig(), f.name):
                raise ConfigError(f"config key 'model.knn.{f.name}' is a kNN memory option, which "
                                  f"model.memory '{kind.name}' does not have")
    if m.qk_norm and not kind.qk_norm:
        raise ConfigError(f"config key 'model.qk_norm' does not apply with model.memory '{kind.name}' "
                          "(it follows its authors' attention)")
    if m.qk_scale_init and not (m.qk_norm or knn.enabled):
        raise ConfigError("config key 'model.qk_scale_init' applies to layers with normalised q and k: set "
                          "model.qk_norm=true or enable the kNN memory")
    if m.smeared_keys and not kind.smeared_keys:
        kinds = " or ".join(f"'{k.name}'" for k in registry.KINDS.values() if k.smeared_keys)
        raise ConfigError(f"config key 'model.smeared_keys' applies with model.memory {kinds} only (this model's is "
                          f"'{kind.name}')")
    for layer in m.smeared_keys:
        if not 0 <= layer < m.num_layers:
            raise ConfigError(f"config key 'model.smeared_keys' has layer {layer}, outside 0..{m.num_layers - 1}")
    if kind.options:  # other kinds' sections hold their defaults (above)
        kind.section(m).check(m, d)
    if not knn.enabled:  # options of a memory that is off would be ignored without a word
        for f in dataclasses.fields(KNNConfig):
            if f.name != "enabled" and getattr(knn, f.name) != getattr(KNNConfig(), f.name):
                raise ConfigError(f"config key 'model.knn.{f.name}' applies only with the kNN memory on: set "
                                  "model.knn.enabled=true, or leave it at its default")
    if knn.enabled:
        for layer in knn.layers:
            if not 0 <= layer < m.num_layers:
                raise ConfigError(f"config key 'model.knn.layers' has layer {layer}, outside 0..{m.num_layers - 1}")
        if 0 < knn.size < knn.k:
            raise ConfigError(f"config key 'model.knn.k' ({knn.k}) is larger than model.knn.size ({knn.size})")
        if knn.query_content_bias and not m.content_bias:
            raise ConfigError("config key 'model.knn.query_content_bias' adds the content bias u, which "
                              "model.content_bias=false removes")
    if len(d.split_fractions) != 3 or min(d.split_fractions) < 0 or d.split_fractions[0] <= 0:
        raise ConfigError(f"config key 'data.split_fractions' must be 3 non-negative ints (train > 0), got {d.split_fractions}")
    if d.data_dir and not d.task:
        raise ConfigError("config key 'data.data_dir' is the data of a seqio task: set data.task too, or read files "
                          "with data.corpus")
    if d.eval_doc_tokens and d.task:
        raise ConfigError("config key 'data.eval_doc_tokens' applies to file corpora (data.corpus), not data.task")
    if d.shards < 0 or (d.shards and d.batch_size % d.shards):
        raise ConfigError(f"config key 'data.shards' must be 0 (one per process) or divide data.batch_size "
                          f"({d.batch_size}), got {d.shards}")
    if d.vocab != "byte" and not d.vocab.endswith(".model"):
        raise ConfigError(f"config key 'data.vocab' must be byte or a SentencePiece .model file, got '{d.vocab}'")
    if d.batch_size % t.grad_accum_steps:
        raise ConfigError(f"config key 'train.grad_accum_steps' ({t.grad_accum_steps}) must divide data.batch_size "
                          f"({d.batch_size})")
    if t.profile_steps and (len(t.profile_steps) != 2 or not 0 < t.profile_steps[0] <= t.profile_steps[1]):
        raise ConfigError(f"config key 'train.profile_steps' must be (first, last) with 0 < first <= last, "
                          f"got {t.profile_steps}")
    if o.warmup_steps >= t.steps:
        raise ConfigError(f"config key 'optim.warmup_steps' ({o.warmup_steps}) must be < train.steps ({t.steps})")

    mesh = cfg.mesh
    if len(mesh.shape) != len(mesh.axes):
        raise ConfigError(f"config key 'mesh.shape' {mesh.shape} must have one size per axis in mesh.axes {mesh.axes}")
    shape = resolve_mesh_shape(mesh.shape, num_devices)
    sizes = dict(zip(mesh.axes, shape))
    for rule in mesh.rules:
        targets = rule[1] if isinstance(rule, (tuple, list)) and len(rule) == 2 else None
        targets = targets if isinstance(targets, (tuple, list)) else (targets,)
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
                and all(t is None or isinstance(t, str) for t in targets)):
            raise ConfigError(f"config key 'mesh.rules' must be (logical axis, mesh axes) pairs like "
                              f"('act_batch', ('data', 'fsdp')), got {rule!r:.60}")
    for name, target in mesh.rules:
        for axis in (target if isinstance(target, (tuple, list)) else (target,)):
            if axis is not None and axis not in sizes:
                raise ConfigError(f"config key 'mesh.rules' maps '{name}' to unknown mesh axis '{axis}'")
    dp = data_parallel_size(mesh.rules, sizes)
    for key, value in (("data.batch_size", d.batch_size), ("data.eval_batch_size", d.eval_batch_size)):
        if value % dp:
            raise ConfigError(f"config key '{key}' ({value}) is not divisible by the data-parallel size {dp}")
    if (d.batch_size // t.grad_accum_steps) % dp:
        raise ConfigError(f"config key 'train.grad_accum_steps' ({t.grad_accum_steps}) leaves micro-batches of "
                          f"{d.batch_size // t.grad_accum_steps} rows, not divisible by the data-parallel size {dp}")
    return shape
