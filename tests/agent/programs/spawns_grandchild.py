"""Starts a grandchild in its own process group (a plain child process), prints
"grandchild PID", then sleeps. With argv[1] == "exit", it exits 0 after printing instead, leaving
the grandchild behind."""

import subprocess
import sys
import time

grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(f"grandchild {grandchild.pid}", flush=True)
if sys.argv[1:] == ["exit"]:
    sys.exit(0)
while True:
    time.sleep(1)
