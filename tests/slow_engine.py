"""An engine whose hooks take their time: a sleep or wake of it lasts more than a
second however small its memory, which is what sleepctl's progress bar needs.

    python slow_engine.py --socket S --model M --bytes N --delay SECONDS

Prints "ready" once attached, then waits for stdin to close.
"""

import argparse
import sys
import time

from sleepd.client import SleepClient


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--bytes", type=int, default=4 << 20)
    parser.add_argument("--delay", type=float, default=1.5)
    args = parser.parse_args()
    with SleepClient.connect(args.model, socket=args.socket) as client:
        client.on_sleep(lambda: time.sleep(args.delay))
        client.on_wake(lambda: time.sleep(args.delay))
        client.alloc(args.bytes, "weights").write(b"\1" * args.bytes)
        print("ready", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
