from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import VM, Host, wait_for

from .worlds import CONFIG, RunningWorld, clean_world

BACKEND = os.environ.get("QREXEC_VCHAN") or "socket"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that speak a vchan's wire themselves run on the socket backend only.

    They replay or forge bytes through plain unix sockets named as the socket
    backend names them; on another backend there is no such wire to speak.
    Everything between real programs runs on every backend.
    """
    if BACKEND == "socket":
        return
    reason = f"plays a vchan peer over the socket backend's wire (QREXEC_VCHAN={BACKEND})"
    for item in items:
        if item.get_closest_marker("socket_vchan_peer") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=[BACKEND])
def host(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Host]:
    """A dom0 with no VMs yet; on teardown, proves nothing was left running."""
    host = Host(short_tmp, backend=request.param)
    try:
        yield host
    finally:
        host.stop()
        # Services are in their own process groups: give killed ones a moment to go.
        try:
            wait_for(lambda: not host.leftovers(), timeout=10, what="no leftover processes")
        except AssertionError:
            pytest.fail(f"processes left behind: {host.leftovers()}")


@pytest.fixture
def vm1(host: Host) -> VM:
    """vm1 (domid 42) with its agent and daemon running, and a test.Echo service."""
    vm = host.start_vm("vm1", 42)
    vm.add_service("test.Echo", '#!/bin/sh\necho "arg=$1 src=$QREXEC_REMOTE_DOMAIN"\nexec cat\n')
    return vm


@pytest.fixture
def world(host: Host) -> Iterator[RunningWorld]:
    """The world of CONFIG; it must stop cleanly, leaving nothing."""
    with clean_world(host, CONFIG) as running:
        yield running
