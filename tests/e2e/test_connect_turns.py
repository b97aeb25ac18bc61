"""qrexec-daemon --max-connecting: VM-to-VM calls beyond it wait their turn (issue 13).

The calling VM's agent is played by the test (see test_dom0_glue), so that it
decides when the first call's data vchan is served, i.e. how long that call
keeps its turn.
"""

from __future__ import annotations

import pytest

from harness import Host, wait_for

from .test_dom0_glue import FakeSourceAgent, _check_call, _vm2

pytestmark = pytest.mark.socket_vchan_peer


def test_a_call_beyond_max_connecting_waits_its_turn_and_is_then_connected(host: Host) -> None:
    _vm2(host)
    host.set_policy("test.Echo * vm1 vm2 allow\n")
    vm1 = FakeSourceAgent(host, "--max-connecting", "1")
    vm1.trigger("vm2", "test.Echo+one", b"SOCKET13")
    first = vm1.expect_connect(b"SOCKET13")
    # The first call is being connected until its data vchan is served: the
    # second is held before its target is even asked.
    vm1.trigger("vm2", "test.Echo+two", b"SOCKET14")
    (waiting,) = wait_for(lambda: vm1.vm.daemon_events("call waits its turn to be connected"),
                          what="the second call to wait its turn")
    assert waiting["request"] == "SOCKET14" and waiting["connecting"] == 1
    _check_call(vm1.call(first, b"1\n"), b"arg=one src=vm1\n1\n")
    second = vm1.expect_connect(b"SOCKET14")
    _check_call(vm1.call(second, b"2\n"), b"arg=two src=vm1\n2\n")
    assert not vm1.vm.daemon_events("call failed")
