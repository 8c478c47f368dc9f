"""vLLM as a user starts it, with SLEEPD_MODEL set: a server (`vllm serve DIR
--enable-sleep-mode`) and its HTTP endpoints, or a script on vLLM's Python API;
and the model as sleepctl reports it. Shared by this suite and tests/gpu."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

# What vLLM needs on these machines: nothing downloaded, a small CPU KV cache, the dev endpoints.
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1"}
# vLLM's defaults otherwise: torch.compile on, as users run it (vLLM's own sleep tests, tests/vllm_upstream,
# run with --enforce-eager where they set it).
FLAGS = ("--host", "127.0.0.1", "--dtype", "float32", "--max-num-seqs", "4", "--max-model-len", "256")
PROMPTS = ("hello world", "sleepd owns the memory", "a b c d")
STARTUP_SECONDS = 600  # two cores shared with other work: vLLM's start has taken two minutes
HERE = os.path.dirname(os.path.abspath(__file__))


def vllm_environment(daemon, model: str) -> dict:
    return {**os.environ, **ENVIRONMENT, "SLEEPD_MODEL": model, "SLEEPD_SOCKET": daemon.socket}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VllmServer:
    def __init__(self, daemon, model: str, checkpoint: str, log_path: str, *flags: str, environment=None):
        self.model, self.checkpoint = model, checkpoint
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [vllm, "serve", checkpoint, "--port", str(self.port), "--enable-sleep-mode", *FLAGS, *flags],
                env={**vllm_environment(daemon, model), **(environment or {})}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"vllm serve was not healthy after {STARTUP_SECONDS} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        with open(self.log_path) as log:
            return "".join(log.readlines()[-lines:])

    def call(self, method: str, path: str, body: dict | None = None, connection=None) -> dict:
        """One request, on a new connection or on `connection` (an http.client.HTTPConnection kept open)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if connection is not None:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            text = response.read().decode()
            assert response.status == 200, f"{method} {path}: {response.status} {text}"
            return json.loads(text) if text else {}
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=300) as response:
            text = response.read().decode()
        return json.loads(text) if text else {}

    def complete(self, prompt: str, max_tokens: int = 16, connection=None) -> str:
        """Greedy (temperature 0), so the same weights give the same text."""
        reply = self.call("POST", "/v1/completions", {"model": self.checkpoint, "prompt": prompt,
                                                       "max_tokens": max_tokens, "temperature": 0}, connection)
        return reply["choices"][0]["text"]

    def api_server_pids(self) -> list[int]:
        """The processes serving HTTP (several with --api-server-count), as their start lines name them."""
        with open(self.log_path) as log:
            return [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", log.read())]

    def connection_to_each_api_server(self, count: int) -> dict:
        """{pid: an open connection that this API server process took}, for each of the `count` API
        servers. Which process takes a connection is the kernel's choice, so connections are made until
        each has one."""
        deadline = time.monotonic() + STARTUP_SECONDS  # /health answers once the first of them is up
        while len(self.api_server_pids()) < count and time.monotonic() < deadline:
            time.sleep(1)
        pids, taken = self.api_server_pids(), {}
        for _ in range(100):
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            connection.connect()
            ours = connection.sock.getsockname()[1]
            owner = wait_for_owner(pids, ours)
            if owner in taken:
                connection.close()
            else:
                taken[owner] = connection
            if len(taken) == len(pids):
                return taken
        raise AssertionError(f"of API servers {pids}, only {sorted(taken)} took any of 100 connections")

    def answers(self) -> list[str]:
        return [self.complete(prompt) for prompt in PROMPTS]

    def is_sleeping(self) -> bool:
        return self.call("GET", "/is_sleeping")["is_sleeping"]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def wait_for_owner(pids: list[int], client_port: int) -> int:
    """Which of `pids` accepted the connection from our `client_port`."""
    import psutil

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in pids:
            if any(c.raddr and c.raddr.port == client_port for c in psutil.Process(pid).net_connections("tcp")):
                return pid
        time.sleep(0.05)
    raise AssertionError(f"none of {pids} accepted the connection from port {client_port} within 30 s")


def model_status(daemon, model: str) -> dict:
    (status,) = daemon.status(model)["models"]
    return status


def tag_states(daemon, model: str) -> dict:
    """{tag: region state} over every rank of the model, as sleepctl reports them."""
    states = {}
    for rank in model_status(daemon, model)["ranks"]:
        for region in rank["regions"]:
            states.setdefault(region["tag"], set()).add(region["state"])
    return {tag: "/".join(sorted(found)) for tag, found in states.items()}


ASLEEP = {"weights": "OFFLOADED", "kv_cache": "DISCARDED"}  # at level 1
AWAKE = {"weights": "MAPPED", "kv_cache": "MAPPED"}


def asleep(daemon, server: VllmServer) -> bool:
    """Whether vLLM and sleepd both say the server's model sleeps (at level 1); fails where they disagree."""
    vllm, sleepd = server.is_sleeping(), model_status(daemon, server.model)["sleeping"]
    assert vllm == sleepd, f"{server.model}: vLLM says sleeping={vllm}, sleepctl says sleeping={sleepd}"
    assert tag_states(daemon, server.model) == (ASLEEP if sleepd else AWAKE)
    return sleepd


def start_script(daemon, model: str, script: str, *args: str, environment: dict | None = None) -> subprocess.Popen:
    """One of this folder's vLLM scripts, attached as `model`; it prints its findings as a RESULT line."""
    env = {**vllm_environment(daemon, model), **(environment or {})}
    return subprocess.Popen([sys.executable, os.path.join(HERE, script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_rl_flow(daemon, model: str, *args: str) -> subprocess.Popen:
    """rl_flow.py (vLLM's Python API) attached as `model`."""
    # collective_rpc sends the loading function to the worker process pickled by value.
    return start_script(daemon, model, "rl_flow.py", *args, environment={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})


def script_result(process: subprocess.Popen, timeout: float, with_log: bool = False):
    """What a script from start_script printed as its RESULT, once it has exited successfully (and, with
    `with_log`, everything it and its vLLM printed)."""
    output, _ = process.communicate(timeout=timeout)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, f"{process.args[1]} failed ({process.returncode}):\n{output[-6000:]}"
    seen = json.loads(lines[-1][len("RESULT "):])
    return (seen, output) if with_log else seen
