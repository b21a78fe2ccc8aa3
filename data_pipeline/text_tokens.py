"""Token shards and the packed token stream that language models train on.

**Token shards** (``python -m data_pipeline.build SOURCE --tokenizer TOK.model --out
DIR``): every sample is one document, its ids as ``tokens.npy`` (int32, no BOS, EOS
appended); the shard index records each sample's ``num_tokens`` and, shard-wide, the
sha256 of the tokenizer's model proto, so a loader can check it holds the right
tokenizer and plan without opening a shard.

**The packed stream** (``data.name: tokens``). Every rank derives the same global plan:

1. the last ``eval_sequences`` windows of the *unshuffled* corpus (shards in URL
   order, documents in order) are held out for evaluation; the tokens before them are
   the training corpus;
2. epoch e orders the shards (a permutation seeded by (seed, e); URL order when
   ``shuffle`` is false); documents keep their order inside a shard; the epochs are
   concatenated into one endless stream of tokens;
3. that stream is cut into windows of ``seq_len``: global sequence i is tokens
   [i L, (i + 1) L). Windows cross document (and epoch) boundaries; EOS marks them.

Global batch g holds sequences g GB .. g GB + GB - 1 (GB = micro batch x accumulation x
ranks); rank r reads its contiguous slice, micro-batch by micro-batch. A sequence's
tokens are found through cumulative token counts and fetched with one byte-range read
per contiguous run of documents of a shard (local files or any fsspec URL, retried on
transient errors), read ahead in a thread pool. The position is one number, global
sequences consumed, so a run resumed on any number of ranks continues with exactly the
tokens it had not seen.

Shapes: B micro-batch, L seq_len.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import logging
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch

from configlib import option
from data_pipeline.loader import DataError, ShardedSource
from data_pipeline.shards import ShardIndex, retry

log = logging.getLogger(__name__)

TOKENS_MEMBER = "tokens.npy"
CHECKSUM_KEY = "tokenizer_sha256"


# --------------------------------------------------------------------------- tokens
def tokenizer_checksum(tokenizer: Any) -> str:
    """sha256 of the tokenizer's serialized model: what token shards record."""
    return hashlib.sha256(tokenizer.model_proto).hexdigest()


def decode_text(tokenizer: Any, ids: Sequence[int] | torch.Tensor | np.ndarray) -> str:
    """Text of a token sequence: documents (split at EOS) decoded and joined by newlines.

    Leftover [MASK], pad and BOS ids decode as nothing, so partly denoised samples read.
    """
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        ids = ids.tolist()
    drop = {tokenizer.pad_id, tokenizer.bos_id}
    try:
        drop.add(tokenizer.token_id("[MASK]"))
    except KeyError:
        pass
    eos = tokenizer.eos_id
    documents: list[list[int]] = [[]]
    for token in ids:
        token = int(token)
        if token == eos:
            documents.append([])
        elif token not in drop:
            documents[-1].append(token)
    return "\n".join(tokenizer.decode(doc) for doc in documents)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def token_samples(
    samples: Iterable[tuple[str, dict[str, bytes], dict[str, Any]]],
    tokenizer: Any,
    *,
    batch_size: int = 512,
) -> Iterator[tuple[str, dict[str, bytes], dict[str, Any]]]:
    """Text samples (``txt`` member) -> token samples: ``tokens.npy`` of the document's
    ids with EOS appended (no BOS) and ``num_tokens`` for the index. Encodes in batches."""
    eos = tokenizer.eos_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.source} defines no EOS id")
    pending: list[tuple[str, str]] = []

    def flush() -> Iterator[tuple[str, dict[str, bytes], dict[str, Any]]]:
        encoded = tokenizer.encode_batch([text for _, text in pending])
        for (key, _), ids in zip(pending, encoded):
            array = np.asarray([*ids, eos], dtype=np.int32)
            yield key, {TOKENS_MEMBER: npy_bytes(array)}, {"num_tokens": len(array)}
        pending.clear()

    for key, fields, _ in samples:
        if "txt" not in fields:
            raise ValueError(f"sample {key} has no txt member to tokenize")
        pending.append((key, fields["txt"].decode("utf-8")))
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    meta = ast.literal_eval(header.decode("latin1"))
    if meta["fortran_order"] or np.dtype(meta["descr"]).hasobject:
        raise ValueError(f"unsupported .npy header {meta}")
    return np.dtype(meta["descr"]), tuple(meta["shape"])


