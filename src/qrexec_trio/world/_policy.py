"""``[policy]``: inline rules and policy files, checked as the engine will read them.

The rules go into a policy.d directory that the world generates, so a rule is
parsed here with the project's own parser, and an error is reported where the
user wrote the rule: the config's line for inline ``rules``, the policy file's
own line for ``files``. Two more checks catch what the parser cannot know: a
rule that names a VM this world does not have (a typo that would otherwise
never match, silently), and ``!include`` directives (their relative paths would
point into the generated directory, not next to the config).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from qrexec_trio.policy import PolicySyntaxError, Rule, parse_multifile_text

from ._errors import WorldConfigError
from ._source import ConfigSource, Table
from ._spec import PolicyOrigin, VMSpec

ADMIN_VM: Final = "dom0"
_POLICY_KEYS: Final = frozenset({"rules", "files", "agent"})
_WHERE: Final = ("policy",)
_INLINE_NAME: Final = "rules"
_UNSAFE_IN_FILE_NAME: Final = re.compile(r"[^A-Za-z0-9_.-]")
_POLICY_SUFFIX: Final = ".policy"
# Target keywords that name no particular domain (so need no cross-check).
_GENERIC_TOKENS: Final = frozenset({"*", "@anyvm", "@adminvm", "@default", "@dispvm"})
_GENERIC_PREFIXES: Final = ("@tag:", "@type:", "@dispvm:@tag:")

#: Reports a problem at a line of the text being checked.
Blame = Callable[[int, str], WorldConfigError]


@dataclass(frozen=True)
class _Piece:
    """One policy text, before it gets its file name."""

    label: str
    text: str
    origin_path: str
    first_line: int


@dataclass(frozen=True)
class _WorldNames:
    domains: frozenset[str]
    templates: frozenset[str]

    @classmethod
    def of(cls, vms: Iterable[VMSpec]) -> _WorldNames:
        vms = tuple(vms)
        return cls(
            frozenset({ADMIN_VM, *(vm.name for vm in vms)}),
            frozenset(vm.name for vm in vms if vm.template_for_dispvms),
        )


def parse_policy(
    source: ConfigSource, root: Table, vms: tuple[VMSpec, ...]
) -> tuple[tuple[tuple[str, str], ...], tuple[PolicyOrigin, ...]]:
    """The policy files to write, in order, and where each came from.

    Inline rules come first, then each of ``files`` in the order listed: the
    first matching rule wins, so the rules next to the VMs can override
    shared files.
    """
    table = source.table(root, (), "policy")
    source.check_keys(table, _WHERE, _POLICY_KEYS)
    names = _WorldNames.of(vms)
    pieces: list[_Piece] = []
    inline = _inline_rules(source, table, names)
    if inline is not None:
        pieces.append(inline)
    pieces += _policy_files(source, table, names)
    width = max(2, len(str(len(pieces))))
    files: list[tuple[str, str]] = []
    origins: list[PolicyOrigin] = []
    for index, piece in enumerate(pieces):
        file_name = f"{index:0{width}d}-{piece.label}{_POLICY_SUFFIX}"
        files.append((file_name, piece.text))
        origins.append(PolicyOrigin(file_name, piece.origin_path, piece.first_line))
    return tuple(files), tuple(origins)


def _inline_rules(source: ConfigSource, table: Table, names: _WorldNames) -> _Piece | None:
    text = source.string(table, _WHERE, "rules")
    if text is None:
        return None
    first_line = source.lines.string_value_start((*_WHERE, "rules"))

    def blame(line: int, message: str) -> WorldConfigError:
        return WorldConfigError(
            source.path, _config_line(source, first_line, text, line), message
        )

    _check_policy_text(text, source.path, names, blame)
    return _Piece(_INLINE_NAME, text, source.path, first_line)


def _config_line(source: ConfigSource, first_line: int, text: str, line: int) -> int:
    """The config line holding line ``line`` of the inline rules.

    Normally a fixed offset; if escapes in a basic string shifted the lines,
    look for the rule's own text instead.
    """
    expected = first_line + line - 1
    rule_lines = text.split("\n")
    if not 1 <= line <= len(rule_lines):
        return source.lines.clamp(expected)
    wanted = rule_lines[line - 1].strip()
    if source.lines.text_of(expected).strip() == wanted:
        return expected
    for number in range(first_line, len(source.lines.lines) + 1):
        if source.lines.text_of(number).strip() == wanted:
            return number
    return source.lines.clamp(expected)


def _policy_files(source: ConfigSource, table: Table, names: _WorldNames) -> list[_Piece]:
    where = (*_WHERE, "files")
    pieces: list[_Piece] = []
    seen: set[str] = set()
    for relative in source.string_list(table, _WHERE, "files"):
        path = source.resolve(relative)
        if path in seen:
            raise source.error(where, f"policy file {relative!r} is listed twice")
        seen.add(path)
        text = _read_policy_file(source, path)

        def blame(line: int, message: str, path: str = path) -> WorldConfigError:
            return WorldConfigError(path, max(line, 1), message)

        _check_policy_text(text, path, names, blame)
        pieces.append(_Piece(_file_label(path), text, path, 1))
    return pieces


def _read_policy_file(source: ConfigSource, path: str) -> str:
    where = (*_WHERE, "files")
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except FileNotFoundError:
        raise source.error(where, f"policy file {path} does not exist") from None
    except UnicodeDecodeError:
        raise source.error(where, f"policy file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise source.error(where, f"policy file {path}: {exc.strerror}") from None


def _file_label(path: str) -> str:
    base = os.path.basename(path).removesuffix(_POLICY_SUFFIX)
    return _UNSAFE_IN_FILE_NAME.sub("_", base) or "policy"


def _check_policy_text(text: str, path: str, names: _WorldNames, blame: Blame) -> None:
    try:
        entries = parse_multifile_text(text, path=path)
    except PolicySyntaxError as exc:
        raise blame(exc.line, exc.message) from None
    for entry in entries:
        if not isinstance(entry, Rule):
            raise blame(
                entry.location.line,
                "!include directives are not supported in a world's policy: "
                "list the file under [policy] files instead",
            )
        problem = _unknown_domain_problem(entry, names)
        if problem is not None:
            raise blame(entry.location.line, problem)


def _unknown_domain_problem(rule: Rule, names: _WorldNames) -> str | None:
    """Why ``rule`` names a domain this world lacks, or None."""
    for token in (str(rule.source), str(rule.target)):
        problem = _token_problem(token, names)
        if problem is not None:
            return problem
    redirects = (("target", rule.params.target), ("default_target", rule.params.default_target))
    for key, value in redirects:
        # Redirects are NamedTarget (a name), DispVMTarget (a template or None)
        # or the admin VM keyword (neither attribute).
        name = getattr(value, "name", None)
        if isinstance(name, str) and name not in names.domains:
            return _not_a_vm(f"{key}={name}", name, names)
        template = getattr(value, "template", None)
        if isinstance(template, str) and template not in names.templates:
            return _not_a_template(f"{key}=@dispvm:{template}", template)
    return None


def _token_problem(token: str, names: _WorldNames) -> str | None:
    if token in _GENERIC_TOKENS or token.startswith(_GENERIC_PREFIXES):
        return None
    if token.startswith("@dispvm:"):
        template = token.removeprefix("@dispvm:")
        return None if template in names.templates else _not_a_template(token, template)
    if token not in names.domains:
        return _not_a_vm(token, token, names)
    return None


def _not_a_vm(text: str, name: str, names: _WorldNames) -> str:
    known = ", ".join(sorted(names.domains))
    what = f"{name!r}" if text == name else f"{text!r}: {name!r}"
    return f"{what} is not a domain of this world (known: {known})"


def _not_a_template(text: str, name: str) -> str:
    return f"{text!r}: {name!r} is not a VM with template_for_dispvms = true"
