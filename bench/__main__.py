"""python -m sleepd.bench {host} [options]"""

import argparse
import sys

from . import host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sleepd.bench", description=__doc__)
    commands = parser.add_subparsers(dest="bench", required=True)
    host.add_arguments(commands.add_parser("host", help="sleep/wake throughput on the host backend vs memcpy"))
    args = parser.parse_args(argv)
    return {"host": host.run}[args.bench](args)


if __name__ == "__main__":
    sys.exit(main())
