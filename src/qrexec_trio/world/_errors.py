"""The one error a world's config raises."""

from __future__ import annotations

from .._errors import QrexecError


class WorldConfigError(QrexecError):
    """The world's config (or a file it names) cannot be used.

    ``file`` is the file at fault (the config, a service file's config line, or a
    policy file), ``line`` is 1-based; ``str()`` is ``FILE:LINE: message``.
    """

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(file, line, message)
        self.file = file
        self.line = line
        self.message = message

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"