def _npy_array(raw: memoryview) -> np.ndarray:
    """A 1-D .npy member without copying (np.load on BytesIO costs ~10x more per doc)."""
    if bytes(raw[:6]) != b"\x93NUMPY":
        raise ValueError("tokens.npy is not a .npy array")
    if raw[6] == 1:
        start, length = 10, int.from_bytes(raw[8:10], "little")
    else:
        start, length = 12, int.from_bytes(raw[8:12], "little")
    dtype, shape = _npy_header(bytes(raw[start : start + length]))
    count = int(np.prod(shape))
    return np.frombuffer(raw, dtype=dtype, count=count, offset=start + length).reshape(shape)


def parse_token_run(data: bytes) -> list[np.ndarray]:
    """The ``tokens.npy`` arrays of a run of consecutive samples (a byte range of a shard
    that starts at a sample), in order.

    Reads the POSIX tar headers directly (name, size, type): tarfile's per-member objects
    cost about a millisecond per short document. Extended (pax / GNU long name) headers,
    which our writer never emits, fall back to tarfile.
    """
    out = []
    view = memoryview(data)
    suffix = b"." + TOKENS_MEMBER.encode()
    pos = 0
    while pos + 512 <= len(data):
        header = view[pos : pos + 512]
        name = bytes(header[:100]).split(b"\0", 1)[0]
        if not name:
            break  # end-of-archive blocks
        kind = bytes(header[156:157])
        if kind not in (b"0", b"\0"):
            return _parse_token_run_tarfile(data)
        size = int(bytes(header[124:136]).split(b"\0", 1)[0].strip() or b"0", 8)
        if name.endswith(suffix):
            out.append(_npy_array(view[pos + 512 : pos + 512 + size]))
        pos += 512 + (size + 511) // 512 * 512
    if pos > len(data):
        raise ValueError("run ends inside a member")
    return out


def _parse_token_run_tarfile(data: bytes) -> list[np.ndarray]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith("." + TOKENS_MEMBER):
                raw = tar.extractfile(member).read()
                out.append(np.load(io.BytesIO(raw), allow_pickle=False))
    return out


# --------------------------------------------------------------------------- config
@dataclass(kw_only=True)
class TokensConfig:
    name: str = option("tokens", "Data source.")
    urls: str | list[str] = option(
        doc="Token shards (built with --tokenizer): brace patterns, folders or s3:// prefixes."
    )
    seq_len: int = option(1024, "Tokens per training sequence (window of the packed stream).", ge=2)
    shuffle: bool = option(True, "Permute the shard order every epoch (documents keep theirs).")
    shuffle_seed: int | None = option(
        None, "Seed of the shard order; default: run.seed (set it to vary the model seed alone)."
    )
    eval_sequences: int = option(
        0, "Windows at the end of the unshuffled corpus held out for evaluation.", ge=0
    )
    tokenizer: str | None = option(
        None, "Tokenizer .model (path or URL) to load and check against the shards' checksum."
    )
    max_retries: int = option(4, "Retries of a failed read (exponential backoff).", ge=0)
    num_workers: int = option(2, "Reader threads per rank.", ge=1)
    prefetch: int = option(4, "Micro-batches read ahead per rank.", ge=1)

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        if not self.urls:
            out.append(("urls", "needs at least one shard pattern"))
        if not self.shuffle and "shuffle_seed" in given:
            out.append(("shuffle_seed", "has no effect with shuffle: false"))
        return out


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Piece:
    """Tokens [start, stop) of one shard (counted from the shard's first token)."""

    shard: int
    start: int
    stop: int


