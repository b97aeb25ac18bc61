"""``python -m qrexec_trio``: the ``qrexec-trio`` command."""

import sys

from .roles.umbrella import main

if __name__ == "__main__":
    sys.exit(main())
