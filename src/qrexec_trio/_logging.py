"""structlog set-up shared by every program, and loggers that import it only when needed.

Logs go to stderr (stdout is payload for qrexec-client and services). On a
terminal they are rendered for people, in colour unless ``NO_COLOR`` is set;
anywhere else (systemd, files, tests) as JSON lines. When stderr is the
journal (``JOURNAL_STREAM`` names it, as systemd sets it), each line starts
with its syslog priority (``<6>`` for info...), so ``journalctl -p`` can
filter them. Each connection binds its context once with
:func:`structlog.contextvars.bound_contextvars`; trio copies context
variables into child tasks, so everything a connection logs carries it.

structlog costs the short-lived clients more start-up time than a whole
call, and a client that works logs nothing at its default level. So the
loggers :func:`get_logger` hands out check the level themselves and import
structlog only for a record that will be written; :func:`configure_logging`
applies its settings to structlog when structlog is first needed (at once if
structlog is already imported, or with ``eager=True``); and
:func:`bind_context` binds fields to every later record of the current
context, before or after structlog is loaded.
"""

from __future__ import annotations

import os
import sys
from _contextvars import ContextVar  # what contextvars re-exports: one module fewer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final, TextIO

    import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")
#: The numbers structlog (and logging) give those levels.
_DEBUG: Final = 10
_INFO: Final = 20
_WARNING: Final = 30
_ERROR: Final = 40
_CRITICAL: Final = 50
_LEVEL_NUMBERS: Final = dict(zip(LEVELS, (_DEBUG, _INFO, _WARNING, _ERROR, _CRITICAL),
                                 strict=True))
#: The syslog priority of each logging method, for the journal's ``<N>`` prefix.
_PRIORITIES: Final = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3,
                      "exception": 3, "critical": 2}


class _Settings:
    """What :func:`configure_logging` was asked for, until structlog is configured with it."""

    __slots__ = ("colour", "journal", "json", "level", "stream")

    def __init__(self, level: int, stream: TextIO, json: bool) -> None:
        self.level = level
        self.stream = stream
        self.json = json
        # Decided now, with the environment of configure_logging's caller.
        self.journal = stream_is_journal(stream)
        self.colour = not json and wants_colour(stream)


class _State:
    __slots__ = ("pending", "settings", "threshold")

    def __init__(self) -> None:
        #: Records below this level are dropped without importing structlog. 0
        #: until configure_logging: every record goes to structlog and its defaults.
        self.threshold = 0
        #: Settings not yet given to structlog.
        self.pending: _Settings | None = None
        #: Settings structlog was last configured with.
        self.settings: _Settings | None = None


_state = _State()


def stream_is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal: ``$JOURNAL_STREAM`` is its ``DEV:INODE``.

    systemd sets the variable for a service whose stderr (or stdout) it
    connected to the journal; a child that redirected its stderr elsewhere
    still inherits it, so the file itself must match.
    """
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False  # no file behind it (io.StringIO: UnsupportedOperation is an OSError)
    return expected == f"{status.st_dev}:{status.st_ino}"


def wants_colour(stream: TextIO) -> bool:
    """Colour for a terminal, unless ``$NO_COLOR`` says otherwise (no-color.org:
    any non-empty value)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False
#: Fields bound by bind_context while structlog was not loaded; the processor
#: configure_logging installs logs them (structlog's own contextvars win: they
#: were bound later).
_bound: ContextVar[dict[str, Any]] = ContextVar("qrexec_trio_log_context")
_NOTHING_BOUND: Final[dict[str, Any]] = {}


def configure_logging(level: str = "info", *, stream: TextIO | None = None,
                      json: bool | None = None, program: str | None = None,
                      eager: bool = False) -> None:
    """Log records of ``level`` and above to ``stream`` (default: stderr), as
    JSON lines or for a terminal (``json=None``: JSON unless ``stream`` is a tty).

    ``program`` is bound to every record. structlog is configured when a
    record is first written, or now if it is already imported (code using it
    directly must get this configuration) or ``eager``.
    """
    if level not in _LEVEL_NUMBERS:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
    # Resolved now, as structlog.configure would: stderr may be redirected later.
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not out.isatty()
    _state.threshold = _LEVEL_NUMBERS[level]
    _state.pending = _Settings(_state.threshold, out, json)
    if eager or "structlog" in sys.modules:
        _configure_structlog()
    if program is not None:
        bind_context(program=program)


def bind_context(**values: Any) -> None:
    """Log ``values`` with every later record of this context (and of the tasks it starts).

    :func:`structlog.contextvars.bind_contextvars` once structlog is loaded;
    before, a context variable of our own, which records carry all the same.
    """
    if "structlog" in sys.modules:
        import structlog  # noqa: PLC0415 (already loaded: this only looks it up)

        structlog.contextvars.bind_contextvars(**values)
    else:
        _bound.set({**_bound.get(_NOTHING_BOUND), **values})


