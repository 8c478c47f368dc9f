"""A complete, small engine on sleepd: a tiny torch language model served by a loop.

    python examples/engine.py --model tiny                 # serve prompts from stdin, one per line
    python examples/engine.py --model tiny --demo          # serve, sleep, serve again, check, exit

What it shows, in the order an engine does it:

1. connect: one SleepClient per process (one rank of a model on one device);
2. adopt: the model's weights move into daemon-owned memory tagged "weights",
   packed into a few regions; the module keeps working on views of them;
3. alloc: a scratch buffer (the "KV cache" of this toy) tagged "kv_cache";
4. hooks: on_sleep pauses the serving loop before any memory goes; on_wake
   resumes it once every tag is back; a "weights" hook reloads the weights if
   they were discarded (level 2) rather than offloaded (level 1);
5. ensure_awake() before each request: the model may have been put to sleep by
   an operator (sleepctl), by eviction or by idle sleep since the last one.

It runs wherever sleepd runs: on the host backend the regions are CPU memory,
on a GPU they are CUDA memory, and the same code serves.
"""

import argparse
import sys
import threading

import torch

from sleepd.client import SleepClient

VOCAB, WIDTH, CONTEXT, NEW_TOKENS = 256, 64, 128, 24


class TinyLM(torch.nn.Module):
    """Bytes in, bytes out: an embedding, a two-layer MLP over a running context, a head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.mix = torch.nn.Sequential(torch.nn.Linear(2 * WIDTH, 4 * WIDTH), torch.nn.GELU(),
                                       torch.nn.Linear(4 * WIDTH, WIDTH))
        self.head = torch.nn.Linear(WIDTH, VOCAB)

    @torch.no_grad()
    def generate(self, prompt: bytes, cache: torch.Tensor) -> bytes:
        """Greedy decoding; `cache` (CONTEXT x WIDTH) holds the embeddings seen so far."""
        tokens = list(prompt[-CONTEXT // 2:]) or [0]
        cache.zero_()
        device = cache.device
        for position, token in enumerate(tokens):
            cache[position] = self.embed(torch.tensor(token, device=device))
        out = []
        for _ in range(NEW_TOKENS):
            length = len(tokens)
            context = cache[:length].mean(dim=0)
            hidden = self.mix(torch.cat([cache[length - 1], context]))
            token = int(self.head(hidden).argmax())
            out.append(token)
            tokens.append(token)
            if len(tokens) > CONTEXT:
                break
            cache[length] = self.embed(torch.tensor(token, device=device))
        return bytes(ord("a") + token % 26 for token in out)


class Engine:
    def __init__(self, client: SleepClient, checkpoint: dict[str, torch.Tensor]):
        self.client = client
        self.checkpoint = checkpoint  # what a real engine would read from disk again
        self.model = TinyLM().eval()
        self.model.load_state_dict(checkpoint)
        self.weights = client.adopt(self.model, tag="weights")
        self.kv = client.alloc(CONTEXT * WIDTH * 4, tag="kv_cache")
        self.cache = self.kv.tensor(torch.float32, (CONTEXT, WIDTH))   # a view of the region, no copy
        # The gate: a request runs only while the model is awake, and a sleep waits for it to finish.
        self._gate = threading.Lock()
        self._awake = True
        client.on_sleep(self._pause)
        client.on_wake(self._resume)
        client.on_wake(self._check_weights, tag="weights")

    def _pause(self) -> None:
        with self._gate:       # waits for the request in flight
            self._awake = False

    def _resume(self) -> None:
        with self._gate:
            self._awake = True

    def _check_weights(self) -> None:
        """Offloaded weights come back bit-identical; discarded ones come back as zeros: reload them
        into the same memory (same addresses, so nothing that points at them needs to change)."""
        state = self.model.state_dict()
        if not all(torch.equal(state[name].cpu(), value) for name, value in self.checkpoint.items()):
            with torch.no_grad():
                for name, value in self.checkpoint.items():
                    state[name].copy_(value)
            print("weights were discarded; reloaded them from the checkpoint", file=sys.stderr, flush=True)

    def serve(self, prompt: str) -> str:
        while True:
            self.client.ensure_awake()   # wakes the model (evicting others as policy allows) if it sleeps
            with self._gate:
                if self._awake:          # a sleep could have come between the two lines above
                    return self.model.generate(prompt.encode(), self.cache).decode()


def checkpoint() -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    return {name: value.clone() for name, value in TinyLM().state_dict().items()}


def demo(engine: Engine) -> int:
    prompts = ["hello", "sleep well", "wake up"]
    first = [engine.serve(prompt) for prompt in prompts]
    for level in (1, 2):
        engine.client.sleep(level=level)
        print(f"level {level}: asleep = {engine.client.is_sleeping()}")
        again = [engine.serve(prompt) for prompt in prompts]   # ensure_awake() wakes it
        same = again == first
        print(f"level {level}: woke on demand; same answers = {same}")
        if not same:
            return 1
    for prompt, answer in zip(prompts, first):
        print(f"{prompt!r} -> {answer!r}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="the model name sleepd knows this engine by")
    parser.add_argument("--device", type=int, default=0, help="this process's device number (sleepd finds the GPU by its UUID)")
    parser.add_argument("--socket", help="sleepd's socket (default $SLEEPD_SOCKET or the system socket)")
    parser.add_argument("--demo", action="store_true", help="serve, sleep at levels 1 and 2, serve again, check")
    args = parser.parse_args()

    with SleepClient.connect(args.model, rank=0, device=args.device, socket=args.socket) as client:
        engine = Engine(client, checkpoint())
        if args.demo:
            return demo(engine)
        print(f"serving {args.model}: one prompt per line", flush=True)
        for line in sys.stdin:
            print(engine.serve(line.rstrip("\n")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
