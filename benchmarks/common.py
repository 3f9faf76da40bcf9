"""Pieces every benchmark script shares: the CPU's name, writing `<name>.{json,md}`, child
processes."""

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


def run_child(script: str, env_var: str, payload, env: dict | None = None) -> dict:
    """Run `script` in a fresh Python process with `payload` (JSON) in `$env_var`, and return
    the JSON object it prints on its last line. A fresh process per measurement keeps one
    runtime's threads, caches and peak memory out of the next one's figures.

    Raises:
      RuntimeError with the end of the child's stderr if it fails.
    """
    import subprocess
    import sys

    child_env = dict(os.environ if env is None else env)
    child_env[env_var] = json.dumps(payload)
    res = subprocess.run(
        [sys.executable, os.path.abspath(script)], env=child_env, capture_output=True, text=True
    )
    if res.returncode:
        raise RuntimeError(f"{script} {payload} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def child_or_main(env_var: str, child, main) -> None:
    """A script's entry point: `child(*payload)` in a process that `run_child` started (the JSON
    payload in `$env_var`), else `main()`."""
    if os.environ.get(env_var):
        child(*json.loads(os.environ[env_var]))
    else:
        main()


def report_header(script: str, argv) -> dict:
    """The command (`python benchmarks/<script> ARGS`), UTC date and machine of a report."""
    import datetime
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    return {
        "command": " ".join(["python", f"benchmarks/{os.path.basename(script)}", *args]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.platform()}",
    }
