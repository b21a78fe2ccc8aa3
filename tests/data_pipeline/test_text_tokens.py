"""Token shards and the packed token stream: build round trip, exact packing in plan
order, rank independence, resume on another world size, the eval split, errors, S3."""

from __future__ import annotations

import hashlib
import io
import tarfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_pipeline import build
from data_pipeline import tokenizer as tokenizer_cli
from data_pipeline.arith import arith_lines
from data_pipeline.loader import DataError
from data_pipeline.shards import expand_urls, load_index
from data_pipeline.text_tokens import TokensConfig, TokenStreamSource, decode_text
from data_pipeline.tokenizer import Tokenizer

NUM_LINES, SEED, L = 1500, 7, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SimpleNamespace:
    """arith text shards -> char tokenizer (CLI) -> token shards (CLI), 4 shards."""
    root = tmp_path_factory.mktemp("arith")
    text, tokens, tok = root / "text", root / "tokens", root / "tok"
    args = ["--num", str(NUM_LINES), "--seed", str(SEED), "--shard-size", "400"]
    assert build.main(["builtin:arith", *args, "--out", str(text)]) == 0
    assert (
        tokenizer_cli.main(
            ["train", "--input", str(text), "--out", str(tok)]
            + ["--vocab-size", "24", "--model-type", "char"]
        )
        == 0
    )
    model = f"{tok}.model"
    assert build.main([str(text), "--tokenizer", model, *args[4:], "--out", str(tokens)]) == 0
    # reference: every shard's documents read with tarfile + np.load (not the loader's parser)
    docs = []
    for url in expand_urls(str(tokens)):
        with tarfile.open(url) as tar:
            shard = [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()]
        docs.append(shard)
    return SimpleNamespace(
        root=root,
        text=str(text),
        tokens=str(tokens),
        model=model,
        tokenizer=Tokenizer.load(model),
        lines=arith_lines(NUM_LINES, SEED),
        docs=docs,
        shard_streams=[np.concatenate(d) for d in docs],
    )


def source(corpus, *, rank=0, world_size=1, micro_batch=4, accum_steps=2, seed=0, **cfg):
    options = {"urls": corpus.tokens, "seq_len": L, **cfg}
    return TokenStreamSource(
        TokensConfig(**options),
        seed=seed,
        rank=rank,
        world_size=world_size,
        micro_batch=micro_batch,
        accum_steps=accum_steps,
    )


def test_token_shards_hold_documents_with_eos(corpus):
    tok = corpus.tokenizer
    assert tok.token_id("[MASK]") == 4 and tok.vocab_size == 18  # char model: the alphabet
    checksum = hashlib.sha256(Path(corpus.model).read_bytes()).hexdigest()
    all_docs = [doc for shard in corpus.docs for doc in shard]
    assert [len(shard) for shard in corpus.docs] == [400, 400, 400, 300]
    for doc, line in zip(all_docs, corpus.lines, strict=True):
        assert doc.dtype == np.int32 and doc[-1] == tok.eos_id
        assert tok.bos_id not in doc and tok.eos_id not in doc[:-1]
        assert tok.decode(doc[:-1].tolist()) == line
    for url, shard in zip(expand_urls(corpus.tokens), corpus.docs):
        index = load_index(url)
        assert index.meta["tokenizer_sha256"] == checksum
        assert [e.meta["num_tokens"] for e in index.samples] == [len(d) for d in shard]


def test_decode_text_splits_documents_and_drops_masks(corpus):
    tok = corpus.tokenizer
    mask = tok.token_id("[MASK]")
    ids = tok.encode("12 + 7 = 19") + [tok.eos_id] + tok.encode("3 + 4 = 7") + [tok.eos_id]
    assert decode_text(tok, ids) == "12 + 7 = 19\n3 + 4 = 7\n"
    noisy = [mask, tok.pad_id] + ids[:3] + [mask] + ids[3:]
    assert decode_text(tok, torch.tensor(noisy)) == "12 + 7 = 19\n3 + 4 = 7\n"


