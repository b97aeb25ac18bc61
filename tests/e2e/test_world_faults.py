"""The local world under faults (issue 13): services of a crashed agent or daemon
are ended by whoever halts the VM and by the world when it stops, a (re)started
VM is callable by name at once, and the world's sockets are private."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trio

from harness import Host, is_program, marked_processes, program, wait_for
from qrexec_trio.domains import Domain, QubesdDomains
from qrexec_trio.roles import world as world_commands

from .worlds import RunningWorld, clean_world

#: Long enough to outlive any test; a service killed with its call never gets there.
HOLD = "exec sleep 3600"


def _holding_service(pid_file: Path) -> str:
    """A service that writes its pid (atomically) and then holds, deaf to its pipes."""
    return f'echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; echo held; {HOLD}'


def _config(root: Path) -> str:
    return f"""
[vm.work]
domid = 10

[vm.vault]
domid = 11
[vm.vault.services]
"test.Hold" = "{_holding_service(root / 'vm-service.pid')}"
"demo.Echo" = "echo vault; exec cat"

[dom0.services]
"test.Hold" = "{_holding_service(root / 'dom0-service.pid')}"

[vm.dvm]
domid = 20
template_for_dispvms = true
autostart = false
[vm.dvm.services]
"test.Hold" = "echo held; {HOLD}"

