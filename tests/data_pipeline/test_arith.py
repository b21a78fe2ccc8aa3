"""builtin:arith: exact format, determinism, the validity check and the shard build."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from data_pipeline import build
from data_pipeline.arith import arith_lines, arith_score, complete_lines, is_valid_arith
from data_pipeline.shards import expand_urls, load_index, parse_sample


def test_lines_exact_format_and_uniform_operands():
    lines = arith_lines(20000, seed=5)
    pattern = re.compile(r"(\d+) \+ (\d+) = (\d+)")
    counts = Counter()
    for line in lines:
        a, b, c = map(int, pattern.fullmatch(line).groups())
        assert line == f"{a} + {b} = {a + b}" and c == a + b
        counts.update([a, b])
    assert set(counts) == set(range(100))  # every operand 0..99, nothing else
    # uniform: 400 draws per value expected, +-25% is > 5 sigma
    assert min(counts.values()) > 300 and max(counts.values()) < 500
    assert all(is_valid_arith(line) for line in lines)


def test_lines_deterministic_prefix_stable_seed_dependent():
    assert arith_lines(300, 1) == arith_lines(300, 1)
    assert arith_lines(1000, 1)[:300] == arith_lines(300, 1)
    assert arith_lines(300, 1) != arith_lines(300, 2)
    assert arith_lines(0, 1) == []


@pytest.mark.parametrize(
    "line,valid",
    [
        ("12 + 7 = 19", True),
        ("0 + 0 = 0", True),
        ("99 + 99 = 198", True),
        ("12 + 7 = 18", False),  # wrong sum
        ("12 + 7 =  19", False),  # extra space
        ("12  + 7 = 19", False),
        (" 12 + 7 = 19", False),
        ("12 + 7 = 19 ", False),
        ("12+7=19", False),
        ("07 + 5 = 12", False),  # padding
        ("12 + 7 = 019", False),
        ("100 + 1 = 101", False),  # operands are 0..99
        ("-1 + 2 = 1", False),
        ("١٢ + 7 = 19", False),  # non-ASCII digits
        ("12 + 7 = 19\n", False),
        ("", False),
    ],
)
def test_is_valid_arith(line, valid):
    assert is_valid_arith(line) is valid


def test_complete_lines_and_score():
    text = "= 19\n3 + 4 = 7\n\n5 + 5 = 11\n1 + 1 = 2\n8 + "
    assert complete_lines(text) == ["3 + 4 = 7", "5 + 5 = 11", "1 + 1 = 2"]
    assert complete_lines("1 + 1 = 2") == []  # a single line is cut on both sides
    score = arith_score([text, "x\n2 + 2 = 4\ny"])
    assert score == {"valid_frac": 3 / 4, "wellformed_frac": 1.0, "complete_lines": 4}
    assert arith_score(["no lines"]) == {
        "valid_frac": 0.0,
        "wellformed_frac": 0.0,
        "complete_lines": 0,
    }
    # a wrong sum is well formed; a leading zero or a double space is not
    assert arith_score(["-\n3 + 4 = 8\n03 + 4 = 7\n3  + 4 = 7\n-"]) == {
        "valid_frac": 0.0,
        "wellformed_frac": 1 / 3,
        "complete_lines": 3,
    }
    # baseline: shuffled characters of real lines are (almost) never valid
    real = "\n".join(arith_lines(200, 0))

    chars = list(real.replace("\n", ""))
    random.Random(0).shuffle(chars)
    junk = "\n".join("".join(chars[i : i + 11]) for i in range(0, len(chars), 11))
    assert arith_score([real])["valid_frac"] == 1.0
    assert arith_score([junk])["valid_frac"] < 0.05
    assert arith_score([junk])["wellformed_frac"] < 0.05


def test_build_builtin_arith_writes_one_line_per_sample(tmp_path, capsys):
    out = tmp_path / "arith"
    code = build.main(
        ["builtin:arith", "--num", "250", "--seed", "3", "--out", str(out), "--shard-size", "100"]
    )
    assert code == 0
    assert "wrote 250 samples in 3 shards" in capsys.readouterr().out
    texts = []
    for url in expand_urls(str(out)):
        index = load_index(url)
        data = open(url, "rb").read()
        for entry in index.samples:
            fields = parse_sample(data[entry.offset : entry.offset + entry.size])
            texts.append(fields["txt"].decode())
            assert entry.meta == {"length": len(texts[-1])}
    assert texts == arith_lines(250, 3)
    assert build.main(["builtin:nope", "--out", str(tmp_path / "x")]) == 2
    assert "builtin:arith" in capsys.readouterr().err