def test_unshuffled_windows_decode_to_the_lines(corpus):
    src = source(corpus, shuffle=False)
    windows = src.plan.train_tokens // L
    batch = src.read_sequences(0, windows)
    assert batch["tokens"].shape == (windows, L) and batch["tokens"].dtype == torch.int64
    assert torch.equal(batch["index"], torch.arange(windows))
    text = decode_text(corpus.tokenizer, batch["tokens"].flatten())
    lines = text.split("\n")
    assert lines[:-1] == corpus.lines[: len(lines) - 1]
    assert corpus.lines[len(lines) - 1].startswith(lines[-1])
    assert len(lines) > NUM_LINES - 5  # all but the cut tail
    src.close()


def test_packing_is_the_corpus_stream_in_plan_order(corpus):
    eval_sequences = 3
    src = source(corpus, eval_sequences=eval_sequences, seed=11)
    # reference: unshuffled corpus, held-out tail cut, each shard's training part
    corpus_stream = np.concatenate(corpus.shard_streams)
    train_end = len(corpus_stream) - eval_sequences * L
    bounds = np.cumsum([0] + [len(s) for s in corpus.shard_streams])
    parts = [corpus_stream[bounds[s] : min(bounds[s + 1], train_end)] for s in range(4)]
    orders = [src.plan.epoch_order(e)[0].tolist() for e in range(3)]
    assert all(sorted(order) == [s for s in range(4) if len(parts[s])] for order in orders)
    assert len({tuple(o) for o in orders}) > 1  # shuffled per epoch
    expected = np.concatenate([parts[s] for order in orders for s in order])
    # 2.5 epochs through next_batch: windows cross document and epoch boundaries
    steps = int(2.5 * train_end / (8 * L))
    batches = [src.next_batch() for _ in range(2 * steps)]
    got = torch.cat([b["tokens"] for b in batches]).flatten().numpy()
    assert np.array_equal(got, expected[: len(got)])
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(len(batches) * 4))
    src.close()


def _global_batches(sources, steps: int) -> list[torch.Tensor]:
    """Per step, the global batch: ranks in order, each rank's micro-batches in order."""
    out = []
    for _ in range(steps):
        parts = [[s.next_batch() for _ in range(s.accum_steps)] for s in sources]
        tokens = torch.cat([m["tokens"] for rank in parts for m in rank])
        index = torch.cat([m["index"] for rank in parts for m in rank])
        assert torch.equal(index, index.sort().values)
        out.append(tokens)
    return out


def test_two_ranks_see_the_same_global_batches_and_resume_across_world_sizes(corpus):
    one = source(corpus, micro_batch=4, accum_steps=2)
    two = [source(corpus, rank=r, world_size=2, micro_batch=2, accum_steps=2) for r in (0, 1)]
    reference = _global_batches([one], 6)
    assert all(torch.equal(a, b) for a, b in zip(reference, _global_batches(two, 6)))
    assert one.last_global_batch == two[0].last_global_batch == 8

    # stop the 1-rank run after 3 steps, resume on 2 ranks (and 2 ranks -> 1)
    first = source(corpus)
    _global_batches([first], 3)
    resumed = [source(corpus, rank=r, world_size=2, micro_batch=2, accum_steps=2) for r in (0, 1)]
    for s in resumed:
        s.load_state_dict([first.state_dict()])
    assert all(torch.equal(a, b) for a, b in zip(reference[3:], _global_batches(resumed, 3)))
    back = source(corpus)
    back.load_state_dict([s.state_dict() for s in two[:1]] + [two[1].state_dict()])
    more = _global_batches([one], 2)
    assert all(torch.equal(a, b) for a, b in zip(more, _global_batches([back], 2)))
    # baseline: a fresh source does not continue where the others stopped
    assert not torch.equal(_global_batches([source(corpus)], 1)[0], more[0])
    for s in [one, *two, first, *resumed, back]:
        s.close()


