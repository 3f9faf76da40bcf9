"""Orbax checkpoints: the train state, a JSON description of the run, and the data iterator.

This is the only module that talks to orbax. A checkpoint step folder holds three items:

- `state`: the `TrainState` pytree (params, per-part optimizer states, step, RNG key);
- `meta`: JSON with the task, library version, input spec (modalities, cube size, normalisation)
  and the full config, so that a checkpoint explains itself;
- `data`: the grain iterator position, so that a resumed run reads the batches it would have read
  (that of the last batch the loop consumed: `IteratorPosition`, as the loop reads ahead).

Orbax writes each step into a temporary folder (`<step>.orbax-checkpoint-tmp-*`) and renames it
when complete, so a crash during a save never leaves a half-written step that looks finished, and
the earlier steps are untouched; leftover temporary folders are removed when a `Checkpointer`
opens the folder. `restore_latest` falls back to the previous step when the newest one cannot be
read (a truncated or deleted file), and renames the unreadable folder aside instead of deleting it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from typing import Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from ssl3d_jax.errors import CheckpointError

log = logging.getLogger(__name__)

# Suffix of a step folder that could not be restored: orbax only lists folders named by a number.
UNREADABLE_SUFFIX = ".unreadable"


def _handlers() -> dict:
    return {
        "state": ocp.PyTreeCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }


class IteratorPosition:
    """A grain iterator's position (`iterator.get_state()`) taken at one moment, saved in place
    of the iterator (`Checkpointer.save(data_iter=...)`).

    The training loop reads its batches ahead, in a background thread (`DevicePrefetcher`):
    the live iterator's position is that of the last batch READ, while a checkpoint of step S
    must resume with batch S, the one after the last batch CONSUMED. grain's checkpoint handler
    writes `get_state()` of any object that is not a dataset iterator as text, so this writes
    the same file as the iterator would have at that moment.
    """

    def __init__(self, state: dict | bytes):
        # A snapshot, not a view of a dict the iterator may still change.
        self.state = state if isinstance(state, bytes) else json.loads(json.dumps(state))

    def get_state(self) -> bytes:
        if isinstance(self.state, bytes):  # a DataLoader iterator's state is already bytes
            return self.state
        return json.dumps(self.state, indent=4).encode()


class Checkpointer:
    """A `CheckpointManager` over `directory` with the items above and a keep-N policy."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, create: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))  # orbax refuses relative paths
        # Temporary folders are saves that a crash interrupted: never complete, safe to remove.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create, cleanup_tmp_directories=create
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_handlers()
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state, meta: dict, data_iter=None) -> None:
        """Asynchronous save of `state` (and the iterator position) at `step`.

        `data_iter`: a grain iterator (its position now is saved) or an `IteratorPosition`.
        """
        args = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self._mngr.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restore the full state (shapes/shardings from `abstract_state`) and the iterator."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        args = {"state": ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self._mngr.restore(step, args=ocp.args.Composite(**args))["state"]

    def restore_latest(
        self,
        abstract_state,
        data_iter=None,
        *,
        check_meta: Callable[[int, dict], None] | None = None,
    ):
        """Restore the newest readable step: state and (into `data_iter`) the iterator position.

        A step whose files cannot be read (truncated, deleted, corrupt) is skipped with a warning
        for an older one; once an older step restores, each skipped folder is renamed to
        `<step>.unreadable` (kept for inspection, ignored by orbax, so that a later save of the
        same step does not collide). Nothing is renamed when no step restores.

        Args:
          abstract_state: shape/dtype/sharding skeleton of the state (`common.abstract_like`).
          data_iter: grain iterator whose position is restored, or None.
          check_meta: `(step, meta) -> None`, may raise to refuse a checkpoint of another run
            (e.g. another task); its errors propagate, they do not count as damage.

        Returns:
          (step, state), or (None, None) when the folder holds no checkpoint.

        Raises:
          CheckpointError: every step is unreadable (naming each folder and its error), or the
            newest readable step holds parameters of other shapes than `abstract_state`.
        """
        failures: list[tuple[int, str]] = []  # (step, root cause of its read error)
        for step in sorted(self.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
                on_disk = _flatten(self.param_shapes(step))
            except Exception as e:  # any read error means an unreadable step
                failures.append((step, _short(e)))
                continue
            if check_meta is not None:
                check_meta(step, meta)
            self._check_fits(step, on_disk, abstract_state)
            try:
                state = self.restore(step, abstract_state, data_iter=data_iter)
            except Exception as e:
                failures.append((step, _short(e)))
                _collect_quietly()
                continue
            for bad, err in failures:
                self._set_aside(bad, err, fallback=step)
            if jax.process_count() > 1:
                # Unconditional: a process that listed the steps after process 0 renamed one
                # has no failures of its own, yet must meet the others here.
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("ssl3d_jax_checkpoint_restore_latest")
            if failures or jax.process_count() > 1:
                self._mngr.reload()
            return step, state
        if failures:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be read: "
                + "; ".join(f"{self._step_dir(s)}: {e}" for s, e in failures)
                + " (move them aside to start over)"
            )
        return None, None

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _check_fits(self, step: int, on_disk: dict, abstract_state) -> None:
        want = {k: tuple(v.shape) for k, v in _flatten(abstract_state.params).items()}
        have = {k: tuple(v.shape) for k, v in on_disk.items()}
        if want != have:
            diff = sorted(set(want) ^ set(have)) or sorted(
                k for k in want if want[k] != have.get(k)
            )
            raise CheckpointError(
                f"checkpoint {self._step_dir(step)} holds parameters that do not fit this run's "
                f"model (changed config? e.g. {diff[:4]}); use another --workdir"
            )

    def _set_aside(self, step: int, err: str, *, fallback: int) -> None:
        src = self._step_dir(step)
        dst = src + UNREADABLE_SUFFIX
        n = 1
        while os.path.exists(dst):
            dst, n = f"{src}{UNREADABLE_SUFFIX}-{n}", n + 1
        log.warning(
            "Checkpoint %s is unreadable (%s); resuming from step %d instead, and moving it to %s",
            src,
            err,
            fallback,
            dst,
        )
        if jax.process_index() == 0:  # one shared folder: one process renames
            os.rename(src, dst)

    def param_shapes(self, step: int) -> dict:
        """On-disk params as a nested dict of `jax.ShapeDtypeStruct`, read from metadata only."""
        metadata = self._mngr.item_metadata(step)["state"]
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            raise CheckpointError(f"{self._step_dir(step)}/state has no readable _METADATA")
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])

    def restore_params(self, step: int, abstract_params: dict) -> dict:
        """Restore only the params listed in `abstract_params` (partial restore, host numpy)."""
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        return self._mngr.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _collect_quietly() -> None:
    """Collect the reads that a failed orbax restore left behind now, without the tracebacks
    Python would print for each of them ('Exception ignored in: <coroutine ...>') whenever the
    garbage collector next ran: the failure has been reported once, as a warning."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _short(err: Exception, limit: int = 300) -> str:
    """The root cause of `err` on one line (orbax wraps tensorstore's 'OUT_OF_RANGE: Error
    reading ... in local file ...' into a long generic message)."""
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    root = seen[-1]
    text = f"{type(root).__name__}: {root}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _flatten(tree: dict) -> dict[str, object]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return flat


def open_pretrained(ckpt_dir: str | os.PathLike) -> Checkpointer:
    """A read-only `Checkpointer` over a pretraining run's `checkpoints` folder, or a
    `CheckpointError` that says what to set when the folder does not exist."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(
            f"pretraining checkpoint folder {os.fspath(ckpt_dir)} does not exist (set "
            "config.finetune.init_from, or run the pretraining first with config.mode)"
        )
    return Checkpointer(ckpt_dir, create=False)


def restore_encoder(ckpt_dir: str | os.PathLike, encoder_params: dict, *, part: str = "encoder"):
    """Load `params[part]` of the latest pretraining checkpoint into `encoder_params`.

    Mirrors big_vision's `merge_params` contract: every leaf of the target whose path exists in the
    checkpoint is loaded; shapes must agree; nothing matching is an error; leaves that stay at their
    initial value are logged. (The original fell back to Keras `load_weights(by_name=True,
    skip_mismatch=True)`, which could silently load nothing.)

    Args:
      ckpt_dir: the pretraining run's `checkpoints` folder.
      encoder_params: nested dict of arrays, the finetuning model's freshly initialised encoder.

    Returns:
      (params, report): the merged nested dict (loaded leaves as numpy arrays, others unchanged) and
      a dict with 'step', 'loaded', 'missing' (in the target, not in the checkpoint) and 'unused'
      (in the checkpoint, not in the target) leaf paths.

    Raises:
      CheckpointError: no checkpoint, no `params/<part>` in it, no matching leaf, or any matched
      leaf with a different shape.
    """
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    with open_pretrained(ckpt_dir) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint step in {ckpt_dir}")
        on_disk = ckpt.param_shapes(step)
        if part not in on_disk:
            raise CheckpointError(
                f"checkpoint {ckpt_dir}/{step} has no params/{part}; "
                f"its parts are {sorted(on_disk)}"
            )
        disk_flat = _flatten(on_disk[part])
        target_flat = _flatten(encoder_params)
        matched = sorted(set(disk_flat) & set(target_flat))
        if not matched:
            raise CheckpointError(
                f"no encoder parameter of the model matches checkpoint {ckpt_dir}/{step}: "
                "model has "
                f"{sorted(target_flat)[:5]}..., checkpoint has {sorted(disk_flat)[:5]}..."
            )
        bad = [
            f"{k}: checkpoint {tuple(disk_flat[k].shape)} "
            f"vs model {tuple(np.shape(target_flat[k]))}"
            for k in matched
            if tuple(disk_flat[k].shape) != tuple(np.shape(target_flat[k]))
        ]
        if bad:
            raise CheckpointError(
                f"encoder in {ckpt_dir}/{step} does not fit the model "
                "(wrong in_channels, widths or dimensionality?): " + "; ".join(bad[:8])
            )
        loaded = ckpt.restore_params(step, {part: on_disk[part]})[part]
    loaded_flat = _flatten(loaded)

    def pick(path, leaf):
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        return np.asarray(loaded_flat[key]) if key in loaded_flat else leaf

    merged = jax.tree_util.tree_map_with_path(pick, encoder_params)
    report = {
        "step": int(step),
        "loaded": matched,
        "missing": sorted(set(target_flat) - set(disk_flat)),
        "unused": sorted(set(disk_flat) - set(target_flat)),
    }
    by_module: dict[str, int] = {}
    for k in matched:
        by_module[k.split("/")[0]] = by_module.get(k.split("/")[0], 0) + 1
    log.info(
        "Restored %d encoder tensors from %s (step %d): %s",
        len(matched),
        ckpt_dir,
        step,
        ", ".join(f"{m} ({n})" for m, n in sorted(by_module.items())),
    )
    for k in report["missing"]:
        log.warning("  NOT in checkpoint, stays at its initial value: %s", k)
    return merged, report
