"""``python -m bench``: the side-by-side benchmark (same as ``videomt-fast bench``)."""

import sys

from videomt_fast.apps.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
