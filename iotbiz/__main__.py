"""`python -m iotbiz`: the operator CLI."""

import sys

from iotbiz.cli import main

if __name__ == "__main__":
    sys.exit(main())
