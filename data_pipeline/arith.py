"""``builtin:arith``: a tiny language whose samples can be checked exactly.

Every line is ``A + B = C`` with A and B uniform integers in 0..99, C = A + B, decimal
without padding and single spaces. A language model that learned the corpus writes lines
that parse *and* add up; ``arith_score`` measures the fraction that do, which makes a
quality test that an untrained model fails.
"""

from __future__ import annotations

import re

import numpy as np

MAX_OPERAND = 99
# no leading zeros, ASCII digits only (\d would accept other scripts' digits)
_LINE = re.compile(r"(0|[1-9][0-9]?) \+ (0|[1-9][0-9]?) = (0|[1-9][0-9]{0,2})")


def arith_lines(num: int, seed: int) -> list[str]:
    """``num`` lines ``A + B = C``, a pure function of (num, seed); a prefix of a longer
    list with the same seed."""
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    rng = np.random.default_rng([seed, 0xA217])
    # row-wise draws: line i depends only on draw i, so prefixes agree across num
    operands = rng.integers(0, MAX_OPERAND + 1, size=(num, 2)).tolist()
    return [f"{a} + {b} = {a + b}" for a, b in operands]


def is_wellformed_arith(line: str) -> bool:
    """True when ``line`` has the corpus's format ``A + B = C`` (A, B in 0..99, C in 0..999,
    no leading zeros, single spaces), whether or not the sum is right."""
    return _LINE.fullmatch(line) is not None


def is_valid_arith(line: str) -> bool:
    """True when ``line`` is exactly ``A + B = C`` (format as generated) and A + B == C."""
    match = _LINE.fullmatch(line)
    return match is not None and int(match[1]) + int(match[2]) == int(match[3])


def complete_lines(text: str) -> list[str]:
    """The lines of a generated window that are whole: the first and last are cut by the
    window edges and dropped, so are empty ones (a window starting at a line break)."""
    lines = text.split("\n")[1:-1]
    return [line for line in lines if line]


def arith_score(texts: list[str]) -> dict[str, float]:
    """``valid_frac``: correct complete lines / complete lines (0 when there are none);
    ``wellformed_frac``: complete lines in the corpus's format, right sum or not;
    ``complete_lines``: how many complete lines the texts hold."""
    lines = [line for text in texts for line in complete_lines(text)]
    valid = sum(is_valid_arith(line) for line in lines)
    wellformed = sum(is_wellformed_arith(line) for line in lines)
    total = max(len(lines), 1)  # no lines: both shares are 0
    return {
        "valid_frac": valid / total,
        "wellformed_frac": wellformed / total,
        "complete_lines": len(lines),
    }