def _merge_bound_context(logger: Any, method_name: str, event_dict: dict[str, Any]
                         ) -> dict[str, Any]:
    """A structlog processor: the fields :func:`bind_context` kept before structlog loaded."""
    for key, value in _bound.get(_NOTHING_BOUND).items():
        event_dict.setdefault(key, value)
    return event_dict


class _StampUnlessStamped:
    """A structlog processor: time a record now, unless it was written elsewhere
    (:func:`relay`): then its own time stays."""

    __slots__ = ("_stamper",)

    def __init__(self, stamper: Any) -> None:
        self._stamper = stamper

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]
                 ) -> dict[str, Any]:
        if "timestamp" in event_dict:
            return event_dict
        result: dict[str, Any] = self._stamper(logger, method_name, event_dict)
        return result


def _journal_priority(logger: Any, method_name: str, rendered: str) -> str:
    """After the renderer: the record's syslog priority, as the journal reads it."""
    return f"<{_PRIORITIES.get(method_name, 6)}>{rendered}"


def _configure_structlog() -> None:
    settings, _state.pending = _state.pending, None
    if settings is None:
        return
    _state.settings = settings
    import structlog  # noqa: PLC0415 (loaded only when needed: see the module doc)

    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.json
        else structlog.dev.ConsoleRenderer(colors=settings.colour)
    )
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _merge_bound_context,
        structlog.processors.add_log_level,
        _StampUnlessStamped(stamper),
    ]
    if settings.json:
        processors.append(structlog.processors.dict_tracebacks)
    processors.append(renderer)
    if settings.journal:
        processors.append(_journal_priority)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(settings.level),
        logger_factory=structlog.WriteLoggerFactory(settings.stream),
        cache_logger_on_first_use=False,
    )


class Logger:
    """structlog's logging methods behind a level check that needs no structlog.

    A record at an enabled level goes to ``structlog.get_logger(name)``, with
    the same arguments, so it is rendered exactly as structlog renders it.
    """

    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: structlog.typing.FilteringBoundLogger | None = None

    def debug(self, event: str, *args: Any, **kw: Any) -> None:
        if _state.threshold <= _DEBUG:
            self._emit("debug", event, args, kw)

    def info(self, event: str, *args: Any, **kw: Any) -> None:
        if _state.threshold <= _INFO:
            self._emit("info", event, args, kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> None:
        if _state.threshold <= _WARNING:
            self._emit("warning", event, args, kw)

    def error(self, event: str, *args: Any, **kw: Any) -> None:
        if _state.threshold <= _ERROR:
            self._emit("error", event, args, kw)

    def exception(self, event: str, *args: Any, **kw: Any) -> None:
        """An error with the traceback of the exception being handled."""
        if _state.threshold <= _ERROR:
            self._emit("exception", event, args, kw)

    def critical(self, event: str, *args: Any, **kw: Any) -> None:
        if _state.threshold <= _CRITICAL:
            self._emit("critical", event, args, kw)

    def _emit(self, method: str, event: str, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        if _state.pending is not None:
            _configure_structlog()
        logger = self._logger
        if logger is None:
            import structlog  # noqa: PLC0415 (loaded only when needed: see the module doc)

            logger = self._logger = structlog.get_logger(self._name)
        getattr(logger, method)(event, *args, **kw)


def get_logger(name: str) -> Logger:
    return Logger(name)


def relay(record: dict[str, Any]) -> None:
    """Log a record another program wrote as a JSON line, as if it were ours.

    It keeps its own fields (its ``program``, ``timestamp``, ``call``...), and
    is written at its own level if that passes our threshold: the world shows
    its programs' logs in its own format (colour, journal priority) this way.
    """
    fields = dict(record)
    level = str(fields.pop("level", "info"))
    method = level if level in _LEVEL_NUMBERS else "info"
    if _state.threshold > _LEVEL_NUMBERS[method]:
        return
    event = str(fields.pop("event", ""))
    exception = fields.get("exception")
    settings = _state.pending or _state.settings
    if exception is not None and not isinstance(exception, str) and not (
            settings is not None and settings.json):
        # dict_tracebacks' structure, which a console renderer cannot show.
        fields["exception"] = repr(exception)
    _relay_logger._emit(method, event, (), fields)


_relay_logger = Logger("qrexec_trio.relay")


def announce(text: str, **fields: Any) -> None:
    """Tell the reader ``text`` whatever the log level: a plain line for people
    (a console), an info record with ``fields`` for machines (JSON lines).

    For what a program reports as its output on stderr (the world's line per
    call), not for diagnostics.
    """
    if _state.pending is not None:
        _configure_structlog()
    settings = _state.settings
    if settings is None or not settings.json:
        stream = settings.stream if settings is not None else sys.stderr
        stream.write(text + "\n")
        stream.flush()
        return
    import structlog  # noqa: PLC0415 (loaded only when needed: see the module doc)

    # A logger of its own that no threshold filters, with every processor of ours.
    config = structlog.get_config()
    logger = structlog.wrap_logger(
        config["logger_factory"](), processors=config["processors"],
        wrapper_class=structlog.make_filtering_bound_logger(0))
    logger.info(text, **fields)
