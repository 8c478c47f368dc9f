"""accept.json and accept.md: the environment, every stage, every figure, and
the README's performance goals beside the figures they judge."""

import json
from pathlib import Path


def targets(figures: dict) -> list[dict]:
    """(figure, target, met) rows; met is None where the figure is missing or cannot be trusted."""
    per_process = figures.get("torch.nvml_sees_processes", {}).get("value")
    rows = []

    def target(key: str, text: str, test, trusted: bool = True, note: str = "") -> None:
        value = figures.get(key, {}).get("value")
        if value is None:
            met, note = None, "not measured"
        elif not trusted:
            met = None
        else:
            met = bool(test(value))
        rows.append({"figure": key, "target": text, "met": met, "note": note})

    for row, pinned in (("first_sleep", "DtoH"), ("later_sleep", "DtoH"), ("first_wake", "HtoD"),
                        ("later_wake", "HtoD")):
        target(f"gpu.{row}_x_pinned", f">= 0.9 x pinned {pinned} bandwidth of the same run", lambda v: v >= 0.9)
    target("gpu.first_sleep_vs_naive", ">= 3 x faster than per-tensor offload into freshly pinned memory",
           lambda v: v >= 3)
    target("swap.swap_vs_sequential", "<= 0.6", lambda v: v <= 0.6)
    unverifiable = "NVML lists no process by the pids seen here (a PID namespace?), so 0 proves nothing"
    for key in ("torch.daemon_idle", "gpu.daemon_asleep"):
        target(key, "0 bytes: the daemon makes no CUDA context", lambda v: v == 0, trusted=per_process is not False,
               note="" if per_process is not False else unverifiable)
    target("torch.nvml_freed_share", ">= 0.95: NVML shows the model's bytes freed while asleep", lambda v: v >= 0.95)
    if figures.get("host.small_regions", {}).get("value") == 1000:
        target("host.small_regions_cycle", "< 50 ms for 1000 regions", lambda v: v < 50)
    return rows


def _cell(figure: dict | None) -> str:
    return f"{figure['value']} {figure['unit']}".strip() if figure else "-"


def write(outdir: Path, outcome: dict, environment: dict, stages: list[dict], figures: dict) -> None:
    rows = targets(figures)
    record = {**outcome, "environment": environment, "stages": stages, "figures": figures,
              "targets": [{**row, **{k: figures.get(row["figure"], {}).get(k) for k in ("label", "value", "unit")}}
                          for row in rows]}
    (outdir / "accept.json").write_text(json.dumps(record, indent=2) + "\n")

    met = sum(row["met"] is True for row in rows)
    lines = [f"# sleepd acceptance: {outcome['result']}", "", outcome["summary"], "",
             f"Started {outcome['started']}; took {outcome['seconds']:.0f} s of the {outcome['budget_seconds']} s "
             "allowed."]
    if environment:
        lines += ["", "| | |", "|---|---|"] + [f"| {item['label']} | {_cell(item)} |" for item in environment.values()]
    lines += ["", f"## Targets ({met} of {len(rows)} met)", "", "| figure | measured | target | met |",
              "|---|---|---|---|"]
    for row in rows:
        figure = figures.get(row["figure"])
        verdict = {True: "yes", False: "**no**", None: "?"}[row["met"]] + (f" ({row['note']})" if row["note"] else "")
        label = figure["label"] if figure else row["figure"]
        lines.append(f"| {label} | {_cell(figure)} | {row['target']} | {verdict} |")
    lines += ["", "## Stages", "", "| stage | status | seconds | limit | |", "|---|---|---|---|---|"]
    for stage in stages:
        seconds = f"{stage['seconds']:.1f}" if stage["seconds"] is not None else "-"
        lines.append(f"| {stage['title']} | {stage['status']} | {seconds} | {stage['limit_seconds']} | "
                     f"{stage['reason'] or ''} |")
    if figures:
        lines += ["", "## Every figure", "", "| key | figure | value |", "|---|---|---|"]
        lines += [f"| {key} | {figure['label']} | {_cell(figure)} |" for key, figure in figures.items()]
    (outdir / "accept.md").write_text("\n".join(lines) + "\n")
