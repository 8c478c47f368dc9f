"""Figures out of what the benchmarks and pytest print, for accept.json. A line
that is not found leaves its figures out, and the report says "not measured"."""

import re

_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def figure(label: str, value, unit: str = "") -> dict:
    return {"label": label, "value": value, "unit": unit}


def _search(pattern: str, text: str):
    return re.search(pattern, text, re.MULTILINE)


def _bytes(text: str) -> int:
    """A size as sleepd's format_size prints it ("512.0 MiB", "0 B")."""
    number, unit = text.split()
    return int(float(number) * _UNITS[unit])


def gpu(text: str) -> dict:
    """python -m sleepd.bench gpu"""
    found = {}
    if match := _search(rf"raw pinned copy: DtoH {_NUMBER} GiB/s, HtoD {_NUMBER} GiB/s", text):
        found["pinned_dtoh"] = figure("pinned copy, device to host", float(match[1]), "GiB/s")
        found["pinned_htod"] = figure("pinned copy, host to device", float(match[2]), "GiB/s")
    if match := _search(r"^(\S+ \S+) of weights in (\d+) tensors", text):
        found["size"] = figure("weights slept and woken", match[1])
    rows = {"first sleep (DtoH)": "first_sleep", "later sleeps, median": "later_sleep",
            "first wake (HtoD)": "first_wake", "later wakes, median": "later_wake"}
    for name, key in rows.items():
        if match := _search(rf"^\s+{re.escape(name)}\s+{_NUMBER} s\s+{_NUMBER} GiB/s\s+{_NUMBER} x pinned", text):
            found[f"{key}_seconds"] = figure(name, float(match[1]), "s")
            found[f"{key}_rate"] = figure(name, float(match[2]), "GiB/s")
            found[f"{key}_x_pinned"] = figure(f"{name}, against pinned bandwidth", float(match[3]), "x")
    if match := _search(rf"naive per-tensor offload\s+{_NUMBER} s, restore {_NUMBER} s; first sleep is {_NUMBER} x "
                        rf"faster, first wake {_NUMBER} x", text):
        found["naive_offload_seconds"] = figure("per-tensor offload into freshly pinned memory", float(match[1]), "s")
        found["naive_restore_seconds"] = figure("per-tensor restore", float(match[2]), "s")
        found["first_sleep_vs_naive"] = figure("first sleep, against per-tensor offload", float(match[3]), "x faster")
        found["first_wake_vs_naive"] = figure("first wake, against per-tensor restore", float(match[4]), "x faster")
    if match := _search(rf"level 2: sleep {_NUMBER} ms, wake {_NUMBER} ms", text):
        found["level2_sleep"] = figure("level-2 sleep", float(match[1]), "ms")
        found["level2_wake"] = figure("level-2 wake", float(match[2]), "ms")
    if match := _search(r"left while asleep: engine (\S+ \S+) \(.*\), daemon (\S+ \S+)", text):
        found["engine_asleep"] = figure("engine's device memory while asleep (NVML)", _bytes(match[1]), "bytes")
        found["daemon_asleep"] = figure("daemon's device memory while asleep (NVML)", _bytes(match[2]), "bytes")
    return found


def swap(text: str) -> dict:
    """python -m sleepd.bench swap"""
    found = {}
    lines = {"sequential_seconds": (rf"sleep\(A\) then wake\(B\):\s+{_NUMBER} s", "sleep(A) then wake(B)", "s"),
             "swap_seconds": (rf"swap A -> B:\s+{_NUMBER} s", "swap A -> B", "s"),
             "swap_vs_sequential": (rf"swap / sequential:\s+{_NUMBER}", "swap / (sleep A + wake B)", "x"),
             "apart_seconds": (rf"one after the other:\s+{_NUMBER} s", "sleep(A), wake(B) one after the other", "s"),
             "together_seconds": (rf"at the same time:\s+{_NUMBER} s", "sleep(A), wake(B) at the same time", "s"),
             "together_vs_apart": (rf"together / apart:\s+{_NUMBER}", "at the same time / one after the other", "x")}
    for key, (pattern, label, unit) in lines.items():
        if match := _search(pattern, text):
            found[key] = figure(label, float(match[1]), unit)
    return found


def host(text: str) -> dict:
    """python -m sleepd.bench host"""
    found = {}
    if match := _search(rf"plain memcpy, 1 thread, .*: {_NUMBER} GiB/s", text):
        found["memcpy"] = figure("plain memcpy, one thread", float(match[1]), "GiB/s")
    for name, key in (("sleep (offload)", "sleep"), ("wake (restore)", "wake")):
        if match := _search(rf"{re.escape(name)}\s+first\s+{_NUMBER} GiB/s \({_NUMBER} x memcpy\)\s+median\s+"
                            rf"{_NUMBER} GiB/s \({_NUMBER} x memcpy\)", text):
            found[f"{key}_first"] = figure(f"host {name}, first", float(match[1]), "GiB/s")
            found[f"{key}_median"] = figure(f"host {name}, median", float(match[3]), "GiB/s")
            found[f"{key}_median_x_memcpy"] = figure(f"host {name}, median, against memcpy", float(match[4]), "x")
    if match := _search(rf"level-2 sleep \+ wake of a model with (\d+) small regions.*median {_NUMBER} ms", text):
        found["small_regions"] = figure("regions of the many-small-regions model", int(match[1]))
        found["small_regions_cycle"] = figure("level-2 sleep + wake of that model, median", float(match[2]), "ms")
    return found


def pytest(text: str) -> dict:
    """The summary line of pytest -q."""
    found = {}
    summaries = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", line)
                 and re.search(r" in [0-9.]+s", line)]
    if summaries:
        for count, outcome in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", summaries[-1]):
            key = "errors" if outcome.startswith("error") else outcome
            found[key] = figure(f"tests {key}", int(count))
    return found
