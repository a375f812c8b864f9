"""Runs until SIGTERM, printing a numbered line every 0.1 s (with a stderr line now and then);
exits 0 on SIGTERM. argv[1], when given, is the number of lines after which it exits 0 itself."""

import signal
import sys
import time


def main() -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else None
    count = 0
    while limit is None or count < limit:
        print(f"line {count}", flush=True)
        if count % 10 == 0:
            print(f"err {count}", file=sys.stderr, flush=True)
        count += 1
        time.sleep(0.1)


if __name__ == "__main__":
    main()
