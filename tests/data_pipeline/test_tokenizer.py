"""SentencePiece training and loading: text files and shards in, .model/.vocab out (local
and S3), ids that round-trip, [MASK] kept whole, deterministic, and a CLI whose user
mistakes are one line and exit 2."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, launch_env

from data_pipeline import build
from data_pipeline.tokenizer import Tokenizer, TokenizerError, train_tokenizer

ADJECTIVES = [
    "red",
    "quiet",
    "enormous",
    "tiny",
    "curious",
    "golden",
    "sleepy",
    "brave",
    "silver",
    "ancient",
    "hungry",
    "purple",
]
NOUNS = [
    "cat",
    "mountain",
    "river",
    "teacher",
    "robot",
    "garden",
    "violin",
    "lantern",
    "dragon",
    "window",
    "pilot",
    "forest",
]
VERBS = [
    "watches",
    "follows",
    "paints",
    "remembers",
    "carries",
    "ignores",
    "finds",
    "builds",
    "borrows",
    "visits",
]
TEMPLATES = [
    "the {a} {n} {v} the {b} {m}.",
    "every morning a {a} {n} {v} my {m}",
    "why does the {n} always {v2} the {b} {m}?",
    "{A} {n}s and {b} {m}s, said the {n}.",
]


def corpus_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        a, b = rng.choice(ADJECTIVES), rng.choice(ADJECTIVES)
        n, m, v = rng.choice(NOUNS), rng.choice(NOUNS), rng.choice(VERBS)
        template = rng.choice(TEMPLATES)
        lines.append(template.format(a=a, A=a.capitalize(), b=b, n=n, m=m, v=v, v2=v[:-1]))
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(corpus_lines(3000)) + "\n")
    return path


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    assert (
        build.main(["builtin:digits", "--out", str(out), "--limit", "200", "--shard-size", "64"])
        == 0
    )
    return out


@pytest.fixture
def s3(s3_endpoint):
    """The moto endpoint, with s3fs instances cached against an earlier endpoint dropped."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_endpoint
    s3fs.S3FileSystem.clear_instance_cache()


HELD_OUT = [
    "the brave robot paints the quiet lantern.",
    "why does the garden always follow the golden violin?",
    "Tiny rivers and red cats, said the teacher.",
]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_trains_on_text_and_round_trips(tmp_path, corpus, model_type):
    summary = train_tokenizer(
        [str(corpus)], str(tmp_path / "spm"), 100, model_type=model_type, progress=False
    )
    assert (summary.sentences, summary.text_files, summary.shards) == (3000, 1, 0)
    tok = Tokenizer.load(tmp_path / "spm.model")
    assert tok.vocab_size == 100
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, 3)
    vocab = (tmp_path / "spm.vocab").read_text().splitlines()
    assert len(vocab) == 100 and vocab[4].split("\t")[0] == "[MASK]"
    for text in HELD_OUT:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    batch = tok.encode_batch(HELD_OUT)
    assert batch == [tok.encode(t) for t in HELD_OUT]
    # pad/bos/eos are dropped by decode, so padded rows decode to their text
    assert tok.decode([tok.bos_id, *batch[0], tok.eos_id, tok.pad_id, tok.pad_id]) == HELD_OUT[0]
    # learned pieces: a frequent word is one piece, not a run of characters
    assert len(tok.encode("mountain")) < len("mountain")
    # the tokenizer travels to dataloader workers
    assert pickle.loads(pickle.dumps(tok)).encode(HELD_OUT[1]) == tok.encode(HELD_OUT[1])


def test_mask_symbol_has_its_own_id_and_is_never_split(tmp_path, corpus):
    train_tokenizer([str(corpus)], str(tmp_path / "with"), 100, progress=False)
    train_tokenizer([str(corpus)], str(tmp_path / "without"), 100, user_symbols=(), progress=False)
    tok = Tokenizer.load(tmp_path / "with.model")
    mask = tok.token_id("[MASK]")
    assert mask == 4 and tok.piece(mask) == "[MASK]"
    for text in ["the [MASK] cat", "the cat[MASK]paints", "[MASK][MASK] river", "golden[MASK]"]:
        ids = tok.encode(text)
        assert ids.count(mask) == text.count("[MASK]"), (text, [tok.piece(i) for i in ids])
        assert tok.decode(ids) == text
    # baseline: without reserving it, the same text splits into pieces and has no id
    plain = Tokenizer.load(tmp_path / "without.model")
    assert len(plain.encode("[MASK]")) > 1
    with pytest.raises(KeyError, match="MASK"):
        plain.token_id("[MASK]")


