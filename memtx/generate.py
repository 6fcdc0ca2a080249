"""Continue a document with a trained model, with whatever memory it has (XL cache, kNN store,
LaMemo):

    python -m memtx.generate --workdir RUN (--prompt TEXT | --prompt-file PATH) [--max-tokens 200]
        [--temperature 1.0] [--top-k 0] [--top-p 1.0] [--seed 0] [--greedy] [--step S] [--config.KEY=VALUE ...]

The prompt is read as the model reads a document in training and evaluation: BOS, then segment
after segment of `data.seq_len` tokens, each full segment run once and rolled into the memories
(the kNN store is written, the XL cache and LaMemo state advance). Then tokens are sampled one at
a time. Inside a segment, XL, kNN and RPE models keep a key/value cache: the segment's first
forward (over the partly filled segment, padded: causal attention makes the filled positions'
logits exactly the teacher-forced ones) returns every layer's keys and values of [memory ;
segment], and each new token then runs one row through the layers, attending over the cached
positions before it and searching the kNN store, without writing anything. A segment that fills
up is run whole once more and rolled into memory as in training, so the memories are written by
the same `model.apply` as training and evaluation and the logits equal the teacher-forced ones
(tests/test_generate.py).

LaMemo has no such cache: its memory is refreshed by looking ahead at the whole segment, so each
token runs one forward of the whole (padded) segment, O(N) work per token.

With --cache-fit (a fit `memtx.evaluate --cache-sizes` saved) tokens are drawn from the model mixed
with the output cache (memtx/memory/output_cache.py) as evaluation scores them: the store holds the
(output state, next token) pairs of the document's completed segments (a completed segment is
written when the token after it arrives: its last pair's next token), and each position also reads
its segment's earlier positions. The mixed log-probabilities equal the teacher-forced ones
(tests/test_generate.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from memtx import cache_tuning, compilation_cache
from memtx import state as state_lib
from memtx.checkpoint import run_checkpointer
from memtx.cli import ArgumentParser, Number, UsageError, resolve_config, run_cli
from memtx.config import Config
from memtx.data import tokenizer
from memtx.data.vocab import load_vocab
from memtx.memory import model_memory, output_cache, registry
from memtx.memory.output_cache import CacheSpec
from memtx.model import TransformerLM


class Generator:
    """One document at a time, batch 1. State: `memory` (what the completed segments of the
    document left), `segment` (the inputs of the current segment, fewer than N) and the logits
    that predict the token after the last input."""

    def __init__(self, cfg: Config, params, pad_id: int, kv_cache: bool = True, cache: CacheSpec | None = None):
        self.cfg = cfg
        self.model = TransformerLM(cfg.model)
        self.pad_id = pad_id  # padded inputs after the last real one: causal attention never reads them
        self.params = params
        self.N = cfg.data.seq_len

        # In-segment key/value cache: every kind but LaMemo (whose memory is refreshed by the
        # whole segment, so each of its tokens runs the whole segment).
        # `kv_cache=False`: every token runs the whole segment (for comparisons).
        self.cached = kv_cache and registry.of(cfg.model).kv_cache

        # The output cache (`cache`): the model's output states come back with its logits.
        self.cache_spec = cache
        mutable = ["intermediates"] if cache is not None else []

        def hidden(state):
            return state["intermediates"]["output_hidden"][0][0].astype(jnp.float32) if cache is not None else None

        def forward(params, memory, inputs_1N, num_valid_1, reset_1):
            memory = model_memory.reset_rows(memory, reset_1)
            out, state = self.model.apply({"params": params}, inputs_1N, memory, num_valid_1, return_cache=self.cached,
                                          mutable=mutable)
            return out[0][0].astype(jnp.float32), out[1], (out[2] if self.cached else None), hidden(state)

        def decode(params, memory, cache, token_11, position, reset_1):
            memory = model_memory.reset_rows(memory, reset_1)
            out, state = self.model.apply({"params": params}, token_11, memory, None, cache=cache, position=position,
                                          mutable=mutable)
            logits_11V, _, cache = out
            return logits_11V[0, 0].astype(jnp.float32), cache, hidden(state)

        self._forward = jax.jit(forward)
        self._decode = jax.jit(decode, donate_argnums=2)
        if cache is not None:
            self._mix = jax.jit(self._mixed_log_probs)
            self._write = jax.jit(self._write_segment, donate_argnums=0)
            self.h_ND = np.zeros((self.N, cfg.model.d_model), np.float32)  # output states of the current segment
            self.pending = None  # (output states, inputs) of the completed segment not yet in the store
        self.memory = model_memory.init(cfg.model, 1)
        self.segment: list[int] = []
        self.first_segment = True  # the next full segment starts a document: reset its row
        self.logits = None
        self.cache, self.cached_len = None, 0  # the current segment's attention cache, its filled length
        self.forwards = self.decodes = 0  # whole-segment forwards and one-token cached steps run

    def _run(self, tokens: list[int]):
        """The model over `tokens` (<= N of them, padded) with the completed segments' memory:
        (logits [N, V], the memory it writes, the attention cache or None)."""
        inputs = np.full((1, self.N), self.pad_id, np.int32)
        inputs[0, :len(tokens)] = tokens
        self.forwards += 1
        # Every segment counts as full (num_valid N): the memory a partial forward would write is
        # dropped, and LaMemo's look-ahead window depends on the segment's length (a document's
        # shorter last segment refreshes fewer slots), which for a document still being written
        # is the full N: the logits then equal those of the teacher-forced forward over the
        # continued text.
        return self._forward(self.params, self.memory, inputs, np.array([self.N], np.int32),
                             np.array([self.first_segment]))

    def start_document(self, bos_id: int) -> None:
        """A new document: the memory row is reset when its first segment is run (the output cache now)."""
        self.segment, self.first_segment, self.logits = [], True, None
        self.cache, self.cached_len = None, 0
        if self.cache_spec is not None:
            spec = self.cache_spec
            self.store = output_cache.init(1, spec.size, spec.key_dim(self.cfg.model.d_model))
            self.pending = None
        self.feed([bos_id])

    # ---------------------------------------------------------------- the output cache

    def _mixed_log_probs(self, store, h_1ND, targets_1N, num_valid_1, logits_V, row):
        """log p of the token after segment position `row`: the model's logits mixed with the cache,
        which holds the store and the segment's positions before `row` (`num_valid` = row of them,
        their next tokens in `targets`): evaluation's computation (step.make_cache_eval_step) at `row`."""
        spec = self.cache_spec
        keys, queries = output_cache.keys_and_queries(h_1ND, spec)
        scores, tokens, valid, n_BN = output_cache.candidates(store, queries, keys, targets_1N, num_valid_1, spec)
        w_BN = output_cache.mixture_weight(spec, n_BN, h_1ND, scores, valid)
        pick = lambda x: jax.lax.dynamic_slice_in_dim(x, row, 1, axis=1)  # noqa: E731
        logp_V = jax.nn.log_softmax(logits_V)
        return output_cache.log_distribution(logp_V[None, None], pick(scores), pick(tokens), pick(valid), spec.theta,
                                             pick(w_BN))[0, 0]

    def _write_segment(self, store, h_1ND, targets_1N):
        keys, _ = output_cache.keys_and_queries(h_1ND, self.cache_spec)
        return output_cache.write(store, keys, targets_1N, jnp.array([self.N], jnp.int32))

    def _with_cache(self, logits_V, n: int) -> jax.Array:
        """The logits of the token after segment position n - 1 mixed with the output cache."""
        targets = np.full((1, self.N), self.pad_id, np.int32)
        targets[0, :n - 1] = self.segment[1:n]
        return self._mix(self.store, self.h_ND[None], targets, np.array([n - 1], np.int32), logits_V, np.int32(n - 1))

    def _flush(self, next_token: int) -> None:
        """The completed segment goes into the store now that its last position's next token is known."""
        h_ND, inputs = self.pending
        targets = np.array([[*inputs[1:], next_token]], np.int32)
        self.store = self._write(self.store, h_ND[None], targets)
        self.pending = None

    def feed(self, tokens) -> None:
        """Appends inputs; every segment that fills up runs once and is rolled into memory."""
        tokens = [int(t) for t in tokens]
        while tokens:
            if self.cache_spec is not None and self.pending is not None:
                self._flush(tokens[0])
            take = self.N - len(self.segment)
            self.segment += tokens[:take]
            tokens = tokens[take:]
            if len(self.segment) == self.N:
                logits_NV, self.memory, _, h_ND = self._run(self.segment)
                self.logits = logits_NV[-1]
                if self.cache_spec is not None:
                    self.h_ND = np.array(h_ND)
                    self.logits = self._with_cache(self.logits, self.N)
                    self.pending = (self.h_ND.copy(), list(self.segment))
                self.segment, self.first_segment = [], False
                self.cache, self.cached_len = None, 0
            else:
                self.logits = None  # computed when asked for

    def next_logits(self) -> np.ndarray:
        """Logits [V] of the token after the last input."""
        if self.logits is None:
            n = len(self.segment)
            if not n:
                raise ValueError("no input yet: call start_document first")
            if self.cache is not None and self.cached_len == n - 1:  # one new token: a cached step
                self.logits, self.cache, h_1D = self._decode(
                    self.params, self.memory, self.cache, np.array([[self.segment[-1]]], np.int32),
                    np.int32(n - 1), np.array([self.first_segment]))
                self.decodes += 1
                if self.cache_spec is not None:
                    self.h_ND[n - 1] = np.asarray(h_1D)[0]
            else:  # the segment's first forward (the memory it would write is dropped)
                logits_NV, _, self.cache, h_ND = self._run(self.segment)
                self.logits = logits_NV[n - 1]
                if self.cache_spec is not None:
                    self.h_ND[:n] = np.asarray(h_ND)[:n]
            if self.cache_spec is not None:
                self.logits = self._with_cache(self.logits, n)
            self.cached_len = n
        return np.asarray(self.logits)


