"""A service run as the identity the agent already has is started without an
identity switch, so that subprocess can vfork rather than fork the agent
(bench/bench_server_cost.py: the fork was most of a service start's cost)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

from qrexec_trio._config import Timeouts
from qrexec_trio.nursery import _process, child_process
from qrexec_trio.nursery._process import identity_changes

FAST = Timeouts(kill_grace=0.5, cleanup=2.0)


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process is root with no supplementary groups (a daemon's usual state)."""
    monkeypatch.setattr(os, "getresuid", lambda: (0, 0, 0))
    monkeypatch.setattr(os, "getresgid", lambda: (0, 0, 0))
    monkeypatch.setattr(os, "getgroups", lambda: [])


@pytest.mark.usefixtures("as_root")
def test_switch_to_the_same_identity_is_left_out() -> None:
    # root's getgrouplist is [0]: the primary group again, which grants nothing more.
    assert identity_changes(0, 0, [0]) == {}
    assert identity_changes(0, 0, []) == {}
    assert identity_changes(None, None, None) == {}


@pytest.mark.usefixtures("as_root")
def test_any_real_change_keeps_every_option() -> None:
    everything = {"user": 1000, "group": 1000, "extra_groups": [1000, 27]}
    assert identity_changes(1000, 1000, [1000, 27]) == everything
    # Same user, other groups: the groups must still be set, and with them the rest.
    assert identity_changes(0, 0, [0, 27]) == {"user": 0, "group": 0, "extra_groups": [0, 27]}
    assert identity_changes(0, 5, None) == {"user": 0, "group": 5}


def test_partly_dropped_privileges_are_still_switched(monkeypatch: pytest.MonkeyPatch) -> None:
    # A saved set-user-ID of 0 is not "already uid 1000": the switch drops it.
    monkeypatch.setattr(os, "getresuid", lambda: (1000, 1000, 0))
    monkeypatch.setattr(os, "getresgid", lambda: (1000, 1000, 1000))
    monkeypatch.setattr(os, "getgroups", lambda: [1000])
    assert identity_changes(1000, 1000, [1000]) == {
        "user": 1000, "group": 1000, "extra_groups": [1000]}


async def test_child_as_ourselves_is_started_without_a_switch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    real_open = trio.lowlevel.open_process

    async def recording_open(argv: Any, **options: Any) -> trio.Process:
        seen.append(options)
        return await real_open(argv, **options)

    monkeypatch.setattr(_process.trio.lowlevel, "open_process", recording_open)
    uid, gid = os.geteuid(), os.getegid()
    with trio.fail_after(10):
        async with child_process(["true"], timeouts=FAST, user=uid, group=gid,
                                 extra_groups=os.getgroups()) as proc:
            await proc.wait()
    assert proc.returncode == 0
    assert not {"user", "group", "extra_groups"} & set(seen[0])
