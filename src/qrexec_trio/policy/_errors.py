"""The one error the policy parsers raise."""

from __future__ import annotations

from typing import Final

from .._errors import QrexecError

#: The longest message kept. Messages quote the text they blame, already cut
#: short; this is the backstop, so that no error (logged, printed by lint, put in
#: a decision's reason) can carry a whole megabyte of one policy line.
MAX_MESSAGE_LEN: Final = 1000


class PolicySyntaxError(QrexecError):
    """A policy file (or a file it names) cannot be used.

    ``line`` is 1-based; 0 means the file as a whole (it is missing, unreadable,
    a directory, ...) when no including line can be blamed instead.
    """

    def __init__(self, path: str, line: int, message: str) -> None:
        if len(message) > MAX_MESSAGE_LEN:
            message = f"{message[:MAX_MESSAGE_LEN]}... ({len(message)} characters)"
        super().__init__(path, line, message)
        self.path = path
        self.line = line
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PolicySyntaxError):
            return NotImplemented
        return (self.path, self.line, self.message) == (other.path, other.line, other.message)

    def __hash__(self) -> int:
        return hash((self.path, self.line, self.message))
