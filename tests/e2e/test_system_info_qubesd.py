"""The daemon's policy learns the domains' facts from qubesd (internal.GetSystemInfo).

vm1's agent is played by the test (``FakeSourceAgent``); qubesd is a stand-in on
a unix socket that answers as qubesd does: the JSON of every domain's facts for
``internal.GetSystemInfo``, an error for anything else. Without it, every call
is denied with a log line naming the socket.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness import Host, program, wait_for

from .test_dom0_glue import ECHO, FakeSourceAgent, _check_call

pytestmark = pytest.mark.socket_vchan_peer

GET_SYSTEM_INFO = b"internal.GetSystemInfo dom0 name dom0\0"


def _domain(kind: str, *, tags: tuple[str, ...] = (), default_dispvm: str | None = None,
            for_dispvms: bool = False, state: str = "Running") -> dict[str, Any]:
    """One domain as qubesd lists it, with the facts the policy does not use too."""
    return {"internal": None, "tags": list(tags), "type": kind,
            "template_for_dispvms": for_dispvms, "default_dispvm": default_dispvm,
            "icon": "appvm-green", "label": "green", "guivm": None, "relayvm": None,
            "transport_rpc": None, "power_state": state,
            "uuid": "8a9e4a55-8b0c-4a56-9d86-6f5e3e9b3a10"}


def _facts(vm1_tags: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"domains": {
        "dom0": _domain("AdminVM", default_dispvm="dvm"),
        "vm1": _domain("AppVM", tags=vm1_tags, default_dispvm="dvm"),
        "dvm": _domain("AppVM", for_dispvms=True, state="Halted"),
    }}


class FakeQubesd:
    """qubesd on a unix socket, in a thread: each connection is one request."""

    def __init__(self, path: Path, facts: dict[str, Any]) -> None:
        self.path = path
        self.facts = facts
        self.requests: list[bytes] = []
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.settimeout(10)
                request = b""
                while chunk := conn.recv(65536):
                    request += chunk
                self.requests.append(request)
                if request == GET_SYSTEM_INFO:
                    conn.sendall(b"0\0" + json.dumps(self.facts).encode())
                else:
                    conn.sendall(b"2\0QubesException\0\0not in this test\0")

    def close(self) -> None:
        # shutdown wakes the accept() of the thread; close alone may not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)


@pytest.fixture
def qubesd(host: Host):
    fake = FakeQubesd(host.root / "qubesd.sock", _facts())
    try:
        yield fake
    finally:
        fake.close()


def _dom0_echo(host: Host) -> None:
    path = host.dom0_services / "test.Echo"
    path.write_text(ECHO)
    path.chmod(0o755)


def _decisions(agent: FakeSourceAgent) -> list[dict]:
    return agent.vm.daemon_events("policy decision")


def test_a_tag_rule_matches_on_qubesd_facts_and_follows_their_changes(
        host: Host, qubesd: FakeQubesd) -> None:
    host.set_policy("test.Echo * @tag:trusted dom0 allow\n")
    _dom0_echo(host)
    qubesd.facts = _facts(vm1_tags=("trusted",))
    vm1 = FakeSourceAgent(host, "--qubesd-internal-socket", str(qubesd.path))
    vm1.trigger("dom0", "test.Echo")
    _check_call(vm1.call(vm1.expect_connect(), b"x"), b"arg= src=vm1\nx")
    assert qubesd.requests == [GET_SYSTEM_INFO]
    # The tag is removed: once the answer has aged out (1 s), the call is denied.
    qubesd.facts = _facts(vm1_tags=())
    time.sleep(1.2)
    vm1.trigger("dom0", "test.Echo", ident=b"SOCKET14")
    vm1.expect_refused(b"SOCKET14")
    assert qubesd.requests == [GET_SYSTEM_INFO, GET_SYSTEM_INFO]
    assert [d["result"] for d in _decisions(vm1)] == ["allow", "deny"]


def test_a_dispvm_rule_uses_the_callers_default_dispvm_from_qubesd(
        host: Host, qubesd: FakeQubesd) -> None:
    host.set_policy("test.Echo * vm1 @dispvm allow\n")
    vm1 = FakeSourceAgent(host, "--qubesd-internal-socket", str(qubesd.path),
                          "--qubesd-socket", str(qubesd.path))
    vm1.trigger("@dispvm", "test.Echo")
    # Allowed to vm1's default_dispvm; this stand-in then refuses to make it.
    vm1.expect_refused()
    wait_for(lambda: _decisions(vm1), what="the policy decision")
    (decision,) = _decisions(vm1)
    assert (decision["result"], decision["target"]) == ("allow", "@dispvm:dvm")
    assert qubesd.requests == [GET_SYSTEM_INFO,
                               b"admin.vm.CreateDisposable dom0 name dvm\0"]


def test_without_qubesd_facts_the_same_dispvm_call_is_denied(host: Host) -> None:
    host.set_policy("test.Echo * vm1 @dispvm allow\n")
    vm1 = FakeSourceAgent(host)  # the harness's "--qubesd-internal-socket ''"
    vm1.trigger("@dispvm", "test.Echo")
    vm1.expect_refused()
    wait_for(lambda: _decisions(vm1), what="the policy decision")
    assert [d["result"] for d in _decisions(vm1)] == ["deny"]


def test_without_qubesd_every_call_is_denied_naming_the_socket(host: Host) -> None:
    missing = host.root / "no-qubesd.internal.sock"
    host.set_policy("test.Echo * @anyvm @anyvm allow\ntest.Echo * vm1 dom0 allow\n")
    _dom0_echo(host)
    vm1 = FakeSourceAgent(host, "--qubesd-internal-socket", str(missing))
    vm1.trigger("dom0", "test.Echo")
    vm1.expect_refused()
    wait_for(lambda: vm1.vm.daemon_events("system info unavailable"),
             what="the daemon to log the missing source")
    (line,) = vm1.vm.daemon_events("system info unavailable")
    assert line["socket"] == str(missing)
    assert "cannot connect" in line["error"] and str(missing) in line["error"]
    # It goes on serving, and asks again for the next call.
    qubesd = FakeQubesd(missing, _facts())
    try:
        vm1.trigger("dom0", "test.Echo", ident=b"SOCKET14")
        _check_call(vm1.call(vm1.expect_connect(b"SOCKET14"), b"y"), b"arg= src=vm1\ny")
    finally:
        qubesd.close()


def test_a_system_info_file_is_used_instead_of_qubesd(host: Host, qubesd: FakeQubesd) -> None:
    host.set_policy("test.Echo * @tag:trusted dom0 allow\n")
    _dom0_echo(host)
    path = host.root / "system-info.json"
    path.write_text(json.dumps({"domains": {"dom0": {"type": "AdminVM"},
                                            "vm1": {"type": "AppVM", "tags": ["trusted"]}}}))
    vm1 = FakeSourceAgent(host, "--qubesd-internal-socket", str(qubesd.path),
                          "--system-info", str(path))
    vm1.trigger("dom0", "test.Echo")
    _check_call(vm1.call(vm1.expect_connect(), b"z"), b"arg= src=vm1\nz")
    assert qubesd.requests == []


def test_the_daemon_asks_qubesd_internal_socket_by_default() -> None:
    from qrexec_trio.roles.daemon import build_parser

    args = build_parser().parse_args(["42", "vm1"])
    assert args.qubesd_internal_socket == "/run/qubesd.internal.sock"
    assert args.system_info is None


def test_qrexec_policy_can_ask_qubesd(host: Host, qubesd: FakeQubesd) -> None:
    host.set_policy("test.Echo * @tag:trusted dom0 allow\n")

    def run(*options: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [program("qrexec-policy"), "--policy-d", str(host.policy_d), "--policy-dir",
             str(host.root / "policy-r2"), *options, "--", "vm1", "dom0", "test.Echo"],
            env=host.env(0), capture_output=True, timeout=30)

    qubesd.facts = _facts(vm1_tags=("trusted",))
    allowed = run("--qubesd-internal-socket", str(qubesd.path))
    assert allowed.returncode == 0, allowed.stderr
    assert b"result=allow" in allowed.stdout
    assert run().returncode == 1  # the request's names only: no tags
    missing = run("--qubesd-internal-socket", str(host.root / "none.sock"))
    assert missing.returncode == 1
    assert b"system info unavailable" in missing.stderr
    assert str(host.root / "none.sock").encode() in missing.stderr
