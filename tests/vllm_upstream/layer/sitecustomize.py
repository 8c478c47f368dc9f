"""Loaded by every Python process of a run of vLLM's own tests (this folder is on their PYTHONPATH),
including the fresh interpreters vLLM's `create_new_process_for_each_test("spawn")` starts.

The one query vLLM's sleep-mode tests make that a CPU cannot answer is the accelerator's memory
(`torch.accelerator.get_memory_info()`): on CPU there is no accelerator, and sleepd's host backend
keeps "device" memory in the host's RAM. So the answer is the host's: (MemAvailable, MemTotal).
Nothing else is changed. torch is not imported here; the query is replaced when torch imports it."""

import os
import sys


def host_memory_info(device=None) -> tuple[int, int]:
    fields = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["MemAvailable"], fields["MemTotal"]


class _ReplaceWhenImported:
    """A meta-path finder that lets torch.accelerator load as usual, then replaces its query."""

    def find_spec(self, name, path, target=None):
        if name != "torch.accelerator":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.get_memory_info = host_memory_info

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("SLEEPD_VLLM_TESTS_HOST_MEMORY") == "1":
    sys.meta_path.insert(0, _ReplaceWhenImported())
