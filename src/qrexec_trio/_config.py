"""Every timeout and limit in one place.

Each wait in qrexec-trio is bounded by one of these. Defaults follow the
reference implementation; each can be overridden from the environment
(``QREXEC_TIMEOUT_<NAME>`` in seconds) so that tests and operators tune them
without touching code.
"""

from __future__ import annotations

import os

# Not dataclasses: the short-lived clients import this module on every call.
from ._light import frozen_record, replace


@frozen_record
class Timeouts:
    #: qrexec-client waits this long for the agent to connect its data vchan (``-w``).
    data_vchan_accept: float = 10.0
    #: The agent's data vchan client gives up connecting after this long.
    data_vchan_connect: float = 120.0
    #: HELLO exchange on any link.
    handshake: float = 10.0
    #: qrexec-daemon waits this long for the agent at start-up (QREXEC_STARTUP_TIMEOUT).
    startup: float = 60.0
    #: Pause between control-vchan reconnection attempts after the agent went away.
    reconnect_backoff: float = 0.5
    #: A client of the daemon must send its request within this long.
    client_request: float = 10.0
    #: Cleanup (closing links, killing process groups) may take at most this long.
    cleanup: float = 5.0
    #: After SIGTERM to a process group, wait this long before SIGKILL.
    kill_grace: float = 2.0
    #: A long-lived program told to stop (SIGTERM) lets its live connections
    #: finish for this long, then cancels them (``--stop-grace``). Keep it
    #: below systemd's ``TimeoutStopSec`` (90 s by default).
    stop_grace: float = 10.0
    #: A frame whose sending was interrupted by cancellation may take this long to finish.
    send_finish: float = 2.0
    #: Sockets accepted on the agent's fdpass socket must be claimed by a trigger
    #: (their CID) within this long, or they are closed.
    cid_claim: float = 10.0
    #: A policy decision (including an ask prompt or an external evaluator).
    policy: float = 120.0
    #: The policy agent's answer to an ``ask`` (its ``policy.Ask`` service, or
    #: ``--ask-program``); none in time denies. Below ``policy``, so that the
    #: ask itself, not the whole decision, is what times out.
    policy_ask: float = 110.0
    #: One ``policy.Notify`` call to the policy agent, start to end.
    policy_notify: float = 10.0
    #: A VM's request must be answered (connected or refused) within this long.
    request_answer: float = 150.0
    #: Creating and starting a DispVM (or autostarting a VM) until its qrexec is ready.
    domain_start: float = 60.0
    #: One admin call to the domain manager (qubesd, or the local world's).
    admin_call: float = 60.0
    #: A ``wait-for-session`` service waits at most this long for
    #: ``qubes.WaitForSession``; then it starts anyway (logged).
    session_wait: float = 60.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Timeouts:
        env = os.environ if environ is None else environ
        values: dict[str, float] = {}
        for name in cls.__match_args__:
            raw = env.get(f"QREXEC_TIMEOUT_{name.upper()}")
            if raw is not None:
                try:
                    values[name] = float(raw)
                except ValueError:
                    raise ValueError(
                        f"QREXEC_TIMEOUT_{name.upper()}={raw!r} is not a number"
                    ) from None
        if "QREXEC_STARTUP_TIMEOUT" in env and "startup" not in values:
            values["startup"] = float(env["QREXEC_STARTUP_TIMEOUT"])
        return cls(**values)

    def replace(self, **changes: float) -> Timeouts:
        return replace(self, **changes)
