"""python -m sleepd.bench {host,gpu,swap,soak} [options]"""

import argparse
import sys

from . import gpu, host, soak, swap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sleepd.bench", description=__doc__)
    commands = parser.add_subparsers(dest="bench", required=True)
    host.add_arguments(commands.add_parser("host", help="sleep/wake throughput on the host backend vs memcpy"))
    gpu.add_arguments(commands.add_parser("gpu", help="sleep/wake on a GPU vs pinned bandwidth and the naive way"))
    swap.add_arguments(commands.add_parser("swap", help="overlapped swap vs sleep then wake"))
    soak.add_arguments(commands.add_parser("soak", help="many clients, random kills, bounded in time"))
    args = parser.parse_args(argv)
    return {"host": host.run, "gpu": gpu.run, "swap": swap.run, "soak": soak.run}[args.bench](args)


if __name__ == "__main__":
    sys.exit(main())
