"""Bursts of clients against a real agent and a real daemon: many more at once
than a listen backlog of 64, each through the client code our programs use,
every one of them served (answered), none failing to connect."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from harness import VM, Host
from qrexec_trio._config import Timeouts
from qrexec_trio.blocking._vm_call import Refused, trigger_frame
from qrexec_trio.domains import QubesdDomains
from qrexec_trio.nursery import CONNECTIONS, control_socket_path
from qrexec_trio.roles._client_vm_trio import ask_agent

#: Clients at once: well above the old backlog of 64.
BURST = 200
#: The whole burst is served within this (generous: 2 shared cores).
BOUND = 120


async def _outcomes(call: Callable[[], Awaitable[None]], count: int) -> list[str]:
    """Run ``count`` concurrent calls; each one's outcome as a word or the error."""
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await call()
        except Refused:
            outcomes.append("refused")
        except Exception as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
        else:
            outcomes.append("answered")

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return outcomes


async def test_a_burst_of_trigger_requests_to_an_agent_is_answered_in_full(vm1: VM) -> None:
    # No policy: each request is denied, which the agent answers by closing
    # the socket (qrexec-client-vm's "Request refused"). Beyond the daemon's
    # per-VM limit the answer is the same, at once.
    frame = trigger_frame(b"", b"vm2", b"test.Echo", b"SOCKET")
    agent_socket = str(vm1.runtime_dir / "qrexec-agent")

    async def call() -> None:
        stream, _, _ = await ask_agent(agent_socket, frame, Timeouts())
        await stream.aclose()

    outcomes = await _outcomes(call, BURST)
    assert outcomes == ["refused"] * BURST, sorted(set(outcomes))


async def test_a_burst_of_control_calls_to_a_daemon_is_answered_in_full(
        vm1: VM, host: Host) -> None:
    domains = QubesdDomains(control_socket_path(str(host.socket_dir), vm1.domid))

    async def call() -> None:
        assert await domains.call(CONNECTIONS, "dom0") == b""

    outcomes = await _outcomes(call, BURST)
    assert outcomes == ["answered"] * BURST, sorted(set(outcomes))
