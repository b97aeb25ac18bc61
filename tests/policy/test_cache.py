"""The cached policy follows the files, and re-parses only what changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qrexec_trio.policy import PolicyCache

from .helpers import decide, policy_d, r2_dir, write


@pytest.fixture(autouse=True, params=["inotify", "stat"])
def change_detection(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: told of changes by the kernel, and checking files on each call."""
    if request.param == "stat":
        monkeypatch.setattr("qrexec_trio.policy._cache.open_watcher", lambda: None)
    return str(request.param)


def test_a_cached_evaluation_checks_no_file_until_one_changes(
    tmp_path: Path, change_detection: str
) -> None:
    root = policy_d(tmp_path, {"50-a.policy": "test.A * @anyvm @anyvm deny\n"})
    cache = PolicyCache(None, str(root))
    for _ in range(50):
        decide(cache, "work", "personal", "test.A")
    checks = cache.checks
    assert checks == (50 if change_detection == "stat" else 2)
    _bump(root / "50-a.policy", "test.A * @anyvm @anyvm allow\n")
    assert decide(cache, "work", "personal", "test.A").action.value == "allow"
    assert cache.loads == 2


def _bump(path: Path, text: str) -> None:
    """Rewrite ``path`` and move its mtime on, as a slow editor would."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_unchanged_policy_is_parsed_once(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"a.policy": "test.Svc * work personal allow\n",
                               "b.policy": "!include inc\n", "inc": "# nothing\n"})
    cache = PolicyCache(None, str(root))
    for _ in range(50):
        assert decide(cache, "work", "personal", "test.Svc").allowed
    assert cache.files_parsed == 3
    assert cache.loads == 1


def test_edited_file_is_seen_by_the_next_evaluation(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"a.policy": "test.Svc * work personal allow\n",
                               "b.policy": "# other\n", "c.policy": "# more\n"})
    cache = PolicyCache(None, str(root))
    assert decide(cache, "work", "personal", "test.Svc").allowed
    _bump(root / "a.policy", "test.Svc * work personal deny\n")
    assert not decide(cache, "work", "personal", "test.Svc").allowed
    # Only a.policy was parsed again.
    assert cache.files_parsed == 4
    assert cache.loads == 2


def test_same_size_edit_in_the_same_second_is_seen(tmp_path: Path) -> None:
    path = write(tmp_path / "d" / "a.policy", "test.Svc * work personal allow\n")
    cache = PolicyCache(None, str(tmp_path / "d"))
    assert decide(cache, "work", "personal", "test.Svc").allowed
    stat = path.stat()
    path.write_text("test.Svc * work personal deny \n")  # "deny " is as long as "allow"
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime and size unchanged
    # ctime still moved, so the change is noticed.
    assert not decide(cache, "work", "personal", "test.Svc").allowed


def test_replaced_file_is_seen(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"a.policy": "test.Svc * work personal allow\n"})
    cache = PolicyCache(None, str(root))
    assert decide(cache, "work", "personal", "test.Svc").allowed
    write(tmp_path / "new", "test.Svc * work personal deny\n")
    os.replace(tmp_path / "new", root / "a.policy")
    assert not decide(cache, "work", "personal", "test.Svc").allowed


def test_added_and_removed_files_are_seen(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"b.policy": "test.Svc * work personal allow\n"})
    cache = PolicyCache(None, str(root))
    assert decide(cache, "work", "personal", "test.Svc").allowed
    write(root / "a.policy", "test.Svc * work personal deny\n")
    assert not decide(cache, "work", "personal", "test.Svc").allowed
    assert cache.files_parsed == 2
    (root / "a.policy").unlink()
    assert decide(cache, "work", "personal", "test.Svc").allowed
    assert cache.files_parsed == 2  # b.policy's parse was kept


def test_edited_include_is_seen_and_includer_not_reparsed(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"a.policy": "!include inc/x\n",
                               "inc/x": "test.Svc * work personal allow\n"})
    cache = PolicyCache(None, str(root))
    assert decide(cache, "work", "personal", "test.Svc").allowed
    _bump(root / "inc" / "x", "test.Svc * work personal deny\n")
    assert not decide(cache, "work", "personal", "test.Svc").allowed
    assert cache.files_parsed == 3


def test_missing_include_appearing_later_clears_the_error(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"a.policy": "!include inc/x\n* * @anyvm @anyvm allow\n"})
    cache = PolicyCache(None, str(root))
    assert len(cache.policy().errors) == 1
    assert not decide(cache, "work", "personal", "test.Svc").allowed
    write(root / "inc" / "x", "# now here\n")
    assert cache.policy().errors == ()
    assert decide(cache, "work", "personal", "test.Svc").allowed


def test_policy_dir_created_later_is_seen(tmp_path: Path) -> None:
    cache = PolicyCache(str(tmp_path / "r2"), str(tmp_path / "d"))
    assert not decide(cache, "work", "personal", "test.Svc").allowed
    r2_dir(tmp_path, {"test.Svc": "work personal allow\n"})
    assert decide(cache, "work", "personal", "test.Svc").allowed


def test_edited_r2_file_is_seen(tmp_path: Path) -> None:
    root = r2_dir(tmp_path, {"test.Svc": "work personal allow\n",
                             "other.Svc": "work vault deny\n"})
    cache = PolicyCache(str(root), None)
    assert decide(cache, "work", "personal", "test.Svc").allowed
    _bump(root / "test.Svc", "work personal deny\n")
    assert not decide(cache, "work", "personal", "test.Svc").allowed
    assert cache.files_parsed == 3


def test_fixing_a_syntax_error_restores_service(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"a.policy": "* * @anyvm @anyvm allow\n", "b.policy": "oops\n"})
    cache = PolicyCache(None, str(root))
    assert not decide(cache, "work", "personal", "test.Svc").allowed
    _bump(root / "b.policy", "# fixed\n")
    assert decide(cache, "work", "personal", "test.Svc").allowed
