"""Policy file tools: ``qubes-policy-lint`` and ``qrexec-legacy-convert``.

``qubes-policy-lint`` and ``qrexec-trio policy lint`` are one implementation
(:func:`run_lint`) under two names; they differ only in how an error line is
tagged: the reference's ``FILE:LINE: error: MESSAGE`` (which editors parse) and
this project's historical ``FILE:LINE: MESSAGE``. A directory is linted as a
policy directory, with its includes followed; a file (or ``-``, stdin) is linted
on its own, line by line, its includes not followed (as the reference does: the
directory a relative include is relative to is not known for a lone file).

``qrexec-legacy-convert`` moves the per-service files of the old policy
directory (``/etc/qubes-rpc/policy/SERVICE[+ARG]``) into one ``policy.d`` file
(``30-user.policy`` by default, ahead of what it holds) and renames each to
``NAME.rpmsave``, as the reference's tool does. The rules are the ones the engine
reads from those files now: where ``policy.d`` holds ``!compat-4.0`` (today's
dom0), R4.0's layout (``$`` keywords, options glued by commas, ``SERVICE+ARG``
files ahead of the ``SERVICE`` one, each closed by the deny rules R4.0 implied),
else R2 files read ahead of ``policy.d``. Before anything is written, the engine
loads staged copies of both directories as they will be, and for every service
the new policy must hold the same rules in the same order as the old one: equal
lists, equal decisions. Anything else (a line the engine rejects, a rule that
would change places, an existing syntax error) is refused, with its file and
line, and nothing is written. Writes are atomic (temporary file, then rename);
the converted rules are written before the old files are renamed, and every
state in between gives the same decisions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, TextIO

from qrexec_trio._help import finish_parser
from qrexec_trio.policy import (
    DEFAULT_POLICY_D,
    DEFAULT_R2_DIR,
    Location,
    Policy,
    PolicySyntaxError,
    Rule,
    load_policy,
    parse_multifile_text,
)

EXIT_OK: Final = 0
EXIT_ERRORS: Final = 1
EXIT_USAGE: Final = 2

#: Larger policy files are refused (the engine's own limit).
MAX_FILE_SIZE: Final = 16 * 1024 * 1024
#: An error message, or a line shown with ``--show-line``, is cut after this many
#: characters: a 1 MB line must not become a 1 MB error line.
MAX_MESSAGE_CHARS: Final = 1000  # the engine's own cap, as a backstop
MAX_SHOWN_LINE_CHARS: Final = 120


# --- shared helpers ---------------------------------------------------------------


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno is not None else str(exc)


def _printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped, so a policy
    file cannot send escape sequences to the terminal that shows its errors."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def read_policy_text(path: str, stdin: TextIO | None = None) -> str:
    """The text of a policy file (``-``: stdin), or PolicySyntaxError naming it.

    Only a regular UTF-8 file of sane size is read; it is opened non-blocking and
    checked on the open descriptor, so a FIFO cannot hang the reader."""
    if path == "-":
        stream = sys.stdin if stdin is None else stdin
        data = stream.buffer.read(MAX_FILE_SIZE + 1)
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise PolicySyntaxError(path, 0, f"cannot read: {_reason(exc)}") from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise PolicySyntaxError(path, 0, "is a directory, not a policy file")
            if not stat.S_ISREG(mode):
                raise PolicySyntaxError(path, 0, "not a regular file")
            with os.fdopen(os.dup(fd), "rb") as stream_b:
                data = stream_b.read(MAX_FILE_SIZE + 1)
        except OSError as exc:
            raise PolicySyntaxError(path, 0, f"cannot read: {_reason(exc)}") from None
        finally:
            os.close(fd)
    if len(data) > MAX_FILE_SIZE:
        raise PolicySyntaxError(path, 0, f"larger than {MAX_FILE_SIZE} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PolicySyntaxError(path, line, "not valid UTF-8") from None


@dataclass(frozen=True)
class _Renames:
    """Staging paths and the real paths they stand for (longest prefix first)."""

    pairs: tuple[tuple[str, str], ...]

    def path(self, path: str) -> str:
        for staged, real in self.pairs:
            if path == staged or path.startswith(staged + os.sep):
                return real + path[len(staged):]
        return path

    def text(self, text: str) -> str:
        for staged, real in self.pairs:
            text = text.replace(staged, real)
        return text

    def error(self, error: PolicySyntaxError) -> PolicySyntaxError:
        return PolicySyntaxError(self.path(error.path), error.line, self.text(error.message))


#: How the engine words a failure to resolve an include (not a syntax error of
#: the including line): a lone file's includes are not followed, so these go.
_INCLUDE_FAILURES: Final = ("cannot include", "include cycle", "includes nested")


def _load_service_file(text: str, display: str) -> list[PolicySyntaxError]:
    """Every error of ``text`` read as an ``!include-service`` file (the R4.0
    per-service layout), by the engine's own reader of that layout; what it
    includes is not checked (its base directory is not known here)."""
    with tempfile.TemporaryDirectory(prefix="qrexec-policy-lint.") as tmp:
        staged = os.path.join(tmp, "service")
        with open(staged, "w", encoding="utf-8") as stream:
            stream.write(text)
        with open(os.path.join(tmp, "lint.policy"), "w", encoding="utf-8") as stream:
            stream.write("!include-service * * service\n")
        policy = load_policy(None, tmp, required=True)
    return [
        PolicySyntaxError(display, error.line, error.message) for error in policy.errors
        if error.path == staged and not error.message.startswith(_INCLUDE_FAILURES)
    ]


# --- lint -----------------------------------------------------------------------


@dataclass(frozen=True)
class LintStyle:
    """How one of the two lint commands names itself and tags its error lines."""

    prog: str
    tag: str


#: The reference's program and its ``FILE:LINE: error: MESSAGE`` lines.
QUBES_POLICY_LINT: Final = LintStyle("qubes-policy-lint", "error: ")
#: ``qrexec-trio policy lint``: ``FILE:LINE: MESSAGE``, as it always printed.
TRIO_POLICY_LINT: Final = LintStyle("qrexec-trio policy lint", "")


def _lint_parser(style: LintStyle) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=style.prog,
        description="Check qrexec policy files and report every error as "
        f"FILE:LINE: {style.tag}MESSAGE (line 0: the file as a whole). A DIRECTORY is "
        "read as a policy.d directory (*.policy files, includes followed); a FILE is "
        "checked on its own, its includes not followed; '-' reads standard input. "
        f"With no PATH and no --policy-dir, lint {DEFAULT_R2_DIR} (R2) and "
        f"{DEFAULT_POLICY_D}, skipping whichever is absent.",
        epilog="Exit status: 0 if everything parses, 1 on any error, 2 on usage errors.",
    )
    parser.add_argument("paths", metavar="PATH", nargs="*",
                        help="a policy file, '-' or a policy.d directory")
    parser.add_argument("-i", "--include-service", action="store_true",
                        help="read FILEs as files named by !include-service "
                        "(SRC DST ACTION[,option=value...] lines), not as *.policy files")
    parser.add_argument("-s", "--show-line", action="store_true",
                        help="append the offending line to each error")
    parser.add_argument("--policy-dir", metavar="D", action="append", default=[],
                        help="a directory of R2 per-service files (repeatable)")
    return finish_parser(
        parser,
        f"{style.prog}                          # the installed policy",
        f"{style.prog} -s /etc/qubes/policy.d/30-user.policy",
        f"{style.prog} - < draft.policy")


@dataclass
class _Texts:
    """File texts read during a lint, for --show-line (read at most once each)."""

    known: dict[str, list[str] | None] = field(default_factory=dict)

    def remember(self, path: str, text: str) -> None:
        self.known[path] = text.split("\n")

    def line(self, path: str, number: int) -> str | None:
        if number <= 0:
            return None
        if path not in self.known:
            try:
                self.remember(path, read_policy_text(path))
            except PolicySyntaxError:
                self.known[path] = None
        lines = self.known[path]
        if lines is None or number > len(lines):
            return None
        return lines[number - 1].strip(" \t")


def lint_file(
    path: str, *, include_service: bool, texts: _Texts | None = None,
    stdin: TextIO | None = None,
) -> list[PolicySyntaxError]:
    """Every error of one file, its includes not followed."""
    try:
        text = read_policy_text(path, stdin)
    except PolicySyntaxError as exc:
        return [exc]
    if texts is not None:
        texts.remember(path, text)
    if include_service:
        return _load_service_file(text, path)
    errors: list[PolicySyntaxError] = []
    # The engine splits lines on "\n" alone, so these numbers agree with it.
    for number, line in enumerate(text.split("\n"), start=1):
        try:
            parse_multifile_text(line, path=path)
        except PolicySyntaxError as exc:
            errors.append(PolicySyntaxError(path, number, exc.message))
    return errors


def lint_errors(
    paths: Sequence[str], r2_dirs: Sequence[str], *, include_service: bool = False,
    texts: _Texts | None = None, stdin: TextIO | None = None,
) -> list[PolicySyntaxError]:
    """Every error in the R2 directories, then in each path, in order."""
    if not paths and not r2_dirs:
        # Nothing named: the installed policy, where a missing directory is normal.
        return list(load_policy(DEFAULT_R2_DIR, DEFAULT_POLICY_D, required=False).errors)
    errors: list[PolicySyntaxError] = []
    for r2_dir in r2_dirs:
        errors += load_policy(r2_dir, None, required=True).errors
    for path in paths:
        if path != "-" and os.path.isdir(path):
            errors += load_policy(None, path, required=True).errors
        else:
            errors += lint_file(path, include_service=include_service, texts=texts,
                                stdin=stdin)
    return errors


def format_error(error: PolicySyntaxError, *, tag: str, line: str | None = None) -> str:
    """``FILE:LINE: [tag]MESSAGE[: LINE TEXT]``, printable and of bounded length."""
    text = f"{_printable(error.path)}:{error.line}: {tag}"
    text += _clip(_printable(error.message), MAX_MESSAGE_CHARS)
    if line is not None:
        text += ": " + _clip(_printable(line), MAX_SHOWN_LINE_CHARS)
    return text


def run_lint(argv: list[str] | None, style: LintStyle) -> int:
    """The lint command (either name): parse, check, print, exit status."""
    try:
        args = _lint_parser(style).parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already reported
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.paths.count("-") > 1:
        print(f"{style.prog}: '-' (standard input) can be given once", file=sys.stderr)
        return EXIT_USAGE
    texts = _Texts()
    errors = lint_errors(args.paths, args.policy_dir, include_service=args.include_service,
                         texts=texts)
    for error in errors:
        line = texts.line(error.path, error.line) if args.show_line else None
        print(format_error(error, tag=style.tag, line=line))
    return EXIT_ERRORS if errors else EXIT_OK


def lint_main(argv: list[str] | None = None) -> int:
    """``qubes-policy-lint [-i] [-s] [--policy-dir D] [PATH...]``."""
    return run_lint(argv, QUBES_POLICY_LINT)


# --- legacy conversion ------------------------------------------------------------

#: The reference's conversion target for everything it cannot hand to a GUI tool.
DEFAULT_OUTPUT: Final = "30-user.policy"
#: Old files are renamed to NAME + this (again while the name is taken).
BACKUP_SUFFIX: Final = ".rpmsave"
#: An output file that existed is kept as NAME + this (again while taken).
OUTPUT_BACKUP_SUFFIX: Final = ".bak"
#: Names the compatibility reader skips: package-manager and editor leftovers.
IGNORED_SUFFIXES: Final = (".rpmsave", ".rpmnew", ".swp")

_LEGACY_NAME: Final = re.compile(r"[A-Za-z0-9_.+-]+")
_PROG: Final = "qrexec-legacy-convert"


class _Refused(Exception):
    """The conversion cannot be done exactly; nothing has been written."""

    def __init__(self, errors: Iterable[PolicySyntaxError]) -> None:
        super().__init__()
        self.errors = list(errors)


def _legacy_names(legacy_dir: str) -> list[str]:
    """The old directory's policy files: regular files named ``SERVICE`` or
    ``SERVICE+ARGUMENT``, as ``!compat-4.0`` picks them (directories such as
    R4.0's ``include/``, hidden names and the leftovers it skips stay where they
    are). Whether the engine reads them so is checked afterwards, not assumed."""
    try:
        names = os.listdir(legacy_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _Refused([PolicySyntaxError(legacy_dir, 0,
                                          f"cannot list directory: {_reason(exc)}")]) from None
    chosen = []
    for name in sorted(names, key=os.fsencode):
        service = name.partition("+")[0]
        if (name.startswith(".") or name.endswith(IGNORED_SUFFIXES)
                or _LEGACY_NAME.fullmatch(name) is None or service in {"", ".", ".."}):
            continue
        try:
            if stat.S_ISREG(os.stat(os.path.join(legacy_dir, name)).st_mode):
                chosen.append(name)
        except OSError:
            continue  # gone, or a dangling link: nothing the engine reads either
    return chosen


@dataclass
class _Stage:
    """Staged copies of a directory for the engine to load: symbolic links to its
    entries (so relative includes still resolve), some left out or renamed, some
    files added. Staged paths map back to the real ones for messages."""

    tmp_root: str
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def mirror(
        self, real: str, *, skip: Iterable[str] = (), rename: dict[str, str] | None = None,
        add: dict[str, str] | None = None,
    ) -> str:
        root = os.path.join(self.tmp_root, str(len(self.pairs) + 1))
        os.mkdir(root)
        self.pairs.append((root, real))
        left_out = set(skip) | set(add or {})
        try:
            names = os.listdir(real)
        except OSError as exc:
            raise _Refused([PolicySyntaxError(real, 0,
                                              f"cannot list directory: {_reason(exc)}")]) from None
        for name in names:
            if name not in left_out:
                os.symlink(os.path.join(os.path.abspath(real), name),
                           os.path.join(root, (rename or {}).get(name, name)))
        for name, text in (add or {}).items():
            with open(os.path.join(root, name), "x", encoding="utf-8") as stream:
                stream.write(text)
        return root

    def _renames(self) -> _Renames:
        # Longest first, so that ".../1" never claims ".../10/...".
        return _Renames(tuple(sorted(self.pairs, key=lambda pair: -len(pair[0]))))

    def location(self, location: Location) -> Location:
        return Location(self._renames().path(location.path), location.line)

    def error(self, error: PolicySyntaxError) -> PolicySyntaxError:
        return self._renames().error(error)


def _legacy_block(old: Sequence[Rule], base: Sequence[Rule]) -> list[Rule] | None:
    """The rules ``old`` holds beyond ``base``, if they are one run (where the
    engine reads the old directory: ahead of policy.d, or at its ``!compat-4.0``)."""
    count = len(old) - len(base)
    start = 0
    while start < len(base) and start < len(old) and old[start] == base[start]:
        start += 1
    if count < 0 or list(old[start + count:]) != list(base[start:]):
        return None
    return list(old[start:start + count])


# The text of converted rules ----------------------------------------------------------


def _target_text(value: object) -> str:
    """A ``target=`` / ``default_target=`` value as the multi-file format spells it."""
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    if hasattr(value, "template"):
        template = getattr(value, "template", None)
        return "@dispvm" if template is None else f"@dispvm:{template}"
    return str(value)  # @adminvm


def rule_line(rule: Rule) -> str:
    """One rule in the ``policy.d`` format (columns separated by tabs, as the
    reference's converter writes them)."""
    assert rule.service is not None  # legacy files name their service
    argument = "*" if rule.argument is None else f"+{rule.argument}"
    params = rule.params
    options: list[str] = []
    if params.target is not None:
        options.append(f"target={_target_text(params.target)}")
    if params.default_target is not None:
        options.append(f"default_target={_target_text(params.default_target)}")
    if params.user is not None:
        options.append(f"user={params.user}")
    if not params.autostart:
        options.append("autostart=no")
    if params.notify is not None:
        options.append(f"notify={'yes' if params.notify else 'no'}")
    columns = [rule.service, argument, str(rule.source), str(rule.target), rule.action.value]
    line = "\t".join(columns)
    return f"{line} {' '.join(options)}" if options else line


def _converted_rules(
    legacy_dir: str, names: Sequence[str], block: Sequence[Rule]
) -> list[Rule]:
    """The rules of ``block`` to convert: all but those of a file left in place
    (a leftover such as NAME.rpmsave, which an R2 reader reads as a service).
    Rules of the files a legacy file includes are converted with it."""
    return [
        rule for rule in block
        if os.path.dirname(rule.location.path) != legacy_dir
        or os.path.basename(rule.location.path) in names
    ]


def _converted_text(legacy_dir: str, rules: Sequence[Rule]) -> str:
    lines = [
        f"# Converted by {_PROG} from the per-service policy files of {legacy_dir}",
        f"# (each renamed to NAME{BACKUP_SUFFIX}), in the order they were read. The",
        "# deny rules after a SERVICE+ARGUMENT file were implicit at its end.",
    ]
    source: tuple[str, int] | None = None
    for rule in rules:
        path, implicit = rule.location.path, rule.location.line == 0
        if (path, implicit) != source:
            source = (path, implicit)
            name = os.path.basename(path)
            lines += ["", f"# implicit at the end of {name}" if implicit else f"# {path}"]
        lines.append(rule_line(rule))
    return "\n".join(lines) + "\n"


# Equivalence ------------------------------------------------------------------------


def _rule_key(rule: Rule) -> tuple[object, ...]:
    return (rule.service, rule.argument, rule.source, rule.target, rule.action, rule.params)


def _first_difference(
    old: Sequence[Rule], new: Sequence[Rule]
) -> tuple[str | None, Rule | None, Rule | None] | None:
    """The first service whose applicable rules differ, with the first differing
    pair (None: past the end). Evaluation reads only the rules of the requested
    service and the ``*`` ones, in order, so equal lists mean equal decisions."""
    services = {r.service for r in old} | {r.service for r in new}
    for service in sorted(services, key=lambda s: (s is not None, s or "")):
        wanted = {service, None}
        a = [r for r in old if r.service in wanted]
        b = [r for r in new if r.service in wanted]
        for index in range(max(len(a), len(b))):
            x = a[index] if index < len(a) else None
            y = b[index] if index < len(b) else None
            if x is None or y is None or _rule_key(x) != _rule_key(y):
                return service, x, y
    return None


@dataclass(frozen=True)
class Plan:
    """A checked conversion: what to write and what to rename."""

    legacy_dir: str
    names: tuple[str, ...]
    converted_text: str
    rule_count: int
    output_path: str
    #: The output file's full new text (the converted rules, then its old text);
    #: None: no rule to write, only files to rename.
    output_text: str | None
    #: The output file's old text, if it existed (kept as a backup).
    previous_text: str | None
    #: Warnings that do not stop the conversion.
    notes: tuple[str, ...] = ()

    @property
    def renames(self) -> list[tuple[str, str]]:
        paths = [os.path.join(self.legacy_dir, name) for name in self.names]
        return [(path, _free_name(path, BACKUP_SUFFIX)) for path in paths]


def _free_name(path: str, suffix: str) -> str:
    candidate = path + suffix
    while os.path.lexists(candidate):
        candidate += suffix
    return candidate


def plan_conversion(legacy_dir: str, policy_d: str, output_name: str) -> Plan | None:
    """Read, convert and check; None when there is nothing to convert.
    Raises _Refused with every reason, located, when it cannot be done exactly.

    The old policy is what the engine loads from both directories now; the new
    one is what it loads from staged copies of them as they will be. For every
    service the two must hold the same rules in the same order."""
    legacy_dir, policy_d = os.path.normpath(legacy_dir), os.path.normpath(policy_d)
    names = _legacy_names(legacy_dir)
    if not names:
        return None
    old = load_policy(legacy_dir, policy_d, required=True)
    if old.errors:
        raise _Refused(old.errors)
    base = load_policy(None, policy_d, required=True)
    block = _legacy_block(old.rules, base.rules)
    if block is None:
        raise _Refused([PolicySyntaxError(policy_d, 0, f"the rules of {legacy_dir} are "
                                          "read in more than one place; convert by hand")])
    owned = _converted_rules(legacy_dir, names, block)
    converted = _converted_text(legacy_dir, owned)
    output_path = os.path.join(policy_d, output_name)
    previous_text = _previous_output(output_path)
    output_text: str | None = None
    if owned:
        output_text = converted if previous_text is None else f"{converted}\n{previous_text}"
    with tempfile.TemporaryDirectory(prefix=f"{_PROG}.") as tmp:
        stage = _Stage(tmp)
        added = {} if output_text is None else {output_name: output_text}
        new_policy_d = stage.mirror(policy_d, add=added)
        new = load_policy(stage.mirror(legacy_dir, skip=names), new_policy_d, required=True)
        if new.errors:
            raise _Refused(stage.error(e) for e in new.errors)
        difference = _first_difference(old.rules, new.rules)
        if difference is not None:
            raise _Refused([_order_error(stage, difference, legacy_dir, output_path,
                                         converted.count("\n"))])
        notes = _backup_notes(stage, legacy_dir, names, new_policy_d, new)
    return Plan(legacy_dir, tuple(names), converted, len(owned), output_path, output_text,
                previous_text, notes)


def _backup_notes(
    stage: _Stage, legacy_dir: str, names: Sequence[str], policy_d: str, new: Policy
) -> tuple[str, ...]:
    """Whether the engine would still read the renamed files as policy (the
    reference never does; a reader of R2 files may)."""
    backups = {name: os.path.basename(_free_name(os.path.join(legacy_dir, name),
                                                 BACKUP_SUFFIX)) for name in names}
    with_backups = load_policy(stage.mirror(legacy_dir, rename=backups), policy_d,
                               required=True)
    if [_rule_key(r) for r in with_backups.rules] == [_rule_key(r) for r in new.rules]:
        return ()
    return (f"this engine still reads the renamed files of {legacy_dir} as policy, for "
            f"services named after them (NAME{BACKUP_SUFFIX}); remove them once checked",)


def _previous_output(path: str) -> str | None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Refused([PolicySyntaxError(path, 0, f"cannot read: {_reason(exc)}")]) from None
    if not stat.S_ISREG(mode):
        raise _Refused([PolicySyntaxError(path, 0, "exists and is not a regular file; "
                                          "choose another --output")])
    try:
        return read_policy_text(path)
    except PolicySyntaxError as exc:
        raise _Refused([exc]) from None


def _order_error(
    stage: _Stage, difference: tuple[str | None, Rule | None, Rule | None],
    legacy_dir: str, output_path: str, converted_lines: int,
) -> PolicySyntaxError:
    """Blame the rule that is not a converted one, where there is such a rule."""
    service, old, new = difference
    what = "every service" if service is None else service
    if new is not None:
        where = stage.location(new.location)
        if where.path != output_path or where.line > converted_lines:
            message = (f"this rule applies to {what} and would be evaluated before the "
                       f"converted rules, but today the rules of {legacy_dir} come first; "
                       "write them to a file that sorts before this one (--output)")
            return PolicySyntaxError(where.path, where.line, message)
    if old is not None and os.path.dirname(old.location.path) != legacy_dir:
        message = (f"this rule applies to {what} and is evaluated before the rules of "
                   f"{legacy_dir} today, but would come after the converted ones; "
                   "write them to a file that sorts after this one (--output)")
        return PolicySyntaxError(old.location.path, old.location.line, message)
    return PolicySyntaxError(output_path, 0, f"the converted rules for {what} would not "
                             "give the same decisions")


# Writing -----------------------------------------------------------------------------


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` in one rename: readers see the old file or
    the new one, never a part. The temporary name is hidden, so a policy loader
    listing the directory meanwhile does not read it."""
    directory, name = os.path.split(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory or ".")


def apply_plan(plan: Plan, report: Callable[[str], None]) -> None:
    """Write the converted rules (keeping the old output file as a backup), then
    rename the legacy files. Raises OSError if the system refuses a step; every
    state up to then gives the same decisions as before (the converted rules
    repeat the old ones behind them until those are renamed)."""
    if plan.output_text is not None:
        mode = 0o644
        if plan.previous_text is not None:
            mode = stat.S_IMODE(os.stat(plan.output_path).st_mode)
            backup = _free_name(plan.output_path, OUTPUT_BACKUP_SUFFIX)
            try:
                os.link(plan.output_path, backup)
            except OSError:
                write_atomic(backup, plan.previous_text, mode)
            report(f"kept the previous {plan.output_path} as {backup}")
        write_atomic(plan.output_path, plan.output_text, mode)
        report(f"wrote {plan.rule_count} rule(s) from {len(plan.names)} file(s) "
               f"to {plan.output_path}")
    for source, destination in plan.renames:
        os.rename(source, destination)
        report(f"renamed {source} to {destination}")
    _fsync_directory(plan.legacy_dir)


def _convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Convert the per-service qrexec policy files of the old directory "
        "(SERVICE and SERVICE+ARGUMENT files) into rules of one policy.d file, read as "
        f"the policy engine reads them now, and rename each old file to NAME{BACKUP_SUFFIX}. "
        "The result is checked before anything is written: for every service the new "
        "policy must hold the same rules in the same order. What cannot be converted "
        "exactly is refused, each reason as FILE:LINE: error: MESSAGE, and then nothing "
        "is written.",
        epilog="Exit status: 0 when converted (or nothing to convert), 1 when refused or "
        "failed, 2 on usage errors.",
    )
    parser.add_argument("--policy-dir", metavar="D", default=DEFAULT_R2_DIR,
                        help=f"the old per-service files (default: {DEFAULT_R2_DIR})")
    parser.add_argument("--policy-d", metavar="D", default=DEFAULT_POLICY_D,
                        help=f"the *.policy directory to write to (default: {DEFAULT_POLICY_D})")
    parser.add_argument("-o", "--output", metavar="NAME.policy", default=DEFAULT_OUTPUT,
                        help="the file of --policy-d that receives the rules, ahead of what "
                        f"it already holds (default: {DEFAULT_OUTPUT})")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="check and print the converted rules; write and rename nothing")
    return finish_parser(parser, f"{_PROG} -n          # show what would be written",
                         f"{_PROG} -o 40-converted.policy")


def _valid_output_name(name: str) -> bool:
    return (name.endswith(".policy") and not name.startswith(".")
            and os.sep not in name and name.isprintable() and len(name) <= 255)


def convert_main(argv: list[str] | None = None) -> int:
    """``qrexec-legacy-convert [--policy-dir D] [--policy-d D] [-o NAME] [-n]``."""
    try:
        args = _convert_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if not _valid_output_name(args.output):
        print(f"{_PROG}: --output must be a file name ending in .policy, not hidden: "
              f"{_printable(args.output)!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        plan = plan_conversion(args.policy_dir, args.policy_d, args.output)
    except _Refused as refused:
        for error in refused.errors:
            print(format_error(error, tag="error: "), file=sys.stderr)
        print(f"{_PROG}: cannot convert exactly; nothing written", file=sys.stderr)
        return EXIT_ERRORS
    if plan is None:
        print(f"{_PROG}: nothing to convert in {args.policy_dir}")
        return EXIT_OK
    for note in plan.notes:
        print(f"{_PROG}: warning: {note}", file=sys.stderr)
    if args.dry_run:
        sys.stdout.write(plan.converted_text)
        for source, destination in plan.renames:
            print(f"{_PROG}: would rename {source} to {destination}", file=sys.stderr)
        print(f"{_PROG}: would write {plan.rule_count} rule(s) to {plan.output_path} "
              "(dry run: nothing written)", file=sys.stderr)
        return EXIT_OK
    try:
        apply_plan(plan, lambda line: print(f"{_PROG}: {line}", flush=True))
    except OSError as exc:
        print(f"{_PROG}: {exc.filename or ''}: {_reason(exc)}; stopped (the policy gives "
              "the same decisions; run again to finish)", file=sys.stderr)
        return EXIT_ERRORS
    return EXIT_OK
