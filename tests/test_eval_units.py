"""Evaluation's units: bits per byte for every vocabulary (the bytes the scored tokens decode to)
and progress counted in tokens (the expected total exact for bytes, estimated for others)."""

import math
import re

import jax
import pytest

from memtx import evaluation as evaluate_lib
from memtx import state as state_lib
from memtx.data import count_tokens, list_documents
from memtx.data.sources import FileSource
from memtx.data.train_sentencepiece import train as train_spm
from memtx.data.vocab import load_vocab
from tests.helpers import make_corpus, tiny_config


def _evaluate(corpus, vocab="byte", vocab_size=None, doc_tokens=0):
    cfg = tiny_config(corpus, mesh_shape=(1, 1, 1))
    cfg.data.vocab = vocab
    if vocab_size:
        cfg.model.vocab_size = vocab_size
    setup = state_lib.build(cfg, state_lib.sharding.make_mesh(cfg, jax.devices()[:1]))
    params = state_lib.init_state(setup, seed=0)["params"]
    docs = list_documents(corpus)
    v = load_vocab(vocab)
    source_fn = lambda shard, shards: FileSource(docs, vocab=v, shuffle=False, repeat=False, shard_index=shard,
                                                 num_shards=shards, max_tokens=doc_tokens)
    return evaluate_lib.evaluate(setup, params, source_fn, verbose=True, log_every=2), docs


def test_expected_tokens_are_exact_for_the_byte_vocabulary(tmp_path):
    docs = list_documents(str(make_corpus(tmp_path / "c")))
    for max_tokens in (0, 1000):
        source = FileSource(docs, shuffle=False, repeat=False, max_tokens=max_tokens)
        read = sum(len(ids) for _, _, ids in source.documents(0, 0))
        assert source.expected_tokens() == read
        if max_tokens:
            assert read < count_tokens(docs)  # the limit cut something (the check above can fail)


def test_progress_counts_tokens_and_ends_at_the_total(tmp_path, capsys):
    corpus = str(make_corpus(tmp_path / "c"))
    result, _ = _evaluate(corpus)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tokens ")]
    assert lines, "no progress line"
    counts = [tuple(int(x.replace(",", "")) for x in re.match(r"tokens ([\d,]+)/([\d,]+)", line).groups())
              for line in lines]
    assert all(total == result["tokens"] for _, total in counts)
    assert [done for done, _ in counts] == sorted(done for done, _ in counts)  # monotone
    assert all("tok/s" in line for line in lines[1:])


@pytest.mark.slow
def test_bits_per_byte_with_a_sentencepiece_vocabulary(tmp_path):
    corpus = str(make_corpus(tmp_path / "c"))
    spm_path = train_spm(corpus, str(tmp_path / "spm"), vocab_size=600, max_mb=1)
    spm_result, docs = _evaluate(corpus, spm_path, vocab_size=600)
    byte_result, _ = _evaluate(corpus)
    # Identity normalisation with byte fallback: the ids decode to the files' bytes exactly.
    assert spm_result["bytes"] == byte_result["bytes"] == byte_result["tokens"] == count_tokens(docs)
    assert spm_result["tokens"] < spm_result["bytes"]  # several bytes per token
    assert spm_result["bits_per_byte"] == pytest.approx(spm_result["nll_sum"] / (math.log(2) * spm_result["bytes"]))
    assert spm_result["bits_per_token"] > spm_result["bits_per_byte"]
    # A document limit in tokens: bytes are those of the scored prefix only.
    cut, _ = _evaluate(corpus, spm_path, vocab_size=600, doc_tokens=200)
    vocab = load_vocab(spm_path)
    prefixes = [len(vocab.decode(vocab.encode(open(d.path, "rb").read())[:200])) for d in docs]
    assert cut["bytes"] == sum(prefixes) < spm_result["bytes"]
