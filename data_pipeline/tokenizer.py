"""SentencePiece tokenizers: train one on a text source, load it, encode and decode.

``python -m data_pipeline.tokenizer train --input A [--input B ...] --out PREFIX
--vocab-size N [--model-type unigram|bpe|char] [--user-symbols "[MASK]" ...]`` reads sentences
(one per non-empty line) from plain ``.txt`` files, folders of them, and WebDataset
shards (the ``txt`` member of each sample; see :mod:`data_pipeline.shards`), trains a
SentencePiece model and writes ``PREFIX.model`` and ``PREFIX.vocab`` to a local path or
an fsspec URL (``s3://bucket/tok/spm``), each whole or absent. ``encode --model M "text"``
and ``decode --model M 1 2 3`` are for looking at a trained model.

Special ids are fixed at training time so that every model we train agrees with T5's
layout: ``pad = 0``, ``eos = 1``, ``unk = 2``, ``bos = 3``, then the user symbols
(``[MASK]`` for the discrete-diffusion LMs) from id 4. User symbols are never split, even
when they appear inside a word.

Training is deterministic for a fixed corpus, options and ``seed``: sentence sampling
(``max_sentences``) uses our own seeded reservoir sample and SentencePiece's generator is
seeded as well.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from data_pipeline.shards import load_index, parse_sample, put_atomic

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
# char: one piece per character; --vocab-size is then an upper bound (the alphabet size)
MODEL_TYPES = ("unigram", "bpe", "char")
# SentencePiece skips longer sentences (bytes); we count them so the summary says so.
MAX_SENTENCE_BYTES = 4192


class TokenizerError(ValueError):
    """A user mistake: missing input, unreadable model, a vocabulary the corpus cannot fill."""


# ------------------------------------------------------------------------------ loading
class Tokenizer:
    """A SentencePiece model with the handful of ids a text model needs.

    Special ids that the model does not define (``bos`` of a T5 ``spiece.model``, say)
    read as ``None`` rather than SentencePiece's ``-1``, which would silently index the
    last row of an embedding table.
    """

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        import sentencepiece as spm

        self.source = source
        self._proto = bytes(model_proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except (RuntimeError, TypeError):
            raise TokenizerError(f"{source} is not a sentencepiece model") from None

    @classmethod
    def load(cls, url: str | os.PathLike) -> Tokenizer:
        """Read a ``.model`` file from a local path or any fsspec URL."""
        url = os.fspath(url)
        try:
            with fsspec.open(url, "rb") as fh:
                proto = fh.read()
        except FileNotFoundError:
            raise TokenizerError(f"tokenizer model {url} does not exist") from None
        except IsADirectoryError:
            raise TokenizerError(f"tokenizer model {url} is a folder, not a .model file") from None
        return cls(proto, source=url)

    # The processor holds a C++ object; pickle the model bytes instead so a Tokenizer can
    # travel to dataloader workers and Ray actors.
    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["proto"], state["source"])

    @property
    def model_proto(self) -> bytes:
        """The serialized model, as written to ``PREFIX.model``."""
        return self._proto

    @staticmethod
    def _defined(token_id: int) -> int | None:
        return None if token_id < 0 else token_id

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int | None:
        return self._defined(self._sp.pad_id())

    @property
    def bos_id(self) -> int | None:
        return self._defined(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return self._defined(self._sp.eos_id())

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def token_id(self, piece: str) -> int:
        """The id of a whole piece such as ``"[MASK]"``; KeyError when it is not one."""
        token_id = self._sp.piece_to_id(piece)
        if token_id == self._sp.unk_id() and piece != self._sp.id_to_piece(token_id):
            raise KeyError(
                f"{piece!r} is not a piece of {self.source}; reserve it at training time"
            )
        return token_id

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; pad/bos/eos are dropped, user symbols come back verbatim."""
        ids = [int(i) for i in ids]
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(
                    f"id {token_id} is out of range for a vocabulary of {self.vocab_size}"
                )
        return self._sp.decode(ids)


# ------------------------------------------------------------------------------ inputs
@dataclass
class _Source:
    kind: str  # "text" | "shard"
    url: str


@dataclass
class TrainSummary:
    """What a training run read and wrote."""

    model_url: str
    vocab_url: str
    vocab_size: int
    model_type: str
    sentences: int = 0
    text_files: int = 0
    shards: int = 0
    samples_without_text: int = 0
    too_long: int = 0
    user_symbols: dict[str, int] = field(default_factory=dict)


