"""Learning-rate search of the pretext tasks on the validation split (never the test cases).

For every task and learning rate: pretrain at the given size on the `train` cases of the split,
measure the pretext loss and metrics on the held-out `val` cases (`pretrain/val` records of
metrics.jsonl), and pick per task the learning rate with the lowest final validation loss.
Writes `<out>.json` and `<out>.md` (default docs/results/pretext_lr_search) with the command,
machine, every run's numbers and the choice.

    python launch/pretext_lr_search.py --size=default --lrs=1e-4,3e-4,1e-3
    python launch/pretext_lr_search.py --tasks=rpl,jigsaw --workdir=/tmp/lr_search

Runs are resumed: a finished pretraining in the workdir is read back, not repeated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssl3d_jax import tasks  # noqa: E402

TASKS = tasks.names()


def _records(path: pathlib.Path, phase: str) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("phase") == phase:
            out.append(rec)
    return out


def _override(config, assignments) -> None:
    """`["rpl.grid_fraction=0.75", ...]` → config keys set (values parsed as Python literals)."""
    import ast

    for a in assignments:
        key, _, value = a.partition("=")
        *path, leaf = key.strip().split(".")
        section = config
        for p in path:
            section = section[p]
        try:
            section[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            section[leaf] = value


def search(
    tasks, lrs, *, size: str, workdir: str, steps: int | None, seed: int, overrides=()
) -> list[dict]:
    from ssl3d_jax import tasks as task_lib
    from ssl3d_jax.train import data as data_lib
    from ssl3d_jax.train import pretrain

    rows = []
    for task in tasks:
        for lr in lrs:
            config = tasks.task_config(task, size)
            with config.unlocked():
                config.pretrain.learning_rate = float(lr)
                config.seed = seed
                config.mode = "pretrain"
                config.tensorboard = False
                _override(
                    config,
                    [
                        o
                        for o in overrides
                        if o.split(".")[0] in (task, "pretrain", "data", "model")
                    ],
                )
                if steps:
                    config.pretrain.num_steps = int(steps)
                    config.pretrain.checkpoint_every = int(steps)
                # The held-out loss is the search's signal: measure it a few times per run.
                config.pretrain.knn_every = max(1, config.pretrain.num_steps // 4)
            dataset = data_lib.open_dataset(config)
            with config.unlocked():
                config.mode = "pretrain_finetune"  # a split with test and val cases
            split = data_lib.base_split(config, dataset)
            run_dir = pathlib.Path(workdir) / task / f"lr{lr:g}"
            t0 = time.time()
            pretrain.run(
                config,
                str(run_dir),
                dataset,
                data_lib.select(dataset.cases, split["train"]),
                val_cases=data_lib.select(dataset.cases, split["val"]),
            )
            wall = time.time() - t0
            chance = task_lib.get_task(config, in_channels=dataset.in_channels).chance
            train = _records(run_dir / "metrics.jsonl", "pretrain")
            val = _records(run_dir / "metrics.jsonl", "pretrain/val")
            rows.append(
                {
                    "task": task,
                    "learning_rate": float(lr),
                    "steps": config.pretrain.num_steps,
                    "batch_size": config.pretrain.batch_size,
                    "chance": chance,
                    "train_final": {k: v for k, v in train[-1].items() if _metric(k)},
                    "val": [{k: v for k, v in r.items() if _metric(k) or k == "step"} for r in val],
                    "wall_time_s": wall,
                    "num_train": len(split["train"]),
                    "num_val": len(split["val"]),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _metric(key: str) -> bool:
    return key not in (
        "phase",
        "step",
        "time",
        "steps_per_sec",
        "data_wait_fraction",
        "examples_per_sec",
    ) and not key.startswith("chance")


def choose(rows) -> dict[str, dict]:
    """Per task the row with the lowest final validation loss."""
    best = {}
    for r in rows:
        loss = r["val"][-1]["loss"]
        if r["task"] not in best or loss < best[r["task"]]["val"][-1]["loss"]:
            best[r["task"]] = r
    return best


def markdown(rows, best, *, command: str, header: str) -> str:
    lines = [
        "# Pretext learning-rate search (validation split)",
        "",
        header,
        "",
        f"Command: `{command}`",
        "",
        "Each run pretrains on the `train` cases of the split; the loss is measured on the",
        "held-out `val` cases (the same random pretext samples at every evaluation; test cases",
        "are never read). Chance: the loss / accuracy of a model that has learned nothing.",
        "The chosen learning rate per task (**bold**) has the lowest final validation loss.",
        "",
        "| task | lr | steps × batch | val loss (chance) | val loss / chance | val metrics | "
        "train loss (window mean) | wall |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        v = r["val"][-1]
        c = r["chance"].get("loss", float("nan"))
        chosen = best[r["task"]] is r
        others = ", ".join(
            f"{k} {v[k]:.3g}" + (f" (chance {r['chance'][k]:.3g})" if k in r["chance"] else "")
            for k in sorted(v)
            if k not in ("loss", "step")
        )
        lr = f"**{r['learning_rate']:g}**" if chosen else f"{r['learning_rate']:g}"
        curve = " → ".join(f"{x['loss']:.3g}" for x in r["val"])
        lines.append(
            f"| {r['task']} | {lr} | {r['steps']} × {r['batch_size']} | {curve} ({c:.3g}) | "
            f"{v['loss'] / c:.2f} | {others} | {r['train_final'].get('loss', float('nan')):.3g} | "
            f"{r['wall_time_s']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    parser.add_argument("--size", default="default")
    parser.add_argument("--steps", type=int, default=None, help="override pretrain.num_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="config override for the tasks it names, e.g. --set=rpl.grid_fraction=0.75",
    )
    parser.add_argument("--workdir", default="/tmp/ssl3d_lr_search")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "pretext_lr_search"))
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tasks = [t for t in args.tasks.split(",") if t]
    lrs = [float(x) for x in args.lrs.split(",") if x]
    t0 = time.time()
    start = datetime.datetime.now(datetime.timezone.utc)
    from ssl3d_jax.audit import git_commit, machine_description

    rows = search(
        tasks,
        lrs,
        size=args.size,
        workdir=args.workdir,
        steps=args.steps,
        seed=args.seed,
        overrides=args.set,
    )
    best = choose(rows)
    command = "python launch/pretext_lr_search.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    header = (
        f"Run {start:%Y-%m-%d %H:%M} UTC, commit {git_commit()}, {machine_description()}; "
        f"size `{args.size}`, seed {args.seed}; {time.time() - t0:.0f} s in all."
    )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": command,
        "header": header,
        "rows": rows,
        "chosen": {t: r["learning_rate"] for t, r in best.items()},
    }
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, best, command=command, header=header))
    print(json.dumps(doc["chosen"]))


if __name__ == "__main__":
    main()
