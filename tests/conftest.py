"""Shared fixtures. End-to-end fixtures live in tests/e2e/conftest.py."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The test helpers are importable as plain modules from tests/.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="qt-", dir=os.environ.get("QREXEC_TEST_TMP", "/tmp")))
    yield path
    shutil.rmtree(path, ignore_errors=True)
