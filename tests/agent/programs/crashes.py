"""Crashes on start: one line on stderr, exit status argv[1] (default 1). With argv[2], it first
runs that many seconds (so that it counts as started) and then crashes."""

import sys
import time

if len(sys.argv) > 2:
    print("running", flush=True)
    time.sleep(float(sys.argv[2]))
print("crashing", file=sys.stderr, flush=True)
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
