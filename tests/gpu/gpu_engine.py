"""An engine process on a real GPU: weights and kv_cache allocated by torch
inside SleepClient.pool, driven by one-line JSON commands on stdin."""

import json
import sys

import torch

from sleepd.client import SleepClient


def main() -> None:
    socket, model, megabytes, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    client = SleepClient.connect(model, socket=socket)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    with client.pool("weights"):
        weights = torch.randn(megabytes << 18, device="cuda", generator=generator)  # 4-byte floats
    with client.pool("kv_cache"):
        kv = torch.ones(megabytes << 18, device="cuda")
    expected = weights.sum().item()
    print(json.dumps({"ready": True, "checksum": expected}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)["op"]
        if command == "check":
            torch.cuda.synchronize()
            print(json.dumps({"weights_ok": weights.sum().item() == expected, "kv_sum": kv.sum().item()}),
                  flush=True)
        elif command == "exit":
            break
    client.close()


if __name__ == "__main__":
    main()
