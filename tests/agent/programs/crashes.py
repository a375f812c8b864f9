"""Crashes on start: one line on stderr, exit status argv[1] (default 1)."""

import sys

print("crashing", file=sys.stderr, flush=True)
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
