"""What the policy engine keeps loaded at rest, and the inotify calls it makes."""

from __future__ import annotations

import ctypes
import errno
import subprocess
import sys
import textwrap
from pathlib import Path

from qrexec_trio.policy._inotify import _load_libc as load_libc
from qrexec_trio.policy._inotify import open_watcher

_WATCHING_CACHE = textwrap.dedent("""
    import sys
    from qrexec_trio.policy import PolicyCache
    cache = PolicyCache(None, sys.argv[1])
    cache.policy()
    assert cache._watching, "inotify should be in use"
    print(sorted(name for name in ("cffi", "pycparser") if name in sys.modules))
""")


def test_a_watching_policy_cache_loads_no_c_parser(tmp_path: Path) -> None:
    # cffi's ABI mode parsed inotify's declarations with pycparser, which then
    # stayed in every daemon: 1.4 MiB of a daemon at rest.
    policy_d = tmp_path / "policy.d"
    policy_d.mkdir()
    (policy_d / "50-a.policy").write_text("demo.Echo * @anyvm @anyvm deny\n")
    result = subprocess.run([sys.executable, "-c", _WATCHING_CACHE, str(policy_d)],
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.splitlines()[-1] == "[]"  # after the log lines


def test_a_failed_watch_reports_its_errno(tmp_path: Path) -> None:
    watcher = open_watcher()
    assert watcher is not None
    try:
        missing = str(tmp_path / "missing").encode()
        assert load_libc().inotify_add_watch(watcher._fd, missing, 0x100) == -1
        assert ctypes.get_errno() == errno.ENOENT
    finally:
        watcher.close()