def _url_join(fs: Any, path: str, template: str) -> str:
    """A listed path as a URL of the same filesystem as ``template``."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return path
    protocol = template.split("://", 1)[0] + "://"
    return path if path.startswith(protocol) else protocol + path


def _resolve_inputs(inputs: Iterable[str]) -> list[_Source]:
    """Text files and shards named by ``inputs`` (files, brace patterns, folders, prefixes)."""
    from braceexpand import braceexpand

    sources: list[_Source] = []
    for spec in inputs:
        spec = os.fspath(spec)
        for item in braceexpand(spec):
            fs, path = fsspec.core.url_to_fs(item)
            if not fs.exists(path):
                raise TokenizerError(f"input {item} does not exist")
            if not fs.isdir(path):
                if item.endswith(".tar"):
                    sources.append(_Source("shard", item))
                else:  # any single file is read as text: the user named it explicitly
                    sources.append(_Source("text", item))
                continue
            found = sorted(p for p in fs.find(path) if p.endswith((".txt", ".tar")))
            if not found:
                raise TokenizerError(f"no .txt files or .tar shards under {item}")
            for p in found:
                kind = "shard" if p.endswith(".tar") else "text"
                sources.append(_Source(kind, _url_join(fs, p, item)))
    if not sources:
        raise TokenizerError("no inputs given")
    return sources


def _lines(text: str) -> Iterator[str]:
    for line in text.splitlines():
        line = line.strip()
        if line:
            yield line


def _text_file_sentences(url: str) -> Iterator[str]:
    try:
        with fsspec.open(url, "rt", encoding="utf-8", errors="strict") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    yield line
    except UnicodeDecodeError:
        raise TokenizerError(f"{url} is not UTF-8 text") from None


def _shard_sentences(url: str, summary: TrainSummary) -> Iterator[str]:
    import tarfile

    index = load_index(url)
    # One open handle and seeks: fsspec's read-ahead turns consecutive byte ranges into a
    # few large requests on object stores instead of one request per sample.
    with fsspec.open(url, "rb") as fh:
        for entry in index.samples:
            fh.seek(entry.offset)
            data = fh.read(entry.size)
            try:
                members = parse_sample(data)
            except tarfile.TarError as err:
                raise TokenizerError(f"{url}: sample {entry.key} is corrupt ({err})") from None
            text = members.get("txt")
            if text is None:
                summary.samples_without_text += 1
                continue
            try:
                yield from _lines(text.decode("utf-8"))
            except UnicodeDecodeError:
                raise TokenizerError(
                    f"{url}: sample {entry.key} has a txt that is not UTF-8"
                ) from None


def _sentences(sources: list[_Source], summary: TrainSummary, progress: bool) -> Iterator[str]:
    from tqdm import tqdm

    bar = tqdm(desc="read", unit=" lines", file=sys.stderr, disable=not progress, mininterval=1.0)
    try:
        for source in sources:
            if source.kind == "shard":
                summary.shards += 1
                lines = _shard_sentences(source.url, summary)
            else:
                summary.text_files += 1
                lines = _text_file_sentences(source.url)
            for line in lines:
                if len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                    summary.too_long += 1
                    continue
                summary.sentences += 1
                bar.update(1)
                yield line
    finally:
        bar.close()


class _Feed:
    """Hands sentences to SentencePiece and keeps any exception raised while reading.

    SentencePiece turns an exception from its sentence iterator into a RuntimeError
    carrying only the message; keeping the original lets a missing or non-UTF-8 input
    surface as the one-line error it is.
    """

    def __init__(self, sentences: Iterable[str]):
        self._it = iter(sentences)
        self.error: BaseException | None = None

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except BaseException as err:
            self.error = err
            raise


def _reservoir(sentences: Iterator[str], size: int, seed: int) -> list[str]:
    """A uniform sample of ``size`` sentences in one pass (Algorithm R), in corpus order."""
    rng = random.Random(seed)
    kept: list[tuple[int, str]] = []
    for i, sentence in enumerate(sentences):
        if i < size:
            kept.append((i, sentence))
        else:
            j = rng.randint(0, i)
            if j < size:
                kept[j] = (i, sentence)
    return [s for _, s in sorted(kept)]


# ------------------------------------------------------------------------------ training
def _vocab_text(tokenizer: Tokenizer) -> str:
    sp = tokenizer._sp
    return "".join(
        f"{sp.id_to_piece(i)}\t{sp.get_score(i) + 0.0:g}\n" for i in range(sp.get_piece_size())
    )


def _write_atomic(url: str, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(delete=False) as tmp:
        tmp.write(data)
    try:
        put_atomic(tmp.name, url)
    finally:
        os.unlink(tmp.name)


def _explain_training_error(err: RuntimeError, vocab_size: int, sentences: int) -> str:
    message = str(err)
    if sentences == 0:
        return "no text found in the inputs (every file and shard sample was empty)"
    match = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message)
    if match:
        return (
            f"vocab size {vocab_size} is too large for this corpus: sentencepiece can build at "
            f"most {match.group(2)} pieces from it; lower --vocab-size or add text"
        )
    return "sentencepiece training failed: " + " ".join(message.split())


def train_tokenizer(
    inputs: Sequence[str] | str,
    model_prefix: str,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    user_symbols: Sequence[str] = ("[MASK]",),
    max_sentences: int | None = None,
    seed: int = 0,
    *,
    progress: bool = True,
) -> TrainSummary:
    """Train a SentencePiece model on ``inputs`` and write ``model_prefix``.model/.vocab.

    ``inputs``: ``.txt`` files, ``.tar`` shards, brace patterns, folders or prefixes
    (local or fsspec). ``max_sentences`` keeps a seeded uniform sample of that many lines.
    Raises :class:`TokenizerError` for user mistakes; nothing is written then.
    """
    import sentencepiece as spm

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"model type {model_type!r} is not one of {list(MODEL_TYPES)}")
    if vocab_size < 5 + len(user_symbols):
        raise TokenizerError(
            f"vocab size {vocab_size} leaves no room for pieces after the 4 special ids and "
            f"{len(user_symbols)} user symbol(s)"
        )
    if not 0.9 <= character_coverage <= 1.0:
        raise TokenizerError(f"character coverage {character_coverage} must be in [0.9, 1]")
    if max_sentences is not None and max_sentences < 1:
        raise TokenizerError(f"max sentences {max_sentences} must be >= 1")
    symbols = list(dict.fromkeys(user_symbols))
    for symbol in symbols:
        if not symbol or any(ch.isspace() for ch in symbol):
            raise TokenizerError(f"user symbol {symbol!r} must be non-empty and without spaces")

    model_prefix = os.fspath(model_prefix)
    summary = TrainSummary(
        model_url=model_prefix + ".model",
        vocab_url=model_prefix + ".vocab",
        vocab_size=vocab_size,
        model_type=model_type,
    )
    sources = _resolve_inputs(inputs)
    sentences: Iterable[str] = _sentences(sources, summary, progress)
    if max_sentences is not None:
        sentences = _reservoir(iter(sentences), max_sentences, seed)

    feed = _Feed(sentences)
    writer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=feed,
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            user_defined_symbols=symbols,
            # we sample ourselves (seeded); 0 lets sentencepiece keep every line we pass
            input_sentence_size=0,
            max_sentence_length=MAX_SENTENCE_BYTES,
            minloglevel=2,  # its per-iteration log drowns our progress bar and summary
        )
    except RuntimeError as err:
        if feed.error is not None:
            raise feed.error from None
        raise TokenizerError(_explain_training_error(err, vocab_size, summary.sentences)) from None
    tokenizer = Tokenizer(writer.getvalue(), source=summary.model_url)
    summary.user_symbols = {s: tokenizer.token_id(s) for s in symbols}
    summary.vocab_size = tokenizer.vocab_size  # a char model may need fewer than asked
    # .vocab first: a .model present means the pair is complete.
    _write_atomic(summary.vocab_url, _vocab_text(tokenizer).encode("utf-8"))
    _write_atomic(summary.model_url, tokenizer.model_proto)
    return summary


# ------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.tokenizer", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a sentencepiece model on text files or shards")
    train.add_argument(
        "--input",
        action="append",
        required=True,
        help=".txt file, .tar shard, brace pattern, folder or fsspec prefix (repeatable)",
    )
    train.add_argument(
        "--out", required=True, help="output prefix: writes PREFIX.model, PREFIX.vocab"
    )
    train.add_argument("--vocab-size", type=int, required=True, help="pieces in the vocabulary")
    train.add_argument(
        "--model-type", choices=MODEL_TYPES, default="unigram", help="default unigram"
    )
    train.add_argument(
        "--user-symbols",
        nargs="*",
        default=["[MASK]"],
        help='symbols kept whole, each with its own id (default "[MASK]")',
    )
    train.add_argument(
        "--character-coverage", type=float, default=1.0, help="share of characters covered"
    )
    train.add_argument(
        "--max-sentences",
        type=int,
        default=None,
        help="train on a seeded sample of this many lines",
    )
    train.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    encode = sub.add_parser("encode", help="print the ids of a text")
    encode.add_argument("--model", required=True, help="a .model file (path or fsspec URL)")
    encode.add_argument("text", nargs="+", help="text to encode (words are joined by spaces)")
    decode = sub.add_parser("decode", help="print the text of ids")
    decode.add_argument("--model", required=True, help="a .model file (path or fsspec URL)")
    decode.add_argument("ids", nargs="+", type=int, help="token ids")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            summary = train_tokenizer(
                args.input,
                args.out,
                args.vocab_size,
                model_type=args.model_type,
                character_coverage=args.character_coverage,
                user_symbols=args.user_symbols,
                max_sentences=args.max_sentences,
                seed=args.seed,
            )
            symbols = ", ".join(f"{s}={i}" for s, i in summary.user_symbols.items()) or "none"
            print(
                f"trained {summary.model_type} tokenizer with {summary.vocab_size} pieces on "
                f"{summary.sentences} lines ({summary.text_files} text files, {summary.shards} "
                f"shards; skipped {summary.samples_without_text} samples without txt, "
                f"{summary.too_long} over-long lines); user symbols: {symbols}; "
                f"wrote {summary.model_url} and {summary.vocab_url}"
            )
        elif args.command == "encode":
            tokenizer = Tokenizer.load(args.model)
            print(" ".join(str(i) for i in tokenizer.encode(" ".join(args.text))))
        else:
            print(Tokenizer.load(args.model).decode(args.ids))
    except TokenizerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
