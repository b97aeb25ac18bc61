"""The inotify watcher: every kind of change to a watched path is reported once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrexec_trio.policy._inotify import Watcher, open_watcher


@pytest.fixture
def watcher() -> Iterator[Watcher]:
    found = open_watcher()
    assert found is not None, "inotify is available on Linux"
    yield found
    found.close()


def test_a_file_edit_is_reported_once(tmp_path: Path, watcher: Watcher) -> None:
    policy = tmp_path / "50-a.policy"
    policy.write_text("x\n")
    assert watcher.watch_paths([str(tmp_path), str(policy)])
    assert not watcher.changed()
    policy.write_text("y\n")
    assert watcher.changed()
    assert not watcher.changed()


@pytest.mark.parametrize("change", ["create", "delete", "rename", "chmod"])
def test_entries_of_a_watched_directory(tmp_path: Path, watcher: Watcher, change: str) -> None:
    policy = tmp_path / "50-a.policy"
    policy.write_text("x\n")
    assert watcher.watch_paths([str(tmp_path), str(policy)])
    if change == "create":
        (tmp_path / "60-b.policy").write_text("")
    elif change == "delete":
        policy.unlink()
    elif change == "rename":
        policy.rename(tmp_path / "51-a.policy")
    else:
        policy.chmod(0o600)
    assert watcher.changed()


def test_a_missing_path_appearing_is_reported(tmp_path: Path, watcher: Watcher) -> None:
    missing = tmp_path / "policy.d" / "include" / "extra"
    assert watcher.watch_paths([str(missing)])
    (tmp_path / "policy.d").mkdir()
    assert watcher.changed()


def test_the_target_of_a_symlink_is_watched(tmp_path: Path, watcher: Watcher) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = elsewhere / "real.policy"
    real.write_text("x\n")
    policy_d = tmp_path / "policy.d"
    policy_d.mkdir()
    link = policy_d / "50-link.policy"
    link.symlink_to(real)
    assert watcher.watch_paths([str(policy_d), str(link)])
    assert not watcher.changed()
    real.write_text("y\n")
    assert watcher.changed()


def test_close_releases_the_descriptor(tmp_path: Path) -> None:
    found = open_watcher()
    assert found is not None
    fds_before = len(os.listdir("/proc/self/fd"))
    found.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before - 1
