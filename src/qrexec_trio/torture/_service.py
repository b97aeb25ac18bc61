"""torture.Echo, the torture's service: a standalone script (standard library only).

The torture world installs this file's text as the service in every VM and
the DispVM template, run by the torture's own Python with ``-IS`` (fast to
start, nothing but the standard library). What it does:

* first a hello line naming what the torture needs to find the call's
  processes: ``TORTURE-HELLO pid=P pgid=G stand_in=S call=ID domid=D``;
* then every byte of its stdin back, as it comes;
* at EOF a trailer: ``TORTURE-END len=N sha256=HEX`` of what it received, so
  the caller checks the data in both directions.

The argument (``torture.Echo+MODE``) picks a behaviour: ``plain``;
``stall.MS`` (read nothing for MS milliseconds first: a stalled reader);
``slow.MS`` (write back in 1 KiB pieces, MS milliseconds apart: a slow
writer). SIGUSR2 makes it close its stdin and stdout at once and exit 0: the
peer-close fault, at a moment the torture chooses.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time

HELLO = b"TORTURE-HELLO"
END = b"TORTURE-END"
#: The piece a slow writer writes between pauses.
SLOW_PIECE = 1024


class _PeerClose(Exception):
    """SIGUSR2 came: close everything now."""


def _on_peer_close(signum: int, frame: object) -> None:
    raise _PeerClose


def _write_all(data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def _echo(chunk: bytes, mode: str, pause: float) -> None:
    if mode != "slow":
        _write_all(chunk)
        return
    for start in range(0, len(chunk), SLOW_PIECE):
        _write_all(chunk[start:start + SLOW_PIECE])
        time.sleep(pause)


def _hello() -> bytes:
    env = os.environ
    fields = (f"pid={os.getpid()}", f"pgid={os.getpgid(0)}",
              f"stand_in={env.get('QREXEC_AGENT_PID', '')}",
              f"call={env.get('QREXEC_CALL_ID', '')}", f"domid={env.get('VCHAN_DOMAIN', '')}")
    return HELLO + b" " + " ".join(fields).encode() + b"\n"


def main() -> int:
    signal.signal(signal.SIGUSR2, _on_peer_close)
    mode, _, amount = (sys.argv[1] if len(sys.argv) > 1 else "plain").partition(".")
    pause = int(amount or 0) / 1000
    digest = hashlib.sha256()
    total = 0
    try:
        _write_all(_hello())
        if mode == "stall":
            time.sleep(pause)
        while chunk := os.read(0, 65536):
            digest.update(chunk)
            total += len(chunk)
            _echo(chunk, mode, pause)
        _write_all(END + f" len={total} sha256={digest.hexdigest()}\n".encode())
    except _PeerClose:
        os.close(0)
        os.close(1)
        return 0
    except OSError:
        # The caller went away (EPIPE, a reset): nothing to say to anyone.
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
