"""Pieces every benchmark script shares: the CPU's name and writing `<name>.{json,md}`."""

from __future__ import annotations

import json
import os
import platform


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(out: str, name: str, result: dict, markdown: str) -> None:
    """`<out>/<name>.json` (the raw result) and `<out>/<name>.md` (its table)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(markdown)
    print(f"wrote {os.path.join(out, name)}.{{json,md}}")
