"""What every program's ``main`` shares: logging options and signal-aware running.

The long-lived programs (agent, daemon, policy daemon) run under a
:class:`Lifecycle`: systemd notifications, a graceful stop, reloads.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import resource
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import trio
from trio.lowlevel import FdStream

from .._config import Timeouts
from .._logging import get_logger
from .._options import logging_options
from .._options import setup_logging as setup_logging  # noqa: PLC0414 (the programs' one import)
from .._systemd import Notifier
from ..nursery import ConnectionRegistry, one_error
from ..xen import VchanError

log = get_logger(__name__)


def add_logging_options(parser: argparse.ArgumentParser, default: str = "info") -> None:
    """The same options, for the long-lived programs' argparse parsers."""
    for option in logging_options(default):
        parser.add_argument(option.long or "", choices=option.choices, default=option.default,
                            help=option.help)


#: What stops a short-lived program: a terminal's hangup too.
CLIENT_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: What stops a long-lived one. Not SIGHUP: a service may send it to the
#: agent, and a daemon's SIGHUP is for reloading (RELOAD_SIGNAL), not stopping.
DAEMON_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


async def _until_signalled(main_scope: trio.CancelScope, received: list[int],
                           stop_signals: tuple[int, ...],
                           task_status: trio.TaskStatus[None]) -> None:
    with trio.open_signal_receiver(*stop_signals) as signals:
        task_status.started()
        async for signum in signals:
            if received:
                # Kept receiving until the program is done: a second Ctrl-C
                # must not reach trio's default handler, which would raise
                # KeyboardInterrupt in the middle of the (bounded) cleanup.
                log.info("already stopping; signal ignored", signal=signal_name(signum))
                continue
            received.append(signum)
            main_scope.cancel()


def run_until_signal(
    main: Callable[[], Awaitable[int]], *, stopped_status: int | None = None,
) -> int:
    """Run ``main`` under trio; :data:`CLIENT_STOP_SIGNALS` cancel it cleanly.

    Returns ``main``'s result, or if signal N stopped it ``stopped_status``
    (daemons: a requested stop is a clean exit) or else 128+N.
    """
    received: list[int] = []

    async def runner() -> int:
        result = 0
        main_scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            await nursery.start(_until_signalled, main_scope, received, CLIENT_STOP_SIGNALS)
            with main_scope:
                result = await main()
            nursery.cancel_scope.cancel()
        return result

    with one_error():
        result = trio.run(runner)
    if not received:
        return result
    return stopped_status if stopped_status is not None else 128 + received[0]


@contextlib.asynccontextmanager
async def local_stdio() -> AsyncIterator[tuple[FdStream, FdStream, FdStream]]:
    """This process's stdin, stdout and stderr as trio streams.

    The streams own duplicates of fds 0-2: trio makes them non-blocking while
    we run and restores their mode when they are closed.
    """
    streams = [FdStream(os.dup(fd)) for fd in (0, 1, 2)]
    try:
        yield streams[0], streams[1], streams[2]
    finally:
        with trio.CancelScope(shield=True):
            for stream in streams:
                await stream.aclose()


def raise_fd_limit() -> None:
    """Use the hard limit on open files: a ring vchan holds several fds, and a
    daemon or agent with hundreds of connections must not hit the soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: What reloads a long-lived program (re-reading what it caches).
RELOAD_SIGNAL: Final = signal.SIGHUP
#: Signals a long-lived program takes no action on (logged): a service may
#: send them to the agent it runs under (QREXEC_AGENT_PID is its connection's
#: stand-in, but a service can find the agent), and none may end it. That is
#: every signal whose default action ends a process quietly. Left as they are:
#: the stops (SIGTERM, SIGINT), the reload (SIGHUP), SIGKILL and SIGSTOP
#: (uncatchable), SIGABRT (systemd's watchdog ends a stuck program with it) and
#: the other core-dumping ones (SIGQUIT asks for a core; SIGSEGV and its kind
#: are faults, which must not be caught and ignored).
IGNORED_SIGNALS: Final = (
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF,
    signal.SIGIO, signal.SIGPWR, signal.SIGSTKFLT,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)


def signal_name(signum: int) -> str:
    """``SIGUSR1``; ``SIGRTMIN+3`` for the real-time signals enum does not name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
#: A reload that takes longer than this is abandoned (logged; the old state stays).
RELOAD_TIMEOUT: Final = 30.0
#: How often a stopping program looks whether its connections are gone.
_DRAIN_POLL: Final = 0.05

