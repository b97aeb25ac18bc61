"""Signals that stop a blocking call, with the same exit statuses as the trio clients.

SIGTERM, SIGINT and SIGHUP (a terminal's hangup) stop a short-lived client:
the call is torn down (every fd closed, modes restored, by the ``finally``
blocks it unwinds through) and the client exits 128+N. ``_signal`` rather
than ``signal``: the latter imports enum.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # (no stub; signal itself imports enum)

#: What stops a short-lived program (the trio clients' CLIENT_STOP_SIGNALS).
STOP_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)


class Stopped(BaseException):
    """A stop signal arrived; raised from the handler, so that the call unwinds."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


def stop_on_signals() -> None:
    """From now on, a stop signal raises :class:`Stopped` in the main thread."""
    for signum in STOP_SIGNALS:
        _signal.signal(signum, _stop)
