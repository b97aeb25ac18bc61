"""Splitting policy text into numbered lines and fields (shared by both formats)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final


class LineError(ValueError):
    """Something on one line is wrong; the file parser adds the file and line."""


# Fields are separated by spaces and tabs only. Any other control or non-ASCII
# character outside a comment is reported, instead of being taken for a separator
# or ending up inside a name.
_FIELD_SEPARATOR: Final = re.compile(r"[ \t]+")
_UNEXPECTED_CHAR: Final = re.compile(r"[^\x20-\x7e\t]")


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based number, line) for every line that is neither blank nor a comment.

    Only whole-line comments exist: a ``#`` later in a line is an error, not the
    start of a comment, so ``allow user=a#b`` cannot quietly turn into ``user=a``.
    Lines are split on ``\\n`` alone, so numbers agree with ``grep -n``.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        yield number, stripped


def split_fields(line: str) -> list[str]:
    bad = _UNEXPECTED_CHAR.search(line)
    if bad is not None:
        raise LineError(f"unexpected character U+{ord(bad.group()):04X}")
    if "#" in line:
        raise LineError("'#' only starts a comment at the beginning of a line")
    return _FIELD_SEPARATOR.split(line)