[policy]
rules = '''
test.Hold * work vault allow
test.Hold * work dom0 allow
test.Hold * work @dispvm:dvm allow
demo.Echo * work vault allow
'''
"""


#: For each program faulted: the VM it belongs to, the target of the call
#: whose service it runs, and where that service writes its pid.
FAULTS = {
    # vault's agent runs work's call of test.Hold in vault.
    "agent": ("vault", "vault", "vm-service.pid"),
    # work's daemon runs work's call of test.Hold in dom0 (a dom0 service).
    "daemon": ("work", "dom0", "dom0-service.pid"),
}


@pytest.fixture
def world(host: Host) -> Iterator[RunningWorld]:
    with clean_world(host, _config(host.root)) as running:
        yield running


def _program_of(world: RunningWorld, what: str, vm: str) -> psutil.Process:
    """The running agent or daemon of ``vm`` in ``world``."""
    state_dir = str(world.dir / "vms" / vm / "run")

    def mine(proc: psutil.Process) -> bool:
        if not is_program(proc, f"qrexec-{what}"):
            return False
        argv = proc.cmdline()
        return state_dir in argv if what == "agent" else vm in argv[-3:]

    found = [proc for proc in marked_processes(world.host.mark) if mine(proc)]
    assert len(found) == 1, found
    return found[0]


def _held_service(world: RunningWorld, target: str, pid_file: Path
                  ) -> tuple[subprocess.Popen[bytes], psutil.Process]:
    """A call from work to ``target`` whose service holds; its caller and service."""
    call = world.start("call", "work", target, "test.Hold", stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert call.stdout is not None
    assert call.stdout.readline() == b"held\n"
    service = psutil.Process(int(pid_file.read_text()))
    assert service.is_running()
    return call, service


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _end(call: subprocess.Popen[bytes]) -> None:
    if call.poll() is None:
        call.kill()
    call.communicate(timeout=30)


def _domain(world: RunningWorld, name: str) -> Domain:
    async def find() -> Domain:
        domains = await QubesdDomains(str(world.dir / "qubesd.sock")).list()
        return next(domain for domain in domains if domain.name == name)

    return trio.run(find)


def _admin(world: RunningWorld, method: str, name: str) -> None:
    async def call() -> None:
        domains = QubesdDomains(str(world.dir / "qubesd.sock"))
        await getattr(domains, method)(name)

    trio.run(call)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_services_of_a_killed_program_are_ended_when_its_vm_halts(
    world: RunningWorld, host: Host, fault: str
) -> None:
    vm, target, pid_name = FAULTS[fault]
    call, service = _held_service(world, target, host.root / pid_name)
    try:
        _program_of(world, fault, vm).send_signal(signal.SIGKILL)
        wait_for(lambda: _gone(service), timeout=30,
                 what=f"the service of the killed {fault} to be ended")
        # The world goes on: the halted VM starts again and serves.
        _admin(world, "start", vm)
        result = world.run("call", "work", "vault", "demo.Echo", input=b"again\n")
        assert (result.returncode, result.stdout) == (0, b"vault\nagain\n"), result.stderr
    finally:
        _end(call)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_the_world_stopping_ends_the_services_of_a_stuck_program(
    world: RunningWorld, host: Host, fault: str
) -> None:
    """A stopped (SIGSTOP) agent or daemon cannot end its services on SIGTERM; the
    world kills it when it stops, and then its services, before it exits."""
    vm, target, pid_name = FAULTS[fault]
    call, service = _held_service(world, target, host.root / pid_name)
    try:
        _program_of(world, fault, vm).send_signal(signal.SIGSTOP)
        assert world.stop() == 0, (host.root / "world.log").read_text()[-3000:]
        # Killed before the world exited: at most the kernel has yet to finish it.
        wait_for(lambda: _gone(service), timeout=10, what="no service left by the world")
    finally:
        _end(call)


def test_the_dispvm_of_a_killed_daemons_call_is_destroyed(world: RunningWorld) -> None:
    """The DispVM belonged to a connection of work's daemon; with that daemon
    killed outright, whoever halts work destroys it from the daemon's ledger."""
    call = world.start("call", "work", "@dispvm:dvm", "test.Hold", stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert call.stdout is not None
        assert call.stdout.readline() == b"held\n"
        assert world.dispvms() != []
        _program_of(world, "daemon", "work").send_signal(signal.SIGKILL)
        wait_for(lambda: world.dispvms() == [], timeout=30,
                 what="the dead daemon's DispVM to be destroyed")
        assert not list((world.dir / "sockets").glob("qrexec-daemon.10.dispvms/*"))
    finally:
        _end(call)


def test_a_restarted_daemon_destroys_its_leftover_dispvms_without_blocking_its_start(
    world: RunningWorld,
) -> None:
    """The restarted daemon's leftovers are destroyed through the world's admin
    socket, whose start of that very VM holds the lock a kill takes: so the
    daemon does it once started, never on the way there. Fifteen leftovers at
    the admin call's 5 s bound each would outlast the 60 s start."""
    _admin(world, "kill", "work")
    ledger = world.dir / "sockets" / "qrexec-daemon.10.dispvms"
    ledger.mkdir(exist_ok=True)
    for number in range(15):
        (ledger / f"disp{900 + number}").touch()
    _admin(world, "start", "work")
    wait_for(lambda: not ledger.exists() or not any(ledger.iterdir()), timeout=60,
             what="the leftovers to be forgotten (they no longer exist)")
    result = world.run("call", "work", "vault", "demo.Echo", input=b"up\n")
    assert (result.returncode, result.stdout) == (0, b"vault\nup\n"), result.stderr


# --- started means callable by name --------------------------------------------------


def _start_and_connect_by_name(world: RunningWorld, name: str) -> None:
    """Start ``name`` and, the moment that returns, connect to its daemon by name
    (in the same process: a new client process would start too slowly to notice)."""
    async def start_and_connect() -> None:
        await QubesdDomains(str(world.dir / "qubesd.sock")).start(name)
        stream = await trio.open_unix_socket(str(world.dir / "sockets" / f"qrexec.{name}"))
        await stream.aclose()

    trio.run(start_and_connect)


def test_a_restarted_vm_is_callable_by_name_as_soon_as_it_is_started(
    world: RunningWorld, host: Host
) -> None:
    """Halted by the admin socket or by a crash of its daemon (which leaves its
    sockets and its name's link behind), vault is callable the moment its start
    returns."""
    for attempt in range(10):
        if attempt % 2:
            _admin(world, "kill", "vault")
        else:
            _program_of(world, "daemon", "vault").send_signal(signal.SIGKILL)
            wait_for(lambda: not _domain(world, "vault").running, timeout=30,
                     what="the world to halt vault")
        _start_and_connect_by_name(world, "vault")
        result = world.run("run", "vault", "echo up")
        assert (result.returncode, result.stdout) == (0, b"up\n"), (attempt, result.stderr)


# --- private sockets -------------------------------------------------------------------

#: The unprivileged identities of the access tests: the world's user, and
#: another user (a uid without a passwd entry, so that it is no one's).
NOBODY = 65534
STRANGER = 54321
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to act as other users")


def _mode(path: Path) -> int:
    return path.lstat().st_mode & 0o7777


def _as_user(uid: int, gid: int, groups: tuple[int, ...] = ()) -> list[str]:
    """The command prefix that runs a program as ``uid``:``gid`` with ``groups``."""
    extra = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", *extra]


def _skip_unless_reachable_by_others() -> None:
    probe = subprocess.run([*_as_user(STRANGER, STRANGER), program("qrexec-trio"), "--help"],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        # The checkout is out of other users' reach (e.g. under a 0700
        # directory): an environment limit. CI's checkout is readable.
        pytest.skip(f"other users cannot run this checkout's programs: {probe.stderr[-200:]!r}")


def test_the_world_is_private_to_its_user(world: RunningWorld) -> None:
    root = world.dir
    assert (_mode(root), root.stat().st_uid) == (0o700, os.geteuid())
    assert _mode(root / "world.json") == 0o600


@NEEDS_ROOT
def test_other_users_cannot_use_a_private_world(world: RunningWorld, host: Host) -> None:
    _skip_unless_reachable_by_others()
    host.root.chmod(0o711)  # the test's own directory is not what keeps them out
    result = subprocess.run([*_as_user(STRANGER, STRANGER), *world.trio_cmd("vms")],
                            capture_output=True, timeout=60, env=host.env(0))
    assert result.returncode != 0
    assert b"Permission denied" in result.stderr


@NEEDS_ROOT
def test_members_of_the_worlds_group_may_use_it_and_no_one_else(host: Host) -> None:
    _skip_unless_reachable_by_others()
    group = grp.getgrgid(NOBODY)
    config = f'''
[world]
group = "{group.gr_name}"
[vm.work]
[vm.vault]
default_user = "{pwd.getpwuid(NOBODY).pw_name}"
[vm.vault.services]
"demo.Echo" = "echo vault; exec cat"
"test.Who" = "id -u"
[policy]
rules = "test.Who * work vault allow"
'''
    host.root.chmod(0o711)  # the test's own directory is not what keeps them out
    world = RunningWorld(host, config)
    try:
        root = world.dir
        assert {name: (_mode(root / name), (root / name).stat().st_gid)
                for name in ("", "sockets", "vchan", "vms", "vms/work/run", "world.json",
                             "qubesd.sock")} == {
            "": (0o2750, NOBODY), "sockets": (0o2750, NOBODY), "vchan": (0o2770, NOBODY),
            "vms": (0o2750, NOBODY), "vms/work/run": (0o2750, NOBODY),
            "world.json": (0o640, NOBODY), "qubesd.sock": (0o660, NOBODY)}
        # A member (by a supplementary group, as a user added to it would be)
        # asks the world's domain manager, and calls a VM from dom0 (the
        # client offers its data vchan in the world's vchan directory).
        member = _as_user(STRANGER, STRANGER, (NOBODY,))
        listing = subprocess.run([*member, *world.trio_cmd("vms")], capture_output=True,
                                 timeout=60, env=host.env(0))
        assert (listing.returncode, b"vault" in listing.stdout) == (0, True), listing.stderr
        call = subprocess.run(
            [*member, program("qrexec-client"), "--socket-dir", str(root / "sockets"),
             "-d", "vault", "root:echo from a member"], capture_output=True, timeout=60,
            env=host.env(0, VCHAN_SOCKET_DIR=str(root / "vchan")))
        assert (call.returncode, call.stdout) == (0, b"from a member\n"), call.stderr
        # A VM's services run as its user, who reaches their files as a member.
        who = world.run("call", "work", "vault", "test.Who")
        assert (who.returncode, who.stdout) == (0, f"{NOBODY}\n".encode()), who.stderr
        stranger = subprocess.run([*_as_user(STRANGER, STRANGER), *world.trio_cmd("vms")],
                                  capture_output=True, timeout=60, env=host.env(0))
        assert stranger.returncode != 0
        assert b"Permission denied" in stranger.stderr
    finally:
        status = world.stop()
    assert status == 0, (host.root / "world.log").read_text()[-3000:]
    assert not world.dir.exists()


@NEEDS_ROOT
def test_a_world_whose_user_is_not_in_its_group_is_refused(host: Host) -> None:
    _skip_unless_reachable_by_others()
    home = host.root / "nobody"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    host.root.chmod(0o711)
    config = host.root / "world.toml"
    config.write_text("[world]\ngroup = 'root'\n[vm.work]\n")
    result = subprocess.run(
        [*_as_user(NOBODY, NOBODY), program("qrexec-trio"), "world", str(config),
         "--dir", str(home / "w")], capture_output=True, timeout=60, env=host.env(0))
    assert result.returncode == 1
    assert b"cannot give" in result.stderr and b"'root'" in result.stderr, result.stderr
    assert not (home / "w").exists()


@pytest.mark.parametrize(("group", "umask"), [("members", 0o002), (None, 0o022)])
def test_run_and_call_let_a_shared_worlds_group_connect_to_their_data_vchan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: str | None, umask: int
) -> None:
    """The clients offer their data vchan as a file the world's programs connect
    to: in a world shared with a group, that file is the group's to write."""
    (tmp_path / "world.json").write_text(json.dumps({
        "vchan": "socket", "vchan_dir": str(tmp_path), "socket_dir": str(tmp_path),
        "qubesd_socket": str(tmp_path / "q"), "group": group,
        "vms": {"work": {"domid": 10, "runtime_dir": str(tmp_path)}}}))
    seen: list[int] = []

    def client_main(argv: list[str], **options: object) -> int:
        seen.append(os.umask(0o022))
        return 0

    # call and run run the clients in their own process, under the world's umask.
    monkeypatch.setattr(world_commands.client, "main", client_main)
    monkeypatch.setattr(world_commands.client_vm, "main", client_main)
    monkeypatch.setattr(world_commands.os, "environ", dict(os.environ))
    before = os.umask(0o022)
    try:
        for main, argv in ((world_commands.run_main, ["work", "true"]),
                           (world_commands.call_main, ["work", "work", "demo.Echo"])):
            assert main(["--world", str(tmp_path), *argv]) == 0
    finally:
        os.umask(before)
    assert seen == [umask, umask]