class TokenPlan:
    """Where every token of the packed stream comes from (rank-independent)."""

    def __init__(
        self,
        indexes: list[ShardIndex],
        seq_len: int,
        eval_sequences: int,
        seed: int,
        shuffle: bool,
    ):
        self.indexes = indexes
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.doc_start: list[np.ndarray] = []  # per shard: cumulative tokens, first 0
        for index in indexes:
            counts = []
            for entry in index.samples:
                if "num_tokens" not in entry.meta:
                    raise DataError(
                        f"{index.url} has no token counts in its index: it was built without "
                        "--tokenizer (python -m data_pipeline.build SOURCE --tokenizer TOK.model)"
                    )
                counts.append(int(entry.meta["num_tokens"]))
            self.doc_start.append(np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))
        self.shard_tokens = np.array([d[-1] for d in self.doc_start], dtype=np.int64)
        self.shard_start = np.concatenate([[0], np.cumsum(self.shard_tokens)])
        self.total_tokens = int(self.shard_start[-1])
        self.eval_sequences = eval_sequences
        self.eval_start = self.total_tokens - eval_sequences * seq_len
        self.train_tokens = self.eval_start
        if self.train_tokens < seq_len:
            raise DataError(
                f"data.seq_len {seq_len} is longer than the {self.train_tokens} training tokens "
                f"of {len(indexes)} shard(s) ({self.total_tokens} tokens, "
                f"{eval_sequences} x {seq_len} held out for evaluation)"
            )
        # each shard's share of the training corpus: the held-out tail ends the last shards
        self.train_len = np.clip(self.eval_start - self.shard_start[:-1], 0, self.shard_tokens)
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shards in epoch order, cumulative training tokens of that order, first 0)."""
        if epoch not in self._orders:
            shards = np.flatnonzero(self.train_len > 0)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, 0x70C5, epoch])
                shards = shards[rng.permutation(len(shards))]
            cum = np.concatenate([[0], np.cumsum(self.train_len[shards])])
            if len(self._orders) > 8:
                self._orders.clear()
            self._orders[epoch] = (shards, cum)
        return self._orders[epoch]

    def train_pieces(self, start: int, stop: int) -> list[Piece]:
        """Shard token runs holding training-stream tokens [start, stop)."""
        pieces = []
        while start < stop:
            epoch, offset = divmod(start, self.train_tokens)
            shards, cum = self.epoch_order(epoch)
            j = int(np.searchsorted(cum, offset, side="right")) - 1
            take = min(stop - start, int(cum[j + 1]) - offset)
            first = offset - int(cum[j])
            pieces.append(Piece(int(shards[j]), first, first + take))
            start += take
        return pieces

    def corpus_pieces(self, start: int, stop: int) -> list[Piece]:
        """Shard token runs holding tokens [start, stop) of the unshuffled corpus."""
        pieces = []
        while start < stop:
            shard = int(np.searchsorted(self.shard_start, start, side="right")) - 1
            take = min(stop - start, int(self.shard_start[shard + 1]) - start)
            first = start - int(self.shard_start[shard])
            pieces.append(Piece(shard, first, first + take))
            start += take
        return pieces

    def documents(self, piece: Piece) -> tuple[int, int]:
        """First and last document (sample positions) that ``piece`` touches."""
        starts = self.doc_start[piece.shard]
        first = int(np.searchsorted(starts, piece.start, side="right")) - 1
        last = int(np.searchsorted(starts, piece.stop - 1, side="right")) - 1
        return first, last


# ---------------------------------------------------------------------------- source
class TokenStreamSource(ShardedSource):
    """Data source over token shards: packed windows of ``seq_len`` (module docstring)."""

    cfg: TokensConfig
    thread_name = "tokens"

    def _setup(self, seed: int) -> None:
        cfg = self.cfg
        self.global_batch = self.last_global_batch = (
            self.micro_batch * self.accum_steps * self.world_size
        )
        self.seq_len = cfg.seq_len
        self.checksum = self._shards_checksum()
        self.tokenizer = self._load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        self.plan = TokenPlan(
            self.indexes,
            cfg.seq_len,
            cfg.eval_sequences,
            seed if cfg.shuffle_seed is None else cfg.shuffle_seed,
            cfg.shuffle,
        )
        self.sequences_done = 0  # global sequences consumed before the current global batch
        self._filesystems: dict[str, tuple[Any, str]] = {}
        self._queue: deque[tuple[int, Future]] = deque()  # (first sequence, future)

    # -------------------------------------------------------------------- checks
    def _shards_checksum(self) -> str | None:
        found: dict[str, str] = {}
        for index in self.indexes:
            checksum = index.meta.get(CHECKSUM_KEY)
            if checksum is not None:
                found.setdefault(checksum, index.url)
        if len(found) > 1:
            (a, url_a), (b, url_b) = list(found.items())[:2]
            raise DataError(
                f"data.urls mixes shards built with different tokenizers: {url_a} "
                f"(sha256 {a[:12]}) and {url_b} (sha256 {b[:12]})"
            )
        return next(iter(found), None)

    def _load_tokenizer(self, url: str):
        from data_pipeline.tokenizer import Tokenizer, TokenizerError

        try:
            tokenizer = Tokenizer.load(url)
        except TokenizerError as err:
            raise DataError(f"data.tokenizer: {err}") from None
        checksum = tokenizer_checksum(tokenizer)
        if self.checksum is None:
            log.warning("the shards record no tokenizer checksum; cannot check %s", url)
        elif checksum != self.checksum:
            raise DataError(
                f"data.tokenizer {url} (sha256 {checksum[:12]}) is not the tokenizer the shards "
                f"were built with (sha256 {self.checksum[:12]}, e.g. {self.indexes[0].url})"
            )
        return tokenizer

    # ------------------------------------------------------------------- reading
    def _fs(self, url: str) -> tuple[Any, str]:
        if url not in self._filesystems:
            self._filesystems[url] = fsspec.core.url_to_fs(url)
        return self._filesystems[url]

    def _read_piece(self, piece: Piece) -> np.ndarray:
        """One byte-range read of the documents under ``piece``; its tokens."""
        index = self.indexes[piece.shard]
        first, last = self.plan.documents(piece)
        begin = index.samples[first].offset
        end = index.samples[last].offset + index.samples[last].size
        fs, path = self._fs(index.url)
        data = retry(
            lambda: fs.cat_file(path, start=begin, end=end),
            what=f"reading {index.url}",
            attempts=self.cfg.max_retries + 1,
        )
        try:
            if len(data) != end - begin:
                raise ValueError(f"short read ({len(data)} of {end - begin} bytes)")
            docs = parse_token_run(data)
            counts = [len(d) for d in docs]
            expected = np.diff(self.plan.doc_start[piece.shard][first : last + 2]).tolist()
            if counts != expected:
                raise ValueError(f"token counts {counts[:4]}... differ from the index's")
        except (ValueError, tarfile.TarError) as err:
            keys = f"{index.samples[first].key}..{index.samples[last].key}"
            raise DataError(f"{index.url}: samples {keys} are corrupt ({err})") from None
        tokens = np.concatenate(docs)
        skip = piece.start - int(self.plan.doc_start[piece.shard][first])
        return tokens[skip : skip + piece.stop - piece.start]

    def _read_tokens(self, pieces: list[Piece], count: int) -> torch.Tensor:
        tokens = np.concatenate([self._read_piece(p) for p in pieces])
        return torch.from_numpy(tokens.astype(np.int64)).view(count, self.seq_len)

    def read_sequences(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Training sequences first .. first + count - 1 of the global plan."""
        pieces = self.plan.train_pieces(first * self.seq_len, (first + count) * self.seq_len)
        return {
            "tokens": self._read_tokens(pieces, count),
            "index": torch.arange(first, first + count, dtype=torch.int64),
        }

    # -------------------------------------------------------------- DataSource API
    def _micro_start(self, sequences_done: int, micro: int) -> int:
        per_rank = self.micro_batch * self.accum_steps
        return sequences_done + self.rank * per_rank + micro * self.micro_batch

    def _fill(self) -> None:
        # the next micro-batches after what is queued: (batch start, micro) advance in order
        done, micro = self.sequences_done, self.micro_index + len(self._queue)
        done += (micro // self.accum_steps) * self.global_batch
        micro %= self.accum_steps
        while len(self._queue) < self.cfg.prefetch:
            first = self._micro_start(done, micro)
            self._queue.append(
                (first, self._pool.submit(self.read_sequences, first, self.micro_batch))
            )
            micro += 1
            if micro == self.accum_steps:
                done, micro = done + self.global_batch, 0

    def next_batch(self) -> dict[str, Any]:
        self._fill()
        first, future = self._queue.popleft()
        assert first == self._micro_start(self.sequences_done, self.micro_index), "order broke"
        batch = future.result()
        if self._advance():
            self.sequences_done += self.global_batch
        self._fill()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sequences_done": self.sequences_done}

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        self._restore_position(states)
        positions = {s["sequences_done"] for s in states}
        if len(positions) != 1:
            raise ValueError(f"ranks saved different token positions: {sorted(positions)}")
        (self.sequences_done,) = positions
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()

    # ---------------------------------------------------------------- evaluation
    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's held-out windows (sequence i with i % world_size == rank), in
        batches of ``batch_size`` (the last may be smaller); "index" is the eval sequence."""
        if self.plan.eval_sequences == 0:
            raise DataError("data.eval_sequences is 0: no held-out sequences to evaluate on")
        mine = list(range(self.rank, self.plan.eval_sequences, self.world_size))
        for b in range(0, len(mine), batch_size):
            ids = mine[b : b + batch_size]
            tokens = []
            for i in ids:
                start = self.plan.eval_start + i * self.seq_len
                pieces = self.plan.corpus_pieces(start, start + self.seq_len)
                tokens.append(self._read_tokens(pieces, 1))
            yield {"tokens": torch.cat(tokens), "index": torch.tensor(ids, dtype=torch.int64)}
