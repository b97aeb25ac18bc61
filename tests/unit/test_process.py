from __future__ import annotations

import os

import psutil
import trio

from qrexec_trio._config import Timeouts
from qrexec_trio.nursery import child_process, exit_status

FAST = Timeouts(kill_grace=0.5, cleanup=2.0)


def test_exit_status_mapping() -> None:
    assert exit_status(0) == 0
    assert exit_status(3) == 3
    assert exit_status(-15) == 143
    assert exit_status(-9) == 137


async def test_cancelling_the_scope_kills_the_whole_process_group() -> None:
    grandchildren: list[int] = []
    with trio.move_on_after(10) as deadline:
        async with child_process(
            ["sh", "-c", "sleep 100 & echo $!; exec sleep 100"], timeouts=FAST
        ) as proc:
            assert proc.stdout is not None
            line = await proc.stdout.receive_some(100)
            grandchildren.append(int(line.strip()))
            deadline.cancel()
            await trio.sleep_forever()
    assert proc.returncode is not None
    # The background sleep was in the same group: it goes too. It is not our
    # child, so its death is asynchronous to us; give it a moment.
    with trio.fail_after(5):
        while _alive(grandchildren[0]):  # noqa: ASYNC110 (polling another process)
            await trio.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_normal_exit_leaves_the_finished_child_reaped() -> None:
    async with child_process(["sh", "-c", "exit 4"], timeouts=FAST) as proc:
        assert exit_status(await proc.wait()) == 4


async def test_child_still_running_at_scope_end_is_terminated() -> None:
    async with child_process(["sleep", "100"], timeouts=FAST) as proc:
        pid = proc.pid
    assert proc.returncode == -15
    assert not psutil.pid_exists(pid)


async def test_term_ignoring_child_gets_killed_after_grace() -> None:
    script = "trap '' TERM; echo ready; while :; do sleep 0.05; done"
    with trio.move_on_after(10) as deadline:
        async with child_process(["sh", "-c", script], timeouts=FAST) as proc:
            assert proc.stdout is not None
            await proc.stdout.receive_some(10)
            deadline.cancel()
            await trio.sleep_forever()
    assert proc.returncode == -9


async def test_no_fd_leaks_into_children(tmp_path) -> None:
    leaked = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY)
    os.set_inheritable(leaked, True)
    try:
        async with child_process(["sh", "-c", f"test -e /proc/self/fd/{leaked} && echo leaked"],
                                 timeouts=FAST) as proc:
            assert proc.stdout is not None
            out = await proc.stdout.receive_some(100)
            await proc.wait()
    finally:
        os.close(leaked)
    assert out == b""


def test_ledger_lets_a_successor_kill_groups_left_behind(tmp_path) -> None:
    """A program killed outright leaves its services; the next one reads the ledger."""
    from qrexec_trio.nursery import GroupLedger

    ledger = GroupLedger(str(tmp_path / "groups"))
    import subprocess

    orphan = subprocess.Popen(["sleep", "100"], process_group=0)
    try:
        ledger.record(orphan.pid)
        # A recorded group whose leader was replaced by another process (a
        # different start time) is not touched.
        (tmp_path / "groups" / str(os.getpid())).write_text("1")
        successor = GroupLedger(str(tmp_path / "groups"))
        assert successor.reap_leftovers() == [orphan.pid]
        assert orphan.wait(5) == -9
        assert os.listdir(tmp_path / "groups") == []
        successor.remove_if_empty()
        assert not (tmp_path / "groups").exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


async def test_child_process_writes_its_group_down_while_it_runs(tmp_path) -> None:
    from qrexec_trio.nursery import GroupLedger

    ledger = GroupLedger(str(tmp_path / "groups"))
    async with child_process(["sleep", "100"], timeouts=FAST, ledger=ledger) as proc:
        assert os.listdir(tmp_path / "groups") == [str(proc.pid)]
    assert os.listdir(tmp_path / "groups") == []
