"""One soak client: allocate, fill, sleep at a random level, wake, verify, free,
over and over, printing a JSON line per cycle. Run by `python -m sleepd.bench soak`."""

import json
import random
import sys
import time

from sleepd.client import SleepClient

TAGS = ("weights", "kv_cache", "buffers")
# What a region holds after a sleep at each level and a wake: its bytes, or zeros.
KEPT = {0: set(TAGS), 1: {"weights", "buffers"}, 2: {"buffers"}}


def main() -> None:
    socket, model, device, seed, deadline = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
        float(sys.argv[5])
    rng = random.Random(seed)
    with SleepClient.connect(model, device=device, socket=socket) as client:
        while time.time() < deadline:
            regions = []
            for _ in range(rng.randint(1, 4)):
                tag = rng.choice(TAGS)
                data = rng.randbytes(rng.choice((64 << 10, 1 << 20, 3 << 20, 8 << 20)))
                region = client.alloc(len(data), tag)
                region.write(data)
                regions.append((region, data))
            level = rng.randint(0, 2)
            client.sleep(level=level)
            client.wake()
            verified = corrupted = 0
            for region, data in regions:
                expected = data if region.tag in KEPT[level] else bytes(len(data))
                actual = region.read()
                verified += len(data)
                if actual != expected:
                    corrupted += sum(a != b for a, b in zip(actual, expected))
                client.free(region)
            print(json.dumps({"verified": verified, "corrupted": corrupted}), flush=True)


if __name__ == "__main__":
    main()
