"""Train a SentencePiece vocabulary on a local corpus, offline (no TensorFlow needed).

    python -m memtx.data.train_sentencepiece --corpus stdlib --vocab-size 8000 --out vocab/stdlib8k
    python -m memtx.data.train_sentencepiece --corpus 'data/pg19/train/*.txt' --vocab-size 32000 --out vocab/pg19_32k

Writes OUT.model and OUT.vocab; use it with --config.data.vocab=OUT.model and
--config.model.vocab_size=VOCAB_SIZE. Ids: 0 pad, 1 </s>, 2 <unk>, 3 <s> (seqio's layout for
the first three), then "\\n" and the learned pieces. Text is not normalised and unknown
characters fall back to their UTF-8 bytes, so decoding gives back exactly the text encoded.
The corpus is what `data.corpus` accepts (a directory, a glob, a file or "stdlib"); only its
training split is read (data.split_fractions' default buckets), at most --max-mb of it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Iterator

from memtx.cli import ArgumentParser, Number, UsageError, check_output_dir, run_cli
from memtx.data.corpus import DEFAULT_FRACTIONS, list_documents, read_document, split_documents


def training_lines(corpus: str, max_bytes: int) -> Iterator[str]:
    """The non-empty lines of the corpus's training documents (UTF-8 ones), up to `max_bytes`."""
    total = 0
    for doc in split_documents(list_documents(corpus), "train", DEFAULT_FRACTIONS):
        try:
            text = read_document(doc).decode("utf-8")
        except UnicodeDecodeError:
            continue
        for line in text.splitlines():
            if line.strip():
                yield line
                total += len(line) + 1
                if total >= max_bytes:
                    return


def train(corpus: str, out: str, vocab_size: int, model_type: str = "unigram", max_mb: float = 100.0) -> str:
    """Trains the model; returns the path of OUT.model."""
    import sentencepiece as spm

    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_lines(corpus, int(max_mb * 2**20)),
        model_prefix=out, vocab_size=vocab_size, model_type=model_type,
        pad_id=0, eos_id=1, unk_id=2, bos_id=3, user_defined_symbols=["\n"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9995,
        max_sentence_length=1 << 16, minloglevel=2)
    return out + ".model"


def main(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise UsageError(f"unknown arguments: {' '.join(rest)}")
    check_output_dir(os.path.dirname(args.out) or ".", "--out")  # before reading any text
    t0 = time.perf_counter()
    try:
        path = train(args.corpus, args.out, args.vocab_size, args.model_type, args.max_mb)
    except RuntimeError as e:  # SentencePiece's own complaints, e.g. too little text for the vocabulary size
        raise UsageError(f"SentencePiece training failed: {str(e).splitlines()[0]}") from None
    print(f"wrote {path} ({args.vocab_size} ids) in {time.perf_counter() - t0:.1f}s; use "
          f"--config.data.vocab={path} --config.model.vocab_size={args.vocab_size}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(print_config=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="stdlib", help="a directory, glob, file or 'stdlib' (default)")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.vocab")
    p.add_argument("--vocab-size", type=Number(int, ge=300, note="4 special ids, 256 byte fallbacks and pieces"),
                   default=8000)
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    p.add_argument("--max-mb", type=Number(float, gt=0), default=100.0, help="read at most this many MiB of text (default 100)")
    return p


def cli() -> None:
    sys.exit(run_cli(main, parser()))


if __name__ == "__main__":
    cli()
