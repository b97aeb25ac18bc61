"""Finding our own programs: the console scripts of this installation."""

from __future__ import annotations

import os
import shutil
import sys


def program(name: str) -> str:
    """One of our console scripts, from the same installation as this Python."""
    return shutil.which(name, path=os.path.dirname(sys.executable)) or name
