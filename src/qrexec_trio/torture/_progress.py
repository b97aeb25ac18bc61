"""Progress on a terminal: one line on stderr, rewritten in place; nothing elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Final, TextIO

import trio

_REFRESH: Final = 0.25


class Progress:
    def __init__(self, line: Callable[[], str], stream: TextIO | None = None) -> None:
        self._line = line
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty()

    async def run(self) -> None:
        """Redraw until cancelled (a no-op off a terminal)."""
        if not self.enabled:
            return
        try:
            while True:
                self._draw()
                await trio.sleep(_REFRESH)
        finally:
            self._draw()
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self) -> None:
        # \r and "erase to end of line": the line may get shorter.
        self._stream.write("\r" + self._line() + "\x1b[K")
        self._stream.flush()
