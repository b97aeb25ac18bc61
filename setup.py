"""Build the cffi vchan backends at install time (everything else is in pyproject.toml).

The shm ring is always built. The Xen backend needs Xen's libxenvchan header
(Debian: libxen-dev) and is built only where it exists; without it the
package installs and runs with the local backends, and says so here.
"""

import os
import sys

from setuptools import setup

XEN_HEADER = "/usr/include/libxenvchan.h"
modules = ["src/qrexec_trio/xen/_build_shm.py:ffi"]
if os.path.exists(XEN_HEADER) or os.environ.get("QREXEC_BUILD_XEN") == "1":
    modules.append("src/qrexec_trio/xen/_build_xen.py:ffi")
else:
    print(f"qrexec-trio: {XEN_HEADER} not found: the xen vchan backend is not built "
          "(install libxen-dev to build it)", file=sys.stderr)

setup(cffi_modules=modules)
