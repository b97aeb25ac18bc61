"""The SIGUSR1 stand-in: its answer at the end of a service's output is final."""

from __future__ import annotations

import os
import signal

import psutil
import trio

from qrexec_trio._config import Timeouts
from qrexec_trio.nursery._stdio_switch import stdio_switch


async def test_a_sigusr1_sent_just_before_the_output_ended_switches() -> None:
    # kill() returns once the signal is queued; the catcher has usually not
    # died yet when we ask, right after it (no checkpoint in between). This is
    # what a service that signals, writes and exits at once looks like on a
    # busy machine. Polling would answer "no switch" and lose its output.
    for _ in range(20):
        async with stdio_switch(Timeouts()) as switch:
            os.kill(switch.pid, signal.SIGUSR1)
            assert await switch.settle()
            assert switch.flipped.is_set()


async def test_no_signal_means_no_switch_and_the_catcher_is_gone() -> None:
    async with stdio_switch(Timeouts()) as switch:
        assert not await switch.settle()
        assert not switch.flipped.is_set()
        assert not psutil.pid_exists(switch.pid) or \
            psutil.Process(switch.pid).status() == psutil.STATUS_ZOMBIE


async def test_the_watcher_flips_on_a_sigusr1_while_the_service_runs() -> None:
    async with stdio_switch(Timeouts()) as switch, trio.open_nursery() as nursery:
        nursery.start_soon(switch.watch)
        os.kill(switch.pid, signal.SIGUSR1)
        with trio.fail_after(10):
            await switch.flipped.wait()
        assert await switch.settle()
