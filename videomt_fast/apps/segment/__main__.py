"""``python -m videomt_fast.apps.segment``: the same as ``videomt-fast segment``."""

import sys

from videomt_fast.apps.segment.cli import main

sys.exit(main())
