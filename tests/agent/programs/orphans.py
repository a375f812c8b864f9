"""Leaves an orphan: a child that starts a grandchild and exits at once; the grandchild, whose
parent is gone, exits itself after 0.3 s (and is then a zombie of whoever adopted it). Prints
"orphan PID" and keeps running."""

import os
import time

reader, writer = os.pipe()
child = os.fork()
if child == 0:
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(0.3)
        os._exit(0)
    os.write(writer, str(grandchild).encode())
    os._exit(0)
os.close(writer)
orphan = int(os.read(reader, 32))
os.waitpid(child, 0)
print(f"orphan {orphan}", flush=True)
while True:
    time.sleep(1)
