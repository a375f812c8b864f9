"""Fails to start twice, then starts, over and over: counts its runs in the file argv[1]; runs
1, 2, 4, 5, 7... crash at once (exit 1), runs 3, 6, 9... run argv[2] seconds, then exit 1."""

import sys
import time
from pathlib import Path

counter = Path(sys.argv[1])
run = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(run))
print(f"run {run}", flush=True)
if run % 3 == 0:
    time.sleep(float(sys.argv[2]))
sys.exit(1)
