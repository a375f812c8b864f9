"""`python -m iotbiz.broker`: run the whole platform (same as `iotbiz serve`)."""

import sys

from iotbiz.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]], prog="python -m iotbiz.broker"))