#: A program's reload: re-read what it caches; says what it re-read (logged).
Reload = Callable[[], Awaitable[str]]


def add_lifecycle_options(parser: argparse.ArgumentParser) -> None:
    """``--stop-grace``, for the long-lived programs' argparse parsers."""
    parser.add_argument(
        "--stop-grace", type=_seconds, metavar="SECONDS", default=None,
        help="on SIGTERM, let live connections finish for up to this long, then cancel "
        "them (default QREXEC_TIMEOUT_STOP_GRACE or 10; e.g. --stop-grace 30)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


class Lifecycle:
    """What a long-lived program's ``main`` is handed by :func:`run_long_lived`.

    The program says what it serves (:meth:`track`, :meth:`on_stop`,
    :meth:`on_reload`) and when it is serving (:meth:`ready`); the lifecycle
    tells systemd (READY, STATUS with the live connection counts, WATCHDOG
    from the event loop, STOPPING, RELOADING) and runs the signals:

    * SIGTERM/SIGINT: a graceful stop. The ``on_stop`` hooks stop accepting;
      live connections get ``stop_grace`` seconds to finish, then are cancelled
      through the registry (so each releases what it holds); then ``main`` is
      cancelled. A second stop signal skips what is left of the grace.
    * SIGHUP: the ``on_reload`` function, between RELOADING=1 and READY=1;
      connections are not touched.
    * SIGUSR1/SIGUSR2: logged, nothing else.
    """

    def __init__(self, notifier: Notifier, *, stop_grace: float, cleanup: float) -> None:
        self.notifier = notifier
        self.stop_grace = stop_grace
        self._cleanup = cleanup
        self.registry: ConnectionRegistry | None = None
        self._reload: Reload | None = None
        self._on_stop: list[Callable[[], object]] = []
        #: Set when a stop was asked for: stop taking new work.
        self.stop_requested = trio.Event()
        self._ready = trio.Event()
        self._reloading = False
        self._main_scope = trio.CancelScope()
        self._stop_signal: int | None = None

    # -- what the program says -------------------------------------------------------

    def track(self, registry: ConnectionRegistry) -> None:
        """The live connections: counted in STATUS=, waited for and cancelled at a stop."""
        self.registry = registry

    def on_stop(self, stop_accepting: Callable[[], object]) -> None:
        """Called (synchronously) when a stop begins: take no new connections."""
        self._on_stop.append(stop_accepting)

    def on_reload(self, reload: Reload) -> None:
        self._reload = reload

    def ready(self) -> None:
        """Serving: READY=1 (once), then the status and the watchdog."""
        if self._ready.is_set():
            return
        self._ready.set()
        self.notifier.ready()
        self.notifier.status(self.status_text(), force=True)

    @property
    def stop_signal(self) -> int | None:
        """The signal that stopped the program, if one did."""
        return self._stop_signal

    def status_text(self) -> str:
        registry = self.registry
        if registry is None:
            what = "serving"
        else:
            states = collections.Counter(info.state for info in registry.list())
            count = sum(states.values())
            what = f"{count} live connection{'' if count == 1 else 's'}"
            if states:
                what += " (" + ", ".join(f"{n} {state}" for state, n in sorted(states.items())) \
                    + ")"
        if self.stop_requested.is_set():
            return f"stopping; {what}"
        return f"serving; {what}" if registry is not None else what

    # -- what run_long_lived runs ------------------------------------------------------

    async def _run(self, main: Callable[[Lifecycle], Awaitable[int]],
                   early_stops: list[int]) -> int:
        result = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(self._signals, nursery, early_stops)
            if self.notifier.enabled:
                nursery.start_soon(self._report_status)
            if self.notifier.watchdog is not None:
                nursery.start_soon(self._watchdog, self.notifier.watchdog)
            with self._main_scope:
                result = await main(self)
            nursery.cancel_scope.cancel()
        return result

    async def _signals(self, nursery: trio.Nursery, early_stops: list[int],
                       task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(*DAEMON_STOP_SIGNALS, RELOAD_SIGNAL,
                                       *IGNORED_SIGNALS) as signals:
            task_status.started()
            # A stop asked for before trio took the signals over (start-up).
            for signum in early_stops[:1]:
                self._stop(nursery, signum)
            async for signum in signals:
                name = signal_name(signum)
                if signum in DAEMON_STOP_SIGNALS:
                    self._stop(nursery, signum)
                elif signum == RELOAD_SIGNAL:
                    if self._reloading:
                        log.info("reload already running; signal ignored", signal=name)
                    else:
                        self._reloading = True
                        nursery.start_soon(self._reload_now)
                else:
                    log.info("signal ignored", signal=name)

    def _stop(self, nursery: trio.Nursery, signum: int) -> None:
        name = signal_name(signum)
        if self.stop_requested.is_set():
            log.info("stop signal again: stopping now", signal=name)
            self._main_scope.cancel()
            return
        self._stop_signal = signum
        self.stop_requested.set()
        self.notifier.stopping(self.status_text())
        for stop_accepting in self._on_stop:
            stop_accepting()
        if not self._ready.is_set() or self.registry is None or not len(self.registry):
            log.info("stopping", signal=name)
            self._main_scope.cancel()
            return
        log.info("stopping; live connections may finish", signal=name,
                 connections=len(self.registry), grace=self.stop_grace)
        nursery.start_soon(self._drain, self.registry)

    async def _drain(self, registry: ConnectionRegistry) -> None:
        with trio.move_on_after(self.stop_grace):
            await self._until_empty(registry)
        left = [info.id for info in registry.list()]
        if left:
            log.warning("stop deadline passed; cancelling live connections",
                        grace=self.stop_grace, connections=left)
            for call in left:
                registry.cancel(call)
            # Each connection releases what it holds under its own deadline
            # (the cleanup timeout, all at once): grace + cleanup bounds a stop.
            with trio.move_on_after(self._cleanup):
                await self._until_empty(registry)
        self._main_scope.cancel()

    @staticmethod
    async def _until_empty(registry: ConnectionRegistry) -> None:
        # Polled, only while stopping: the registry has no "now empty" event,
        # and a stop is no hot path.
        while len(registry):  # noqa: ASYNC110
            await trio.sleep(_DRAIN_POLL)

    async def _reload_now(self) -> None:
        try:
            if not self._ready.is_set() or self.stop_requested.is_set():
                log.info("reload signal ignored: not serving")
                return
            self.notifier.reloading("reloading")
            log.info("reloading")
            try:
                with trio.fail_after(RELOAD_TIMEOUT):
                    what = await self._reload() if self._reload is not None else ""
            except Exception as exc:  # a failed reload keeps the program as it was
                log.error("reload failed; going on as before",
                          error=str(exc) or type(exc).__name__)
            else:
                log.info("reloaded", what=what or "nothing: this program caches no "
                         "configuration")
            self.notifier.ready()
            self.notifier.status(self.status_text(), force=True)
        finally:
            self._reloading = False

    async def _report_status(self) -> None:
        await self._ready.wait()
        while True:
            await trio.sleep(self.notifier.status_interval)
            self.notifier.status(self.status_text())

    async def _watchdog(self, interval: float) -> None:
        # From a task of the event loop: a loop that is stuck stops the pings,
        # and systemd restarts the program.
        await self._ready.wait()
        while True:
            self.notifier.ping()
            await trio.sleep(interval)


def _no_action(signum: int, frame: object) -> None:
    # Never log here: a handler runs between any two bytecodes of the main
    # thread, possibly inside the logger's own write (a deadlock). Inside
    # trio.run the signals are received by a task instead (Lifecycle._signals).
    pass


def run_long_lived(main: Callable[[Lifecycle], Awaitable[int]], *,
                   stop_grace: float | None = None) -> int:
    """Run a daemon-like program under a :class:`Lifecycle`: a requested stop
    is a clean exit (0), and a vchan that cannot be set up is a logged
    start-up failure (1). ``stop_grace`` (None: the configured one) bounds a
    graceful stop."""
    raise_fd_limit()
    timeouts = Timeouts.from_env()
    early_stops: list[int] = []
    for signum in (RELOAD_SIGNAL, *IGNORED_SIGNALS):
        # Caught rather than ignored: children start with default dispositions.
        signal.signal(signum, _no_action)
    for signum in DAEMON_STOP_SIGNALS:
        # Until trio takes them over: a stop during start-up is a clean stop.
        signal.signal(signum, lambda signum, frame: early_stops.append(signum))
    notifier = Notifier.from_environ()
    life = Lifecycle(notifier, stop_grace=timeouts.stop_grace if stop_grace is None
                     else stop_grace, cleanup=timeouts.cleanup)
    try:
        with one_error():
            result = trio.run(life._run, main, early_stops)
    except VchanError as exc:
        get_logger(__name__).error("cannot start", error=str(exc))
        return 1
    finally:
        notifier.close()
    return 0 if life.stop_signal is not None else result
