"""Where a key sits in a TOML text: enough of a lexer to give errors a line.

tomllib returns plain values without positions, so semantic errors ("unknown
key", "not a template for DispVMs") find their line here, by scanning the raw
text for table headers and ``key =`` lines. Lines that start inside a
multi-line string are skipped, so a shell test such as ``[ -f x ]`` in an
inline service body is never taken for a table header. Anything this does not
understand (inline tables, odd spellings) falls back to the nearest enclosing
key or table that it did find, and finally to line 1: a slightly vague line is
better than a crash while reporting another error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

KeyPath = tuple[str, ...]

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_MULTILINE_DELIMITERS: Final = ('"""', "'''")


@dataclass(frozen=True)
class TomlLines:
    """The raw lines of a TOML text and the first line defining each key path."""

    lines: tuple[str, ...]
    keys: Mapping[KeyPath, int]

    @classmethod
    def of(cls, text: str) -> TomlLines:
        lines = tuple(text.split("\n"))
        keys: dict[KeyPath, int] = {}
        table: KeyPath = ()
        for number, line in _statement_lines(lines):
            header = _table_header(line)
            if header is not None:
                table = header
                keys.setdefault(table, number)
                continue
            key = _assignment_key(line)
            if key is not None:
                keys.setdefault((*table, *key), number)
        return cls(lines, keys)

    def line_of(self, path: KeyPath) -> int:
        """The line defining ``path``; else the first line defining a key inside it
        (``[vm.a.services]`` without ``[vm.a]``); else the same for its closest
        enclosing key; else 1."""
        for length in range(len(path), 0, -1):
            prefix = path[:length]
            number = self.keys.get(prefix)
            if number is not None:
                return number
            inside = [line for key, line in self.keys.items() if key[:length] == prefix]
            if inside:
                return min(inside)
        return 1

    def string_value_start(self, path: KeyPath) -> int:
        """The line where the string value of ``path`` begins.

        TOML drops a newline right after an opening triple quote, so such a
        string starts on the next line.
        """
        number = self.line_of(path)
        _, _, value = self.text_of(number).partition("=")
        value = value.strip()
        for delimiter in _MULTILINE_DELIMITERS:
            if value.startswith(delimiter) and not value[len(delimiter):].strip():
                return number + 1
        return number

    def text_of(self, number: int) -> str:
        return self.lines[number - 1] if 1 <= number <= len(self.lines) else ""

    def clamp(self, number: int) -> int:
        return min(max(number, 1), max(len(self.lines), 1))


def _statement_lines(lines: tuple[str, ...]) -> Iterator[tuple[int, str]]:
    """(number, stripped line) for lines that begin outside a multi-line string."""
    open_delimiter: str | None = None
    for number, line in enumerate(lines, start=1):
        if open_delimiter is None:
            yield number, line.strip()
        open_delimiter = _delimiter_after(line, open_delimiter)


def _delimiter_after(line: str, open_delimiter: str | None) -> str | None:
    """The multi-line string still open at the end of ``line``, if any."""
    index = 0
    while index < len(line):
        if open_delimiter is not None:
            if open_delimiter == '"""' and line[index] == "\\":
                index += 2  # an escaped character, possibly a quote
                continue
            if line.startswith(open_delimiter, index):
                open_delimiter = None
                index += 3
                continue
            index += 1
            continue
        char = line[index]
        if char == "#":
            return None
        delimiter = next((d for d in _MULTILINE_DELIMITERS if line.startswith(d, index)), None)
        if delimiter is not None:
            open_delimiter = delimiter
            index += 3
        elif char in "\"'":
            index = _end_of_single_line_string(line, index)
        else:
            index += 1
    return open_delimiter


def _end_of_single_line_string(line: str, start: int) -> int:
    quote = line[start]
    index = start + 1
    while index < len(line):
        if quote == '"' and line[index] == "\\":
            index += 2
            continue
        if line[index] == quote:
            return index + 1
        index += 1
    return index


def _table_header(line: str) -> KeyPath | None:
    if not line.startswith("["):
        return None
    inner = line[2:] if line.startswith("[[") else line[1:]
    parsed = _dotted_key(inner)
    if parsed is None:
        return None
    key, rest = parsed
    return key if rest.lstrip().startswith("]") else None


def _assignment_key(line: str) -> KeyPath | None:
    parsed = _dotted_key(line)
    if parsed is None:
        return None
    key, rest = parsed
    return key if rest.lstrip().startswith("=") else None


def _dotted_key(text: str) -> tuple[KeyPath, str] | None:
    """A dotted key at the start of ``text`` and the text after it, or None."""
    parts: list[str] = []
    rest = text
    while True:
        parsed = _simple_key(rest.lstrip())
        if parsed is None:
            return None
        part, rest = parsed
        parts.append(part)
        stripped = rest.lstrip()
        if not stripped.startswith("."):
            return tuple(parts), rest
        rest = stripped[1:]


def _simple_key(text: str) -> tuple[str, str] | None:
    if text.startswith('"'):
        end = _end_of_single_line_string(text, 0)
        try:
            # TOML's basic-string escapes are JSON's plus \e and \UXXXXXXXX;
            # a key using those is simply not found (and the caller falls back).
            value = json.loads(text[:end])
        except ValueError:
            return None
        return (value, text[end:]) if isinstance(value, str) else None
    if text.startswith("'"):
        end = text.find("'", 1)
        return None if end < 0 else (text[1:end], text[end + 1:])
    match = _BARE_KEY.match(text)
    return None if match is None else (match.group(), text[match.end():])
