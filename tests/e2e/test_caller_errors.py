"""What the user got wrong, said once: ``qrexec-trio call`` and ``qrexec-trio run``
give one wording and one exit status for an unknown VM (125), a refused call
(126) and a missing service (127), while the reference-named client they run
keeps the reference's own words."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from harness import Host, program

from .worlds import RunningWorld, clean_world

CONFIG = """
[vm.work]
domid = 10

[vm.vault]
domid = 11
[vm.vault.services]
"demo.Echo" = "exec cat"
"demo.Gone" = "exit 127"

[vm.dvm]
domid = 20
template_for_dispvms = true
autostart = false

[policy]
rules = '''
demo.Echo * work vault allow
demo.Missing * work vault allow
demo.Missing * work @dispvm:dvm allow
demo.Gone * work vault allow
'''
"""

UNKNOWN = b"qrexec-trio: unknown VM 'wrok' (known: work, vault, dvm)\n"
REFUSED = (b"qrexec-trio: call refused (the policy denied it, or its target could not be "
           b"started)\n")


@pytest.fixture
def errors_world(host: Host) -> Iterator[RunningWorld]:
    with clean_world(host, CONFIG) as running:
        yield running


def _outcome(result: subprocess.CompletedProcess[bytes]) -> tuple[int, bytes, bytes]:
    return result.returncode, result.stdout, result.stderr


def test_a_vm_the_world_does_not_have_is_one_error_for_call_and_run(
        errors_world: RunningWorld) -> None:
    for command in (("call", "wrok", "vault", "demo.Echo"),
                    ("call", "work", "wrok", "demo.Echo"),
                    ("call", "work", "@dispvm:wrok", "demo.Echo"),
                    ("run", "wrok", "echo hi")):
        assert _outcome(errors_world.run(*command)) == (125, b"", UNKNOWN), command
    # The world goes on answering.
    assert _outcome(errors_world.run("call", "work", "vault", "demo.Echo", input=b"hi\n")) \
        == (0, b"hi\n", b"")


def test_a_refused_call_is_said_once_and_the_reference_client_keeps_its_words(
        errors_world: RunningWorld, host: Host) -> None:
    assert _outcome(errors_world.run("call", "work", "vault", "demo.Denied")) \
        == (126, b"", REFUSED)
    # qrexec-client-vm itself, in the same VM: the reference's output, unchanged.
    state = json.loads((errors_world.dir / "world.json").read_text())
    agent_socket = f"{state['vms']['work']['runtime_dir']}/qrexec-agent"
    result = subprocess.run(
        [program("qrexec-client-vm"), "--agent-socket", agent_socket, "vault", "demo.Denied"],
        input=b"", capture_output=True, timeout=60,
        env=host.env(10, VCHAN_SOCKET_DIR=state["vchan_dir"]))
    assert _outcome(result) == (126, b"", b"Request refused\n")


def test_an_allowed_call_to_a_missing_service_says_so_for_call_and_run(
        errors_world: RunningWorld) -> None:
    missing = b"qrexec-trio: service 'demo.Missing' not found in VM '%s'\n"
    assert _outcome(errors_world.run("call", "work", "vault", "demo.Missing")) \
        == (127, b"", missing % b"vault")
    assert _outcome(errors_world.run("call", "work", "@dispvm:dvm", "demo.Missing")) \
        == (127, b"", missing % b"dvm")
    assert _outcome(errors_world.run("run", "vault", "QUBESRPC demo.Missing work")) \
        == (127, b"", missing % b"vault")
    # A service that is there and exits 127 itself is not "not found".
    assert _outcome(errors_world.run("call", "work", "vault", "demo.Gone")) == (127, b"", b"")
