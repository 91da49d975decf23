"""``python -m toist_core.cli``: the ``toist`` command without installing the package."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