def sample(logits: np.ndarray, rng: np.random.Generator, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, allowed: int | None = None, banned=()) -> int:
    """A token id from `logits`: argmax when greedy (or temperature 0), else softmax(logits / T)
    cut to the top_k most likely and to the smallest set with probability >= top_p."""
    logits = np.array(logits, np.float64)
    if allowed is not None:
        logits[allowed:] = -np.inf
    for t in banned:
        logits[t] = -np.inf
    if greedy or temperature == 0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore"):
        z = logits / temperature
    if not np.isfinite(z.max()):  # a temperature so small that the scores overflow: its limit, the argmax
        return int(np.argmax(logits))
    p = np.exp(z - z.max())
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    kept = order[:top_k] if top_k > 0 else order
    if top_p < 1.0:
        cum = np.cumsum(p[kept]) / p.sum()
        kept = kept[:int(np.searchsorted(cum, top_p)) + 1]
    keep[kept] = True
    p = np.where(keep, p, 0.0)
    return int(rng.choice(len(p), p=p / p.sum()))


def generate(gen: Generator, prompt_ids, max_tokens: int, bos_id: int, rng: np.random.Generator, *,
             eos_id: int | None = None, on_token=None, **sampling) -> tuple[list[int], list[np.ndarray]]:
    """Starts a document, reads the prompt, samples up to `max_tokens` tokens (stops at eos_id).
    Returns the tokens and the logits each was drawn from."""
    gen.start_document(bos_id)
    gen.feed(prompt_ids)
    out, logits = [], []
    for _ in range(max_tokens):
        lg = gen.next_logits()
        token = sample(lg, rng, **sampling)
        out.append(token)
        logits.append(lg)
        if on_token is not None:
            on_token(token)
        if eos_id is not None and token == eos_id:
            break
        gen.feed([token])
    return out, logits


