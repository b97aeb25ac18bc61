"""Today's policy format: ``<policy.d>/*.policy``, merged in C-locale order.

Rule lines::

    SERVICE ARGUMENT SOURCE TARGET ACTION [key=value ...]

SERVICE is a service name or ``*``; ARGUMENT is ``*`` (any), ``+`` (none) or
``+ARG``; SOURCE and TARGET are tokens (see ``_tokens``); ACTION is allow, deny or
ask. Parameters: allow takes target, user, autostart, notify; ask also
default_target; deny only notify.

Directives::

    !include PATH                         another file in this format
    !include-dir DIR                      every *.policy file of DIR, in C-locale order
    !include-service SERVICE ARG PATH     a file of "SRC DST ACTION[,k=v...]" lines
                                          (the R4.0 layout) applying to SERVICE ARG
    !compat-4.0                           the legacy per-service files, here (see _r2)

An ``!include-service`` file may itself hold ``!include PATH`` (or the R4.0
spelling ``$include:PATH``): another file of the same layout for the same
service and argument. The stock admin policy relies on it
(``include/admin-local-ro`` includes ``include/admin-local-rwx``).

Relative paths are relative to the policy directory (to the legacy directory
for files reached through ``!compat-4.0``). An include cycle, a missing or
unreadable include, and nesting deeper than MAX_INCLUDE_DEPTH are errors
reported at the including line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Final

from ._errors import PolicySyntaxError
from ._files import POLICY_SUFFIX
from ._lines import LineError, numbered_lines, split_fields
from ._names import describe_argument_problem, describe_service_problem, quoted
from ._parsed import (
    Entry,
    Include,
    IncludeKind,
    MultiFileMode,
    ParsedFile,
    PolicyReader,
    ServiceFileMode,
)
from ._r2 import implicit_denies, legacy_files
from ._rules import Location, Rule, build_rule
from ._tokens import Dialect

MAX_INCLUDE_DEPTH: Final = 32
_ANY: Final = "*"


# --- one file ---------------------------------------------------------------------


def parse_multifile_lines(text: str, *, path: str) -> ParsedFile:
    """Rules and (unresolved) includes of one file, with every error (for lint)."""
    entries: list[Entry] = []
    errors: list[PolicySyntaxError] = []
    for number, line in numbered_lines(text):
        location = Location(path, number)
        try:
            if line.startswith("!"):
                entries.append(_parse_directive(line, location))
            else:
                entries.append(_parse_rule(line, location))
        except LineError as exc:
            errors.append(PolicySyntaxError(path, number, str(exc)))
    return ParsedFile(tuple(entries), tuple(errors))


def parse_service_file_lines(
    text: str, *, path: str, service: str | None, argument: str | None
) -> ParsedFile:
    """An ``!include-service`` file: ``SRC DST ACTION`` with options glued by commas
    or separated by spaces (both spellings of the R4.0 layout), ``$`` read as ``@``,
    and ``!include`` / ``$include:`` of another such file."""
    entries: list[Entry] = []
    errors: list[PolicySyntaxError] = []
    for number, line in numbered_lines(text):
        location = Location(path, number)
        try:
            entries.append(_parse_service_line(line, service, argument, location))
        except LineError as exc:
            errors.append(PolicySyntaxError(path, number, str(exc)))
    return ParsedFile(tuple(entries), tuple(errors))


def _parse_service_line(
    line: str, service: str | None, argument: str | None, location: Location
) -> Entry:
    # The reference's substitutions for this layout, in its order: the R4.0
    # include spelling first (its "$" must not become "@"), then every "$" (no
    # name can hold one, so only keywords change), then "," (options glued to
    # the action become fields).
    line = line.replace("$include:", "!include ", 1) if line.startswith("$include:") else line
    fields = split_fields(line.replace("$", "@").replace(",", " "))
    if fields[0].startswith("!"):
        name, *operands = fields
        if name != IncludeKind.FILE.value:
            raise LineError(
                f"only !include is allowed in an !include-service file, not {quoted(name)}"
            )
        if len(operands) != 1:
            raise LineError(f"{name} takes exactly one path")
        return Include(IncludeKind.SERVICE, operands[0], location, service=service,
                       argument=argument)
    return _rule_from_fields(service, argument, fields, location)


def parse_multifile_text(text: str, *, path: str = "<string>") -> tuple[Entry, ...]:
    """Entries of one file (includes unresolved); raises the first PolicySyntaxError."""
    parsed = parse_multifile_lines(text, path=path)
    if parsed.errors:
        raise parsed.errors[0]
    return parsed.entries


def _parse_rule(line: str, location: Location) -> Rule:
    fields = split_fields(line)
    if len(fields) < 5:
        raise LineError(
            "missing action: expected SERVICE ARGUMENT SOURCE TARGET ACTION [key=value ...]"
        )
    service = _parse_service_column(fields[0])
    argument = _parse_argument_column(fields[1])
    return _rule_from_fields(service, argument, fields[2:], location)


def _rule_from_fields(
    service: str | None, argument: str | None, fields: list[str], location: Location
) -> Rule:
    if len(fields) < 3:
        raise LineError("missing action: expected SOURCE TARGET ACTION")
    source_text, target_text, action_text, *params = fields
    return build_rule(service, argument, source_text, target_text, action_text,
                      params=params, dialect=Dialect.MULTIFILE, location=location)


def _parse_directive(line: str, location: Location) -> Include:
    fields = split_fields(line)
    name, *operands = fields
    if name == IncludeKind.COMPAT.value:
        if operands:
            raise LineError(f"{name} takes no operands")
        return Include(IncludeKind.COMPAT, "", location)
    if name in {IncludeKind.FILE.value, IncludeKind.DIRECTORY.value}:
        if len(operands) != 1:
            raise LineError(f"{name} takes exactly one path")
        return Include(IncludeKind(name), operands[0], location)
    if name == IncludeKind.SERVICE.value:
        if len(operands) != 3:
            raise LineError(f"{name} takes SERVICE ARGUMENT PATH")
        return Include(
            IncludeKind.SERVICE,
            operands[2],
            location,
            service=_parse_service_column(operands[0]),
            argument=_parse_argument_column(operands[1]),
        )
    raise LineError(f"unknown directive {quoted(name)}")


def _parse_service_column(text: str) -> str | None:
    if text == _ANY:
        return None
    problem = describe_service_problem(text)
    if problem is not None:
        raise LineError(problem)
    return text


def _parse_argument_column(text: str) -> str | None:
    if text == _ANY:
        return None
    if not text.startswith("+"):
        raise LineError(f"argument must be '*', '+' or '+ARGUMENT', got {quoted(text)}")
    argument = text[1:]
    problem = describe_argument_problem(argument)
    if problem is not None:
        raise LineError(problem)
    return argument


# --- a directory and everything it includes ---------------------------------------


@dataclass
class _Walk:
    root: str
    reader: PolicyReader
    #: Where ``!compat-4.0`` reads legacy files from; None: it reads nothing.
    legacy_dir: str | None
    required: bool
    rules: list[Rule] = field(default_factory=list)
    errors: list[PolicySyntaxError] = field(default_factory=list)
    compat_seen: bool = False

    def visit(
        self,
        path: str,
        mode: MultiFileMode | ServiceFileMode,
        origin: Location | None,
        chain: tuple[str, ...],
        base: str,
    ) -> None:
        """Rules of ``path`` and what it includes; ``base`` is the directory its
        relative include paths start from."""
        real = os.path.realpath(path)
        # Top-level files start with an empty chain, so these two only ever fire
        # for included files, and ``origin`` names the including line.
        blame = origin if origin is not None else Location(path, 0)
        if real in chain:
            cycle = " -> ".join((*chain[chain.index(real):], real))
            self._fail(blame, f"include cycle: {cycle}")
            return
        if len(chain) >= MAX_INCLUDE_DEPTH:
            self._fail(blame, f"includes nested deeper than {MAX_INCLUDE_DEPTH}")
            return
        try:
            parsed = self.reader.parsed(path, mode)
        except PolicySyntaxError as exc:
            self._blame(exc, origin, f"cannot include {path!r}")
            return
        self.errors.extend(parsed.errors)
        for entry in parsed.entries:
            if isinstance(entry, Rule):
                self.rules.append(entry)
            else:
                self._include(entry, (*chain, real), base)

    def visit_directory(self, path: str, origin: Location | None, chain: tuple[str, ...],
                        base: str) -> None:
        try:
            names = self.reader.listing(path, suffix=POLICY_SUFFIX)
        except PolicySyntaxError as exc:
            self._blame(exc, origin, f"cannot include directory {path!r}")
            return
        for name in names:
            self.visit(os.path.join(path, name), MultiFileMode(), origin, chain, base)

    def _include(self, include: Include, chain: tuple[str, ...], base: str) -> None:
        if include.kind is IncludeKind.COMPAT:
            self._compat(include.location, chain)
            return
        target = os.path.join(base, include.path)
        if include.kind is IncludeKind.FILE:
            self.visit(target, MultiFileMode(), include.location, chain, base)
        elif include.kind is IncludeKind.DIRECTORY:
            self.visit_directory(target, include.location, chain, base)
        else:
            mode = ServiceFileMode(include.service, include.argument)
            self.visit(target, mode, include.location, chain, base)

    def _compat(self, location: Location, chain: tuple[str, ...]) -> None:
        """``!compat-4.0``: the legacy files' rules, here (see ``_r2``)."""
        self.compat_seen = True
        if self.legacy_dir is None:
            return
        files, errors = legacy_files(self.legacy_dir, self.reader, required=self.required)
        for error in errors:
            self._blame(error, location, "!compat-4.0")
        for legacy in files:
            mode = ServiceFileMode(legacy.service, legacy.argument)
            # Their includes ($include:) are relative to the legacy directory.
            self.visit(legacy.path, mode, location, chain, self.legacy_dir)
            self.rules.extend(implicit_denies(legacy))

    def _blame(self, exc: PolicySyntaxError, origin: Location | None, what: str) -> None:
        # A whole-file problem (line 0) of an included file is reported at the line
        # that includes it; a problem on a specific line keeps its own location.
        if origin is None or exc.line != 0:
            self.errors.append(exc)
        else:
            self._fail(origin, f"{what}: {exc.message}")

    def _fail(self, origin: Location, message: str) -> None:
        self.errors.append(PolicySyntaxError(origin.path, origin.line, message))


@dataclass(frozen=True)
class MultiFileLoad:
    rules: list[Rule]
    errors: list[PolicySyntaxError]
    #: Whether some file holds ``!compat-4.0``: then the legacy files are read
    #: there, and must not also be put in front of everything.
    compat_seen: bool


def load_multifile_dir(
    root: str, reader: PolicyReader, *, required: bool, legacy_dir: str | None = None
) -> MultiFileLoad:
    """Rules of every ``*.policy`` file under ``root`` in order, includes expanded,
    and the legacy files of ``legacy_dir`` wherever ``!compat-4.0`` stands.

    A missing ``root`` is an error only when ``required`` (lint of a named
    directory); otherwise it just contributes no rules.
    """
    walk = _Walk(root, reader, legacy_dir, required)
    if not required and not reader.exists(root):
        return MultiFileLoad([], [], compat_seen=False)
    walk.visit_directory(root, None, (), root)
    return MultiFileLoad(walk.rules, _unique(walk.errors), walk.compat_seen)


def _unique(errors: list[PolicySyntaxError]) -> list[PolicySyntaxError]:
    # A file included twice would otherwise report each of its errors twice.
    return list(dict.fromkeys(errors))
