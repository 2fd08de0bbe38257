"""What machine a benchmark ran on, for its results file; and the results file of a CPU bench of
rows."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: str) -> str:
    """GPU name for a CUDA device, else the CPU model with its core count."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return f"{cpu_model()} ({os.cpu_count()} cpus)"


def write_rows(path: str, method: str, args: dict, rows: list[dict], device: str = "cpu") -> None:
    """bench/results/NAME.json of a bench that measures rows: machine, date, method, args, rows."""
    out = {"machine": device_name(device), "date": datetime.date.today().isoformat(), "method": method,
           "args": args, "rows": rows}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
