"""sd_notify without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

:class:`Notifier` is what a long-lived program tells systemd (sd_notify(3)):
``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1`` and
``RELOADING=1`` with ``MONOTONIC_USEC=`` (the ``Type=notify-reload``
protocol). It is trio-free and cheap: one non-blocking datagram socket, a
send per message. What systemd handed us is taken out of the environment
when read, as the reference agent does, so that no child (a service) thinks
the notifications or the watchdog are its own.

Bad input never stops a program: a ``WATCHDOG_USEC`` that is not a positive
integer (or a ``WATCHDOG_PID`` that is not a number) means no watchdog, with
one log line; a ``NOTIFY_SOCKET`` that does not exist or refuses means the
notifications are dropped, with one log line until a send succeeds again.
Without ``NOTIFY_SOCKET`` (not under systemd) every call is a silent no-op.
"""

from __future__ import annotations

import os
import socket
import time

from ._logging import get_logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import MutableMapping

log = get_logger(__name__)

#: What systemd sets for a notify-type service, and we take from the environment.
NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def notify_address(value: str) -> str | None:
    """The socket address ``$NOTIFY_SOCKET`` names (``@name``: the abstract
    namespace); None for one we cannot send to (logged by the caller)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # vsock:... and relative paths: systemd never hands these to a service of ours.
    return None


def watchdog_interval(usec: str | None, pid: str | None, own_pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None for no watchdog.

    Raises ValueError for a value systemd would never set (the caller logs it).
    """
    if usec is None:
        return None
    if pid is not None:
        try:
            watched = int(pid)
        except ValueError:
            raise ValueError(f"{WATCHDOG_PID}={pid!r} is not a process id") from None
        if watched != own_pid:
            return None  # another process's watchdog (we were started by it)
    try:
        timeout = int(usec)
    except ValueError:
        raise ValueError(f"{WATCHDOG_USEC}={usec!r} is not a number of microseconds") from None
    if timeout <= 0:
        raise ValueError(f"{WATCHDOG_USEC}={usec!r} is not a positive number of microseconds")
    return timeout / 2 / 1_000_000


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """One program's channel to systemd. Every method is cheap and never raises."""

    def __init__(self, address: str | None, *, watchdog: float | None = None,
                 status_interval: float = 1.0) -> None:
        self.address = address
        #: Seconds between WATCHDOG=1 pings; None: no watchdog.
        self.watchdog = watchdog if address is not None else None
        #: STATUS= is sent at most once in this many seconds (a busy daemon
        #: must not send a datagram per connection).
        self.status_interval = status_interval
        self._sock: socket.socket | None = None
        self._failing = False
        self._status: str | None = None
        self._status_sent_at = -float("inf")

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *,
                     pid: int | None = None, unset: bool = True) -> Notifier:
        """What systemd asked for in ``environ`` (default: this process's), taken
        out of it unless ``unset`` is False. Bad values are logged once."""
        env = os.environ if environ is None else environ
        take = env.pop if unset else env.get
        raw_address, usec, watched = take(NOTIFY_SOCKET, None), take(WATCHDOG_USEC, None), \
            take(WATCHDOG_PID, None)
        address = None
        if raw_address:
            address = notify_address(raw_address)
            if address is None:
                log.warning("NOTIFY_SOCKET not usable; systemd will not be notified",
                            notify_socket=raw_address)
        interval = None
        try:
            interval = watchdog_interval(usec, watched, os.getpid() if pid is None else pid)
        except ValueError as exc:
            log.warning("watchdog disabled", error=str(exc))
        if interval is not None and address is None:
            log.warning("watchdog disabled", error=f"{WATCHDOG_USEC} without a usable "
                        f"{NOTIFY_SOCKET}")
        return cls(address, watchdog=interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; False if not sent (dropped)."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            # Missing, refusing, or full (non-blocking: systemd is not keeping
            # up): dropped. Said once, not per message, until it works again.
            if not self._failing:
                self._failing = True
                log.warning("cannot notify systemd; notifications dropped",
                            notify_socket=self._shown(), error=exc.strerror or str(exc))
            return False
        if self._failing:
            self._failing = False
            log.info("notifying systemd again", notify_socket=self._shown())
        return True

    def _shown(self) -> str:
        assert self.address is not None
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def ready(self) -> bool:
        return self.send("READY=1")

    def stopping(self, status: str | None = None) -> bool:
        return self._send_with_status(status, "STOPPING=1")

    def reloading(self, status: str | None = None) -> bool:
        return self._send_with_status(status, "RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def ping(self) -> bool:
        """``WATCHDOG=1``: the event loop is alive."""
        return self.send("WATCHDOG=1")

    def status(self, text: str, *, now: float | None = None, force: bool = False) -> bool:
        """``STATUS=text`` if it changed, at most once per ``status_interval``
        (unless ``force``); False when nothing was sent."""
        if self.address is None:
            return False
        now = time.monotonic() if now is None else now
        if text == self._status and not force:
            return False
        if not force and now - self._status_sent_at < self.status_interval:
            return False
        return self._send_with_status(text, now=now)

    def _send_with_status(self, status: str | None, *assignments: str,
                          now: float | None = None) -> bool:
        """Send ``assignments`` and ``STATUS=status``; the status counts as said only
        if the datagram went (dropped on a full queue, the next tick says it again)."""
        lines = assignments if status is None else (*assignments, f"STATUS={status}")
        if not self.send(*lines):
            return False
        if status is not None:
            self._status = status
            self._status_sent_at = time.monotonic() if now is None else now
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
