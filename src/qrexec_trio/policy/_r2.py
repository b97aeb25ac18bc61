"""Legacy per-service policy files: ``<policy-dir>/<SERVICE>``.

They are read in one of two ways.

Without ``!compat-4.0`` anywhere in policy.d (our own setups), the directory
holds R2 files, read strictly and placed before all of policy.d
(``load_r2_dir``). Each non-comment line is ``SRC DST ACTION[,key=value...]``:
SRC is a qube name, ``dom0`` or ``$anyvm``; DST also ``$dispvm``; ACTION is
allow, deny or ask, with ``target=`` and ``user=`` glued on by commas (allow and
ask only). Where R2 was lenient this parser is not: R2 ignored short lines, extra
fields (so ``allow, user=x`` silently lost its option) and unknown options; here
each is a syntax error, because a policy that does not say what its author meant
must not be used.

With ``!compat-4.0`` (today's dom0: the stock ``35-compat.policy`` holds it),
the directory holds what R4.0 left there, and it is read as the reference does
(qubes-core-qrexec ``qrexec/policy/parser_compat.py`` and
``doc/multifile-policy.markdown``), at the place of the directive
(``legacy_files``, then the multi-file loader):

- each regular file (a symlink to one counts) whose name is ``SERVICE`` or
  ``SERVICE+ARGUMENT`` in the call-name characters; directories (R4.0's
  ``include/``), other non-files, hidden names, names with other characters and
  the ``.rpmsave`` / ``.rpmnew`` / ``.swp`` leftovers are skipped, not errors,
  as there;
- in order of service name, and within a service the ``+ARGUMENT`` files (in
  name order) before the plain ``SERVICE`` file;
- each read as an ``!include-service SERVICE +ARGUMENT|* FILE`` would be, in the
  R4.0 syntax: ``$`` keywords read as ``@`` (``$anyvm``, ``$tag:T``,
  ``$dispvm:VM``, ``$default``, ...), options glued by commas or separated by
  spaces (``allow,target=dom0,user=root``), all of today's options, and
  ``$include:PATH`` lines relative to the legacy directory;
- after a ``SERVICE+ARGUMENT`` file, the deny that R4.0 implied at the end of
  every file: ``@anyvm @anyvm deny`` and ``@anyvm @adminvm deny`` for that
  service and argument. A plain ``SERVICE`` file gets none, so a call no rule of
  it matches falls through to the rules after the directive (the defaults).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Final

from ._errors import PolicySyntaxError
from ._lines import LineError, numbered_lines, split_fields
from ._names import describe_argument_problem, describe_service_problem
from ._parsed import PolicyReader, R2FileMode
from ._rules import Action, Location, Params, Rule, build_rule
from ._tokens import AdminVMToken, AnyVMToken, Dialect


def parse_r2_lines(
    text: str, *, service: str, path: str
) -> tuple[list[Rule], list[PolicySyntaxError]]:
    """Every rule of the file and every error, in line order (for lint)."""
    rules: list[Rule] = []
    errors: list[PolicySyntaxError] = []
    for number, line in numbered_lines(text):
        try:
            rules.append(_parse_line(line, service, Location(path, number)))
        except LineError as exc:
            errors.append(PolicySyntaxError(path, number, str(exc)))
    return rules, errors


def parse_r2_text(text: str, *, service: str, path: str = "<string>") -> list[Rule]:
    """The rules of one R2 file; raises the first PolicySyntaxError."""
    rules, errors = parse_r2_lines(text, service=service, path=path)
    if errors:
        raise errors[0]
    return rules


def _parse_line(line: str, service: str, location: Location) -> Rule:
    fields = split_fields(line)
    if len(fields) < 3:
        raise LineError("missing action: expected SRC DST ACTION[,option=value...]")
    if len(fields) > 3:
        raise LineError(
            f"unexpected field {fields[3]!r}: options are glued to the action with commas,"
            " without spaces"
        )
    source_text, target_text, action_text = fields
    action_name, *options = action_text.split(",")
    # R2 knows no arguments: a file for SERVICE covers SERVICE+anything.
    return build_rule(service, None, source_text, target_text, action_name,
                      params=options, dialect=Dialect.R2, location=location)


def load_r2_dir(
    root: str, reader: PolicyReader, *, required: bool
) -> tuple[list[Rule], list[PolicySyntaxError]]:
    """Rules of every per-service file in ``root``; each file's name is its service.

    A file whose name is not a valid service name is an error (it could never
    apply, and is most likely a misnamed policy). A missing ``root`` is an error
    only when ``required``.
    """
    if not required and not reader.exists(root):
        return [], []
    try:
        names = reader.listing(root, suffix=None)
    except PolicySyntaxError as exc:
        return [], [exc]
    rules: list[Rule] = []
    errors: list[PolicySyntaxError] = []
    for name in names:
        if name.endswith(_IGNORED_SUFFIXES):
            # A package manager's or an editor's leftover (".rpmsave" after
            # qrexec-legacy-convert), never a service's policy.
            continue
        path = os.path.join(root, name)
        problem = describe_service_problem(name)
        if problem is not None:
            message = f"file name is not a service name: {problem}"
            errors.append(PolicySyntaxError(path, 0, message))
            continue
        try:
            parsed = reader.parsed(path, R2FileMode(name))
        except PolicySyntaxError as exc:
            errors.append(exc)
            continue
        rules.extend(entry for entry in parsed.entries if isinstance(entry, Rule))
        errors.extend(parsed.errors)
    return rules, errors


# --- !compat-4.0 -----------------------------------------------------------------

#: Package-manager and editor leftovers, skipped as the reference skips them.
_IGNORED_SUFFIXES: Final = (".rpmsave", ".rpmnew", ".swp")
#: The characters of a call name; any other file is not a policy (skipped).
_LEGACY_NAME: Final = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass(frozen=True)
class LegacyFile:
    """One legacy file that ``!compat-4.0`` reads."""

    service: str
    #: None: the name has no ``+``, and the file covers every argument.
    argument: str | None
    path: str


def legacy_files(
    root: str, reader: PolicyReader, *, required: bool
) -> tuple[list[LegacyFile], list[PolicySyntaxError]]:
    """The files ``!compat-4.0`` reads from ``root``, in the order it reads them.

    A missing ``root`` is an error only when ``required``: a dom0 that never had
    R4.0 policy has nothing to be compatible with (the reference would fail
    every call instead, a crash rather than a rule).
    """
    if not required and not reader.exists(root):
        return [], []
    try:
        names = reader.listing(root, suffix=None)
    except PolicySyntaxError as exc:
        return [], [exc]
    files = [f for f in (_legacy_file(root, name, reader) for name in names) if f is not None]
    # Service names are ASCII, so byte order is the reference's string order; a
    # plain SERVICE file comes after every SERVICE+ARGUMENT one.
    files.sort(key=lambda f: (f.service, f.argument is None, f.argument or ""))
    return files, []


def _legacy_file(root: str, name: str, reader: PolicyReader) -> LegacyFile | None:
    if name.endswith(_IGNORED_SUFFIXES) or _LEGACY_NAME.fullmatch(name) is None:
        return None
    service, plus, argument = name.partition("+")
    # A name the character set lets through can still name no service (an empty
    # one, ".", ".."): no call could ever match its rules, so it is skipped too.
    if describe_service_problem(service) is not None or (
        plus and describe_argument_problem(argument) is not None
    ):
        return None
    path = os.path.join(root, name)
    # Watched even when skipped: a directory replaced by a file must be noticed.
    if not reader.exists(path) or not os.path.isfile(path):
        return None
    return LegacyFile(service, argument if plus else None, path)


def implicit_denies(legacy: LegacyFile) -> list[Rule]:
    """The rules R4.0 implied after the file, for a ``SERVICE+ARGUMENT`` file only."""
    if legacy.argument is None:
        return []
    # Line 0: these rules are the end of the file, not one of its lines.
    location = Location(legacy.path, 0)
    return [
        Rule(legacy.service, legacy.argument, AnyVMToken(), target, Action.DENY, Params(),
             location)
        for target in (AnyVMToken(), AdminVMToken())
    ]
