"""What parsing one file yields, and how the loaders ask for files."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from ._errors import PolicySyntaxError
from ._rules import Location, Rule


class IncludeKind(enum.Enum):
    FILE = "!include"
    DIRECTORY = "!include-dir"
    SERVICE = "!include-service"
    #: The legacy per-service files, in the place of the directive (see ``_r2``).
    COMPAT = "!compat-4.0"


@dataclass(frozen=True)
class Include:
    """A directive: what it includes is read by the loader, not the parser."""

    kind: IncludeKind
    #: As written; relative paths are relative to the policy directory (to the
    #: legacy directory for files reached through ``!compat-4.0``). Empty for
    #: ``!compat-4.0``, which names no path: its directory is the loader's.
    path: str
    location: Location
    #: For ``!include-service``: the service and argument (None: ``*``).
    service: str | None = None
    argument: str | None = None


Entry = Rule | Include


@dataclass(frozen=True)
class ParsedFile:
    entries: tuple[Entry, ...]
    errors: tuple[PolicySyntaxError, ...]


@dataclass(frozen=True)
class MultiFileMode:
    """A ``*.policy`` file, or one named by ``!include``."""


@dataclass(frozen=True)
class ServiceFileMode:
    """A file named by ``!include-service`` (or by ``!include`` inside one, or a
    legacy file read by ``!compat-4.0``): ``SRC DST ACTION`` lines for one
    service and argument."""

    service: str | None
    argument: str | None


@dataclass(frozen=True)
class R2FileMode:
    """An R2 per-service file ``<policy-dir>/<service>``."""

    service: str


FileMode = MultiFileMode | ServiceFileMode | R2FileMode


class PolicyReader(Protocol):
    """Where loaders get parsed files and directory listings from. Both raise
    PolicySyntaxError naming the path (line 0 unless a line is to blame), and the
    reader remembers what it was asked for, so that changes can be noticed."""

    def parsed(self, path: str, mode: FileMode) -> ParsedFile: ...

    def listing(self, path: str, *, suffix: str | None) -> list[str]: ...

    def exists(self, path: str) -> bool: ...
