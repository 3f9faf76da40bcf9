"""The command line: `ssl3d` (console script) and `python launch/main.py`, one code path.

    ssl3d --config=configs/rpl.py:smoke [--workdir=DIR] [--config.KEY=VALUE ...]
    ssl3d --list        # the config files and pretext tasks
    ssl3d --help        # config syntax, sizes, modes, outputs

This module only parses flags and dispatches to `ssl3d_jax.run.run(config, workdir)`. A
`--config` path that does not exist relative to the current directory is looked up in the
`configs` package's folder (the repository's `configs/` under `pip install -e .`), so
`ssl3d --config=configs/rpl.py:smoke` works from any directory. Notebooks use the same pieces:
`load_config("configs/rpl.py:smoke")` and `setup_runtime()`.
"""

from __future__ import annotations

import ast
import logging
import os
import pathlib
import re
import sys

from absl import app, flags
from absl import logging as absl_logging

from ssl3d_jax import config_files
from ssl3d_jax.config_files import (  # noqa: F401 — the CLI's names for notebooks and tests
    PROG,
    configs_dir,
    load_config,
    resolve_config_path,
    resolve_config_spec,
)

# What each `config.mode` does; a mode of `run.MODES` missing here is still listed by --help.
MODE_HELP = {
    "pretrain_finetune": "pretrain the task, then finetune and evaluate every arm (default)",
    "pretrain": "pretraining only (checkpoints under <workdir>/checkpoints)",
    "finetune": "finetune and evaluate from config.finetune.init_from or <workdir>/checkpoints",
    "preprocess": "fill the preprocessed-array cache of the dataset, then exit",
    "experiment": "the paper's label-fraction protocol for this task (results.{csv,md})",
    "sweep": "the protocol for every task in config.experiment.tasks (configs/sweep.py)",
    "visualize": "PNG figures of the task's inputs, predictions and curves in <workdir>/figures",
}

HELP = """\
{prog}: pretrain a 3D self-supervised pretext task (Taleb et al., NeurIPS 2020), finetune the
encoder and evaluate it. Same as `python launch/main.py ...` from the repository root.

Usage:
  {prog} --config=FILE[:ARG] [--workdir=DIR] [--config.KEY=VALUE ...]
  {prog} --list      the config files (with their ARGs) and the pretext tasks
  {prog} --help      this text; --helpfull lists every flag, absl's included

--config=FILE[:ARG]
  FILE is a Python file whose get_config(ARG) returns the config, e.g. configs/rpl.py. A FILE
  that does not exist relative to the current directory is looked up in the installed configs
  folder, so --config=configs/rpl.py, --config=rpl.py and --config=rpl work from any directory.
  Configs folder: {configs}
  ARG (after the colon) is a comma-separated size and dimensionality:
    smoke      seconds-scale, for tests and CI
    default    (or no ARG) the built-in phantom on a 2-core CPU in minutes
    paper      the paper's BraTS setting (128^3 volumes); needs an accelerator
    2d         axial slices with 2D encoders (3d, the default: volumes), e.g. :smoke,2d

--config.KEY=VALUE
  Overrides one key of the config, e.g. --config.data.root=/data/BraTS2021_Training
  --config.pretrain.num_steps=1000 --config.finetune.arms="('pretrained',)". Keys are locked: a
  mistyped key is an error. Every shared key is documented in configs/common.py; the run logs
  the whole config when it starts.

--config.mode=MODE (what the run does)
{modes}

Outputs go to --workdir (default ./workdir/<task>): checkpoints/ (pretraining), metrics.jsonl
(and TensorBoard events), splits.json, finetune/<arm>/ (checkpoints, test predictions as NIfTI),
results.json (Dice per arm), figures/ (mode visualize). Rerunning in the same workdir resumes.

Data: config.data.root unset means the built-in synthetic BraTS-layout phantom, generated once.
$SSL3D_JAX_CACHE (default ~/.cache/ssl3d_jax) holds it, the preprocessed arrays and the
persistent XLA compilation cache.
"""