def test_training_is_deterministic(tmp_path, corpus):
    def train(name: str, **kwargs) -> bytes:
        train_tokenizer([str(corpus)], str(tmp_path / name), 100, progress=False, **kwargs)
        return (tmp_path / f"{name}.model").read_bytes()

    assert train("a") == train("b")
    assert train("c", max_sentences=400, seed=1) == train("d", max_sentences=400, seed=1)
    # baseline: the sample (and so the model) depends on the seed
    assert train("e", max_sentences=400, seed=2) != train("c", max_sentences=400, seed=1)


def test_trains_on_digit_caption_shards_and_text_together(tmp_path, digit_shards, corpus):
    summary = train_tokenizer(
        [str(digit_shards)], str(tmp_path / "digits"), 60, model_type="bpe", progress=False
    )
    assert (summary.sentences, summary.shards, summary.samples_without_text) == (200, 4, 0)
    tok = Tokenizer.load(tmp_path / "digits.model")
    caption = build.digit_caption(7)
    assert tok.decode(tok.encode(caption)) == caption
    # the captions' words were learned: "photo" and "digit" are single pieces
    assert {"▁photo", "▁digit"} <= {tok.piece(i) for i in tok.encode(caption)}

    # a brace pattern of two shards plus a text file
    pattern = str(digit_shards / "shard-{000000..000001}.tar")
    both = train_tokenizer([pattern, str(corpus)], str(tmp_path / "both"), 100, progress=False)
    assert (both.sentences, both.shards, both.text_files) == (128 + 3000, 2, 1)


def test_writes_and_loads_through_s3(tmp_path, s3, corpus, digit_shards):
    import uuid

    import fsspec

    # moto keeps objects across tests of one process: use prefixes no other test writes
    base = f"ckpts/tok-test-{uuid.uuid4().hex[:8]}"
    local = train_tokenizer([str(digit_shards)], str(tmp_path / "local"), 30, progress=False)
    assert (
        build.main(
            [
                "builtin:digits",
                "--out",
                f"s3://{base}/shards",
                "--limit",
                "200",
                "--shard-size",
                "64",
            ]
        )
        == 0
    )
    remote = train_tokenizer([f"s3://{base}/shards"], f"s3://{base}/tok/spm", 30, progress=False)
    assert (remote.sentences, remote.shards) == (local.sentences, local.shards)
    fs = fsspec.filesystem("s3")
    assert sorted(fs.ls(f"{base}/tok")) == [f"{base}/tok/spm.model", f"{base}/tok/spm.vocab"]
    tok = Tokenizer.load(f"s3://{base}/tok/spm.model")
    assert tok.model_proto == (tmp_path / "local.model").read_bytes()
    assert tok.decode(tok.encode("a photo of the digit two")) == "a photo of the digit two"
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(f"s3://{base}/tok/other.model")


def test_user_mistakes_raise_before_writing(tmp_path, corpus):
    with pytest.raises(TokenizerError, match="too large for this corpus"):
        train_tokenizer([str(corpus)], str(tmp_path / "big"), 5000, progress=False)
    with pytest.raises(TokenizerError, match="does not exist"):
        train_tokenizer([str(tmp_path / "missing.txt")], str(tmp_path / "x"), 100, progress=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(TokenizerError, match="not UTF-8"):
        train_tokenizer([str(corpus), str(bad)], str(tmp_path / "y"), 100, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.tokenizer", *args],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_train_encode_decode(tmp_path, corpus):
    out = str(tmp_path / "cli")
    proc = _cli(
        "train", "--input", str(corpus), "--out", out, "--vocab-size", "100", "--model-type", "bpe"
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.count("\n") == 1 and "3000 lines" in proc.stdout and "[MASK]=4" in proc.stdout
    )
    assert "read" in proc.stderr  # the progress line
    proc = _cli("encode", "--model", out + ".model", "the sleepy [MASK] finds")
    assert proc.returncode == 0, proc.stderr
    ids = [int(i) for i in proc.stdout.split()]
    assert 4 in ids
    proc = _cli("decode", "--model", out + ".model", *map(str, ids))
    assert (proc.returncode, proc.stdout.strip()) == (0, "the sleepy [MASK] finds")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train", "--input", "{tmp}/missing.txt", "--out", "{tmp}/m", "--vocab-size", "50"],
            "does not exist",
        ),
        (
            ["train", "--input", "{corpus}", "--out", "{tmp}/m", "--vocab-size", "50000"],
            "too large for this corpus",
        ),
        (
            ["train", "--input", "{tmp}", "--out", "{tmp}/m", "--vocab-size", "50"],
            "no .txt files or .tar shards",
        ),
        (["encode", "--model", "{tmp}/missing.model", "hello"], "does not exist"),
        (["decode", "--model", "{corpus}", "1", "2"], "not a sentencepiece model"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, corpus, args, message):
    proc = _cli(*(a.format(tmp=tmp_path, corpus=corpus) for a in args))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("m.*"))
