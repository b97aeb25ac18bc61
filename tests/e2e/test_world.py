"""The local world: one config file, every program a real process; DispVMs
made for one call and destroyed with it, whatever ends the call."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from harness import Host, program, wait_for

from .worlds import CONFIG, RunningWorld


def test_world_comes_up_serves_and_goes_down_leaving_nothing(host: Host) -> None:
    world = RunningWorld(host, CONFIG)
    state = json.loads((world.dir / "world.json").read_text())
    assert set(state["vms"]) == {"work", "vault", "dvm"}
    summary = world.proc.stdout.readline() if world.proc.stdout else b""
    assert summary.startswith(b"world ready in ")
    result = world.run("run", "work", "echo hello from work")
    assert (result.returncode, result.stdout) == (0, b"hello from work\n")
    result = world.run("call", "work", "vault", "demo.Echo", input=b"hi\n")
    assert (result.returncode, result.stdout) == (0, b"vault\nhi\n")
    listing = world.run("vms")
    assert b"work" in listing.stdout and b"AdminVM" in listing.stdout
    assert world.stop() == 0
    assert not world.dir.exists()
    wait_for(lambda: not host.leftovers(), what="every process of the world to be gone")


def test_dispvm_call_creates_and_destroys_one(world: RunningWorld) -> None:
    result = world.run("call", "work", "@dispvm", "demo.Reverse", input=b"stressed\n")
    assert (result.returncode, result.stdout) == (0, b"desserts\n"), result.stderr
    wait_for(lambda: not world.dispvms(), what="the DispVM to be destroyed")


def _held_call(world: RunningWorld) -> subprocess.Popen[bytes]:
    call = world.start("call", "work", "@dispvm", "demo.Hold", stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)
    assert call.stdout is not None
    assert call.stdout.readline() == b"held\n"
    assert len(world.dispvms()) == 1
    return call


def test_dispvm_destroyed_when_the_caller_is_killed(world: RunningWorld) -> None:
    call = _held_call(world)
    call.send_signal(signal.SIGKILL)
    call.wait()
    wait_for(lambda: not world.dispvms(), what="the DispVM to be destroyed")


def test_dispvm_destroyed_when_the_call_is_cancelled(world: RunningWorld) -> None:
    call = _held_call(world)
    call.send_signal(signal.SIGINT)  # Ctrl-C: the caller cancels its call
    call.wait(30)
    wait_for(lambda: not world.dispvms(), what="the DispVM to be destroyed")


def test_dispvm_destroyed_when_the_world_stops_mid_call(world: RunningWorld,
                                                        host: Host) -> None:
    call = _held_call(world)
    assert world.stop() == 0
    assert call.wait(30) != 0
    assert not world.dir.exists()
    wait_for(lambda: not host.leftovers(), what="every process of the world to be gone")


def test_twenty_dispvm_calls_in_parallel_leave_none_behind(world: RunningWorld) -> None:
    calls = [world.start("call", "work", "@dispvm", "demo.Reverse", stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(20)]
    for number, call in enumerate(calls):
        out, err = call.communicate(f"call {number}\n".encode(), timeout=180)
        assert call.returncode == 0, err
        assert out == f"call {number}\n"[::-1][1:].encode() + b"\n"
    # The world kills its VMs one at a time: twenty take a while on a busy machine.
    wait_for(lambda: not world.dispvms(), timeout=120, what="every DispVM to be destroyed")


def test_qfile_daemon_dvm_runs_one_call_in_a_new_dispvm(world: RunningWorld,
                                                       host: Host) -> None:
    state = json.loads((world.dir / "world.json").read_text())
    result = subprocess.run(
        [program("qfile-daemon-dvm"), "--qubesd-socket", state["qubesd_socket"],
         "--socket-dir", state["socket_dir"], "demo.Reverse", "work", "DEFAULT"],
        input=b"abc\n", capture_output=True, timeout=60,
        env=host.env(0, VCHAN_SOCKET_DIR=state["vchan_dir"]))
    assert (result.returncode, result.stdout) == (0, b"cba\n"), result.stderr
    wait_for(lambda: not world.dispvms(), what="the DispVM to be destroyed")


def test_dispvm_that_fails_to_start_is_refused_and_removed(world: RunningWorld) -> None:
    # Fault injection: a file squats the control vchan name of the first DispVM
    # (domid 1000), so its agent cannot start.
    squatter = world.dir / "vchan" / "vchan.1000.0.512.sock"
    squatter.write_text("squatter")
    result = world.run("call", "work", "@dispvm", "demo.Reverse", input=b"x")
    assert result.returncode == 126
    assert b"qrexec-trio: call refused" in result.stderr
    wait_for(lambda: not world.dispvms(), what="the half-made DispVM to be removed")
    # The world goes on: without the squatter, the next DispVM works.
    squatter.unlink()
    result = world.run("call", "work", "@dispvm", "demo.Reverse", input=b"ok\n")
    assert (result.returncode, result.stdout) == (0, b"ko\n")


@pytest.mark.parametrize(("text", "line"), [
    ("[vm.a]\n[vm.a]\n", 2),
    ("[vm.a]\ndefault_dispvm = \"nope\"\n", 2),
])
def test_bad_config_is_reported_with_file_and_line_before_anything_starts(
    host: Host, text: str, line: int
) -> None:
    config = host.root / "bad.toml"
    config.write_text(text)
    result = subprocess.run(
        [program("qrexec-trio"), "world", str(config), "--dir", str(host.root / "w")],
        capture_output=True, timeout=30, env=host.env(0))
    assert result.returncode == 1
    assert f"{config}:{line}:".encode() in result.stderr
    assert not (host.root / "w").exists()