# --- the listing ----------------------------------------------------------------------------------


def _module_info(path: pathlib.Path) -> tuple[str, set[str]]:
    """(summary of the docstring, names of the top-level functions) of a Python file, unrun."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return config_files.summary(ast.get_docstring(tree)), {
        n.name for n in tree.body if isinstance(n, ast.FunctionDef)
    }


def _accepted_args(path: pathlib.Path) -> tuple[str, str]:
    """(the ARGs that the config file's get_config accepts, its config.task)."""
    module = config_files.load_module(str(path))
    ok: dict[str, list[str]] = {"3d": [], "2d": []}
    task = ""
    for dims in ok:
        for size in config_files.SIZE_ARGS:
            try:
                config = module.get_config(f"{size},{dims}")
            except Exception:  # noqa: BLE001 — any failure means the ARG is not accepted
                continue
            ok[dims].append(size)
            task = task or str(config.get("task", ""))
    text = " | ".join(ok["3d"]) or "-"
    if ok["2d"] == ok["3d"] and ok["2d"]:
        text += "; append ,2d for 2D"
    elif ok["2d"]:
        text += "; 2D: " + " | ".join(f"{s},2d" for s in ok["2d"])
    return text, task


def task_names() -> list[str]:
    """The registered pretext tasks (`ssl3d_jax.tasks.names()`)."""
    from ssl3d_jax import tasks

    return list(tasks.names())


def list_text() -> str:
    """The text of `ssl3d --list`: config files with their ARGs, then the registered pretext
    tasks with their config files."""
    from ssl3d_jax import tasks

    folder = config_files.configs_dir()
    lines = [f"Config files (--config=configs/NAME.py[:ARG]; in {folder}):"]
    paths = sorted(folder.glob("*.py")) if folder else []
    # Config files of registered tasks outside the configs folder ($SSL3D_JAX_TASKS).
    paths += [
        pathlib.Path(f)
        for f in (tasks.config_file(n) for n in tasks.names())
        if os.path.isfile(f) and (folder is None or pathlib.Path(f).parent != folder)
    ]
    for path in paths:
        summary, functions = _module_info(path)
        if "get_config" not in functions:
            continue  # common.py, __init__.py
        args, task = _accepted_args(path)
        name = path.stem if folder is not None and path.parent == folder else str(path)
        lines.append(f"  {name:<10} {summary}")
        lines.append(f"  {'':<10} ARG: {args}" + (f"   (config.task={task!r})" if task else ""))
    lines.append("")
    lines.append(
        f"Pretext tasks (config.task; ssl3d_jax/tasks/NAME.py, or files in ${tasks.ENV_VAR}):"
    )
    for name, definition in tasks.registry().items():
        lines.append(f"  {name:<10} {definition.summary}")
    return "\n".join(lines)


def help_text() -> str:
    from ssl3d_jax import run

    modes = "\n".join(f"  {m:<18} {MODE_HELP.get(m, 'see ssl3d_jax/run.py')}" for m in run.MODES)
    text = HELP.format(prog=PROG, configs=configs_dir(), modes=modes)
    return text + "\nFlags:\n" + flags.FLAGS.module_help(__name__)


# --- running ------------------------------------------------------------------------------------

_FLAGS: dict = {}


def _define_flags() -> dict:
    # Defined on first use rather than at import, so that importing this module (notebooks:
    # load_config, setup_runtime) leaves the global absl flags alone.
    if not _FLAGS:
        from ml_collections import config_flags

        _FLAGS["config"] = config_flags.DEFINE_config_file(
            "config",
            None,
            "FILE[:ARG], e.g. configs/rpl.py:smoke (see above); --config.KEY=VALUE overrides.",
            lock_config=True,
        )
        _FLAGS["workdir"] = flags.DEFINE_string(
            "workdir", None, "Output folder. Default: ./workdir/<task>."
        )
        _FLAGS["list"] = flags.DEFINE_bool(
            "list", False, "List the config files and pretext tasks, then exit."
        )
    return _FLAGS


def setup_runtime(cache_dir: str | None = None) -> None:
    """What every run needs before it starts: the persistent XLA compilation cache, the
    library's log lines on stderr, and parsed absl flags (grain's worker processes read them).

    Args:
      cache_dir: default `$SSL3D_JAX_CACHE` or `~/.cache/ssl3d_jax`; compiles go to
        `<cache_dir>/jax_compile`.
    """
    import jax

    # A persistent compilation cache turns the ~10 s of XLA compiles of a rerun into a fraction.
    cache = (
        cache_dir or os.environ.get("SSL3D_JAX_CACHE") or os.path.expanduser("~/.cache/ssl3d_jax")
    )
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "jax_compile"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    # orbax and grain log every save and read through absl at INFO; keep their warnings only and
    # give the library's own progress lines a plain format.
    absl_logging.set_verbosity(absl_logging.WARNING)
    lib = logging.getLogger("ssl3d_jax")
    if not any(getattr(h, "_ssl3d", False) for h in lib.handlers):  # once per process
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._ssl3d = True
        lib.addHandler(handler)
    lib.setLevel(logging.INFO)
    lib.propagate = False
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _fail(message: str, code: int = 1):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _main(argv) -> None:
    f = _FLAGS
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]}; see `{PROG} --help`", 2)
    if f["list"].value:
        print(list_text())
        return
    if f["config"].value is None:
        _fail(f"--config is required, e.g. --config=configs/rpl.py:smoke; see `{PROG} --help`", 2)
    from ssl3d_jax import errors, run

    setup_runtime()
    log = logging.getLogger("ssl3d_jax.main")
    config = f["config"].value
    workdir = f["workdir"].value or os.path.join("workdir", config.task or "run")
    log.info("Config:\n%s", config)
    try:
        run.run(config, workdir)
    except errors.Ssl3dError as e:
        _fail(str(e))


