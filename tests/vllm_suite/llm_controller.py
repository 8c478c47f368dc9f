"""vLLM's Python API (`LLM`) on sleepd: its workers attach as ranks that need a
controller, and the LLM's own process attaches as that controller once its
engine is built. Run by test_vllm_controller.py in a process of its own (vLLM
spawns processes, so the `__main__` guard is needed). Prints one JSON line of
what it saw.

    python llm_controller.py CHECKPOINT
"""

import json
import os
import subprocess
import sys
import threading
import time

PROMPTS = ["hello world", "sleepd owns the memory", "a b c d"]


def sleepctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sleepd.client.ctl", *args], capture_output=True, text=True,
                          timeout=120)


def sleepd_status(model: str) -> dict:
    (status,) = json.loads(sleepctl("--json", "status", "--model", model).stdout)["models"]
    return {"sleeping": status["sleeping"], "controller_pid": status.get("controllerPid", 0),
            "tags": {region["tag"]: region["state"] for rank in status["ranks"] for region in rank["regions"]}}


def main() -> None:
    from vllm import LLM, SamplingParams

    model = os.environ["SLEEPD_MODEL"]
    # Eager: the mid-batch sleep test counts on steps as slow as eager ones, which compiled ones are not
    # (the LLM flow with vLLM's defaults, compile on, is rl_flow.py's and vLLM's own tests').
    llm = LLM(sys.argv[1], enable_sleep_mode=True, dtype="float32", enforce_eager=True, max_num_seqs=4,
              max_model_len=256, kv_cache_memory_bytes=64 << 20)
    greedy = SamplingParams(temperature=0, max_tokens=16)

    def answers():
        return [list(output.outputs[0].token_ids) for output in llm.generate(PROMPTS, greedy, use_tqdm=False)]

    seen = {"pid": os.getpid(), "before": answers(), "attached": sleepd_status(model)}
    slept = sleepctl("sleep", "--model", model, "--level", "1")
    seen["sleepctl_sleep"] = {"code": slept.returncode, "stderr": slept.stderr,
                              "status": sleepd_status(model), "vllm_sleeping": llm.llm_engine.is_sleeping()}
    seen["while_asleep"] = answers()  # the first request wakes it
    seen["after_request"] = {"status": sleepd_status(model), "vllm_sleeping": llm.llm_engine.is_sleeping()}
    # An outside sleep while generate() runs a batch larger than the engine takes at once: the sleep
    # lands between two steps, the requests still queued wake the model, and all are answered. sleepctl
    # starts once the batch is stepping. The batch outlasts its start: an engine core of its own runs
    # through about a thousand steps, and one in this process only as fast as the script's paced steps.
    # The engine's sleep notes how many requests were still unanswered once it had slept.
    batch = PROMPTS * 8
    many = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
    expected = [list(output.outputs[0].token_ids) for output in llm.generate(batch, many, use_tqdm=False)]
    engine, unanswered_at_sleep, stepping = llm.llm_engine, [], threading.Event()
    step, sleep = engine.step, engine.sleep

    def paced_step():
        time.sleep(0.01)
        outputs = step()
        stepping.set()
        return outputs

    def noting_sleep(*args, **kwargs):
        result = sleep(*args, **kwargs)
        unanswered_at_sleep.append(engine.get_num_unfinished_requests())
        return result

    engine.step, engine.sleep = paced_step, noting_sleep
    done = {}
    generating = threading.Thread(target=lambda: done.update(answers=[
        list(output.outputs[0].token_ids) for output in llm.generate(batch, many, use_tqdm=False)]))
    generating.start()
    stepping.wait(timeout=120)
    slept = sleepctl("sleep", "--model", model, "--level", "1")
    generating.join(timeout=300)
    del engine.step, engine.sleep
    seen["sleep_during_generate"] = {"code": slept.returncode, "stderr": slept.stderr[-2000:],
                                     "answered": done.get("answers") == expected,
                                     "unanswered_at_sleep": unanswered_at_sleep}
    llm.sleep(level=1)
    seen["own_sleep"] = sleepd_status(model)
    llm.wake_up()
    seen["after"] = answers()
    print("RESULT " + json.dumps(seen), flush=True)


if __name__ == "__main__":
    main()
