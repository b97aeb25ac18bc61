"""A small table-driven command-line parser for the short-lived clients.

argparse alone costs more start-up time than a whole qrexec call may take
(issue 14), so the clients describe their options as a table of
:class:`Option` rows and parse them here with getopt_long's rules, as the
reference programs do:

* short options cluster (``-tT``) and take a value glued or as the next
  argument (``-pDATA``, ``-p DATA``), whatever that argument looks like;
* long options take ``--name=VALUE`` or ``--name VALUE``, and an unambiguous
  prefix of a long name stands for it (``--prefix`` for ``--prefix-data``);
* ``--`` ends the options; with ``stop_at_operand`` so does the first operand
  (getopt's ``+``: a PROG's own options pass through), otherwise options and
  operands may be mixed (GNU getopt's permutation).

Usage errors print a usage line and ``PROG: error: MESSAGE`` to stderr and
exit with the program's usage status; ``-h``/``--help`` prints the help to
stdout and exits 0, and ``--version`` (for the programs that take it)
``PROG VERSION``. Messages keep argparse's wording, which the programs
used before.

Only ``sys`` is imported at run time: this module is on the
clients' start-up path.
"""

from __future__ import annotations

import sys

from . import __version__
from ._logging import LEVELS, configure_logging

TYPE_CHECKING = False
if TYPE_CHECKING:
    from argparse import Namespace as ArgparseNamespace
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any, Literal, NoReturn

    #: What an option does when given: ``store`` its value (the last one
    #: wins), store it ``once`` (a second time is a usage error), store
    #: ``true`` or ``false``, ``count`` how often it was given, or print the
    #: ``help`` or the ``version``.
    Action = Literal["store", "once", "true", "false", "count", "help", "version"]

_UNSET = object()
_TAKES_VALUE = ("store", "once")
_IMPLICIT_DEFAULTS: dict[str, object] = {"true": False, "false": True, "count": 0}
_HELP_COLUMN = 28


class Option:
    """One row of a program's option table: a short and/or a long spelling."""

    __slots__ = ("action", "choices", "convert", "default", "dest", "help", "long",
                 "metavar", "required", "short")

    def __init__(
        self, short: str | None, long: str | None, *, dest: str | None = None,
        action: Action = "store", default: object = _UNSET, metavar: str | None = None,
        help: str = "", choices: Sequence[str] | None = None,
        convert: Callable[[str], object] | None = None, required: bool = False,
    ) -> None:
        if short is None and long is None:
            raise ValueError("an option needs a short or a long spelling")
        self.short = short
        self.long = long
        self.dest: str = dest or (long or "").lstrip("-").replace("-", "_")
        if not self.dest:
            raise ValueError(f"option {short}: a short-only option needs a dest")
        self.action = action
        self.default = _IMPLICIT_DEFAULTS.get(action) if default is _UNSET else default
        self.choices = tuple(choices) if choices is not None else None
        if metavar is None:
            metavar = "{" + ",".join(self.choices) + "}" if self.choices else self.dest.upper()
        self.metavar = metavar
        self.help = help
        self.convert = convert
        self.required = required

    @property
    def takes_value(self) -> bool:
        return self.action in _TAKES_VALUE

    @property
    def name(self) -> str:
        """``-p/--prefix-data``, as usage errors name the option."""
        return "/".join(spelling for spelling in (self.short, self.long) if spelling)

    def synopsis(self) -> str:
        """``-p, --prefix-data DATA``, as the help lists the option."""
        spellings = ", ".join(spelling for spelling in (self.short, self.long) if spelling)
        return f"{spellings} {self.metavar}" if self.takes_value else spellings


class Operand:
    """A positional argument; ``rest`` takes every argument left (possibly none)."""

    __slots__ = ("dest", "help", "metavar", "rest")

    def __init__(self, dest: str, metavar: str, help: str = "", *, rest: bool = False) -> None:
        self.dest = dest
        self.metavar = metavar
        self.help = help
        self.rest = rest


