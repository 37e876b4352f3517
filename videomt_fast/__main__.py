import sys

from videomt_fast.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