def _parse_flags(argv):
    """absl's flag parsing, but a config key that does not exist is one line naming the flag.

    ml_collections raises a bare AttributeError / KeyError for `--config.pretrain.num_stepz=3`,
    which absl prints as a traceback; absl itself only reports its own `flags.Error` cleanly.
    """
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        text = str(e)
        hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
        key = hint.group(2) if hint else (re.findall(r"\w+", text) or ["?"])[0]
        flag = next(
            (
                a.split("=", 1)[0]
                for a in argv[1:]
                if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")
            ),
            "--config",
        )
        advice = f"did you mean {hint.group(1)!r}?" if hint else "see configs/common.py."
        _fail(f"{flag}: the config has no key {key!r}; {advice}")


def _resolve_argv(argv: list[str]) -> list[str]:
    """argv with the file of `--config=FILE[:ARG]` (or `--config FILE[:ARG]`) resolved by
    `resolve_config_path`; exits with one line when that file does not exist anywhere."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--":
            break
        m = re.fullmatch(r"(--?config=)(.*)", a)
        index = i if m else (i + 1 if a in ("--config", "-config") and i + 1 < len(out) else None)
        if index is None:
            continue
        prefix = m.group(1) if m else ""
        spec = resolve_config_spec(out[index][len(prefix) :])
        if not os.path.isfile(spec.partition(":")[0]):
            _fail(config_files.missing_config(out[index][len(prefix) :]), 2)
        out[index] = prefix + spec
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of `ssl3d` and `launch/main.py`; `argv` defaults to `sys.argv`."""
    argv = list(sys.argv if argv is None else argv)
    _define_flags()
    options = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    if any(a in ("-h", "-help", "--help", "--helpshort", "-?") for a in options):
        print(help_text())
        sys.exit(0)
    app.run(_main, argv=_resolve_argv(argv), flags_parser=_parse_flags)
