"""Where things are on a Qubes system, by default (each can be overridden).

Light (no imports): the short-lived clients need these names at start-up.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

#: The qrexec-daemons' sockets (``qrexec.<name>``, ``qrexec.<domid>``).
DAEMON_SOCKET_DIR: Final = "/var/run/qubes"
#: qubesd's admin socket, and the variable that points elsewhere (the world's).
QUBESD_SOCKET: Final = "/run/qubesd.sock"
QUBESD_SOCKET_ENV: Final = "QREXEC_QUBESD_SOCKET"