def test_eval_windows_are_held_out_and_split_over_ranks(corpus):
    eval_sequences = 5
    ranks = [source(corpus, rank=r, world_size=2, eval_sequences=eval_sequences) for r in (0, 1)]
    plan = ranks[0].plan
    corpus_stream = np.concatenate(corpus.shard_streams)
    tail = corpus_stream[len(corpus_stream) - eval_sequences * L :].reshape(eval_sequences, L)
    seen = {}
    for r, src in enumerate(ranks):
        for batch in src.eval_batches(2):
            assert len(batch["index"]) <= 2
            for i, row in zip(batch["index"].tolist(), batch["tokens"]):
                assert i % 2 == r and i not in seen
                seen[i] = row
    assert sorted(seen) == list(range(eval_sequences))
    assert all(np.array_equal(seen[i].numpy(), tail[i]) for i in seen)
    # every epoch's training pieces tile exactly the corpus before the held-out tail
    for epoch in range(2):
        start = epoch * plan.train_tokens
        pieces = plan.train_pieces(start, start + plan.train_tokens)
        spans = sorted(
            (int(plan.shard_start[p.shard]) + p.start, int(plan.shard_start[p.shard]) + p.stop)
            for p in pieces
        )
        assert spans[0][0] == 0 and spans[-1][1] == plan.eval_start
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    with pytest.raises(DataError, match="eval_sequences is 0"):
        next(source(corpus).eval_batches(2))


def test_tokenizer_checksum_and_clear_errors(corpus, tmp_path):
    src = source(corpus, tokenizer=corpus.model)
    assert src.tokenizer.vocab_size == 18
    # another tokenizer (bpe on the same text): refused by name, and mixing its shards too
    other = tmp_path / "other"
    assert (
        tokenizer_cli.main(
            ["train", "--input", corpus.text, "--out", str(other), "--vocab-size", "30"]
            + ["--model-type", "bpe"]
        )
        == 0
    )
    with pytest.raises(DataError, match="not the tokenizer the shards were built with"):
        source(corpus, tokenizer=f"{other}.model")
    other_tokens = tmp_path / "other_tokens"
    args = [corpus.text, "--tokenizer", f"{other}.model", "--limit", "50"]
    assert build.main([*args, "--out", str(other_tokens)]) == 0
    with pytest.raises(DataError, match="different tokenizers"):
        source(corpus, urls=[corpus.tokens, str(other_tokens)])
    with pytest.raises(DataError, match="built without --tokenizer"):
        source(corpus, urls=corpus.text)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        source(corpus, urls=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="seq_len 100000 is longer"):
        source(corpus, seq_len=100_000)
    cfg = TokensConfig(urls="x", shuffle=False, shuffle_seed=3)
    assert cfg.check({"shuffle", "shuffle_seed"}) == [
        ("shuffle_seed", "has no effect with shuffle: false")
    ]


def test_s3_round_trip(corpus, s3_endpoint):
    """Build token shards straight to S3 and stream them back: same batches as local."""
    prefix = f"s3://ckpts/{uuid.uuid4().hex}"
    args = [corpus.text, "--tokenizer", corpus.model, "--shard-size", "400"]
    assert build.main([*args, "--out", f"{prefix}/tokens"]) == 0
    import fsspec

    with fsspec.open(f"{prefix}/tok.model", "wb") as fh:
        fh.write(Path(corpus.model).read_bytes())
    remote = source(corpus, urls=f"{prefix}/tokens", tokenizer=f"{prefix}/tok.model", seed=3)
    local = source(corpus, seed=3)
    assert len(remote.indexes) == 4
    assert all(
        torch.equal(a, b) for a, b in zip(_global_batches([remote], 3), _global_batches([local], 3))
    )
    remote.close()
    local.close()
