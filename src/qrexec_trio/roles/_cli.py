"""What every program's ``main`` shares: logging options and signal-aware running."""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import trio
from trio.lowlevel import FdStream

from .._logging import get_logger
from .._options import logging_options
from .._options import setup_logging as setup_logging  # noqa: PLC0414 (the programs' one import)
from ..nursery import one_error
from ..xen import VchanError


def add_logging_options(parser: argparse.ArgumentParser, default: str = "info") -> None:
    """The same options, for the long-lived programs' argparse parsers."""
    for option in logging_options(default):
        parser.add_argument(option.long or "", choices=option.choices, default=option.default,
                            help=option.help)


#: What stops a short-lived program: a terminal's hangup too.
CLIENT_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: What stops a long-lived one. Not SIGHUP: a service may send it to the
#: agent, and a daemon's SIGHUP is for reloading, not stopping.
DAEMON_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


async def _until_signalled(scope: trio.CancelScope, received: list[int],
                           stop_signals: tuple[int, ...]) -> None:
    with trio.open_signal_receiver(*stop_signals) as signals:
        async for signum in signals:
            received.append(signum)
            scope.cancel()
            return


def run_until_signal(
    main: Callable[[], Awaitable[int]], *, stopped_status: int | None = None,
    stop_signals: tuple[int, ...] = CLIENT_STOP_SIGNALS,
    ignored_signals: tuple[int, ...] = (),
) -> int:
    """Run ``main`` under trio; ``stop_signals`` cancel it cleanly.

    Returns ``main``'s result, or if signal N stopped it ``stopped_status``
    (daemons: a requested stop is a clean exit) or else 128+N.
    """
    received: list[int] = []

    async def runner() -> int:
        result = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_signalled, nursery.cancel_scope, received, stop_signals)
            if ignored_signals:
                nursery.start_soon(_log_ignored, ignored_signals)
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


#: Signals a long-lived program takes no action on (logged): a service may
#: send them to the agent it runs under (QREXEC_AGENT_PID is its connection's
#: stand-in, but a service can find the agent), and none may end it.
IGNORED_SIGNALS: Final = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _no_action(signum: int, frame: object) -> None:
    # Never log here: a handler runs between any two bytecodes of the main
    # thread, possibly inside the logger's own write (a deadlock). Inside
    # trio.run the signals are received by a task instead (_log_ignored).
    pass


async def _log_ignored(signals: tuple[int, ...]) -> None:
    with trio.open_signal_receiver(*signals) as received:
        async for signum in received:
            get_logger(__name__).info("signal ignored", signal=signal.Signals(signum).name)


def run_long_lived(main: Callable[[], Awaitable[int]]) -> int:
    """Run a daemon-like program: a requested stop is a clean exit (0), and a
    vchan that cannot be set up is a logged start-up failure (1)."""
    raise_fd_limit()
    for signum in IGNORED_SIGNALS:
        # Caught rather than ignored: children start with default dispositions.
        signal.signal(signum, _no_action)
    try:
        return run_until_signal(main, stopped_status=0, stop_signals=DAEMON_STOP_SIGNALS,
                                ignored_signals=IGNORED_SIGNALS)
    except VchanError as exc:
        get_logger(__name__).error("cannot start", error=str(exc))
        return 1
