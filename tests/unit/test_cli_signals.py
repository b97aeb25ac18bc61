"""run_until_signal: the first stop signal stops; later ones never cut the cleanup."""

from __future__ import annotations

import os
import signal

import trio

from qrexec_trio.roles._cli import run_until_signal


def test_a_second_stop_signal_does_not_interrupt_the_cleanup() -> None:
    cleaned: list[bool] = []

    async def main() -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again, while cleaning up
                await trio.sleep(0.2)
                cleaned.append(True)
        return 0

    assert run_until_signal(main) == 128 + signal.SIGINT
    assert cleaned == [True]


def test_a_stop_signal_before_main_awaits_anything_is_received() -> None:
    async def main() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        await trio.sleep_forever()
        return 0  # pragma: no cover

    assert run_until_signal(main, stopped_status=0) == 0