def load(workdir: str, config_spec: str | None, overrides: list[str], step: int | None):
    """(config, host parameters, step) of a run's checkpoint."""
    if not os.path.isdir(workdir):
        raise UsageError(f"work directory '{workdir}' does not exist")
    cfg = resolve_config(config_spec, workdir, list(overrides))
    compilation_cache.use(cfg.train.compilation_cache_dir)  # the run's, if it has one
    setup = state_lib.build(cfg)
    ckpt = run_checkpointer(cfg, workdir, async_save=False)
    step = ckpt.step_to_read(step)  # a named step: it must exist and be undamaged
    params = jax.device_get(ckpt.restore_params(step, setup.abstract_state["params"]))
    return cfg, params, step


def main(args: argparse.Namespace, rest: list[str]) -> int:
    if args.print_config:
        resolve_config(args.config, args.workdir, rest)  # prints it and exits
    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError("give exactly one of --prompt TEXT and --prompt-file PATH")
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise UsageError(f"prompt file '{args.prompt_file}' does not exist")
        with open(args.prompt_file, "rb") as f:
            prompt = f.read()
    else:
        prompt = args.prompt.encode("utf-8", "surrogateescape")  # bytes that are not UTF-8 come back as they were
    cache = cache_tuning.load_spec(args.cache_fit) if args.cache_fit else None
    if args.cache_size is not None:
        if cache is None:
            raise UsageError("--cache-size needs --cache-fit (the cache's fitted settings)")
        cache = dataclasses.replace(cache, size=args.cache_size)
    cfg, params, step = load(args.workdir, args.config, rest, args.step)
    vocab = load_vocab(cfg.data.vocab)
    gen = Generator(cfg, params, vocab.pad_id, cache=cache)
    ids = vocab.encode(prompt)
    m = cfg.model
    memory = registry.describe(m)
    if cache is not None:
        memory += (f"; output cache {cache.scorer} {cache.size}" + (f" top {cache.k}" if cache.k else "")
                   + f" (theta {cache.theta:g}, lambda {cache.lam:g}, fill {cache.fill:g})")
    print(f"{args.workdir} step {step}: {memory}, segment {cfg.data.seq_len}; prompt {len(ids):,} tokens",
          file=sys.stderr, flush=True)
    # Never padding; a document start (or the byte vocabulary's reserved EOS) ends the continuation.
    stop = {vocab.bos_id, getattr(vocab, "eos_id", None), *([tokenizer.EOS_ID] if vocab.name == "byte" else [])} - {None}
    t0 = time.perf_counter()
    gen.start_document(vocab.bos_id)
    gen.feed(ids)
    prompt_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    sys.stdout.buffer.write(prompt if args.echo else b"")
    t0 = time.perf_counter()
    count = 0
    for _ in range(args.max_tokens):
        token = sample(gen.next_logits(), rng, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       greedy=args.greedy, allowed=vocab.size, banned=[vocab.pad_id])
        count += 1
        if token in stop:
            break
        sys.stdout.buffer.write(vocab.decode([token]))
        sys.stdout.flush()
        gen.feed([token])
    gen_s = time.perf_counter() - t0
    print(f"\n[prompt read in {prompt_s:.2f}s; {count} tokens generated in {gen_s:.2f}s, "
          f"{count / max(gen_s, 1e-9):,.1f} tokens/s]", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a training work directory (config.json, checkpoints/)")
    p.add_argument("--config", help="a config file instead of WORKDIR/config.json")
    p.add_argument("--step", type=Number(int, ge=0), help="checkpoint step; default: the latest")
    p.add_argument("--prompt", help="the start of the document (text)")
    p.add_argument("--prompt-file", help="the start of the document (a file, read as bytes)")
    p.add_argument("--max-tokens", type=Number(int, ge=0), default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=Number(float, ge=0), default=1.0, help="softmax temperature; 0 is greedy")
    p.add_argument("--top-k", type=Number(int, ge=0), default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=Number(float, gt=0, le=1), default=1.0, help="nucleus: the smallest set with this probability")
    p.add_argument("--seed", type=Number(int, ge=0), default=0, help="sampling seed")
    p.add_argument("--greedy", action="store_true", help="always the most likely token")
    p.add_argument("--cache-fit", help="mix in the output cache with the settings `memtx.evaluate --cache-sizes` "
                                       "fitted and saved (WORKDIR/cache_fit_*.json)")
    p.add_argument("--cache-size", type=Number(int, ge=1), help="the output cache's entries (default: the fit's)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    return p


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
