"""The config text being validated, and typed access to its decoded tables.

Every accessor takes the key path it reads, so that whatever is wrong with the
value is reported at that key's line.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final

from ._errors import WorldConfigError
from ._toml_lines import KeyPath, TomlLines

Table = Mapping[str, object]

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ConfigSource:
    #: The config file as it was named (messages use this spelling).
    path: str
    lines: TomlLines

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path) or "."

    def resolve(self, relative: str) -> str:
        """A path named in the config, relative to the config's directory."""
        return os.path.join(self.directory, relative)

    def error(self, where: KeyPath, message: str) -> WorldConfigError:
        return WorldConfigError(self.path, self.lines.line_of(where), message)

    def check_keys(self, table: Table, where: KeyPath, known: Collection[str]) -> None:
        """Unknown keys are errors: a misspelt key must not quietly mean its default."""
        for key in table:
            if key not in known:
                raise self.error((*where, key), _unknown_key_message(where, key, known))

    def table(self, parent: Table, where: KeyPath, key: str) -> Table:
        """A sub-table; an absent one reads as empty."""
        value = parent.get(key, {})
        if not isinstance(value, dict):
            raise self.error((*where, key), f"{dotted((*where, key))} must be a table")
        return value

    def string(self, parent: Table, where: KeyPath, key: str) -> str | None:
        value = parent.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error((*where, key), f"{dotted((*where, key))} must be a string")
        return value

    def boolean(self, parent: Table, where: KeyPath, key: str, default: bool) -> bool:
        value = parent.get(key, default)
        if not isinstance(value, bool):
            raise self.error((*where, key), f"{dotted((*where, key))} must be true or false")
        return value

    def integer(self, parent: Table, where: KeyPath, key: str) -> int | None:
        value = parent.get(key)
        # bool is an int in Python; "domid = true" is still a mistake.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.error((*where, key), f"{dotted((*where, key))} must be an integer")
        return value

    def string_list(self, parent: Table, where: KeyPath, key: str) -> tuple[str, ...]:
        value = parent.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.error((*where, key), f"{dotted((*where, key))} must be a list of strings")
        return tuple(value)


def dotted(path: KeyPath) -> str:
    """A key path as TOML spells it: ``vm.work.services."demo.Echo"``."""
    return ".".join(part if _BARE_KEY.fullmatch(part) else f'"{part}"' for part in path)


def _unknown_key_message(where: KeyPath, key: str, known: Collection[str]) -> str:
    place = f"in [{dotted(where)}]" if where else "at the top level"
    message = f"unknown key {key!r} {place}"
    guess = difflib.get_close_matches(key, list(known), n=1)
    if guess:
        return f"{message}; did you mean {guess[0]!r}?"
    if known:
        return f"{message} (known: {', '.join(sorted(known))})"
    return message