class Namespace:
    """The parsed command line: one attribute per option ``dest`` and operand."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"Namespace({fields})"

    if TYPE_CHECKING:
        # The attributes come from the table: typed as argparse types its own.
        def __getattr__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...


HELP = Option("-h", "--help", action="help", help="show this help and exit")
VERSION = Option(None, "--version", action="version", help="print the version and exit")


def version_line(prog: str) -> str:
    """``PROG VERSION``, as every program's ``--version`` prints it."""
    return f"{prog} {__version__}"


class Parser:
    """A program's option table and operands, and how its usage errors exit."""

    def __init__(
        self, prog: str, options: Sequence[Option], operands: Sequence[Operand], *,
        description: str = "", epilog: str = "", usage_status: int = 2,
        stop_at_operand: bool = False, exclusive: Sequence[tuple[str, ...]] = (),
        version: bool = False,
    ) -> None:
        self.prog = prog
        # --version is opt-in: a new long name could make a prefix that a
        # program's users abbreviate to ambiguous (getopt_long's rules).
        extra: tuple[Option, ...] = (VERSION,) if version else ()
        self.options = (HELP, *options, *extra)
        self.operands = tuple(operands)
        self.description = description
        self.epilog = epilog
        self.usage_status = usage_status
        self.stop_at_operand = stop_at_operand
        #: Groups of dests of which at most one may be given.
        self.exclusive = tuple(exclusive)
        self._short = {option.short[1:]: option for option in self.options if option.short}
        self._long = {option.long[2:]: option for option in self.options if option.long}

    # -- parsing ------------------------------------------------------------------------

    def parse_args(self, argv: Sequence[str]) -> Namespace:
        """Parse ``argv`` (without the program name); usage errors exit."""
        values: dict[str, object] = {}
        for option in self.options:
            if option.action not in ("help", "version"):
                values.setdefault(option.dest, option.default)  # the first row's default wins
        given: dict[str, str] = {}  # dest -> the option that set it, for usage errors
        operands: list[str] = []
        args = iter(argv)
        for arg in args:
            if arg == "--":
                operands.extend(args)
            elif arg.startswith("--"):
                self._long_option(arg[2:], args, values, given)
            elif arg.startswith("-") and arg != "-":
                self._short_options(arg[1:], args, values, given)
            else:
                operands.append(arg)
                if self.stop_at_operand:
                    operands.extend(args)
        values.update(self._assign_operands(operands, given))
        return Namespace(**values)

    def _long_option(self, text: str, args: Iterator[str], values: dict[str, object],
                     given: dict[str, str]) -> None:
        name, has_value, value = text.partition("=")
        option = self._find_long(name)
        if not option.takes_value:
            if has_value:
                self.error(f"argument {option.name}: ignored explicit argument {value!r}")
            self._apply(option, option.long or "", None, values, given)
            return
        if not has_value:
            value = self._next_value(option, args)
        self._apply(option, option.long or "", value, values, given)

    def _find_long(self, name: str) -> Option:
        """The option ``--name`` means: its exact name or a prefix of one name only."""
        if name in self._long:
            return self._long[name]
        matches = [option for long, option in self._long.items() if name and long.startswith(name)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            candidates = ", ".join(option.long or "" for option in matches)
            self.error(f"ambiguous option: --{name} could match {candidates}")
        self.error(f"unrecognized arguments: --{name}")

    def _short_options(self, cluster: str, args: Iterator[str], values: dict[str, object],
                       given: dict[str, str]) -> None:
        for index, letter in enumerate(cluster):
            option = self._short.get(letter)
            if option is None:
                self.error(f"unrecognized arguments: -{letter}")
            if not option.takes_value:
                self._apply(option, f"-{letter}", None, values, given)
                continue
            # The rest of the cluster is the value (-pDATA), else the next argument.
            value = cluster[index + 1:] or self._next_value(option, args)
            self._apply(option, f"-{letter}", value, values, given)
            return

    def _next_value(self, option: Option, args: Iterator[str]) -> str:
        value = next(args, None)
        if value is None:
            self.error(f"argument {option.name}: expected one argument")
        return value

    def _apply(self, option: Option, spelling: str, value: str | None,
               values: dict[str, object], given: dict[str, str]) -> None:
        if option.action in ("help", "version"):
            text = self.format_help() if option.action == "help" else version_line(self.prog)
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()
            raise SystemExit(0)
        self._check_exclusive(option, given)
        if option.action == "once" and option.dest in given:
            self.error(f"{spelling} can only be used once")
        given[option.dest] = option.name
        if option.action == "true":
            values[option.dest] = True
        elif option.action == "false":
            values[option.dest] = False
        elif option.action == "count":
            count = values[option.dest]
            values[option.dest] = (count if isinstance(count, int) else 0) + 1
        else:
            assert value is not None
            values[option.dest] = self._value(option, value)

    def _check_exclusive(self, option: Option, given: dict[str, str]) -> None:
        for group in self.exclusive:
            if option.dest not in group:
                continue
            for other in group:
                if other != option.dest and other in given:
                    self.error(f"argument {option.name}: not allowed with argument "
                               f"{given[other]}")

    def _value(self, option: Option, value: str) -> object:
        if option.choices is not None and value not in option.choices:
            choices = ", ".join(repr(choice) for choice in option.choices)
            self.error(f"argument {option.name}: invalid choice: {value!r} "
                       f"(choose from {choices})")
        if option.convert is None:
            return value
        try:
            return option.convert(value)
        except ValueError:
            kind = getattr(option.convert, "__name__", "")
            self.error(f"argument {option.name}: invalid {kind} value: {value!r}")

    def _assign_operands(self, operands: list[str], given: dict[str, str]) -> dict[str, object]:
        missing = [option.name for option in self.options
                   if option.required and option.dest not in given]
        assigned: dict[str, object] = {}
        left = list(operands)
        for operand in self.operands:
            if operand.rest:
                assigned[operand.dest], left = left, []
            elif left:
                assigned[operand.dest] = left.pop(0)
            else:
                missing.append(operand.metavar)
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        if left:
            self.error(f"unrecognized arguments: {' '.join(left)}")
        return assigned

    # -- messages -------------------------------------------------------------------------

    def format_usage(self) -> str:
        words = [f"usage: {self.prog} [OPTIONS]"]
        words += [f"{option.name.split('/')[0]} {option.metavar}"
                  for option in self.options if option.required]
        words += [f"[{operand.metavar}]" if operand.rest else operand.metavar
                  for operand in self.operands]
        return " ".join(words) + "\n"

    def format_help(self) -> str:
        """The usage line, then one line per operand and per option."""
        lines = [self.format_usage()]
        if self.description:
            lines += ["", self.description]
        rows = [(operand.metavar, operand.help) for operand in self.operands]
        if rows:
            lines += ["", "operands:", *_aligned(rows)]
        lines += ["", "options:", *_aligned([(option.synopsis(), option.help)
                                             for option in self.options])]
        if self.epilog:
            lines += ["", self.epilog]
        return "\n".join(line.rstrip("\n") for line in lines) + "\n"

    def error(self, message: str) -> NoReturn:
        """A usage error: the usage line and ``PROG: error: MESSAGE`` on stderr, then exit."""
        sys.stderr.write(f"{self.format_usage()}{self.prog}: error: {message}\n")
        sys.stderr.flush()
        raise SystemExit(self.usage_status)


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    """``  NAME  HELP``, the help texts in one column where the names fit before it."""
    lines = []
    for name, text in rows:
        head = f"  {name}"
        pad = _HELP_COLUMN - len(head) if len(head) + 2 <= _HELP_COLUMN else 2
        lines.append(f"{head}{' ' * pad}{text}" if text else head)
    return lines


# -- what every program takes -------------------------------------------------------


def logging_options(default: str = "info") -> tuple[Option, Option]:
    """``--log-level`` and ``--log-format``, as rows of an option table (:mod:`._options`)."""
    return (
        Option(None, "--log-level", choices=LEVELS, default=default,
               help=f"log threshold (default {default})"),
        Option(None, "--log-format", choices=("auto", "json", "console"), default="auto",
               help="auto: console on a terminal, JSON lines elsewhere"),
    )


def setup_logging(args: Namespace | ArgparseNamespace, program: str) -> None:
    """Configure logging from ``--log-level`` and ``--log-format``."""
    json = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level, json=json, program=program)
