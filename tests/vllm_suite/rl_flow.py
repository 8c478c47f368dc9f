"""vLLM's RL weight-update flow through its Python API, as verl and OpenRLHF drive it,
run by test_vllm_weight_update.py in a process of its own (vLLM spawns processes, so the
`__main__` guard is needed). Prints one JSON line of what it saw.

    python rl_flow.py CHECKPOINT NEW_CHECKPOINT

The engine loads CHECKPOINT from disk and answers. Then two rounds of the flow, each a level-2
sleep, the weights back, a checkpoint loaded into the same tensors, the KV cache back: the first
loads NEW_CHECKPOINT, the second CHECKPOINT again, so that its answers are those the engine gave
when it loaded CHECKPOINT from disk, with no second engine to ask.
"""

import json
import subprocess
import sys

PROMPTS = ["hello world", "sleepd owns the memory", "a b c d"]


def load_checkpoint(worker, directory: str) -> int:
    """Runs in the vLLM worker: new weights into the model's existing tensors, as a trainer sends them."""
    import os

    from safetensors.torch import load_file

    weights = load_file(os.path.join(directory, "model.safetensors"))
    worker.model_runner.get_model().load_weights(weights.items())
    return len(weights)


def sleepd_status(model: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "sleepd.client.ctl", "--json", "status", "--model", model],
                         capture_output=True, text=True, check=True).stdout
    (status,) = json.loads(out)["models"]
    return {"sleeping": status["sleeping"],
            "tags": {region["tag"]: region["state"] for rank in status["ranks"] for region in rank["regions"]}}


def main() -> None:
    import os

    from vllm import LLM, SamplingParams

    checkpoint, new_checkpoint = sys.argv[1], sys.argv[2]
    model = os.environ["SLEEPD_MODEL"]
    llm = LLM(checkpoint, enable_sleep_mode=True, dtype="float32", max_num_seqs=4,
              max_model_len=256, kv_cache_memory_bytes=64 << 20)
    greedy = SamplingParams(temperature=0, max_tokens=16)

    def answers():
        return [list(output.outputs[0].token_ids) for output in llm.generate(PROMPTS, greedy, use_tqdm=False)]

    def states():
        return {"vllm": llm.llm_engine.is_sleeping(), "sleepd": sleepd_status(model)}

    seen = {"before": answers(), "updates": []}
    for directory in (new_checkpoint, checkpoint):
        llm.sleep(level=2)
        update = {"asleep": states()}
        llm.wake_up(tags=["weights"])
        update["weights_back"] = states()
        update["loaded"] = llm.collective_rpc(load_checkpoint, args=(directory,))
        llm.wake_up(tags=["kv_cache"])
        update["awake"] = states()
        update["answers"] = answers()
        seen["updates"].append(update)
    print("RESULT " + json.dumps(seen), flush=True)


if __name__ == "__main__":
    main()
