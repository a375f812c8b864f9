"""Prints argv[1] numbered lines of argv[2] characters each, one very long line, a line that is
not UTF-8 and a last line without a newline, then sleeps."""

import sys
import time

count, width = int(sys.argv[1]), int(sys.argv[2])
for number in range(count):
    print(f"{number:06d} " + "x" * width)
print("y" * 20000)
sys.stdout.flush()
sys.stdout.buffer.write(b"bad \xff\xfe bytes\nno newline")
sys.stdout.flush()
time.sleep(600)
