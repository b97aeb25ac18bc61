"""R2 per-service policy files: ``<policy-dir>/<SERVICE>``.

Each non-comment line is ``SRC DST ACTION[,key=value...]``: SRC is a qube name,
``dom0`` or ``$anyvm``; DST also ``$dispvm``; ACTION is allow, deny or ask, with
``target=`` and ``user=`` glued on by commas (allow and ask only).

Where R2 was lenient this parser is not: R2 ignored short lines, extra fields
(so ``allow, user=x`` silently lost its option) and unknown options; here each
is a syntax error, because a policy that does not say what its author meant must
not be used.
"""

from __future__ import annotations

import os

from ._errors import PolicySyntaxError
from ._lines import LineError, numbered_lines, split_fields
from ._names import describe_service_problem
from ._parsed import PolicyReader, R2FileMode
from ._rules import Location, Rule, build_rule
from ._tokens import Dialect


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
