"""vLLM's AsyncLLM used directly (as an RL framework's own server does) on sleepd:
the process attaches as the model's controller, so `sleepctl sleep` runs the
engine's own sleep, and a generate() while asleep wakes it. Run by
test_vllm_controller.py in a process of its own; prints one JSON line.

    python async_llm_controller.py CHECKPOINT
"""

import asyncio
import json
import os
import sys

from llm_controller import PROMPTS, sleepctl, sleepd_status


async def answers(engine, sampling) -> list[list[int]]:
    async def one(index, prompt):
        async for output in engine.generate(prompt, sampling, request_id=f"r{index}-{os.urandom(4).hex()}"):
            final = output
        return list(final.outputs[0].token_ids)

    return list(await asyncio.gather(*(one(index, prompt) for index, prompt in enumerate(PROMPTS))))


async def run(checkpoint: str) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    model = os.environ["SLEEPD_MODEL"]
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=checkpoint, enable_sleep_mode=True, dtype="float32", max_num_seqs=4,
        max_model_len=256, kv_cache_memory_bytes=64 << 20))
    greedy = SamplingParams(temperature=0, max_tokens=16)
    try:
        seen = {"pid": os.getpid(), "before": await answers(engine, greedy)}
        seen["attached"] = await asyncio.to_thread(sleepd_status, model)
        slept = await asyncio.to_thread(sleepctl, "sleep", "--model", model, "--level", "1")  # the loop serves it
        seen["sleepctl_sleep"] = {"code": slept.returncode, "stderr": slept.stderr,
                                  "status": await asyncio.to_thread(sleepd_status, model),
                                  "vllm_sleeping": await engine.is_sleeping()}
        seen["while_asleep"] = await answers(engine, greedy)  # wakes it
        seen["after"] = {"status": await asyncio.to_thread(sleepd_status, model),
                         "vllm_sleeping": await engine.is_sleeping()}
        return seen
    finally:
        engine.shutdown()


if __name__ == "__main__":
    print("RESULT " + json.dumps(asyncio.run(run(sys.argv[1]))), flush=True)
